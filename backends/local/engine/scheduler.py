"""Iteration-level scheduling over a paged KV cache: which tokens of which sequences run in the next step.

`schedule() -> StepPlan`, then `update(plan, sampled) -> finished`. Decodes go first, then short prompts
(running or waiting interactive ones with at most `short_prefill_tokens` left after their cached prefix,
within half the budget), then the other prefill chunks (earliest due first) within `max_prefill_tokens`, then
waiting requests join, so a long prompt never stalls the running decodes for more than a step. A step with
short prompts to compute runs them alone (beside the decodes) while longer ones wait, and the next step
carries the longer ones' chunks whatever is short: a short prompt (an agent's next turn) waits only for the
step in progress, and a long prompt's chunks skip at most every other step. When blocks run out the latest-due
running sequence (without deadlines: the youngest) is preempted: its blocks are freed and it is recomputed
later from its prompt plus the tokens it already produced. Full, computed blocks are indexed by content
(`prefix_cache.PrefixIndex`), so a sequence starting with the same tokens shares them (ref-counted) instead of
recomputing; with prefix caching they stay cached after their sequence ends, evictable (LRU).
Priority classes: interactive sequences order ahead of batch ones (waiting and running alike), so batch
work is admitted only behind interactive work, is preempted first, and is preempted to admit interactive work.
Within a class, sequences order by deadline, earliest first (`SamplingParams.deadline_ms`, the caller's
time-to-first-token target; `default_deadline_ms` for one that gives none), then by arrival: admission and
prefill chunks go to the request with the least slack, and the latest-due running one is preempted first.
Without deadlines (or all alike) that is arrival order. A request whose own deadline passes before its first
token is re-queued as one without a deadline would be that arrived then (due `default_deadline_ms` later):
it can no longer be on time, so it stops holding back those that still can (as Triton's DELAY timeout
action), for a bounded while, never starved.
Invariants: a block is written only by its one holder, and shared only once full; a request is accepted only
if it could run alone in the whole cache, so the first running sequence always makes progress.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from backends.base import DEFAULT_DEADLINE_MS
from backends.local.engine.prefix_cache import PrefixIndex
from backends.local.engine.types import SeqChunk, StepPlan

# The short pass looks at most this far down the waiting queue past longer prompts: judging one short means
# matching its prefix, which under overload would otherwise cost a match per waiting sequence every step.
SHORT_SCAN_LIMIT = 32


class Priority(StrEnum):
    INTERACTIVE = "interactive"  # someone waits for it
    BATCH = "batch"  # background work: runs on capacity interactive work leaves, recomputed when preempted


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request knobs. `temperature == 0` means greedy; `seed=None` means fresh randomness.

    `stop` strings are matched by the caller's detokeniser (the engine sees token ids only): the caller
    aborts the request once its text contains one.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    priority: Priority = Priority.INTERACTIVE
    # Its first token is wanted within this many ms of its arrival (a team's p95 TTFT target, sent by the
    # gateway): it orders the queue (earliest deadline first). None: the scheduler's `default_deadline_ms`.
    deadline_ms: float | None = None


class SeqStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, to be recomputed from its tokens so far
    FINISHED = "finished"


class FinishCause(StrEnum):
    STOP = "stop"  # a stop token (end of sequence)
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the caller gave up (client disconnect, stop string)
    ERROR = "error"  # a step failed


class Allocator(Protocol):
    """What the scheduler needs of the KV block allocator."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free(self) -> int: ...

    def allocate(self, n: int) -> list[int] | None: ...  # None when fewer than n are free

    def free(self, blocks: Iterable[int], *, cached: Container[int] = ()) -> None: ...

    def uncache(self, block: int) -> None: ...

    def share(self, blocks: Iterable[int]) -> None: ...

    def ref_count(self, block: int) -> int: ...


class RequestTooLarge(ValueError):
    """The request can never fit the KV cache, even alone; the message says what to change."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch: int = 32  # sequences running at once
    max_prefill_tokens: int = 512  # prompt tokens computed per step, across all prefill chunks
    block_size: int = 16  # tokens per KV block
    num_spec_tokens: int = 0  # draft slots reserved per decode (speculative decoding)
    prefix_sharing: bool = True  # reuse full blocks of identical prompt prefixes
    # Automatic prefix caching: indexed blocks stay cached (evictable, LRU) after their last holder ends, so
    # a later request (an agent's next turn) reuses them. False: shared only while a holder is running.
    prefix_caching: bool = True
    # While interactive work is running or waiting, at most this many batch sequences compute in a step; the
    # others sit it out holding their KV blocks (no recomputation), so a step, and with it interactive
    # latency, stays close to what interactive work alone costs. None: batch rows are not capped.
    batch_rows_beside_interactive: int | None = None
    # Interactive prefills with at most this many prompt tokens left to compute (an agent's next turn whose
    # history is cached, a short question) go ahead of longer prompts' chunks, within half of a step's
    # `max_prefill_tokens`, so they do not wait out a long prompt's remaining chunks. 0: oldest first.
    short_prefill_tokens: int = 128
    # A request that names no deadline is due this long after it arrives. Finite, so a request without one
    # is overtaken only by those due before it: never starved by a stream of tighter ones.
    default_deadline_ms: float = DEFAULT_DEADLINE_MS

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_prefill_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.short_prefill_tokens < 0:
            raise ValueError(f"short_prefill_tokens must be >= 0, got {self.short_prefill_tokens}")
        if not 0 < self.default_deadline_ms < float("inf"):
            raise ValueError(
                f"default_deadline_ms must be positive and finite, got {self.default_deadline_ms}"
            )
        if self.num_spec_tokens < 0:
            raise ValueError(f"num_spec_tokens must be >= 0, got {self.num_spec_tokens}")
        if self.batch_rows_beside_interactive is not None and self.batch_rows_beside_interactive < 0:
            raise ValueError(
                f"batch_rows_beside_interactive must be >= 0, got {self.batch_rows_beside_interactive}"
            )


@dataclass(slots=True, eq=False)
class Seq:
    """One request's state. `tokens[:num_computed]` have K/V in `block_table`; the rest run next."""

    seq_id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    arrival: int
    stop_token_ids: frozenset[int]
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_indexed_blocks: int = 0  # leading blocks already offered to the prefix index
    num_preemptions: int = 0
    finish_cause: FinishCause | None = None
    due: float = 0.0  # when its first token is due, on the scheduler's clock (s)
    rank: float = 0.0  # the due time it is ordered by: `due`, later once it missed its own (`_requeue_late`)

    @property
    def tokens(self) -> list[int]:
        return [*self.prompt_ids, *self.output_ids]

    @property
    def order(self) -> tuple[bool, float, int]:
        """Scheduling order: interactive before batch, then by deadline, then by arrival."""
        return (self.params.priority is Priority.BATCH, self.rank, self.arrival)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_decoding(self) -> bool:
        return bool(self.output_ids) and self.num_computed == self.num_tokens - 1


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class Scheduler:
    """Owns every live sequence; the engine thread is its only caller."""

    def __init__(
        self, config: SchedulerConfig, allocator: Allocator, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._allocator = allocator
        self._clock = clock
        self._seqs: dict[int, Seq] = {}
        # Both by `Seq.order` (priority class, deadline, arrival); preempted ones keep their place.
        self._waiting: list[Seq] = []  # WAITING and PREEMPTED
        self._running: list[Seq] = []  # the last (the latest-due batch one, if any) is preempted first
        self._held: list[Seq] = []  # running, set aside while their suspended step is in flight (`hold`)
        self._arrivals = 0
        self._draft_rooms: dict[int, int] = {}
        self._prefix = PrefixIndex(config.block_size)  # full, computed blocks by content
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0  # prompt tokens reused from the prefix index, first admission only
        self.num_evicted_blocks = 0  # cached blocks reused for other content (automatic prefix caching)
        self.num_requeued_late = 0  # requests re-queued for missing their own deadline (`_requeue_late`)
        self._next_due = float("inf")  # the earliest deadline a request named and may still miss
        # Steps that computed short prompts alone, the longer prompts' chunks put off to the next step, which
        # then carries them whatever is short (so they wait at most one step in two).
        self.num_short_steps = 0
        self._short_step_last = False

    # -- requests in and out ---------------------------------------------------------------------------------

    def max_kv_tokens(self) -> int:
        return self._allocator.num_blocks * self.config.block_size

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise `RequestTooLarge` unless the prompt and all `max_tokens` could be cached at once."""
        # The last sampled token is never fed back, so the cache holds prompt + max_tokens - 1 positions.
        needed = blocks_for(num_prompt_tokens + max_tokens - 1, self.config.block_size)
        if needed > self._allocator.num_blocks:
            room = self.max_kv_tokens() - num_prompt_tokens + 1
            hint = f"lower max_tokens to at most {room}" if room >= 1 else "shorten the prompt"
            raise RequestTooLarge(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs {needed} "
                f"KV blocks of {self.config.block_size} tokens; this engine's KV cache has "
                f"{self._allocator.num_blocks} ({self.max_kv_tokens()} tokens): {hint}, "
                "or restart the engine with a larger --kv-cache-mb"
            )

    def add(
        self,
        seq_id: int,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Iterable[int] = (),
    ) -> Seq:
        """Queue a request; it joins the running batch at the next `schedule()` that has room."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already scheduled")
        if not prompt_ids:
            raise ValueError("prompt must hold at least one token")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
        self.check_fits(len(prompt_ids), params.max_tokens)
        wanted = self.config.default_deadline_ms if params.deadline_ms is None else params.deadline_ms
        due = self._clock() + wanted / 1000
        stop = frozenset(stop_token_ids)
        seq = Seq(seq_id, tuple(prompt_ids), params, self._arrivals, stop, due=due, rank=due)
        if params.deadline_ms is not None:
            self._next_due = min(self._next_due, due)
        self._arrivals += 1
        self._seqs[seq_id] = seq
        bisect.insort(self._waiting, seq, key=_order)  # after every one of its class due no later
        return seq

    def past_due(self, seq: Seq) -> bool:
        """Whether `seq`'s deadline (the one its queue place follows) has passed."""
        return self._clock() > seq.due

    def abort(self, seq_id: int, cause: FinishCause = FinishCause.ABORT) -> Seq | None:
        """End a live sequence now and free its blocks; None if it is unknown or already finished."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        if seq in self._held:
            raise RuntimeError(f"sequence {seq_id} is in a suspended step; abort it after `unhold`")
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self._finish(seq, cause)
        return seq

    def get(self, seq_id: int) -> Seq | None:
        return self._seqs.get(seq_id)

    # -- load, for metrics -----------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._held)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._held)

    @property
    def allocator(self) -> Allocator:
        return self._allocator

    @property
    def num_free_blocks(self) -> int:
        return self._allocator.num_free

    @property
    def num_blocks(self) -> int:
        return self._allocator.num_blocks

    # -- one step --------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Decide the next step: decodes, then prefill chunks, then newly admitted requests."""
        planned: dict[int, SeqChunk] = {}  # seq_id -> chunk; a preempted sequence's chunk is dropped
        prefills: set[int] = set()
        self._draft_rooms = {}
        preempted = False
        rows = _BatchRows(self._batch_row_cap())
        self._requeue_late()
        for seq in [s for s in self._running if s.is_decoding]:
            if seq.status is not SeqStatus.RUNNING or not rows.take(seq):
                continue  # preempted earlier in this loop, or a batch row sitting this step out
            room = min(self.config.num_spec_tokens, seq.params.max_tokens - len(seq.output_ids) - 1)
            if not self._reserve(seq, seq.num_computed + 1 + room, planned):
                preempted = True
                continue
            planned[seq.seq_id] = SeqChunk(
                seq.seq_id, (seq.output_ids[-1],), seq.num_computed, tuple(seq.block_table)
            )
            if room > 0:
                self._draft_rooms[seq.seq_id] = room
        short = self.config.short_prefill_tokens
        if short:  # short interactive prefills first, running then waiting, within half the budget
            cap = self.config.max_prefill_tokens // 2
            planned, preempted = self._fill(planned, prefills, rows, preempted, short, cap)
            if prefills and not self._short_step_last and self._longer_pending(planned, min(short, cap)):
                self._short_step_last = True  # they run alone; the longer prompts' chunk comes next step
                self.num_short_steps += 1
                return StepPlan(tuple(planned.values()))
        self._short_step_last = False
        planned, _ = self._fill(planned, prefills, rows, preempted)
        return StepPlan(tuple(planned.values()))

    def _longer_pending(self, planned: Container[int], short: int) -> bool:
        """Whether a prompt with more than `short` tokens left to compute waits: a running prefill the short
        pass left, or a waiting request (judged by its whole prompt: no prefix match for this)."""
        return any(s.num_tokens > short for s in self._waiting) or any(
            not s.is_decoding and s.seq_id not in planned and s.num_tokens - s.num_computed > short
            for s in self._running
        )

    def _requeue_late(self) -> None:
        """Order each request that named a deadline and passed it without a first token as one that named
        none and arrived at that deadline: an O(1) check until the earliest such deadline passes."""
        now = self._clock()
        if now <= self._next_due:
            return
        self._next_due = float("inf")
        before = self.num_requeued_late
        for seq in self._seqs.values():
            if seq.params.deadline_ms is None or seq.output_ids or seq.rank != seq.due:
                continue
            if now > seq.due:
                seq.rank = seq.due + self.config.default_deadline_ms / 1000
                self.num_requeued_late += 1
            else:
                self._next_due = min(self._next_due, seq.due)
        if self.num_requeued_late > before:
            self._waiting.sort(key=_order)
            self._running.sort(key=_order)

    def _fill(
        self,
        planned: dict[int, SeqChunk],
        prefills: set[int],
        rows: _BatchRows,
        preempted: bool,
        short: int | None = None,
        cap: int | None = None,
    ) -> tuple[dict[int, SeqChunk], bool]:
        """`planned` with the next chunks of running prefills (earliest due first), then, unless a sequence
        had to be preempted for room (now or before: `preempted`), waiting sequences admitted (`_admit`),
        all within the step's budget and `cap` prompt tokens; only interactive ones whose prompt finishes
        within `short` tokens, if given. Also returns whether a sequence was preempted."""
        for seq in [s for s in self._running if not s.is_decoding and s.seq_id not in planned]:
            budget = self._budget_left(planned, prefills, cap)
            if budget <= 0:
                break
            if short is not None and not self._is_short(seq, seq.num_computed, min(short, budget)):
                continue
            if seq.status is not SeqStatus.RUNNING or not rows.take(seq):
                continue
            end = min(seq.num_tokens, seq.num_computed + budget)
            if not self._reserve(seq, end, planned):
                preempted = True
                continue
            planned[seq.seq_id] = self._prefill_chunk(seq, end)
            prefills.add(seq.seq_id)
        # Before admitting: a sequence preempted above and readmitted below must not keep its draft room.
        self._draft_rooms = {k: v for k, v in self._draft_rooms.items() if k in planned}
        if preempted:
            return planned, True
        evicted: set[int] = set()
        admitted = self._admit(self._budget_left(planned, prefills, cap), evicted, rows, short)
        # Interactive admissions may have preempted batch sequences planned above (and even readmitted
        # them from their start): their planned chunks and draft rooms are stale.
        planned = {k: c for k, c in planned.items() if k not in evicted}
        planned.update((c.seq_id, c) for c in admitted)
        prefills.update(c.seq_id for c in admitted)
        self._draft_rooms = {k: v for k, v in self._draft_rooms.items() if k not in evicted}
        return planned, False

    @staticmethod
    def _is_short(seq: Seq, computed: int, most: int) -> bool:
        """Whether interactive `seq`'s prompt, `computed` tokens of it done, finishes within `most` tokens."""
        return seq.params.priority is Priority.INTERACTIVE and seq.num_tokens - computed <= most

    def hold(self, seq_ids: Collection[int]) -> None:
        """Set these running sequences aside while their step is suspended mid-forward (K/V writes to come):
        until `unhold`, `schedule` neither plans, preempts nor frees them, and plans no batch rows."""
        self._held = [s for s in self._running if s.seq_id in seq_ids]
        self._running = [s for s in self._running if s.seq_id not in seq_ids]

    def unhold(self) -> None:
        for seq in self._held:
            bisect.insort(self._running, seq, key=_order)
        self._held = []

    def _batch_row_cap(self) -> int | None:
        """How many batch sequences may compute this step: the cap while interactive work is present, none
        while a step is held (the steps run inside a suspended one are for interactive work only)."""
        if self._held:
            return 0
        cap = self.config.batch_rows_beside_interactive
        if cap is None:
            return None
        present = (s.params.priority is Priority.INTERACTIVE for s in (*self._running, *self._waiting))
        return cap if any(present) else None

    def _budget_left(
        self, planned: Mapping[int, SeqChunk], prefills: set[int], cap: int | None = None
    ) -> int:
        limit = self.config.max_prefill_tokens if cap is None else min(cap, self.config.max_prefill_tokens)
        return limit - sum(len(planned[s].token_ids) for s in prefills if s in planned)

    def draft_rooms(self) -> dict[int, int]:
        """Decode chunks of the last plan that have draft slots reserved: seq_id -> most drafts allowed."""
        return dict(self._draft_rooms)

    def with_drafts(self, plan: StepPlan, drafts: Mapping[int, Sequence[int]]) -> StepPlan:
        """The plan with draft tokens appended to decode chunks (each within its reserved room)."""
        chunks = []
        for chunk in plan.chunks:
            proposed = tuple(drafts.get(chunk.seq_id, ()))
            if proposed:
                room = self._draft_rooms.get(chunk.seq_id, 0)
                if len(proposed) > room:
                    raise ValueError(f"sequence {chunk.seq_id}: {len(proposed)} drafts, room for {room}")
                seq = self._seqs[chunk.seq_id]
                chunk = SeqChunk(
                    chunk.seq_id,
                    chunk.token_ids + proposed,
                    chunk.start_pos,
                    tuple(seq.block_table),
                    num_logits=1 + len(proposed),
                )
            chunks.append(chunk)
        return StepPlan(tuple(chunks))

    def update(self, plan: StepPlan, sampled: Mapping[int, Sequence[int]]) -> list[Seq]:
        """Apply one step's accepted tokens (per seq_id: none for a non-final prefill chunk, else 1 to
        `num_logits`); returns the sequences that finished, whose blocks are already free."""
        finished = []
        for chunk in plan.chunks:
            seq = self._seqs.get(chunk.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue
            new = list(sampled.get(chunk.seq_id, ()))
            if len(new) > chunk.num_logits or (chunk.num_logits > 0 and not new):
                raise ValueError(f"sequence {seq.seq_id}: {len(new)} tokens for {chunk.num_logits} logits")
            # Rejected drafts' K/V slots stay allocated and are overwritten by later tokens.
            seq.num_computed = chunk.start_pos + len(chunk.token_ids) - chunk.num_logits + len(new)
            cause = self._append(seq, new)
            if self.config.prefix_sharing:
                self._index_full_blocks(seq)  # on finishing too: with prefix caching its blocks stay
            if cause is not None:
                self._running.remove(seq)
                self._finish(seq, cause)
                finished.append(seq)
        return finished

    # -- internals -------------------------------------------------------------------------------------------

    def _append(self, seq: Seq, new: list[int]) -> FinishCause | None:
        for token in new:
            seq.output_ids.append(token)
            if token in seq.stop_token_ids:
                return FinishCause.STOP
            if len(seq.output_ids) >= seq.params.max_tokens:
                return FinishCause.LENGTH
        return None

    def _prefill_chunk(self, seq: Seq, end: int) -> SeqChunk:
        """`seq`'s tokens from `num_computed` up to `end`; logits only when that reaches its last token."""
        return SeqChunk(
            seq.seq_id,
            tuple(seq.tokens[seq.num_computed : end]),
            seq.num_computed,
            tuple(seq.block_table),
            num_logits=1 if end == seq.num_tokens else 0,
            prefill=True,
        )

    def _reserve(self, seq: Seq, num_tokens: int, planned: dict[int, SeqChunk]) -> bool:
        """Grow `seq` to hold `num_tokens` positions, preempting younger sequences (or `seq` itself)."""
        needed = blocks_for(num_tokens, self.config.block_size) - len(seq.block_table)
        while needed > self._allocator.num_free:
            victim = self._running[-1]
            self._preempt(victim)
            planned.pop(victim.seq_id, None)
            if victim is seq:
                return False
        if needed > 0:
            seq.block_table.extend(self._take(needed))
        return True

    def _take(self, n: int) -> list[int]:
        blocks = self._allocator.allocate(n)
        if blocks is None:  # callers check num_free first
            raise RuntimeError(f"block allocator refused {n} blocks with {self._allocator.num_free} free")
        for block in blocks:
            if block in self._prefix:  # an evicted cached block: its content, and all under it, are gone
                self.num_evicted_blocks += 1
                for orphan in self._prefix.forget(block):
                    self._allocator.uncache(orphan)
        return blocks

    def _admit(
        self, budget: int, evicted: set[int], rows: _BatchRows, short: int | None = None
    ) -> list[SeqChunk]:
        """Start waiting sequences in order while there is budget, batch room, free blocks and (for batch
        ones) batch rows; interactive ones preempt running batch ones for room (their ids go to `evicted`).
        With `short`: only interactive ones with at most that many prompt tokens left after their cached
        prefix, passing over at most `SHORT_SCAN_LIMIT` longer ones."""
        admitted = []
        skipped = 0  # waiting sequences passed over as not short
        while len(self._waiting) > skipped and budget > 0:
            seq = self._waiting[skipped]
            shared: list[int] | None = None
            if short is not None:
                if seq.params.priority is not Priority.INTERACTIVE or skipped >= SHORT_SCAN_LIMIT:
                    break  # only batch ones are left (waiting is in priority order), or looked far enough
                shared = self._match_prefix(seq)
                if not self._is_short(seq, len(shared) * self.config.block_size, min(short, budget)):
                    skipped += 1
                    continue
            if not rows.take(seq):
                break  # waiting is in priority order: only batch sequences are left
            while True:
                if shared is None:  # again after a preemption: it may free indexed blocks
                    shared = self._match_prefix(seq)
                start = len(shared) * self.config.block_size
                end = min(seq.num_tokens, start + budget)
                needed = blocks_for(end, self.config.block_size) - len(shared)
                # Cached blocks nobody holds count as free until this sequence takes them back.
                revived = sum(1 for b in shared if self._allocator.ref_count(b) == 0)
                # Headroom of one block per running sequence, so admitting this one does not force a
                # preemption at the very next decode; with nothing running, the whole cache is available.
                no_room = needed + revived + len(self._running) > self._allocator.num_free
                if not (no_room or len(self._running) >= self.config.max_batch) or not self._displaces(seq):
                    break
                evicted.add(self._running[-1].seq_id)
                self._preempt(self._running[-1])
                shared = None
            if no_room or len(self._running) >= self.config.max_batch:
                break
            self._waiting.remove(seq)
            self._allocator.share(shared)
            seq.block_table = shared + self._take(needed)
            seq.num_computed = start
            seq.num_indexed_blocks = len(shared)
            if not seq.num_preemptions:  # a readmitted sequence's prompt was counted at its first admission
                self.num_prefix_hit_tokens += start
            seq.status = SeqStatus.RUNNING
            bisect.insort(self._running, seq, key=_order)
            admitted.append(self._prefill_chunk(seq, end))
            budget -= end - start
        return admitted

    def _displaces(self, seq: Seq) -> bool:
        """Whether waiting `seq` may preempt the last running sequence: interactive over batch only."""
        return (
            seq.params.priority is Priority.INTERACTIVE
            and bool(self._running)
            and self._running[-1].params.priority is Priority.BATCH
        )

    def _match_prefix(self, seq: Seq) -> list[int]:
        """Indexed blocks holding `seq`'s leading tokens; at least its last token is left to compute."""
        return self._prefix.match(seq.tokens) if self.config.prefix_sharing else []

    def _index_full_blocks(self, seq: Seq) -> None:
        """Offer `seq`'s newly completed blocks to the prefix index (the first holder of a content wins)."""
        full = min(seq.num_computed // self.config.block_size, len(seq.block_table))
        if seq.num_indexed_blocks < full:
            self._prefix.add(seq.block_table, seq.tokens, seq.num_indexed_blocks, full)
            seq.num_indexed_blocks = full

    def _release(self, seq: Seq) -> None:
        """Drop `seq`'s hold on its blocks (tail first). With prefix caching an indexed block nobody holds
        stays cached (evictable); without, it leaves the prefix index."""
        if self.config.prefix_caching:
            self._allocator.free(reversed(seq.block_table), cached=self._prefix)
        else:
            self._allocator.free(reversed(seq.block_table))
            for block in seq.block_table:
                if block in self._prefix and self._allocator.ref_count(block) == 0:
                    self._prefix.forget(block)  # nothing under it is held either (holders hold the chain)
        seq.block_table = []
        seq.num_indexed_blocks = 0

    def _preempt(self, seq: Seq) -> None:
        self._running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self._waiting, seq, key=_order)

    def _finish(self, seq: Seq, cause: FinishCause) -> None:
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_cause = cause
        del self._seqs[seq.seq_id]


class _BatchRows:
    """Counts the batch sequences given a chunk in one step, up to `cap` (None: no cap)."""

    def __init__(self, cap: int | None) -> None:
        self._left = cap

    def take(self, seq: Seq) -> bool:
        if self._left is None or seq.params.priority is Priority.INTERACTIVE:
            return True
        if self._left <= 0:
            return False
        self._left -= 1
        return True


def _order(seq: Seq) -> tuple[bool, float, int]:
    return seq.order
