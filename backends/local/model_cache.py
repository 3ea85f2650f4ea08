"""The converted-weights cache: a GGUF model, once dequantized by transformers, saved as a plain HF directory.

Converting a GGUF's tokenizer and tensors in Python takes ~35 s for the bundled SmolLM2; the saved entry loads
in seconds, bit for bit the same. A metadata entry (`-metadata`) holds only the tokenizer and configs: the
engine reads weights from the GGUF itself (`gguf_weights.py`). Entries live under `$SWITCHBOARD_CACHE_DIR/
models/` (default `~/.cache/switchboard/models/`), named after the GGUF's name, size and mtime and the
transformers version. Invariant: an entry directory is complete or absent: written under a temporary name
and renamed into place (the first of several racing processes wins). Models over `MAX_CACHED_BYTES` of
float32 weights are not cached. A zipped model (the bundled embedding model) is extracted the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson

CACHE_DIR_ENV = "SWITCHBOARD_CACHE_DIR"
CACHE_FORMAT = 1  # bump when what an entry holds changes
MANIFEST = "switchboard-cache.json"  # written last inside an entry, before the rename
MAX_CACHED_BYTES = 8 * 2**30  # float32 weights; a larger GGUF is converted at every start instead
_PARTIAL_PREFIX = ".partial-"
_STALE_PARTIAL_S = 3600.0  # a partial directory this old belongs to a process that died

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """`$SWITCHBOARD_CACHE_DIR`, else `~/.cache/switchboard`."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "switchboard"


def entry_path(gguf: Path, cache_root: Path) -> Path:
    """Where the conversion of `gguf` lives (whether or not it exists yet)."""
    stat = gguf.stat()
    stem = gguf.name.removesuffix(".gguf")
    # the installed distribution's version, read without importing transformers (the engine may never need it)
    key = f"{stem}-{stat.st_size}-{stat.st_mtime_ns}-tf{version('transformers')}-v{CACHE_FORMAT}"
    return cache_root / "models" / key


def is_complete(entry: Path) -> bool:
    return (entry / MANIFEST).is_file()


def save_entry(model: Any, tokenizer: Any, gguf: Path, entry: Path) -> bool:
    """Save a model loaded from `gguf` as `entry`; False (logged) when it is too large or the disk refuses.

    Never leaves a partial `entry`; an entry another process finished first is kept as it is."""
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if n_bytes > MAX_CACHED_BYTES:
        log.info(
            "not caching the conversion of %s: %.1f GiB of float32 weights (limit %.0f GiB)",
            gguf.name,
            n_bytes / 2**30,
            MAX_CACHED_BYTES / 2**30,
        )
        return False
    return _publish(gguf, entry, lambda work: _write(model, tokenizer, gguf, work))


def metadata_entry_path(gguf: Path, cache_root: Path) -> Path:
    """Where the tokenizer and configs of `gguf` live without its weights (the engine reads those itself)."""
    entry = entry_path(gguf, cache_root)
    return entry.with_name(entry.name + "-metadata")


def save_metadata_entry(tokenizer: Any, config: Any, generation_config: Any, gguf: Path, entry: Path) -> bool:
    """Save the tokenizer (whose conversion from GGUF is slow) and configs as `entry`; False when refused."""

    def write(work: Path) -> None:
        import copy

        plain = copy.deepcopy(config)
        if hasattr(plain, "quantization_config"):
            del plain.quantization_config  # the GGUF marker
        plain.save_pretrained(work)
        generation_config.save_pretrained(work)
        tokenizer.save_pretrained(work)
        manifest = {"format": CACHE_FORMAT, "source": str(gguf), "created_at": time.time(), "weights": False}
        (work / MANIFEST).write_bytes(orjson.dumps(manifest))

    return _publish(gguf, entry, write)


def _publish(gguf: Path, entry: Path, write: Callable[[Path], None]) -> bool:
    """Run `write` into a fresh partial directory and rename it to `entry`; False (logged) on failure."""
    started_s = time.perf_counter()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(entry.parent)
        work = Path(tempfile.mkdtemp(dir=entry.parent, prefix=_PARTIAL_PREFIX))
    except OSError as exc:
        log.warning("cannot cache the conversion of %s under %s: %s", gguf.name, entry.parent, exc)
        return False
    try:
        write(work)
        try:
            work.rename(entry)
        except OSError:
            if not is_complete(entry):  # not a lost race: a real failure
                raise
            log.info("another process cached %s first; keeping its copy", gguf.name)
            return True
    except OSError as exc:
        log.warning(
            "cannot cache the conversion of %s under %s: %s (set %s to a writable directory)",
            gguf.name,
            entry.parent,
            exc,
            CACHE_DIR_ENV,
        )
        return False
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("cached the conversion of %s in %s (%.1f s)", gguf.name, entry, time.perf_counter() - started_s)
    return True


def _write(model: Any, tokenizer: Any, gguf: Path, work: Path) -> None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker: these are plain float32 weights now
    # A twin built on the meta device that takes the loaded tensors as they are: no copy, no random init.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.generation_config = model.generation_config  # its eos_token_id ends generation (build.py)
    plain.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    manifest = {"format": CACHE_FORMAT, "source": str(gguf), "created_at": time.time()}
    (work / MANIFEST).write_bytes(orjson.dumps(manifest))


def extracted_archive(archive: Path, cache_root: Path) -> Path:
    """The files of a zipped model directory, extracted once into a cache entry named after the archive's
    path, size and mtime. Raises OSError when it cannot be extracted (the caller names the setting)."""
    import hashlib
    import zipfile

    stat = archive.stat()
    where = hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:12]
    stem = archive.name.removesuffix(".zip")
    entry = cache_root / "models" / f"{stem}-{where}-{stat.st_size}-{stat.st_mtime_ns}-v{CACHE_FORMAT}"
    if is_complete(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(entry.parent)
    work = Path(tempfile.mkdtemp(dir=entry.parent, prefix=_PARTIAL_PREFIX))
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(work)
        manifest = {"format": CACHE_FORMAT, "source": str(archive), "created_at": time.time()}
        (work / MANIFEST).write_bytes(orjson.dumps(manifest))
        try:
            work.rename(entry)
        except OSError:
            if not is_complete(entry):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("extracted %s into %s", archive.name, entry)
    return entry


def _remove_stale_partials(models_dir: Path) -> None:
    now = time.time()
    for partial in models_dir.glob(_PARTIAL_PREFIX + "*"):
        try:
            stale = now - partial.stat().st_mtime > _STALE_PARTIAL_S
        except OSError:
            continue  # removed meanwhile
        if stale:
            shutil.rmtree(partial, ignore_errors=True)
