"""The engine loop: one background thread runs schedule -> (draft) -> execute -> sample -> update, forever.

asyncio talks to it through a thread-safe inbox (`submit`, `abort`); token ids come back per request as
events via `loop.call_soon_threadsafe`: `Tokens`, then exactly one `Finished` or `Failed`. A step that
raises fails the requests in that step and the loop keeps serving the others. Speculative decoding plugs in
as a `Proposer`: the scheduler reserves draft slots, the runner returns drafts + 1 logits per decode, and
`accept_drafts` keeps the longest agreeing prefix plus one token of the target's own. Token ids only: the
caller owns the tokenizer, the chat template and stop strings (it aborts once its text hits one).
A step holding batch rows (and no drafts) runs layer by layer on a CPU runner: when interactive requests
arrive meanwhile, it is suspended at a layer boundary, their prefill runs alone, and it resumes where it
stopped. Its sequences are held meanwhile: neither planned, preempted nor freed (an abort waits for the step).
Interactive prompts that arrived between steps run in a forward of their own before such a step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from backends.local.engine.heap import trim_heap
from backends.local.engine.sampler import make_generator, sample
from backends.local.engine.scheduler import FinishCause, Priority, SamplingParams, Scheduler, Seq
from backends.local.engine.types import StepPlan

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# -- events -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tokens:
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Finished:
    cause: FinishCause
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Failed:
    message: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


EngineEvent = Tokens | Finished | Failed


# -- seams ---------------------------------------------------------------------------------------------------


class StepRunner(Protocol):
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Logits (sum of chunks' num_logits, vocab), rows in chunk order."""
        ...


class LayeredStep(Protocol):
    """One step's forward pass, run a layer at a time (`runner.LayeredForward`)."""

    def advance(self) -> bool:
        """Run the next layer; whether layers are left."""
        ...

    def logits(self) -> torch.Tensor:
        """As `StepRunner.execute`'s, once every layer ran."""
        ...


@runtime_checkable
class PausableRunner(StepRunner, Protocol):
    def begin(self, plan: StepPlan) -> LayeredStep | None:
        """The step as a `LayeredStep`; None where this runner cannot suspend it."""
        ...


@dataclass(frozen=True, slots=True)
class DraftQuery:
    seq_id: int
    token_ids: tuple[int, ...]  # prompt + output so far; the last one is not in the target's cache yet
    max_drafts: int


class Proposer(Protocol):
    """Speculative decoding's draft source (a draft model, the model itself, n-gram lookup)."""

    def propose(self, queries: Sequence[DraftQuery]) -> list[tuple[int, ...]]:
        """Up to `max_drafts` guessed next tokens per query, in query order."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget a finished, aborted or preempted sequence's state."""
        ...


class NoProposer:
    """No speculation: every decode computes exactly one token."""

    def propose(self, queries: Sequence[DraftQuery]) -> list[tuple[int, ...]]:
        return [() for _ in queries]

    def release(self, seq_id: int) -> None:
        return None


class EngineObserver(Protocol):
    """Per-token timings and outcomes, called on the engine thread (for metrics)."""

    def first_token(self, ttft_s: float, prompt_tokens: int, late: bool) -> None: ...

    def next_tokens(self, count: int, gap_s: float) -> None: ...

    def finished(self, outcome: Finished | Failed) -> None: ...


class NullObserver:
    def first_token(self, ttft_s: float, prompt_tokens: int, late: bool) -> None:
        return None

    def next_tokens(self, count: int, gap_s: float) -> None:
        return None

    def finished(self, outcome: Finished | Failed) -> None:
        return None


@dataclass(frozen=True, slots=True)
class EngineStats:
    waiting: int
    running: int
    kv_blocks_total: int
    kv_blocks_free: int
    preemptions: int
    prefix_hit_tokens: int  # prompt tokens whose K/V came from cached prefix blocks (running or finished)
    drafted_tokens: int
    accepted_tokens: int
    suspended_steps: int = 0  # steps with batch rows suspended mid-forward for interactive arrivals
    interleaved_steps: int = 0  # interactive steps run inside suspended ones
    prefill_tokens_per_step: int = 0  # the scheduler's `max_prefill_tokens`
    short_prefill_tokens: int = 0  # and `short_prefill_tokens`
    requeued_late: int = 0  # requests re-queued for missing their own deadline before a first token
    short_steps: int = 0  # steps that computed short prompts alone, longer prompts' chunks put off a step

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free


# -- the asyncio side ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Sink:
    """Where one request's events go: a queue on the caller's loop."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[EngineEvent] = field(default_factory=asyncio.Queue)

    def deliver(self, event: EngineEvent) -> bool:
        """False when the caller's loop is closed: nobody is listening any more."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            return False
        return True


class RequestHandle:
    """The asyncio side of one submitted request."""

    def __init__(self, seq_id: int, sink: _Sink, abort: Callable[[int], None]) -> None:
        self.seq_id = seq_id
        self._sink = sink
        self._abort = abort
        self._done = False

    def abort(self) -> None:
        """Stop generating and free the request's KV blocks (idempotent; a finished request ignores it)."""
        if not self._done:
            self._abort(self.seq_id)

    async def events(self) -> AsyncIterator[EngineEvent]:
        """Yield `Tokens`, then exactly one `Finished` or `Failed`."""
        while not self._done:
            event = await self._sink.events.get()
            self._done = not isinstance(event, Tokens)
            yield event


@dataclass(frozen=True, slots=True)
class _Add:
    seq_id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    sink: _Sink
    arrived_s: float


@dataclass(frozen=True, slots=True)
class _Abort:
    seq_id: int


@dataclass(slots=True)
class _Live:
    """Engine-thread bookkeeping for one request, beside the scheduler's `Seq`."""

    sink: _Sink
    generator: torch.Generator
    arrived_s: float
    last_token_s: float | None = None


# -- the engine ----------------------------------------------------------------------------------------------


class Engine:
    """Owns the scheduler, the runner and one thread. `submit`/`abort` may be called from any asyncio loop."""

    def __init__(
        self,
        runner: StepRunner,
        scheduler: Scheduler,
        *,
        stop_token_ids: Iterable[int],
        proposer: Proposer | None = None,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
        threads: int | None = None,
        suspend_batch_steps: bool = True,
    ) -> None:
        self._runner = runner
        self._scheduler = scheduler
        self._stop_token_ids = tuple(stop_token_ids)
        self._proposer: Proposer = proposer or NoProposer()
        self._observer: EngineObserver = observer or NullObserver()
        self._clock = clock
        self._threads = threads  # torch compute threads of the engine thread; None: torch's default
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._live: dict[int, _Live] = {}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drafted = 0
        self._accepted = 0
        # Suspending steps with batch rows (see the module docstring): only on runners that can.
        self._pausable = runner if suspend_batch_steps and isinstance(runner, PausableRunner) else None
        self._in_flight: frozenset[int] = frozenset()  # sequences of the step now running layer by layer
        self._deferred_aborts: list[int] = []  # aborts of in-flight sequences, applied after their step
        self._interactive_arrived = False
        self._halted = False  # stop() seen while a step was suspended
        self._suspended = 0
        self._interleaved = 0

    # -- control, from any thread --------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="switchboard-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fail every request still queued or running and join the thread."""
        if self._thread is None:
            return
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout_s)
        self._thread = None

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise `RequestTooLarge` for a request that could never fit the KV cache, even alone."""
        self._scheduler.check_fits(prompt_tokens, max_tokens)

    def max_kv_tokens(self) -> int:
        return self._scheduler.max_kv_tokens()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestHandle:
        """Queue a request; call on the asyncio loop that will read its events. It joins the next step."""
        if self._thread is None or self._stopping:
            raise RuntimeError("engine is not running; call start() first")
        if not prompt_ids:
            raise ValueError("prompt must hold at least one token")
        self.check_fits(len(prompt_ids), params.max_tokens)
        seq_id = next(self._ids)
        sink = _Sink(asyncio.get_running_loop())
        self._inbox.put(_Add(seq_id, tuple(prompt_ids), params, sink, self._clock()))
        return RequestHandle(seq_id, sink, self.abort)

    def abort(self, seq_id: int) -> None:
        self._inbox.put(_Abort(seq_id))

    def stats(self) -> EngineStats:
        """A snapshot for metrics (each field is read atomically; together they may be a step apart)."""
        return EngineStats(
            waiting=self._scheduler.num_waiting,
            running=self._scheduler.num_running,
            kv_blocks_total=self._scheduler.num_blocks,
            kv_blocks_free=self._scheduler.num_free_blocks,
            preemptions=self._scheduler.num_preemptions,
            prefix_hit_tokens=self._scheduler.num_prefix_hit_tokens,
            drafted_tokens=self._drafted,
            accepted_tokens=self._accepted,
            suspended_steps=self._suspended,
            interleaved_steps=self._interleaved,
            prefill_tokens_per_step=self._scheduler.config.max_prefill_tokens,
            short_prefill_tokens=self._scheduler.config.short_prefill_tokens,
            requeued_late=self._scheduler.num_requeued_late,
            short_steps=self._scheduler.num_short_steps,
        )

    # -- the loop, on the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)  # this thread's OpenMP team (see build.one_compute_thread)
        stepped = False
        while not self._halted:
            idle = not self._scheduler.has_work
            if idle and stepped:  # gone idle: the steps' freed temporaries go back before the thread waits
                trim_heap()
                stepped = False
            if not self._drain(block=idle):
                break
            if self._scheduler.has_work:
                self._step()
                stepped = True
        for seq_id in list(self._live):
            seq = self._scheduler.abort(seq_id, FinishCause.ERROR)
            self._fail(seq_id, seq, "engine is shutting down")
        while True:  # submitted while stopping: never scheduled
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                command.sink.deliver(Failed("engine is shutting down"))

    def _drain(self, *, block: bool) -> bool:
        """Apply queued submits and aborts; False once `stop` was called."""
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command is None:
                return False
            if isinstance(command, _Add):
                self._add(command)
            else:
                self._drop(command.seq_id)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, command: _Add) -> None:
        seed = command.params.seed
        # manual_seed takes [-2**63, 2**64); the wire allows that range, the modulo is for other callers.
        generator = make_generator(secrets.randbits(63) if seed is None else seed % 2**64)
        live = _Live(command.sink, generator, command.arrived_s)
        self._live[command.seq_id] = live
        try:
            self._scheduler.add(command.seq_id, command.prompt_ids, command.params, self._stop_token_ids)
        except ValueError as exc:  # checked in submit already; a bad request fails alone
            self._fail(command.seq_id, None, str(exc))
            return
        self._interactive_arrived |= command.params.priority is Priority.INTERACTIVE

    def _step(self) -> None:
        plan: StepPlan | None = None
        try:
            plan = self._scheduler.schedule()
            if not plan.chunks:  # nothing can run until an abort frees blocks: do not spin
                time.sleep(0.005)
                return
            plan = self._attach_drafts(plan)
            for part in self._parts(plan):
                self._complete(part, self._forward(part))
        except Exception as exc:  # the engine loop: fail this step's requests, keep serving the others
            log.exception("engine step failed")
            self._fail_all([c.seq_id for c in plan.chunks] if plan is not None else list(self._live), exc)
        finally:
            self._in_flight = frozenset()
            deferred, self._deferred_aborts = self._deferred_aborts, []
            for seq_id in deferred:
                self._drop(seq_id)

    def _complete(self, plan: StepPlan, logits: torch.Tensor) -> None:
        sampled = self._sample(plan, logits)
        before = {c.seq_id: self._output_len(c.seq_id) for c in plan.chunks}
        finished = self._scheduler.update(plan, sampled)
        self._emit(before, finished)

    def _fail_all(self, seq_ids: Iterable[int], exc: Exception) -> None:
        for seq_id in seq_ids:
            self._fail(seq_id, self._scheduler.abort(seq_id, FinishCause.ERROR), type(exc).__name__)

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        """The plan's logits; a step with batch rows runs layer by layer and checks the inbox in between."""
        layered = self._pausable.begin(plan) if self._pausable and self._may_suspend(plan) else None
        if layered is None:
            return self._runner.execute(plan)
        self._in_flight = frozenset(c.seq_id for c in plan.chunks)
        suspended = False
        while layered.advance():
            if not self._inbox.empty() and self._interleave():
                suspended = True
        self._suspended += suspended
        return layered.logits()

    def _parts(self, plan: StepPlan) -> tuple[StepPlan, ...]:
        """The plan in the forwards it runs as: a suspendable one's new interactive prompts go first, alone
        (they arrived between two steps; their first token should not wait for the batch rows)."""
        if self._pausable is None or not self._may_suspend(plan):
            return (plan,)
        new = set()
        for chunk in plan.chunks:
            seq = self._scheduler.get(chunk.seq_id)
            if seq is not None and not seq.output_ids and seq.params.priority is Priority.INTERACTIVE:
                new.add(chunk.seq_id)
        if not new:
            return (plan,)
        first = StepPlan(tuple(c for c in plan.chunks if c.seq_id in new))
        return first, StepPlan(tuple(c for c in plan.chunks if c.seq_id not in new))

    def _may_suspend(self, plan: StepPlan) -> bool:
        """A step with a batch row and no drafts (drafts are verified as one piece; the proposer may keep
        state per step). Interactive-only steps never pay the layer-by-layer loop."""
        batch = False
        for chunk in plan.chunks:
            if chunk.num_logits > 1:
                return False
            seq = self._scheduler.get(chunk.seq_id)
            batch = batch or (seq is not None and seq.params.priority is Priority.BATCH)
        return batch

    def _interleave(self) -> bool:
        """Between two layers of the in-flight step: apply what arrived; if that includes interactive
        requests, run interactive-only steps until their prompts are prefilled. Whether any step ran."""
        self._interactive_arrived = False
        if not self._drain(block=False):
            self._halted = True  # stop(): finish this step, then the loop ends
        if not self._interactive_arrived or self._halted:
            return False
        ran = False
        self._scheduler.hold(self._in_flight)
        try:
            while (inner := self._scheduler.schedule()).chunks:
                try:
                    inner = self._attach_drafts(inner)
                    self._complete(inner, self._runner.execute(inner))
                except Exception as exc:  # fail the inner step's requests; the suspended one goes on
                    log.exception("engine step failed")
                    self._fail_all([c.seq_id for c in inner.chunks], exc)
                ran = True
                self._interleaved += 1
                if all(c.num_logits > 0 for c in inner.chunks):  # every prompt in it is prefilled
                    break
        finally:
            self._scheduler.unhold()
        return ran

    def _output_len(self, seq_id: int) -> int:
        seq = self._scheduler.get(seq_id)
        return 0 if seq is None else len(seq.output_ids)

    def _attach_drafts(self, plan: StepPlan) -> StepPlan:
        rooms = self._scheduler.draft_rooms()
        if not rooms or isinstance(self._proposer, NoProposer):
            return plan
        queries = []
        for seq_id, room in rooms.items():
            seq = self._scheduler.get(seq_id)
            assert seq is not None
            queries.append(DraftQuery(seq_id, tuple(seq.tokens), room))
        proposals = self._proposer.propose(queries)
        return self._scheduler.with_drafts(
            plan, {q.seq_id: p for q, p in zip(queries, proposals, strict=True)}
        )

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> dict[int, list[int]]:
        """Sample every logits row with its request's generator, then keep the accepted tokens."""
        rows: list[_Live] = []
        params: list[SamplingParams] = []
        for chunk in plan.chunks:
            seq = self._scheduler.get(chunk.seq_id)
            assert seq is not None
            rows += [self._live[chunk.seq_id]] * chunk.num_logits
            params += [seq.params] * chunk.num_logits
        if logits.shape[0] != len(rows):
            raise RuntimeError(f"runner returned {logits.shape[0]} logits rows for {len(rows)} wanted")
        tokens: list[int] = sample(
            logits,
            [p.temperature for p in params],
            [p.top_p for p in params],
            [r.generator for r in rows],
        ).tolist()
        sampled: dict[int, list[int]] = {}
        row = 0
        for chunk in plan.chunks:
            if chunk.num_logits == 0:
                continue
            drafts = chunk.token_ids[len(chunk.token_ids) - chunk.num_logits + 1 :]
            sampled[chunk.seq_id] = accept_drafts(drafts, tokens[row : row + chunk.num_logits])
            self._drafted += len(drafts)
            self._accepted += len(sampled[chunk.seq_id]) - 1
            row += chunk.num_logits
        return sampled

    def _emit(self, before: dict[int, int], finished: list[Seq]) -> None:
        """Deliver the step's new tokens and outcomes: one wake-up per caller loop, not one per request."""
        now = self._clock()
        done = {seq.seq_id: seq for seq in finished}
        outbox: dict[asyncio.AbstractEventLoop, list[tuple[int, _Sink, EngineEvent]]] = {}
        for seq_id, old_len in before.items():
            seq = done.get(seq_id) or self._scheduler.get(seq_id)
            live = self._live.get(seq_id)
            if seq is None or live is None or len(seq.output_ids) == old_len:
                continue
            new = tuple(seq.output_ids[old_len:])
            if live.last_token_s is None:
                late = self._scheduler.past_due(seq)
                self._observer.first_token(now - live.arrived_s, len(seq.prompt_ids), late)
                if len(new) > 1:
                    self._observer.next_tokens(len(new) - 1, 0.0)
            else:
                self._observer.next_tokens(len(new), now - live.last_token_s)
            live.last_token_s = now
            outbox.setdefault(live.sink.loop, []).append((seq_id, live.sink, Tokens(new)))
        for seq in done.values():
            if (outcome := self._finish(seq)) is not None:
                sink, event = outcome
                outbox.setdefault(sink.loop, []).append((seq.seq_id, sink, event))
        for loop, batch in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(sink, event) for _, sink, event in batch])
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                for seq_id, _, _ in batch:
                    self._drop(seq_id)

    def _drop(self, seq_id: int) -> None:
        """Abort a request now (a no-op once it finished) and tell its caller; one whose step is in flight
        once that step is done (its blocks are still being written)."""
        if seq_id in self._in_flight:
            self._deferred_aborts.append(seq_id)
            return
        seq = self._scheduler.abort(seq_id)
        outcome = None if seq is None else self._finish(seq)
        if outcome is not None:
            outcome[0].deliver(outcome[1])

    def _finish(self, seq: Seq) -> tuple[_Sink, Finished] | None:
        """Forget a finished or aborted sequence; its outcome and where it goes (None if nobody listens)."""
        live = self._live.pop(seq.seq_id, None)
        self._proposer.release(seq.seq_id)
        cause = seq.finish_cause or FinishCause.ABORT
        outcome = Finished(cause, len(seq.prompt_ids), len(seq.output_ids))
        self._observer.finished(outcome)
        return None if live is None else (live.sink, outcome)

    def _fail(self, seq_id: int, seq: Seq | None, message: str) -> None:
        live = self._live.pop(seq_id, None)
        if live is None:
            return  # already finished (a step can fail after delivering some outcomes)
        self._proposer.release(seq_id)
        outcome = Failed(
            message,
            prompt_tokens=len(seq.prompt_ids) if seq is not None else 0,
            completion_tokens=len(seq.output_ids) if seq is not None else 0,
        )
        self._observer.finished(outcome)
        live.sink.deliver(outcome)


def _put_all(batch: list[tuple[_Sink, EngineEvent]]) -> None:
    """On the caller's loop: hand one step's events to their requests' queues."""
    for sink, event in batch:
        sink.events.put_nowait(event)


def accept_drafts(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """Drafts up to the first one the target disagrees with, then the target's own token there.

    `sampled[i]` is the target's token after the i-th input of the chunk, so `len(sampled) == len(drafts)+1`.
    With greedy sampling this equals the target alone, token for token.
    """
    accepted: list[int] = []
    for draft, token in zip(drafts, sampled, strict=False):
        accepted.append(token)
        if token != draft:
            return accepted
    accepted.append(sampled[len(drafts)])
    return accepted
