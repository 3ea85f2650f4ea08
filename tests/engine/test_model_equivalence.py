"""The engine reproduces transformers on the same weights: logits under teacher forcing, greedy tokens.

Sequences arrive at different steps and prefill in chunks of different sizes while others decode, so one
step mixes long prefill chunks (own attention call), short ones and single decode tokens (one padded call).
Tolerances (float32): tiny models max |diff| < 1e-4; SmolLM2-135M < 1e-3 on logits of magnitude ~30
(different summation orders in attention and matmuls). sdpa, paged and eager agree within 3e-5 in float32
(1e-5 on one attention call; the model's layers add summation-order noise).
"""

from __future__ import annotations

from typing import Any

import pytest

from backends.local.engine.attention import SeqSpan, attend, build_metadata, resolve_impl
from backends.local.engine.config import ModelArgs, UnsupportedModelError
from backends.local.engine.kernels import kernel_op, kernels_disabled
from backends.local.engine.kv_cache import blocks_needed
from backends.local.engine.types import SeqChunk, StepPlan
from backends.local.engine.weights import build_model
from tests.support.tiny_models import TINY_KINDS, ToySeq, drive, tiny_hf_model, tiny_runner

torch = pytest.importorskip("torch")

TINY_ATOL = 1e-4
SMOLLM2_ATOL = 1e-3

# (arrival step, prompt length, chunk size, total length): chunk 11 > MAX_BATCHED_Q attends on its own.
SCHEDULE = ((0, 23, 11, 40), (0, 5, 5, 30), (2, 17, 3, 33), (3, 1, 1, 20), (6, 30, 8, 45))


def _random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _reference_logits(hf_model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()  # (L, V)


def _random_seqs(schedule: Any, vocab: int) -> list[ToySeq]:
    return [
        ToySeq(i, _random_tokens(total, vocab, seed=i), prompt, arrival, chunk, total)
        for i, (arrival, prompt, chunk, total) in enumerate(schedule)
    ]


def _teacher_forced_max_diff(runner: Any, hf_model: Any, seqs: list[ToySeq]) -> float:
    """Max |ours - transformers| over every position of every sequence."""
    vocab = hf_model.config.vocab_size
    expected = {s.seq_id: _reference_logits(hf_model, s.tokens) for s in seqs}
    worst = 0.0

    def check(seq: ToySeq, chunk: Any, logits: torch.Tensor) -> None:
        nonlocal worst
        positions = list(range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids)))
        assert logits.shape == (len(positions), vocab) and logits.dtype == torch.float32
        worst = max(worst, (logits - expected[seq.seq_id][positions]).abs().max().item())

    plans = list(drive(runner, seqs, check, all_logits=True))
    assert any(len({len(c.token_ids) for c in p.chunks}) > 2 for p in plans), "schedule never mixed phases"
    return worst


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_teacher_forced_logits_match_transformers(kind: str, block_size: int) -> None:
    hf = tiny_hf_model(kind)
    runner = tiny_runner(hf, block_size=block_size)
    assert _teacher_forced_max_diff(runner, hf, _random_seqs(SCHEDULE, hf.config.vocab_size)) < TINY_ATOL


def _greedy_tokens(runner: Any, prompts: list[list[int]], new_tokens: int, eos: set[int]) -> list[list[int]]:
    seqs = [
        ToySeq(
            i, list(p), len(p), arrival_step=2 * i, chunk_size=(7, 3, 16)[i % 3], max_len=len(p) + new_tokens
        )
        for i, p in enumerate(prompts)
    ]

    def append(seq: ToySeq, chunk: Any, logits: torch.Tensor) -> None:
        ended = seq.tokens[-1] in eos and len(seq.tokens) > seq.prompt_len
        if chunk.num_logits and len(seq.tokens) < seq.max_len and not ended:
            seq.tokens.append(int(logits[-1].argmax()))

    for _ in drive(runner, seqs, append):
        pass
    return [s.tokens for s in seqs]


def _generate(hf_model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens
        )
    return out[0].tolist()


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_greedy_matches_generate(kind: str) -> None:
    hf = tiny_hf_model(kind)
    prompts = [_random_tokens(n, hf.config.vocab_size, seed=100 + n) for n in (9, 1, 21, 14)]
    ours = _greedy_tokens(tiny_runner(hf), prompts, new_tokens=24, eos=set())
    assert ours == [_generate(hf, p, 24) for p in prompts]


@pytest.mark.parametrize("impl", ["sdpa", "paged"])
def test_attention_impl_agrees_with_eager(impl: str) -> None:
    hf = tiny_hf_model("llama")
    runner = tiny_runner(hf, attn_impl=impl)
    assert runner.attn_impl == impl
    ours = _teacher_forced_logits(runner)
    eager = _teacher_forced_logits(tiny_runner(hf, attn_impl="eager"))
    assert max((a - b).abs().max().item() for a, b in zip(ours, eager, strict=True)) < 3e-5


# (start position, new tokens) per sequence: a long prefill, short chunks and decodes.
MIXED_CHUNKS = ((0, 13), (9, 1), (30, 5), (3, 2), (17, 1), (0, 1))


def _random_attention_case(
    dtype: Any,
    device: str = "cpu",
    block_size: int = 4,
    *,
    seed: int = 0,
    n_blocks: int = 64,
    n_kv: int = 2,
    n_heads: int = 6,
    head_dim: int = 16,
    chunks: tuple[tuple[int, int], ...] = MIXED_CHUNKS,
) -> tuple[Any, ...]:
    """A filled paged cache (blocks in random order), and new queries for the spans `chunks` describes."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(n_blocks, block_size, n_kv, head_dim, generator=g).to(device, dtype)
    v_cache = torch.randn(n_blocks, block_size, n_kv, head_dim, generator=g).to(device, dtype)
    order = torch.randperm(n_blocks, generator=g).tolist()
    spans, taken = [], 0
    for start, n in chunks:
        need = blocks_needed(start + n, block_size)
        spans.append(SeqSpan(start, n, order[taken : taken + need]))
        taken += need
    q = torch.randn(sum(s.num_tokens for s in spans), n_heads, head_dim, generator=g).to(device, dtype)
    slots = torch.zeros(q.shape[0], dtype=torch.long, device=device)  # unused by attend
    return q, k_cache, v_cache, spans, slots


def _attend_with(impl: Any, case: tuple[Any, ...], block_size: int = 4) -> torch.Tensor:
    q, k_cache, v_cache, spans, slots = case
    n_rep = q.shape[1] // k_cache.shape[2]
    meta = build_metadata(spans, slots, block_size=block_size, n_rep=n_rep, impl=impl, dtype=q.dtype)
    assert len(meta.groups) == 2 and not meta.identity  # one padded group of short chunks, one long chunk
    return attend(q, k_cache, v_cache, meta, scale=q.shape[-1] ** -0.5).float()


def _naive_attention(case: tuple[Any, ...], block_size: int = 4) -> torch.Tensor:
    """One sequence at a time, float64, explicit causal mask over the gathered prefix."""
    q, k_cache, v_cache, spans, _ = case
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_rep = n_heads // k_cache.shape[2]
    outs, row = [], 0
    for s in spans:
        ctx = s.start_pos + s.num_tokens
        index = torch.tensor(s.block_table, dtype=torch.long)
        k = k_cache[index].flatten(0, 1)[:ctx].double().repeat_interleave(n_rep, dim=1)  # (L, H, D)
        v = v_cache[index].flatten(0, 1)[:ctx].double().repeat_interleave(n_rep, dim=1)
        qs = q[row : row + s.num_tokens].double()  # (n, H, D)
        scores = torch.einsum("nhd,lhd->hnl", qs, k) * head_dim**-0.5
        q_pos = torch.arange(s.start_pos, ctx)[:, None]
        scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
        outs.append(torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v).reshape(s.num_tokens, -1))
        row += s.num_tokens
    return torch.cat(outs)


def test_attention_impls_match_naive_reference_fp32() -> None:
    case = _random_attention_case(torch.float32)
    reference = _naive_attention(case).float()
    for impl in ("sdpa", "eager", "paged"):
        assert (_attend_with(impl, case) - reference).abs().max().item() < 1e-5, impl
    # The same groups through torch SDPA itself, as CUDA runs them (CPU decode groups use batched matmuls).


def test_sdpa_agrees_with_eager_bf16() -> None:
    case = _random_attention_case(torch.bfloat16)
    reference = _naive_attention(case).float()
    sdpa, eager = _attend_with("sdpa", case), _attend_with("eager", case)
    # bf16 has an 8-bit mantissa: outputs ~1 round at ~4e-3, and eager also rounds the probabilities.
    assert (sdpa - eager).abs().max().item() < 3e-2
    assert (sdpa - reference).abs().max().item() < 2e-2
    # The paged kernel computes in float32 from bf16 inputs and rounds once, at the output.
    assert (_attend_with("paged", case) - reference).abs().max().item() < 1e-2


@pytest.mark.parametrize("head_dim", [64, 20])  # the AVX-512 path (multiples of 16) and the scalar one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_kernel_matches_reference_for_decode_batches(head_dim: int, dtype: Any) -> None:
    """Decode tokens and drafts only (one group: the whole step), GQA 3:1 as SmolLM2, long contexts."""
    block_size = 16
    decodes = ((200, 1), (0, 1), (15, 1), (16, 5), (333, 1), (47, 3))
    case = _random_attention_case(
        dtype,
        block_size=block_size,
        seed=1,
        chunks=decodes,
        n_blocks=96,
        n_kv=3,
        n_heads=9,
        head_dim=head_dim,
    )
    q, k_cache, v_cache, spans, slots = case
    meta = build_metadata(spans, slots, block_size=block_size, n_rep=3, impl="paged", dtype=dtype)
    assert meta.identity and meta.groups[0].token_seq is not None
    got = attend(q, k_cache, v_cache, meta, scale=head_dim**-0.5).float()
    reference = _naive_attention(case, block_size).float()
    assert (got - reference).abs().max().item() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_a_prompt_prefilled_whole_attends_as_its_tail_does_after_a_prefix_hit() -> None:
    """bf16 under the paged impl: a long chunk (SDPA) and the same last queries as a short chunk (the C++
    kernel, as after a prefix-cache hit) compute alike (both in float32, rounded once). In bf16 SDPA they
    differed enough to change a greedy answer between a request and its repeat."""
    if kernel_op("paged_attention") is None:
        pytest.skip("the paged kernel did not build")
    block_size, tail = 16, 4
    case = _random_attention_case(
        torch.bfloat16, block_size=block_size, seed=3, chunks=((0, 40),), n_kv=3, n_heads=9, head_dim=64
    )
    q, k_cache, v_cache, spans, slots = case
    scale = 64**-0.5
    whole_meta = build_metadata(spans, slots, block_size=block_size, n_rep=3, impl="paged", dtype=q.dtype)
    assert whole_meta.groups[0].token_seq is None  # the long chunk goes to SDPA
    whole = attend(q, k_cache, v_cache, whole_meta, scale=scale)[-tail:]
    span = SeqSpan(40 - tail, tail, spans[0].block_table)
    short_meta = build_metadata(
        [span], slots[-tail:], block_size=block_size, n_rep=3, impl="paged", dtype=q.dtype
    )
    assert short_meta.groups[0].token_seq is not None  # the short chunk goes to the kernel
    short = attend(q[-tail:].contiguous(), k_cache, v_cache, short_meta, scale=scale)
    # Both round float32 results of the same math once: at most one bf16 step apart, and nearly all equal.
    step = whole.float().abs().clamp_min(2**-20) * 2**-7
    assert ((whole.float() - short.float()).abs() <= step).all()
    assert (whole == short).float().mean().item() > 0.95


def test_paged_kernel_is_built_here() -> None:
    """CI and every machine with g++ and ninja must run the kernel, not silently fall back to SDPA."""
    if kernels_disabled():
        pytest.skip("SWITCHBOARD_KERNELS=off")
    assert kernel_op("paged_attention") is not None
    assert resolve_impl("auto", device=torch.device("cpu"), dtype=torch.bfloat16) == "paged"


def _teacher_forced_logits(runner: Any) -> list[torch.Tensor]:
    vocab = runner.vocab_size
    seqs = [
        ToySeq(i, _random_tokens(t, vocab, seed=i), p, a, c, t) for i, (a, p, c, t) in enumerate(SCHEDULE)
    ]
    out: list[torch.Tensor] = []
    for _ in drive(runner, seqs, lambda seq, chunk, logits: out.append(logits), all_logits=True):
        pass
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_size", [4, 256])
def test_flash_attention_agrees_with_sdpa(block_size: int) -> None:
    pytest.importorskip("flash_attn")
    case = _random_attention_case(torch.bfloat16, device="cuda", block_size=block_size)
    sdpa = _attend_with("sdpa", case, block_size)
    flash = _attend_with("flash", case, block_size)
    assert (sdpa - flash).abs().max().item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_size", [16, 256])
def test_flash_model_agrees_with_sdpa(block_size: int) -> None:
    pytest.importorskip("flash_attn")
    hf = tiny_hf_model("llama")
    runs = {
        impl: _teacher_forced_logits(
            tiny_runner(hf, dtype=torch.bfloat16, attn_impl=impl, device="cuda", block_size=block_size)
        )
        for impl in ("sdpa", "flash")
    }
    scale = max(x.abs().max().item() for x in runs["sdpa"])
    diff = max((a - b).abs().max().item() for a, b in zip(runs["sdpa"], runs["flash"], strict=True))
    assert diff < 0.02 * scale


def test_args_from_configs() -> None:
    llama = ModelArgs.from_hf_config(tiny_hf_model("llama").config)
    assert (llama.n_heads, llama.n_kv_heads, llama.head_dim, llama.tie_word_embeddings) == (4, 2, 16, True)
    assert not llama.qkv_bias and llama.rope_scaling is None
    qwen = ModelArgs.from_hf_config(tiny_hf_model("qwen2").config)
    assert qwen.qkv_bias and not qwen.o_bias and qwen.rope_theta == 1_000_000.0
    scaled = ModelArgs.from_hf_config(tiny_hf_model("llama3_rope").config)
    assert scaled.rope_scaling is not None and scaled.rope_scaling.kind == "llama3"
    mistral = ModelArgs.from_hf_config(tiny_hf_model("mistral").config)
    assert mistral.sliding_window == 64 and mistral.max_seq_len == 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
    ],
)
def test_args_refuse_what_the_engine_cannot_reproduce(change: dict[str, Any], message: str) -> None:
    config = tiny_hf_model("llama").config
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedModelError, match=message):
        ModelArgs.from_hf_config(config)


def test_runner_refuses_positions_past_the_context_limit() -> None:
    runner = tiny_runner(tiny_hf_model("mistral"), block_size=16)
    with pytest.raises(ValueError, match="exceed the model's 64"):
        runner.execute(StepPlan((SeqChunk(0, tuple(range(65)), 0, tuple(range(5)), 1),)))


def test_build_model_releases_transformers_weights() -> None:
    hf = tiny_hf_model("llama")
    reference = _reference_logits(hf, list(range(10)))
    runner = tiny_runner(hf)  # keeps hf's weights: the reference must stay usable
    model = build_model(hf, release_source=True)
    assert all(p.device.type == "meta" for p in hf.parameters())
    assert model.lm_head.weight is model.embed_tokens.weight  # tied like SmolLM2
    runner.model = model
    diff = (_teacher_one(runner, list(range(10))) - reference).abs().max().item()
    assert diff < TINY_ATOL


def _teacher_one(runner: Any, tokens: list[int]) -> torch.Tensor:
    seq = ToySeq(0, tokens, len(tokens), 0, len(tokens), len(tokens))
    out: list[torch.Tensor] = []
    for _ in drive(runner, [seq], lambda s, c, logits: out.append(logits), all_logits=True):
        pass
    return torch.cat(out)


@pytest.mark.model
def test_smollm2_matches_transformers(smollm2: Any) -> None:
    hf, tokenizer = smollm2.model, smollm2.tokenizer
    runner = tiny_runner(hf, block_size=16, kv_cache_mb=64)
    texts = [
        "The capital of France is Paris, and the capital of Italy is Rome. Both cities are famous for",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
        "Once upon a time, in a land far away, there lived a",
    ]
    token_lists = [tokenizer(t)["input_ids"] for t in texts]
    seqs = [
        ToySeq(
            i,
            list(tokens),
            prompt_len=len(tokens) // 2,
            arrival_step=i,
            chunk_size=(4, 9, 1)[i],
            max_len=len(tokens),
        )
        for i, tokens in enumerate(token_lists)
    ]
    assert _teacher_forced_max_diff(runner, hf, seqs) < SMOLLM2_ATOL
    configured = hf.generation_config.eos_token_id
    eos = set(configured) if isinstance(configured, list) else {configured}
    prompts = [tokens[: len(tokens) // 2] for tokens in token_lists]
    ours = _greedy_tokens(runner, prompts, new_tokens=16, eos=eos)
    assert ours == [_generate(hf, p, 16) for p in prompts]


@pytest.mark.parametrize("rows", [1, 37])
def test_rms_norm_kernel_reproduces_the_torch_path(rows: int) -> None:
    """bf16: bit for bit (the same two roundings); float32: within summation-order noise."""
    from backends.local.engine.model import RMSNorm

    g = torch.Generator().manual_seed(rows)
    for dtype, tol in ((torch.bfloat16, 0.0), (torch.float32, 1e-6)):
        norm = RMSNorm(576, 1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(576, generator=g) * 0.5 + 1)
        x = (torch.randn(rows, 576, generator=g) * 3).to(dtype)
        reference = norm(x)
        op = kernel_op("rms_norm")
        assert op is not None
        norm.kernel = op
        got = norm(x)
        assert got.dtype == dtype
        assert (got.float() - reference.float()).abs().max().item() <= tol * reference.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kernel_reproduces_the_torch_path(dtype: Any) -> None:
    """Rotated q bit for bit, rotated k and raw v written at the slots, nothing else in the cache touched."""
    from backends.local.engine.model import apply_rope

    op = kernel_op("rope_write")
    assert op is not None
    g = torch.Generator().manual_seed(3)
    n_q, n_kv, head_dim, tokens = 9, 3, 64, 7
    qkv = torch.randn(tokens, n_q + 2 * n_kv, head_dim, generator=g).to(dtype)
    angles = torch.randn(tokens, head_dim // 2, generator=g)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.tensor([5, 0, 17, 3, 30, 31, 8])
    caches = [torch.full((4, 8, n_kv, head_dim), 7.0, dtype=dtype) for _ in range(4)]
    q = op(qkv, cos, sin, slots, caches[0], caches[1], n_q)
    qk = apply_rope(qkv[:, : n_q + n_kv], cos, sin)
    caches[2].view(-1, n_kv, head_dim).index_copy_(0, slots, qk[:, n_q:])
    caches[3].view(-1, n_kv, head_dim).index_copy_(0, slots, qkv[:, n_q + n_kv :])
    assert torch.equal(q, qk[:, :n_q])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_rope_write_kernel_writes_a_bf16_cache_under_float32_as_the_torch_path() -> None:
    """float32 compute over a bfloat16 KV cache: q as the float32 path gives it, k and v rounded to bf16 once
    (as `KVCache.write` rounds them on the torch path)."""
    from backends.local.engine.model import apply_rope

    op = kernel_op("rope_write")
    assert op is not None
    g = torch.Generator().manual_seed(4)
    n_q, n_kv, head_dim, tokens = 9, 3, 64, 7
    qkv = torch.randn(tokens, n_q + 2 * n_kv, head_dim, generator=g)
    angles = torch.randn(tokens, head_dim // 2, generator=g)
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([5, 0, 17, 3, 30, 31, 8])
    caches = [torch.full((4, 8, n_kv, head_dim), 7.0, dtype=torch.bfloat16) for _ in range(4)]
    q = op(qkv, cos, sin, slots, caches[0], caches[1], n_q)
    qk = apply_rope(qkv[:, : n_q + n_kv], cos, sin)
    caches[2].view(-1, n_kv, head_dim).index_copy_(0, slots, qk[:, n_q:].to(torch.bfloat16))
    caches[3].view(-1, n_kv, head_dim).index_copy_(0, slots, qkv[:, n_q + n_kv :].to(torch.bfloat16))
    assert q.dtype == torch.float32 and torch.equal(q, qk[:, :n_q])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(RuntimeError, match="bfloat16 under float32"):
        op(qkv.to(torch.bfloat16), cos.to(torch.bfloat16), sin.to(torch.bfloat16), slots,
           caches[0].float(), caches[1].float(), n_q)  # fmt: skip


@pytest.mark.parametrize("head_dim", [64, 20])  # the vector path and the scalar one
def test_paged_kernel_reads_a_bf16_cache_under_float32_queries(head_dim: int) -> None:
    """The mixed kernel widens bf16 keys and values exactly: its output is the float32 kernel's over the same
    cache widened to float32, bit for bit, and matches the float64 reference as closely."""
    block_size = 16
    case = _random_attention_case(
        torch.float32, block_size=block_size, seed=2, chunks=((200, 1), (0, 1), (16, 5), (47, 3)),
        n_blocks=64, n_kv=3, n_heads=9, head_dim=head_dim,
    )  # fmt: skip
    q, k_cache, v_cache, spans, slots = case
    k16, v16 = k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16)
    meta = build_metadata(spans, slots, block_size=block_size, n_rep=3, impl="paged", dtype=torch.float32)
    scale = head_dim**-0.5
    got = attend(q, k16, v16, meta, scale=scale)
    widened = attend(q, k16.float(), v16.float(), meta, scale=scale)
    assert got.dtype == torch.float32 and torch.equal(got, widened)
    reference = _naive_attention((q, k16.float(), v16.float(), spans, slots), block_size).float()
    assert (got - reference).abs().max().item() < 1e-5


def test_a_bf16_cache_under_float32_compute_stays_close_to_transformers() -> None:
    """A float32 model over a bfloat16 KV cache (what `--kv-dtype auto` gives float32 engines on CPU): the C++
    kernels and the torch path agree, and the logits sit between float32's and bfloat16 compute's distance
    from transformers (on the tiny model, logits up to ~7: ~0.10 against bf16 compute's ~0.22)."""
    hf = tiny_hf_model("llama")

    def diff(**options: Any) -> float:
        runner = tiny_runner(hf, **options)
        return _teacher_forced_max_diff(runner, hf, _random_seqs(SCHEDULE, hf.config.vocab_size))

    kernels = tiny_runner(hf, attn_impl="auto", kv_dtype=torch.bfloat16)
    assert kernels.kv_cache.dtype == torch.bfloat16 and kernels.dtype == torch.float32
    mixed = _teacher_forced_max_diff(kernels, hf, _random_seqs(SCHEDULE, hf.config.vocab_size))
    bf16 = diff(dtype=torch.bfloat16)
    # really 16-bit, and closer than bf16 compute (with long chunks' attention in bf16 where this CPU has it)
    assert TINY_ATOL < mixed < 0.7 * bf16, (mixed, bf16)
    kernels.prefill_dtype = None  # attention all in float32: the kernels and the torch path agree
    exact = _teacher_forced_max_diff(kernels, hf, _random_seqs(SCHEDULE, hf.config.vocab_size))
    plain = diff(attn_impl="sdpa", kv_dtype=torch.bfloat16, kernels=False)
    assert abs(plain - exact) < 1e-3, (plain, exact)
