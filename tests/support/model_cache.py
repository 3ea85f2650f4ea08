"""The bundled SmolLM2 converted once to a transformers directory, for tests that start many engine processes.

Loading the GGUF costs ~35 s in every process (tokenizer conversion and de-quantization in Python; minutes
when three processes do it at once on two cores). The same weights, saved once as float32 safetensors plus the
tokenizer, load in a few seconds; the engine quantizes them (e.g. int4) exactly as it would the GGUF's. The
directory is cached under $SWITCHBOARD_TEST_CACHE (default: the system temp dir), keyed by the GGUF's size and
mtime, and written atomically, so concurrent sessions never read a half-written copy.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    root = Path(
        os.environ.get("SWITCHBOARD_TEST_CACHE") or Path(tempfile.gettempdir()) / "switchboard-test-cache"
    )
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_directory(root: Path | None = None) -> Path:
    """A model directory usable as `--model` (`load_model` spec) holding the bundled SmolLM2's weights."""
    from backends.local.loader import DEFAULT_MODEL_SPEC, load_model, resolve_spec

    root = root or cache_root()
    source = resolve_spec(DEFAULT_MODEL_SPEC)
    assert source.gguf_file is not None
    stat = (source.directory / source.gguf_file).stat()
    dest = root / f"smollm2-{stat.st_size}-{int(stat.st_mtime)}"
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM

    loaded = load_model(DEFAULT_MODEL_SPEC)
    config = loaded.model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker: these are plain float32 weights now
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.model.state_dict())
    work = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    try:
        plain.save_pretrained(work, safe_serialization=True)
        loaded.tokenizer.save_pretrained(work)
        try:
            work.rename(dest)
        except OSError:  # another session finished first
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        del plain, loaded
        gc.collect()
    return dest
