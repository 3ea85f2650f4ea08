"""The KV cache's dtype (`build.kv_cache_dtype`, `--kv-dtype`): `auto` halves a float32 engine's cache on CPU,
and a choice the kernels cannot read is refused with the flag to change."""

from __future__ import annotations

import pytest

from backends.local.build import EngineOptions, kv_cache_dtype


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        ("float32", "cpu", "bfloat16"),
        ("bfloat16", "cpu", "bfloat16"),
        ("float32", "cuda", "float32"),
        ("float16", "cuda", "float16"),
    ],
)
def test_auto_is_bf16_under_float32_on_cpu_else_the_compute_dtype(
    dtype: str, device: str, expected: str
) -> None:
    assert kv_cache_dtype("auto", dtype, device) == expected


def test_an_explicit_choice_is_the_compute_dtype_or_bf16_under_float32_on_cpu() -> None:
    assert kv_cache_dtype("float32", "float32", "cpu") == "float32"
    assert kv_cache_dtype("bfloat16", "float32", "cpu") == "bfloat16"
    for kv, dtype, device in (
        ("float32", "bfloat16", "cpu"),
        ("float16", "float32", "cpu"),
        ("bfloat16", "float32", "cuda"),
    ):
        with pytest.raises(ValueError, match="--kv-dtype auto") as caught:
            kv_cache_dtype(kv, dtype, device)
        assert f"--kv-dtype {kv} with --dtype {dtype}" in str(caught.value)


def test_an_unknown_kv_dtype_names_the_flag() -> None:
    with pytest.raises(
        ValueError, match="--kv-dtype `int8` is unknown; use one of auto, float32, bfloat16, float16"
    ):
        EngineOptions(kv_dtype="int8")


def test_a_pinned_dtype_with_a_kv_dtype_it_cannot_take_is_refused_before_loading() -> None:
    with pytest.raises(ValueError, match="--kv-dtype float16 with --dtype float32 on cpu"):
        EngineOptions(dtype="float32", kv_dtype="float16")
    assert EngineOptions(dtype="float32", kv_dtype="bfloat16").kv_dtype == "bfloat16"
    assert EngineOptions(dtype="auto", kv_dtype="float32").kv_dtype == "float32"  # checked once resolved
