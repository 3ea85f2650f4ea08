"""`--max-prefill-tokens` by device: 256 on CPU, where a step of 512 prompt tokens keeps every decoding stream
and waiting question for 1-2 s, 512 on CUDA; a value given wins, and a nonsense one names the flag."""

from __future__ import annotations

import pytest

from backends.local.build import CPU_PREFILL_TOKENS, EngineOptions


def test_the_default_follows_the_device_and_a_given_value_wins() -> None:
    assert CPU_PREFILL_TOKENS == 256
    assert EngineOptions().prefill_tokens == 256
    assert EngineOptions(device="cuda").prefill_tokens == 512
    assert EngineOptions(max_prefill_tokens=1024).prefill_tokens == 1024
    assert EngineOptions(device="cuda", max_prefill_tokens=64).prefill_tokens == 64


def test_a_budget_below_one_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--max-prefill-tokens must be at least 1, got 0"):
        EngineOptions(max_prefill_tokens=0)
