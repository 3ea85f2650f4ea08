"""The converted-weights cache (backends/local/model_cache.py): entries are complete or absent, keyed by the
GGUF file, identical bit for bit to what they were saved from, and safe when several processes write one.

Tiny random models check the mechanics in milliseconds; one `model` test checks that the bundled SmolLM2's
second load reads the cache and gives the same weights and tokenizer as a load straight from the GGUF.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.local import loader, model_cache  # noqa: E402
from backends.local.chat_tokenizer import ChatTokenizer  # noqa: E402
from backends.local.loader import DEFAULT_MODEL_SPEC, ModelSource, load_model, resolve_spec  # noqa: E402
from tests.support.tiny_models import tiny_hf_model  # noqa: E402


class StubTokenizer:
    def save_pretrained(self, path: str | Path) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")


def a_gguf(tmp_path: Path, content: bytes = b"GGUF") -> Path:
    path = tmp_path / "Tiny-1M.Q4_1.gguf"
    path.write_bytes(content)
    return path


def same_weights(a: Any, b: Any) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # tied and untied lm_head
def test_an_entry_holds_the_same_weights(tmp_path: Path, kind: str) -> None:
    model = tiny_hf_model(kind)
    gguf = a_gguf(tmp_path)
    entry = model_cache.entry_path(gguf, tmp_path / "cache")
    assert not model_cache.is_complete(entry)
    assert model_cache.save_entry(model, StubTokenizer(), gguf, entry)
    assert model_cache.is_complete(entry)
    assert orjson.loads((entry / model_cache.MANIFEST).read_bytes())["source"] == str(gguf)
    again = transformers.AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32)
    assert same_weights(model, again)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no partial directory left behind


def test_the_key_follows_the_file_and_the_library(tmp_path: Path) -> None:
    gguf = a_gguf(tmp_path)
    first = model_cache.entry_path(gguf, tmp_path)
    assert first.parent == tmp_path / "models"
    assert first.name.startswith("Tiny-1M.Q4_1-4-") and f"-tf{transformers.__version__}-" in first.name
    gguf.write_bytes(b"GGUF, another model")
    assert model_cache.entry_path(gguf, tmp_path) != first


def test_the_default_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(model_cache.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert model_cache.default_cache_root() == tmp_path / "c"
    monkeypatch.delenv(model_cache.CACHE_DIR_ENV)
    assert model_cache.default_cache_root() == Path.home() / ".cache" / "switchboard"


def test_a_second_writer_keeps_the_first_entry(tmp_path: Path) -> None:
    gguf = a_gguf(tmp_path)
    entry = model_cache.entry_path(gguf, tmp_path)
    first = tiny_hf_model("llama", seed=1)
    assert model_cache.save_entry(first, StubTokenizer(), gguf, entry)
    manifest = (entry / model_cache.MANIFEST).read_bytes()
    # Another process that converted at the same time finishes second: its rename fails, its copy goes.
    assert model_cache.save_entry(tiny_hf_model("llama", seed=2), StubTokenizer(), gguf, entry)
    assert (entry / model_cache.MANIFEST).read_bytes() == manifest
    again = transformers.AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32)
    assert same_weights(first, again)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_stale_partial_directories_are_removed(tmp_path: Path) -> None:
    gguf = a_gguf(tmp_path)
    entry = model_cache.entry_path(gguf, tmp_path)
    entry.parent.mkdir(parents=True)
    stale, fresh = entry.parent / ".partial-dead", entry.parent / ".partial-busy"
    stale.mkdir()
    fresh.mkdir()
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    assert model_cache.save_entry(tiny_hf_model("llama"), StubTokenizer(), gguf, entry)
    assert not stale.exists() and fresh.exists()  # another process may still be writing that one


def test_a_model_over_the_size_limit_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_cache, "MAX_CACHED_BYTES", 1024)
    gguf = a_gguf(tmp_path)
    entry = model_cache.entry_path(gguf, tmp_path)
    assert not model_cache.save_entry(tiny_hf_model("llama"), StubTokenizer(), gguf, entry)
    assert not entry.exists()


def test_an_unreadable_entry_is_converted_again(tmp_path: Path) -> None:
    entry = tmp_path / "models" / "broken"
    entry.mkdir(parents=True)
    (entry / model_cache.MANIFEST).write_text("{}")  # complete by its marker, but no weights
    assert loader._read_cached(entry, "broken") is None


@pytest.mark.model
def test_the_second_load_of_smollm2_reads_the_cache_and_is_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = load_model(DEFAULT_MODEL_SPEC, cache=False)  # straight from the GGUF
    reads: list[ModelSource] = []
    real_read = loader._read

    def spy(source: ModelSource) -> tuple[Any, Any]:
        reads.append(source)
        if source.gguf_file is not None:
            return reference.model, reference.tokenizer  # the conversion just paid for
        return real_read(source)

    monkeypatch.setattr(loader, "_read", spy)
    load_model(DEFAULT_MODEL_SPEC, cache_root=tmp_path)  # a miss: converts, then fills the cache
    source = resolve_spec(DEFAULT_MODEL_SPEC)
    assert source.gguf_file is not None
    entry = model_cache.entry_path(source.directory / source.gguf_file, tmp_path)
    assert model_cache.is_complete(entry) and reads[-1].gguf_file is not None
    cached = load_model(DEFAULT_MODEL_SPEC, cache_root=tmp_path)
    assert reads[-1] == ModelSource(entry, None, reference.name)  # read the cache, not the GGUF
    assert cached.name == reference.name == "SmolLM2-135M-Instruct"
    assert same_weights(reference.model, cached.model)
    assert cached.model.config.tie_word_embeddings and cached.model.lm_head.weight is (
        cached.model.model.embed_tokens.weight
    )
    chat = [{"role": "user", "content": "Say hello to plant-7, ünïcode included."}]
    assert cached.tokenizer.chat_template == reference.tokenizer.chat_template
    as_ids = {"add_generation_prompt": True, "tokenize": True}
    assert cached.tokenizer.apply_chat_template(chat, **as_ids) == reference.tokenizer.apply_chat_template(
        chat, **as_ids
    )
    text = "Count 1, 2, 3... résumé 東京 <|im_end|>"
    assert cached.tokenizer(text)["input_ids"] == reference.tokenizer(text)["input_ids"]
    assert cached.tokenizer.eos_token_id == reference.tokenizer.eos_token_id
    cfg, ref_cfg = cached.model.generation_config, reference.model.generation_config
    assert (cfg.eos_token_id, cfg.bos_token_id) == (ref_cfg.eos_token_id, ref_cfg.bos_token_id)


@pytest.mark.model
def test_the_engine_opens_a_gguf_without_its_weights_and_caches_only_the_tokenizer(
    tmp_path: Path, smollm2: Any
) -> None:
    """`load_engine_model`: tokenizer and configs (converted once, then from a metadata entry), the model a
    holder of its configs (`ConfigHolder`: no module, no weights), the weights left in the file
    (`GgufWeights`)."""
    from backends.local.engine.config import ModelArgs
    from backends.local.gguf_weights import GgufWeights

    first = loader.load_engine_model(DEFAULT_MODEL_SPEC, cache_root=tmp_path)  # a miss: converts
    source = resolve_spec(DEFAULT_MODEL_SPEC)
    assert source.gguf_file is not None
    gguf = source.directory / source.gguf_file
    entry = model_cache.metadata_entry_path(gguf, tmp_path)
    assert model_cache.is_complete(entry) and not (entry / "model.safetensors").exists()
    assert not model_cache.is_complete(model_cache.entry_path(gguf, tmp_path))  # no float32 weights written
    again = loader.load_engine_model(DEFAULT_MODEL_SPEC, cache_root=tmp_path)
    for loaded in (first, again):
        assert isinstance(loaded.weights, GgufWeights) and loaded.name == smollm2.name
        assert isinstance(loaded.model, loader.ConfigHolder) and list(loaded.model.parameters()) == []
        assert isinstance(loaded.tokenizer, ChatTokenizer)  # tests/engine/test_chat_tokenizer.py
        assert ModelArgs.from_hf_config(loaded.model.config) == ModelArgs.from_hf_config(smollm2.model.config)
        assert loaded.model.generation_config.eos_token_id == smollm2.model.generation_config.eos_token_id
        explicit = smollm2.model.generation_config.to_diff_dict()  # what sampling defaults read
        assert loaded.model.generation_config.to_diff_dict() == explicit
        text = "Say hello in five words."
        assert loaded.tokenizer.encode(text) == smollm2.tokenizer(text).input_ids
        assert loaded.tokenizer.chat_template == smollm2.tokenizer.chat_template
        loaded.weights.close()
    # A fresh process opening the cached entry does not import transformers at all: no model, tokenizer
    # registry or config class (~90 MB resident), nor its base modules behind the tokenizer (~40 MB); nor
    # gguf-py, whose import keeps sentencepiece, mistral_common and yaml (the engine reads the GGUF itself).
    script = (
        "import sys; from pathlib import Path; from backends.local import loader; "
        f"loader.load_engine_model({DEFAULT_MODEL_SPEC!r}, cache_root=Path({str(tmp_path)!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'gguf')))"
    )
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-c", script]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
