"""Fused decode layers (`engine/fused.py`) on the real SmolLM2 engine: a step's logits are bit for bit the
module path's, for every configuration the engine builds on CPU with its kernels (int4 and int8 weights,
float32 and bf16 compute, float32 over its default bf16 KV cache and over a float32 one), at one and many
decode rows; prefill steps go through the modules."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from backends.local.build import BuiltEngine, EngineOptions, build_engine_parts  # noqa: E402
from backends.local.engine.fused import fuse_decode  # noqa: E402
from backends.local.engine.kernels import kernel_op  # noqa: E402
from backends.local.engine.model import Block  # noqa: E402
from backends.local.engine.types import SeqChunk, StepPlan  # noqa: E402

pytestmark = pytest.mark.model

# (dtype, quant, kv_dtype): `auto` is bf16 under float32 compute (build.kv_cache_dtype).
CONFIGS = [
    ("float32", "int4", "auto"),
    ("float32", "int4", "float32"),
    ("bfloat16", "int4", "auto"),
    ("float32", "int8", "auto"),
    ("bfloat16", "none", "auto"),
]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: "-".join(c))
def parts(request: pytest.FixtureRequest, smollm2: Any) -> BuiltEngine:
    if kernel_op("paged_attention") is None:
        pytest.skip("the C++ kernels did not build here (SWITCHBOARD_KERNELS=off?)")
    dtype, quant, kv_dtype = request.param
    options = EngineOptions(
        dtype=dtype, quant=quant, kv_dtype=kv_dtype, kv_cache_mb=96, attn="paged", warm_up=False
    )
    built = build_engine_parts(smollm2, options)
    expected = "bfloat16" if kv_dtype == "auto" else kv_dtype
    assert built.runner.kv_cache.dtype == getattr(torch, expected)
    return built


def _blocks(parts: BuiltEngine) -> list[Block]:
    return [b for b in parts.runner.model.layers if isinstance(b, Block)]


def _logits(parts: BuiltEngine, plan: StepPlan, *, fused: bool) -> Any:
    blocks = _blocks(parts)
    saved = [b.decode for b in blocks]
    if not fused:
        for b in blocks:
            b.decode = None
    try:
        return parts.runner.execute(plan)
    finally:
        for b, d in zip(blocks, saved, strict=True):
            b.decode = d


def test_every_layer_gets_a_decode_closure(parts: BuiltEngine) -> None:
    assert all(b.decode is not None for b in _blocks(parts))
    assert fuse_decode(parts.runner.model) == len(_blocks(parts))  # idempotent: the same count again


@pytest.mark.parametrize("rows", [1, 5, 32])
def test_fused_decode_steps_compute_the_module_paths_logits(parts: BuiltEngine, rows: int) -> None:
    runner = parts.runner
    context = 24
    chunks = []
    for i in range(rows):
        table = (2 * i, 2 * i + 1)
        runner.execute(StepPlan((SeqChunk(i, tuple(range(40 + i, 40 + i + context)), 0, table, 0),)))
        chunks.append(SeqChunk(i, (11 + i,), context, table))
    plan = StepPlan(tuple(chunks))
    # Each run writes the step's K/V at the same slots with the same values, so the two runs see equal caches.
    modules = _logits(parts, plan, fused=False)
    fused = _logits(parts, plan, fused=True)
    assert fused.shape == (rows, runner.vocab_size)
    assert torch.equal(fused, modules)


def test_a_prefill_step_is_left_to_the_modules(parts: BuiltEngine) -> None:
    calls = []
    blocks = _blocks(parts)
    originals = [b.decode for b in blocks]

    def spy(b: Block, fn: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            out = fn(*args)
            calls.append(out is not None)
            return out

        return wrapped

    for b, fn in zip(blocks, originals, strict=True):
        b.decode = spy(b, fn)
    try:
        parts.runner.execute(StepPlan((SeqChunk(0, tuple(range(100, 140)), 0, (0, 1, 2), 1),)))
        assert calls and not any(calls)  # 40 prompt rows: every layer declined
        calls.clear()
        parts.runner.execute(StepPlan((SeqChunk(0, (7,), 40, (0, 1, 2)),)))
        assert calls and all(calls)  # a decode row: every layer served it
    finally:
        for b, fn in zip(blocks, originals, strict=True):
            b.decode = fn
