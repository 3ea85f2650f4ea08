"""Engine fixtures: a tiny random-weight model of each kind (tests/support/tiny_models.py builds them), and
the real SmolLM2, loaded once per session, only for tests marked `model`."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.support.tiny_models import tiny_hf_model  # noqa: E402


@pytest.fixture(params=("llama", "qwen2"))
def tiny_hf(request: pytest.FixtureRequest) -> Any:
    return tiny_hf_model(request.param)


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real SmolLM2-135M (transformers, float32), loaded once; tests must not release its weights."""
    from backends.local.loader import DEFAULT_MODEL_SPEC, load_model

    return load_model(DEFAULT_MODEL_SPEC)
