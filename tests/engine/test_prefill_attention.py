"""Long prefill chunks' attention in bf16 (`attention.prefill_dtype`): when it is chosen, what it computes,
and that a prompt gets the same logits whether prefilled whole or after a prefix-cache hit."""

from __future__ import annotations

from typing import Any

import pytest

from backends.local.engine import attention
from backends.local.engine.attention import SeqSpan, attend, build_metadata, prefill_dtype
from backends.local.engine.kernels import kernel_op
from backends.local.engine.kv_cache import blocks_needed
from backends.local.engine.types import SeqChunk, StepPlan
from tests.support.tiny_models import tiny_hf_model, tiny_runner

torch = pytest.importorskip("torch")

BLOCK = 16


def _case(seed: int, spans: tuple[tuple[int, int, bool], ...]) -> tuple[Any, ...]:
    """A bf16 paged cache (SmolLM2's GQA 9:3, head 64), float32 queries for spans (start, tokens, prefill)."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(64, BLOCK, 3, 64, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(64, BLOCK, 3, 64, generator=g).to(torch.bfloat16)
    order = torch.randperm(64, generator=g).tolist()
    out, taken = [], 0
    for start, n, prefill in spans:
        need = blocks_needed(start + n, BLOCK)
        out.append(SeqSpan(start, n, order[taken : taken + need], prefill=prefill))
        taken += need
    q = torch.randn(sum(s.num_tokens for s in out), 9, 64, generator=g)
    return q, k_cache, v_cache, out, torch.zeros(q.shape[0], dtype=torch.long)


def _attend(case: tuple[Any, ...], long_dtype: Any) -> Any:
    q, k_cache, v_cache, spans, slots = case
    meta = build_metadata(spans, slots, block_size=BLOCK, n_rep=3, impl="paged", long_dtype=long_dtype)
    return meta, attend(q, k_cache, v_cache, meta, scale=64**-0.5)


@pytest.fixture
def kernels() -> None:
    if kernel_op("paged_attention") is None:
        pytest.fail(
            "the paged kernel did not build: g++ and ninja are needed (test_paged_kernel_is_built_here)"
        )


@pytest.fixture
def native_bf16(kernels: None) -> None:
    """Where torch runs bf16 SDPA natively (AVX512-BF16 or AMX, under its AVX-512 code: under
    ATEN_CPU_CAPABILITY=avx2 on an AMX CPU it fails), which the engine's bf16 path needs; the engine takes it
    on AMX CPUs only (`prefill_dtype`), but what it computes is tested wherever it can run."""
    if not (torch.cpu._is_avx512_bf16_supported() and torch.backends.cpu.get_cpu_capability() == "AVX512"):
        pytest.skip("torch does not run bf16 SDPA natively here (no AVX512-BF16, or not its AVX-512 code)")


BF16 = "avx512+vnni+bf16"


@pytest.mark.parametrize(
    ("isa", "amx", "aten", "dtype", "cache", "impl", "expected"),
    [
        (BF16, True, "AVX512", "float32", "bfloat16", "paged", "bfloat16"),
        (BF16, False, "AVX512", "float32", "bfloat16", "paged", None),  # AVX512-BF16 alone (Zen 4): no gain
        ("avx512+vnni", False, "AVX512", "float32", "bfloat16", "paged", None),  # no bf16 (e.g. Skylake-X)
        ("avx2+fma", False, "AVX2", "float32", "bfloat16", "paged", None),  # AVX2-only CPUs
        (BF16, True, "AVX2", "float32", "bfloat16", "paged", None),  # ATEN_CPU_CAPABILITY=avx2 on AMX
        (BF16, True, "AVX512", "float32", "float32", "paged", None),  # --kv-dtype float32: all float32
        (BF16, True, "AVX512", "bfloat16", "bfloat16", "paged", "bfloat16"),  # bf16 compute (else float32)
        (BF16, True, "AVX512", "float16", "float16", "paged", None),
        (BF16, True, "AVX512", "float32", "bfloat16", "sdpa", None),  # only the paged impl's long chunks
    ],
)
def test_prefill_dtype_is_bf16_only_over_a_bf16_cache_on_an_amx_cpu(
    monkeypatch: pytest.MonkeyPatch,
    isa: str,
    amx: bool,
    aten: str,
    dtype: str,
    cache: str,
    impl: Any,
    expected: Any,
) -> None:
    monkeypatch.setattr(attention, "kernel_isa", lambda: isa)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    got = prefill_dtype(impl, getattr(torch, dtype), getattr(torch, cache))
    assert got == (None if expected is None else getattr(torch, expected))


def test_long_chunks_in_bf16_differ_from_float32_by_rounding_and_decode_rows_not_at_all(
    native_bf16: None,
) -> None:
    """A 40-token chunk over 300 cached tokens beside two decode rows: the chunk's rows are bf16 SDPA (not
    float32's numbers, within bf16's error of them); the decode rows are the kernel's, bit for bit."""
    case = _case(1, ((300, 40, True), (120, 1, False), (7, 1, False)))
    meta32, f32 = _attend(case, None)
    meta16, b16 = _attend(case, torch.bfloat16)
    assert [g.compute_dtype for g in meta16.groups] == [None, torch.bfloat16]
    assert all(g.compute_dtype is None for g in meta32.groups)
    chunk, decode = slice(0, 40), slice(40, 42)
    assert torch.equal(f32[decode], b16[decode])
    error = (b16[chunk] - f32[chunk]).abs().max().item()
    assert 1e-5 < error < 2e-2 * f32[chunk].abs().max().item(), error


def test_a_prompts_last_tokens_after_a_prefix_hit_attend_as_in_the_whole_prompt(native_bf16: None) -> None:
    """Under a bf16 `long_dtype` a prompt's tail of a few tokens (what is left after a prefix-cache hit) is
    attended as a long chunk, not by the float32 kernel: its rows equal the same rows of the whole prompt's
    chunk, bit for bit, so a request and its repeat get the same greedy answer. Without the `prefill` mark
    (a decode token, drafts) a span that short stays in the kernel's group."""
    whole = _case(3, ((0, 45, True),))
    q, k_cache, v_cache, spans, slots = whole
    _, out = _attend(whole, torch.bfloat16)
    for tail in (1, 5):
        span = SeqSpan(45 - tail, tail, spans[0].block_table, prefill=True)
        case = (q[-tail:].contiguous(), k_cache, v_cache, [span], slots[-tail:])
        meta, got = _attend(case, torch.bfloat16)
        assert meta.groups[0].compute_dtype is torch.bfloat16 and meta.groups[0].token_seq is None
        assert torch.equal(got, out[-tail:])
        drafts = SeqSpan(45 - tail, tail, spans[0].block_table)
        meta, _ = _attend((case[0], k_cache, v_cache, [drafts], case[4]), torch.bfloat16)
        assert meta.groups[0].token_seq is not None


def test_a_runner_gives_a_prompt_the_same_logits_whole_or_after_a_prefix_hit(kernels: None) -> None:
    """The tiny model over a bf16 cache with the production attention: a 40-token prompt prefilled in one
    chunk, then the same prompt as a prefix hit on its first 9 blocks and a 4-token tail. The last token's
    logits agree to float32 summation order whether this CPU computes long chunks in bf16 or not."""
    hf = tiny_hf_model("llama")
    runner = tiny_runner(hf, attn_impl="auto", kv_dtype=torch.bfloat16)
    tokens = tuple(torch.randint(0, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(5)))
    ids = tuple(int(t) for t in tokens)
    first = tuple(range(1, 11))  # 10 blocks of 4
    whole = runner.execute(StepPlan((SeqChunk(0, ids, 0, first, prefill=True),)))
    again = first[:9] + (11,)  # the shared 36 tokens' blocks, a fresh block for the tail
    hit = runner.execute(StepPlan((SeqChunk(1, ids[36:], 36, again, prefill=True),)))
    unmarked = runner.execute(StepPlan((SeqChunk(2, ids[36:], 36, again),)))  # the tail in the kernel
    assert (whole - hit).abs().max().item() < 1e-4  # the linear layers' float32 summation order only
    kernel_gap = (whole - unmarked).abs().max().item()
    # where long chunks compute in bf16, the same tail in the float32 kernel is bf16's error away (~2e-2)
    assert kernel_gap > 1e-3 if runner.prefill_dtype is torch.bfloat16 else kernel_gap < 1e-4
