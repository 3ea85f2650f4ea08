"""Paged attention: `attend` computes every sequence's attention over its cached prefix plus its new tokens.

The implementation is chosen per step by `AttentionMetadata.impl` (the runner's `attn_impl` argument; there is
no module-level switch): "sdpa" (torch scaled_dot_product_attention), "eager" (reference math, what
transformers' eager path computes), "flash" (flash_attn on CUDA) or "paged" (CPU: our C++ kernel,
`kernels.py`, for the short chunks, reading K/V blocks in place; SDPA for long prefill chunks). "auto" picks
one per device (`resolve_impl`). Under "paged" over a bfloat16 cache on a CPU that multiplies bf16 natively
(AMX, AVX512-BF16), prompt chunks' SDPA computes in bf16 (`prefill_dtype`), the tail of a prompt after a
prefix-cache hit included. Sequences are grouped: all short chunks (decode tokens, speculative drafts) go in
one batch, each long prefill chunk on its own.
Queries are left-padded so the real ones end at the sequence's last key: query row j of a group with q_len Q
sits at position ctx_len - Q + j, and it sees key positions <= that (bottom-right causal, as flash does).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from backends.local.engine.kernels import kernel_isa, kernel_op
from backends.local.engine.kv_cache import blocks_needed

AttnImpl = Literal["sdpa", "eager", "flash", "paged"]
ATTN_IMPLS: tuple[AttnImpl, ...] = ("sdpa", "eager", "flash", "paged")
ATTN_CHOICES = ("auto", *ATTN_IMPLS)  # what `--attn` accepts
MAX_BATCHED_Q = 8  # chunks with at most this many new tokens share one padded attention call


@dataclass(frozen=True, slots=True)
class AttnGroup:
    """Sequences attended in one call: `batch` sequences, queries left-padded to `q_len` rows each."""

    batch: int
    q_len: int
    block_table: torch.Tensor  # (B, nb) long: blocks covering the group's longest context (0-padded)
    ctx_lens: torch.Tensor  # (B,) int32: keys per sequence once this step's K/V are written
    # sdpa: additive 0 / -inf in the model dtype, (B, 1, n_rep*Q, L) or (B, 1, 1, L) for one query;
    # eager: bool (B, 1, Q, L), True = may attend; flash: None (it masks by ctx_lens).
    mask: torch.Tensor | None
    q_rows: torch.Tensor | None  # (B*Q,) long: packed token row of each padded query; None = identity
    real_rows: torch.Tensor | None  # (n,) long: padded rows holding real queries; None = all of them
    out_rows: torch.Tensor | None  # (n,) long: the packed rows those queries belong to
    # "paged" short group only (queries unpadded, in packed order): per query, its block-table row and how
    # many leading positions it sees. Then q_rows/real_rows are None and out_rows picks the packed rows.
    token_seq: torch.Tensor | None = None  # (n,) long
    token_keys: torch.Tensor | None = None  # (n,) long
    compute_dtype: torch.dtype | None = None  # SDPA's inputs and mask (`prefill_dtype`); None: the model's


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """What `attend` needs for one step, built once and shared by every layer."""

    slots: torch.Tensor  # (T,) long: flat cache slot of each new token, where its K/V are written
    groups: tuple[AttnGroup, ...]
    num_tokens: int
    impl: AttnImpl
    identity: bool  # one group, no padding, rows in packed order: its output is the step's output


@dataclass(frozen=True, slots=True)
class SeqSpan:
    """One sequence's share of a step: `num_tokens` new tokens at `start_pos` (packed rows in order)."""

    start_pos: int
    num_tokens: int
    block_table: Sequence[int]
    prefill: bool = False  # prompt tokens: with a `long_dtype`, attended as a long chunk however few


def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_impl(impl: str, *, device: torch.device, dtype: torch.dtype) -> AttnImpl:
    """ "auto" -> flash on CUDA with flash_attn and a 16-bit dtype, else sdpa on CUDA; paged on CPU when the
    C++ kernel builds (float32/bfloat16), else sdpa. Any other name is checked by `check_impl`."""
    if impl != "auto":
        return check_impl(impl, device=device, dtype=dtype)
    if device.type == "cuda":
        fp16 = dtype in (torch.float16, torch.bfloat16)
        return "flash" if fp16 and flash_available() else "sdpa"
    cpu = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    return "paged" if cpu and kernel_op("paged_attention") is not None else "sdpa"


def check_impl(impl: str, *, device: torch.device, dtype: torch.dtype) -> AttnImpl:
    """Validate an implementation name for a device and dtype; the message says what to change."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention impl `{impl}` is unknown; choose one of {', '.join(ATTN_CHOICES)}")
    if impl == "paged":
        if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("attention impl `paged` runs on CPU in float32 or bfloat16; use `sdpa`/`auto`")
        if kernel_op("paged_attention") is None:
            raise ValueError(
                "attention impl `paged` needs its C++ kernel, which did not build (see the log); use `sdpa`"
            )
    if impl == "flash":
        if device.type != "cuda" or not flash_available():
            raise ValueError("attention impl `flash` needs CUDA and the flash_attn package; use `sdpa`")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention impl `flash` needs float16 or bfloat16 weights, not {dtype}")
    return impl


def prefill_dtype(impl: AttnImpl, dtype: torch.dtype, cache_dtype: torch.dtype) -> torch.dtype | None:
    """bfloat16 where prompt chunks' SDPA computes in bf16 (K/V read as cached, queries rounded once, softmax
    and sums in float32): under "paged", over a bfloat16 cache, with float32 or bf16 compute, where the
    kernels run bf16 and the CPU has AMX: ~1.5x float32's speed on a warm agent turn's chunk over its
    history there; AVX512-BF16 without AMX (Zen 4) timed 0.92-1.04x, so float32. None elsewhere: float32, as
    the kernel computes short chunks (`--kv-dtype float32` keeps all of attention in float32)."""
    # torch's bf16 SDPA must run its AVX-512 code too: under ATEN_CPU_CAPABILITY=avx2 on such a CPU it fails
    amx = impl == "paged" and "bf16" in kernel_isa() and torch.cpu._is_amx_tile_supported()
    native = amx and torch.backends.cpu.get_cpu_capability() == "AVX512"
    fits = cache_dtype == torch.bfloat16 and dtype in (torch.float32, torch.bfloat16)
    return torch.bfloat16 if native and fits else None


def build_metadata(
    spans: Sequence[SeqSpan],
    slots: torch.Tensor,
    *,
    block_size: int,
    n_rep: int,
    impl: AttnImpl = "sdpa",
    max_batched_q: int = MAX_BATCHED_Q,
    dtype: torch.dtype = torch.float32,
    long_dtype: torch.dtype | None = None,
) -> AttentionMetadata:
    """Group the spans and precompute masks and row maps for all layers of one step (`dtype`: the model's;
    `long_dtype`: prompt chunks' SDPA dtype from `prefill_dtype`; None: the default path)."""
    row_starts, row = [], 0
    for s in spans:
        row_starts.append(row)
        row += s.num_tokens
    # With a `long_dtype`, a prompt's last few tokens (after a prefix-cache hit) are computed as they would be
    # in a longer chunk, so a prompt sent twice gets the same logits however much of it was cached.
    cap = max_batched_q
    short = [i for i, s in enumerate(spans) if s.num_tokens <= cap and not (long_dtype and s.prefill)]
    members = [(short, True)] if short else []  # (span indices, whether it is the short group)
    members += [([i], False) for i in sorted(set(range(len(spans))) - set(short))]
    groups = []
    for m, is_short in members:
        group_spans, starts = [spans[i] for i in m], [row_starts[i] for i in m]
        alone = len(members) == 1
        if impl == "paged" and is_short:
            groups.append(_build_paged_group(group_spans, starts, block_size, alone, slots.device))
            continue
        group_impl: AttnImpl = "sdpa" if impl == "paged" else impl  # paged: long prefill chunks use SDPA
        group_dtype = long_dtype if group_impl == "sdpa" else None
        args = (block_size, n_rep, group_impl, alone, slots.device, dtype, group_dtype)
        groups.append(_build_group(group_spans, starts, *args))
    identity = len(groups) == 1 and groups[0].q_rows is None
    return AttentionMetadata(slots=slots, groups=tuple(groups), num_tokens=row, impl=impl, identity=identity)


def _context(spans: list[SeqSpan], block_size: int) -> tuple[list[int], int, list[list[int]]]:
    """Keys per span once this step is written, the blocks covering the longest (nb), and each span's first
    nb blocks, 0-padded: the group's (B, nb) block table."""
    ctx = [s.start_pos + s.num_tokens for s in spans]
    nb = blocks_needed(max(ctx), block_size)
    return ctx, nb, [list(s.block_table[:nb]) + [0] * (nb - len(s.block_table[:nb])) for s in spans]


def _build_group(
    spans: list[SeqSpan],
    row_starts: list[int],
    block_size: int,
    n_rep: int,
    impl: AttnImpl,
    alone: bool,
    device: torch.device,
    dtype: torch.dtype,
    compute_dtype: torch.dtype | None = None,
) -> AttnGroup:
    batch, q_len = len(spans), max(s.num_tokens for s in spans)
    ctx, nb, table = _context(spans, block_size)
    q_rows: list[int] = []
    real_rows: list[int] = []
    out_rows: list[int] = []
    for b, (s, r0) in enumerate(zip(spans, row_starts, strict=True)):
        pad = q_len - s.num_tokens
        q_rows += [r0] * pad + list(range(r0, r0 + s.num_tokens))
        real_rows += range(b * q_len + pad, (b + 1) * q_len)
        out_rows += range(r0, r0 + s.num_tokens)
    # The only group, unpadded, in packed order: its output rows are the step's rows.
    identity = alone and q_rows == list(range(batch * q_len))
    return AttnGroup(
        batch=batch,
        q_len=q_len,
        block_table=torch.tensor(table, dtype=torch.long, device=device),
        ctx_lens=torch.tensor(ctx, dtype=torch.int32, device=device),
        mask=_mask(ctx, q_len, nb * block_size, n_rep, impl, device, compute_dtype or dtype),
        q_rows=None if identity else torch.tensor(q_rows, dtype=torch.long, device=device),
        real_rows=None if identity else torch.tensor(real_rows, dtype=torch.long, device=device),
        out_rows=None if identity else torch.tensor(out_rows, dtype=torch.long, device=device),
        compute_dtype=compute_dtype,
    )


def _build_paged_group(
    spans: list[SeqSpan], row_starts: list[int], block_size: int, alone: bool, device: torch.device
) -> AttnGroup:
    """The short group for the paged kernel: no padding, no mask; each query has its row and causal limit."""
    ctx, _, table = _context(spans, block_size)
    token_seq: list[int] = []
    token_keys: list[int] = []
    out_rows: list[int] = []
    for b, (s, r0) in enumerate(zip(spans, row_starts, strict=True)):
        token_seq += [b] * s.num_tokens
        token_keys += range(s.start_pos + 1, s.start_pos + s.num_tokens + 1)
        out_rows += range(r0, r0 + s.num_tokens)
    identity = alone and out_rows == list(range(len(out_rows)))
    return AttnGroup(
        batch=len(spans),
        q_len=max(s.num_tokens for s in spans),
        block_table=torch.tensor(table, dtype=torch.long, device=device),
        ctx_lens=torch.tensor(ctx, dtype=torch.int32, device=device),
        mask=None,
        q_rows=None,
        real_rows=None,
        out_rows=None if identity else torch.tensor(out_rows, dtype=torch.long, device=device),
        token_seq=torch.tensor(token_seq, dtype=torch.long, device=device),
        token_keys=torch.tensor(token_keys, dtype=torch.long, device=device),
    )


def _mask(
    ctx: list[int],
    q_len: int,
    num_keys: int,
    n_rep: int,
    impl: AttnImpl,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    if impl == "flash":
        return None
    # Query row j of sequence b is at position ctx_b - Q + j; left-padding rows (< 0) see key 0 only.
    ctx_t = torch.tensor(ctx, dtype=torch.long, device=device)
    q_pos = (ctx_t[:, None] - q_len + torch.arange(q_len, device=device)).clamp(min=0)  # (B, Q)
    allowed = torch.arange(num_keys, device=device)[None, None, :] <= q_pos[:, :, None]  # (B, Q, L)
    allowed = allowed.unsqueeze(1)  # (B, 1, Q, L)
    if impl == "sdpa" and q_len > 1 and n_rep > 1:
        allowed = allowed.repeat(1, 1, n_rep, 1)  # rows g*Q + j: GQA heads stacked along the query axis
    if impl == "sdpa":
        # Additive, in the compute dtype: given a bool mask, CPU SDPA converts it in every layer.
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return allowed


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """(num_blocks, bs, Hkv, D) cache and (B, nb) table -> (B, nb*bs, Hkv, D), whole blocks in table order.

    index_select, not advanced indexing: on CPU `cache[table]` was three orders of magnitude slower here.
    """
    batch, nb = block_table.shape
    picked = cache.index_select(0, block_table.view(-1))  # (B*nb, bs, Hkv, D)
    return picked.view(batch, nb * cache.shape[1], cache.shape[2], cache.shape[3])


def attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *, scale: float
) -> torch.Tensor:
    """Attention of new queries q (T, H, D) over one layer's paged cache (num_blocks, bs, Hkv, D) -> (T, H*D).

    The new tokens' K/V must already be in the cache (`KVCache.write`).
    """
    if meta.identity:
        group = meta.groups[0]
        if group.token_seq is not None:
            return _paged(q, k_cache, v_cache, group, scale)
        return _attend_group(q, k_cache, v_cache, group, meta.impl, scale)
    num_tokens, n_heads, head_dim = q.shape
    out = q.new_empty(num_tokens, n_heads * head_dim)
    for group in meta.groups:
        assert group.out_rows is not None
        if group.token_seq is not None:
            picked = q.index_select(0, group.out_rows)
            out.index_copy_(0, group.out_rows, _paged(picked, k_cache, v_cache, group, scale))
            continue
        padded = _attend_group(q, k_cache, v_cache, group, meta.impl, scale)  # (B*Q, H*D)
        assert group.real_rows is not None
        out.index_copy_(0, group.out_rows, padded.index_select(0, group.real_rows))
    return out


def _paged(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttnGroup, scale: float
) -> torch.Tensor:
    """The C++ kernel over the group's queries (n, H, D), in their packed order -> (n, H*D)."""
    op = kernel_op("paged_attention")
    assert op is not None, "impl `paged` is only chosen once the kernel has loaded"
    out = op(q, k_cache, v_cache, group.block_table, group.token_seq, group.token_keys, scale)
    return out.view(q.shape[0], q.shape[1] * q.shape[2])


def _attend_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: AttnGroup,
    impl: AttnImpl,
    scale: float,
) -> torch.Tensor:
    batch, q_len, n_heads, head_dim = group.batch, group.q_len, q.shape[1], q.shape[2]
    q_pad = q if group.q_rows is None else q.index_select(0, group.q_rows)
    q_pad = q_pad.view(batch, q_len, n_heads, head_dim)
    if impl == "flash":
        out = _flash(q_pad, k_cache, v_cache, group, scale)
    else:
        k, v = gather_blocks(k_cache, group.block_table), gather_blocks(v_cache, group.block_table)
        mask, dtype = group.mask, q_pad.dtype
        assert mask is not None
        if group.compute_dtype is not None:  # `prefill_dtype`: K/V and the mask are in it already
            q_pad = q_pad.to(group.compute_dtype)
        elif impl == "paged" and dtype == torch.bfloat16:
            # The paged kernel's long chunks, in bf16: in float32, as the kernel computes its short ones
            # (bf16 widened exactly, float32 softmax and sums, one rounding at the end). In bf16 SDPA a prompt
            # prefilled whole and the same prompt's last tokens after a prefix-cache hit (a short chunk)
            # differed enough to change a greedy answer (tests/edge/test_node.py, on a bf16 machine).
            q_pad, k, v, mask = q_pad.float(), k.float(), v.float(), mask.float()
        elif k.dtype != dtype:  # a 16-bit cache under float32 compute: widened exactly
            k, v = k.to(dtype), v.to(dtype)
        fn = _eager if impl == "eager" else _sdpa  # "paged" groups that reach here are long: SDPA
        out = fn(q_pad, k, v, mask, scale).to(dtype)
    return out.reshape(batch * q_len, n_heads * head_dim)


def _stack_heads(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, Q, H, D) -> (B, Hkv, n_rep*Q, D): the query heads sharing a KV head, stacked along the query axis.

    GQA without repeating K/V; for one decode token per sequence it is a free view.
    """
    batch, q_len, n_heads, head_dim = q.shape
    if q_len == 1:
        return q.view(batch, n_kv, n_heads // n_kv, head_dim)
    return q.permute(0, 2, 1, 3).reshape(batch, n_kv, n_heads // n_kv * q_len, head_dim)


def _unstack_heads(out: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, Hkv, n_rep*Q, D) -> (B, Q, H, D)."""
    batch, n_kv, rows, head_dim = out.shape
    if q_len == 1:
        return out.view(batch, 1, n_kv * rows, head_dim)
    return out.view(batch, n_kv, rows // q_len, q_len, head_dim).permute(0, 3, 1, 2, 4)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q (B, Q, H, D), k/v (B, L, Hkv, D) -> (B, Q, H, D)."""
    qs = _stack_heads(q, k.shape[2])
    out = F.scaled_dot_product_attention(
        qs, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return _unstack_heads(out, q.shape[1])


def _eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Reference: repeat K/V per query head, softmax in float32 (as transformers' eager attention)."""
    n_rep = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # (B, H, Q, D)
    kh = k.transpose(1, 2).repeat_interleave(n_rep, dim=1)  # (B, H, L, D)
    vh = v.transpose(1, 2).repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(qh, kh.transpose(2, 3)) * scale  # (B, H, Q, L)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vh).transpose(1, 2)  # (B, Q, H, D)


def _flash(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttnGroup, scale: float
) -> torch.Tensor:
    """flash_attn over the paged cache; causal alignment is bottom-right, which left padding matches."""
    from flash_attn import flash_attn_with_kvcache

    if k_cache.shape[1] % 256 == 0:  # flash reads pages in place when they hold a multiple of 256 tokens
        table = group.block_table.to(torch.int32)
        return flash_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            cache_seqlens=group.ctx_lens,
            block_table=table,
            softmax_scale=scale,
            causal=True,
        )
    k, v = gather_blocks(k_cache, group.block_table), gather_blocks(v_cache, group.block_table)
    return flash_attn_with_kvcache(q, k, v, cache_seqlens=group.ctx_lens, softmax_scale=scale, causal=True)
