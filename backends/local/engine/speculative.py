"""Speculative decoding: draft proposal (prompt lookup, a draft model, an int4 self-draft) and accept/reject.

Proposers implement the engine's `Proposer` seam and propose deterministic drafts (n-gram continuations or a
draft model's argmax), so each draft's q is a point mass. Verification keeps the target's distribution: greedy
output equals plain decoding token for token, and `verify_sampled` is the Leviathan/Chen rule (accept x with
prob min(1, p(x)/q(x)), else resample from norm(max(0, p - q))). Each sequence's draft length adapts to an
EWMA of its acceptance rate, which a proposer infers from the tokens that follow its previous drafts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from backends.local.engine.engine import DraftQuery, Proposer
from backends.local.engine.kv_cache import BlockAllocator, blocks_needed
from backends.local.engine.model import Transformer
from backends.local.engine.runner import ModelRunner, build_runner
from backends.local.engine.sampler import residual_probabilities, sample_from_probs
from backends.local.engine.types import SeqChunk, StepPlan

SPEC_KINDS = ("ngram", "draft", "self")

# -- accept / reject ---------------------------------------------------------------------------------------


def verify_greedy(drafts: Sequence[int], target_argmax: Sequence[int]) -> list[int]:
    """Drafts while they equal the target's argmax, then the target's own token (len(drafts) + 1 argmaxes)."""
    accepted: list[int] = []
    for draft, token in zip(drafts, target_argmax, strict=False):
        accepted.append(token)
        if token != draft:
            return accepted
    accepted.append(target_argmax[len(drafts)])
    return accepted


def verify_sampled(
    drafts: Sequence[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
) -> list[int]:
    """Leviathan et al. accept/reject over one sequence's drafts; the output is distributed as the target's.

    `target_probs` (len(drafts) + 1, V) are the target's sampling distributions after each chunk input (as
    `sampler.probabilities`); `draft_probs` (len(drafts), V) the drafter's, or None for point-mass drafts.
    Draws one uniform per decided position from `generator`.
    """
    accepted: list[int] = []
    for i, x in enumerate(drafts):
        p = target_probs[i]
        q = draft_probs[i] if draft_probs is not None else _one_hot(x, p)
        u = float(torch.rand(1, generator=generator))
        if float(q[x]) > 0 and u * float(q[x]) < float(p[x]):  # u < min(1, p(x) / q(x))
            accepted.append(x)
            continue
        residual = residual_probabilities(p[None], q[None])
        accepted.append(int(sample_from_probs(residual, torch.rand(1, generator=generator))[0]))
        return accepted
    last = target_probs[len(drafts)][None]
    accepted.append(int(sample_from_probs(last, torch.rand(1, generator=generator))[0]))
    return accepted


def _one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q


# -- adaptive draft length -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Track:
    length: int
    rate: float  # EWMA of accepted / drafted
    context_len: int = 0  # len(token_ids) when the last drafts were proposed
    drafts: tuple[int, ...] = ()
    idle: int = 0  # steps since the last probe while the length is 0


@dataclass(slots=True)
class DraftLength:
    """Per-sequence draft length: +1 while its acceptance EWMA is >= `raise_at`, -1 while < `lower_at`.

    It may fall to 0: a sequence whose drafts keep failing stops paying for verify rows, and every
    `probe_every`-th step it drafts one token to find out whether drafting pays again (two accepted
    probes in a row bring it back from a rate near 0).
    """

    max_len: int = 8
    min_len: int = 0
    probe_every: int = 8
    alpha: float = 0.5
    raise_at: float = 0.7
    lower_at: float = 0.35
    drafted: int = 0
    accepted: int = 0
    _tracks: dict[int, _Track] = field(default_factory=dict)

    def limit(self, query: DraftQuery) -> int:
        """Learn from how `query.token_ids` continued the last drafts; the number of drafts to propose now."""
        track = self._tracks.setdefault(query.seq_id, _Track(min(self.max_len, 2), rate=0.5))
        if track.drafts and len(query.token_ids) > track.context_len:
            after = query.token_ids[track.context_len :]
            hits = 0
            for draft, token in zip(track.drafts, after, strict=False):
                if draft != token:
                    break
                hits += 1
            self.observe(query.seq_id, len(track.drafts), hits)
        track.drafts = ()
        if track.length == 0:
            track.idle += 1
            if track.idle < self.probe_every:
                return 0
            track.idle = 0
            return min(1, query.max_drafts)
        return max(0, min(track.length, query.max_drafts))

    def observe(self, seq_id: int, drafted: int, accepted: int) -> None:
        track = self._tracks.setdefault(seq_id, _Track(min(self.max_len, 2), rate=0.5))
        self.drafted += drafted
        self.accepted += accepted
        track.rate = (1 - self.alpha) * track.rate + self.alpha * accepted / drafted
        if track.rate >= self.raise_at:
            track.length = min(self.max_len, track.length + 1)
        elif track.rate < self.lower_at:
            track.length = max(self.min_len, track.length - 1)

    def proposed(self, query: DraftQuery, drafts: tuple[int, ...]) -> None:
        track = self._tracks[query.seq_id]
        track.context_len, track.drafts = len(query.token_ids), drafts

    def length(self, seq_id: int) -> int | None:
        track = self._tracks.get(seq_id)
        return None if track is None else track.length

    def release(self, seq_id: int) -> None:
        self._tracks.pop(seq_id, None)


# -- prompt lookup -------------------------------------------------------------------------------------------


def lookup_ngram(tokens: Sequence[int], k: int, *, max_n: int = 3, min_n: int = 1) -> tuple[int, ...]:
    """Up to `k` tokens that followed the latest earlier occurrence of the context's last n tokens.

    Tries n = max_n down to min_n and takes the longest suffix that occurs earlier in `tokens`.
    """
    size = len(tokens)
    if k <= 0:
        return ()
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = list(tokens[size - n :])
        first = suffix[0]
        for start in range(size - n - 1, -1, -1):  # latest match first: it best predicts a repetition
            if tokens[start] == first and list(tokens[start : start + n]) == suffix:
                return tuple(tokens[start + n : start + n + k])
    return ()


class NgramProposer:
    """Prompt lookup: drafts are what followed the last few tokens earlier in the same context."""

    def __init__(self, *, max_n: int = 3, min_n: int = 1, lengths: DraftLength | None = None) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.lengths = lengths or DraftLength()

    def propose(self, queries: Sequence[DraftQuery]) -> list[tuple[int, ...]]:
        out = []
        for query in queries:
            drafts = lookup_ngram(
                query.token_ids, self.lengths.limit(query), max_n=self.max_n, min_n=self.min_n
            )
            self.lengths.proposed(query, drafts)
            out.append(drafts)
        return out

    def release(self, seq_id: int) -> None:
        self.lengths.release(seq_id)


# -- draft model ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _DraftSeq:
    blocks: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # tokens whose K/V the draft cache holds, in order


class DraftModelProposer:
    """Greedy drafts from a small model (same vocabulary) that runs over its own paged KV cache.

    Per sequence the draft cache keeps the longest prefix that still matches the context; each `propose`
    feeds the new tokens, then decodes the drafts one batched step at a time.
    """

    def __init__(self, runner: ModelRunner, *, lengths: DraftLength | None = None) -> None:
        self.runner = runner
        self.lengths = lengths or DraftLength()
        self._allocator = BlockAllocator(runner.kv_cache.num_blocks)
        self._seqs: dict[int, _DraftSeq] = {}

    def propose(self, queries: Sequence[DraftQuery]) -> list[tuple[int, ...]]:
        wanted: dict[int, int] = {}  # seq_id -> drafts to make
        feeds: dict[int, tuple[int, ...]] = {}  # seq_id -> tokens the next draft step feeds
        for query in queries:
            k = self.lengths.limit(query)
            if k > 0 and self._prepare(query, k):
                wanted[query.seq_id] = k
                state = self._seqs[query.seq_id]
                feeds[query.seq_id] = query.token_ids[len(state.cached) :]
        drafts: dict[int, list[int]] = {seq_id: [] for seq_id in wanted}
        while feeds:
            ids = list(feeds)
            chunks = []
            for seq_id in ids:
                state = self._seqs[seq_id]
                chunks.append(SeqChunk(seq_id, feeds[seq_id], len(state.cached), tuple(state.blocks)))
            tokens = self.runner.execute(StepPlan(tuple(chunks))).argmax(dim=-1).tolist()
            feeds = {}
            for seq_id, chunk, token in zip(ids, chunks, tokens, strict=True):
                self._seqs[seq_id].cached += chunk.token_ids
                drafts[seq_id].append(token)
                if len(drafts[seq_id]) < wanted[seq_id]:
                    feeds[seq_id] = (token,)
        out = []
        for query in queries:
            proposal = tuple(drafts.get(query.seq_id, ()))
            self.lengths.proposed(query, proposal)
            out.append(proposal)
        return out

    def _prepare(self, query: DraftQuery, k: int) -> bool:
        """Trim stale cache entries and grow the blocks for `k` drafts; False when there is no room."""
        tokens = query.token_ids
        if len(tokens) + k > self.runner.max_seq_len:
            return False
        state = self._seqs.setdefault(query.seq_id, _DraftSeq())
        keep = 0
        limit = min(len(state.cached), len(tokens) - 1)  # at least one token is fed: its logits are needed
        while keep < limit and state.cached[keep] == tokens[keep]:
            keep += 1
        del state.cached[keep:]  # rejected drafts' K/V are overwritten by the next feed
        more = blocks_needed(len(tokens) + k - 1, self.runner.block_size) - len(state.blocks)
        if more > 0:
            blocks = self._allocator.allocate(more)
            if blocks is None:  # the draft cache is full: this sequence goes without drafts
                self.release(query.seq_id)
                return False
            state.blocks += blocks
        return True

    def release(self, seq_id: int) -> None:
        state = self._seqs.pop(seq_id, None)
        if state is not None:
            self._allocator.free(state.blocks)
        self.lengths.release(seq_id)


# -- assembly ------------------------------------------------------------------------------------------------


def self_draft_model(target: Transformer, *, lm_head: str = "int8", group_size: int = 32) -> Transformer:
    """An int4 copy of `target` (CPU only: the int4 kernel is the CPU one); the target is untouched."""
    from backends.local.engine.quant import quantize_model

    draft = copy.deepcopy(target)
    quantize_model(draft, "int4", group_size=group_size, lm_head=lm_head)
    return draft


def build_proposer(
    kind: str,
    *,
    target: Transformer,
    draft_model: str | None = None,
    load_draft: Callable[[str], Any] | None = None,
    device: str = "cpu",
    kv_cache_mb: float = 256.0,
    block_size: int = 16,
    max_drafts: int = 8,
) -> Proposer:
    """The proposer for `--spec KIND`: "ngram", "self" (int4 copy of `target`) or "draft" (`draft_model`,
    which `load_draft` turns into a transformers model: loading files is the adapter's job)."""
    lengths = DraftLength(max_len=max_drafts)
    if kind == "ngram":
        return NgramProposer(lengths=lengths)
    if kind == "self":
        if device != "cpu":
            raise ValueError("--spec self quantizes to int4 with the CPU kernel; use --device cpu")
        drafter = self_draft_model(target)
    elif kind == "draft":
        if not draft_model or load_draft is None:
            raise ValueError("--spec draft needs --draft-model (a GGUF file, HF directory or pkg:PKG/FILE)")
        drafter = _draft_of(draft_model, load_draft(draft_model), target, device)
    else:
        raise ValueError(f"--spec `{kind}` is unknown; use one of {', '.join(SPEC_KINDS)}")
    runner = build_runner(drafter, kv_cache_mb=kv_cache_mb, block_size=block_size, attn_impl="auto")
    return DraftModelProposer(runner, lengths=lengths)


def _draft_of(spec: str, loaded: Any, target: Transformer, device: str) -> Transformer:
    from backends.local.engine.weights import build_model

    dtype = target.dtype
    drafter = build_model(loaded.model, dtype=dtype, device=device, release_source=True)
    if drafter.args.vocab_size != target.args.vocab_size:
        raise ValueError(
            f"--draft-model `{spec}` has a vocabulary of {drafter.args.vocab_size} tokens, the target "
            f"{target.args.vocab_size}; the draft must share the target's tokenizer"
        )
    return drafter
