"""The bundled SmolLM2 as a converted transformers directory, for tests that start engine or node processes.

It is the product's converted-weights cache entry (backends/local/model_cache.py), filled on first use: the
same weights as the GGUF, loaded in seconds rather than ~35 s of GGUF conversion per process (minutes when
three processes convert at once on two cores). tests/conftest.py points $SWITCHBOARD_CACHE_DIR at the system
temp dir, so test runs share the entry without writing into the user's home.
"""

from __future__ import annotations

import gc
from pathlib import Path

from backends.local import model_cache
from backends.local.loader import DEFAULT_MODEL_SPEC, load_model, resolve_spec


def smollm2_directory() -> Path:
    """A model directory usable as `--model` (`load_model` spec) holding the bundled SmolLM2's weights."""
    source = resolve_spec(DEFAULT_MODEL_SPEC)
    assert source.gguf_file is not None
    entry = model_cache.entry_path(source.directory / source.gguf_file, model_cache.default_cache_root())
    if not model_cache.is_complete(entry):
        loaded = load_model(DEFAULT_MODEL_SPEC)  # converts, and fills the cache
        del loaded
        gc.collect()
    assert model_cache.is_complete(entry), f"the converted-weights cache could not be written: {entry}"
    return entry
