"""A discrete-event simulator of the fleet: engine boxes as fluids on their step model, the cloud as delays.

Events are arrivals, prefill completions and decode completions; between two events every box's rates are
constant (`fleet.StepModel`: one step decodes a token per running stream and computes up to
`max_prefill_tokens` prompt tokens: short prompts first, then the others earliest deadline first, as the
engine orders them). A box admits up to `max_batch` requests and queues the rest earliest deadline first (a
request is due its policy's `deadline_ms` after it arrives, as the gateway tells the engine, or the engine's
default: without deadlines, arrival order); a request that named a deadline and missed it before its first
token is re-queued as if due the engine's default after it, as the engine does. Its prefix cache works like
the engine's: prompt blocks are shared with requests still running on the same box and, with prefix caching
(the engine's default), kept after a request ends until evicted (`prefix_model.PrefixCache`; `docs/ENGINE.md`,
"Prefix sharing and automatic prefix caching"). Invariants: every request ends completed or rejected; on a
box, cached + computed prompt tokens equal the prompt, and decoded tokens equal the output.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from backends.base import DEFAULT_DEADLINE_MS
from bench.routing_eval.fleet import BoxSpec, Fleet, StepModel, positions
from bench.routing_eval.prefix_model import PrefixCache
from bench.routing_eval.workload import Request
from routing.fleet import prompt_context

CLOUD = "cloud"


@dataclass(slots=True)
class Job:
    req: Request
    target: str  # a box name or CLOUD
    start_s: float
    cached_tokens: int = 0
    counted_prompt: int = -1  # what the gateway counts as its pending prefill; -1: the whole prompt
    prefill_left: float = 0.0
    decode_left: float = 0.0
    ttft_s: float = math.nan  # from arrival
    due_s: float = math.inf  # when its first token is due
    rank_s: float = math.inf  # the due time it is queued by: `due_s`, later once it missed one it named
    requeue_s: float = math.inf  # past this without a first token, it is re-queued (`Box.requeue_late`)
    e2e_s: float = math.nan
    cost_usd: Decimal = Decimal(0)
    # The prompt positions [from, to) of the chunk its step is computing: fixed when the step begins, so an
    # event inside the step (a stream finishing, an arrival) does not move the chunk (`Box._rates`).
    chunk: tuple[float, float] = (0.0, 0.0)

    def in_chunk(self) -> bool:
        """Whether a chunk is in progress: the prompt stands inside it (a leftover under 1e-6 tokens is no
        chunk, or the clock could not move past it)."""
        done = self.req.prompt_tokens - self.prefill_left
        return self.chunk[0] <= done < self.chunk[1] - 1e-6


# `Box._prefill_plan`: the prefilling jobs in the engine's order, the step's prompt tokens, short ones alone
Plan = tuple[list[Job], float, bool]


@dataclass(slots=True)
class Box:
    spec: BoxSpec
    waiting: list[Job] = field(default_factory=list)  # earliest `rank_s` first (then arrival)
    prefilling: list[Job] = field(default_factory=list)  # the same; computed in `_prefill_plan`'s order
    decoding: list[Job] = field(default_factory=list)
    t: float = 0.0
    version: int = 0
    slowdown: float = 1.0  # > 1 while boxes sharing cores outnumber them (Simulation's shared_cores)
    # With a measured curve of every box busy at once (Simulation's `contended`): how far its step time is
    # blended in (0: the box's own curve, 1: the contended one), instead of `slowdown`.
    contended: StepModel | None = None
    blend: float = 0.0
    next_requeue_s: float = math.inf  # the earliest `requeue_s` of its jobs
    long_owed_until: float = -math.inf  # until then, a step carrying the longer prompts' chunk (`settle`)
    step_alone: bool = False  # whether the step that ran up to `t` computed short prompts alone
    busy_s: float = 0.0
    prefill_computed: int = 0
    decoded: int = 0
    cache: PrefixCache = field(init=False)

    def __post_init__(self) -> None:
        m = self.spec.model
        self.cache = PrefixCache(m.block_size, m.kv_tokens, m.prefix_caching)

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def in_system(self) -> int:
        return self.running + len(self.waiting)

    @property
    def pending_prompt_tokens(self) -> int:
        """What a gateway counts: prompt tokens of its requests here without a first token yet (waiting or
        prefilling; it sees no prefill progress, and of prefix-cache hits only what it predicted)."""
        return sum(_counted(j) for j in self.waiting) + sum(_counted(j) for j in self.prefilling)

    @property
    def in_flight_context(self) -> int:
        """Prompt tokens of the requests here, as a gateway counts them (`routing.fleet.predict`)."""
        return sum(j.req.prompt_tokens for j in (*self.waiting, *self.prefilling, *self.decoding))

    @property
    def pending_prompt_context(self) -> float:
        """Their attention's share, as the gateway counts it (`routing.fleet.prompt_context`: each one's
        counted tokens after the rest of its prompt)."""
        return sum(_context(j) for j in self.waiting) + sum(_context(j) for j in self.prefilling)

    def _prefill_plan(self) -> Plan:
        """(the prefilling jobs in the engine's order, the prompt tokens the step computes, whether short
        ones run alone). The order: those with at most `short_prefill_tokens` left that fit in half a step's
        budget, then the rest, each part earliest due first (`Scheduler.schedule`). Short ones run alone
        while a longer one is prefilling, unless a step of short ones alone just ended (the next step then
        carries the longer ones' chunk: `long_owed_until`), as the engine's scheduler does."""
        m = self.spec.model
        pending = sum(j.prefill_left for j in self.prefilling)
        chunk = min(m.max_prefill_tokens, pending)
        if not m.short_prefill_tokens:
            return self.prefilling, chunk, False
        most = min(m.short_prefill_tokens, m.max_prefill_tokens // 2)
        room = m.max_prefill_tokens // 2
        first, rest = [], []
        for j in self.prefilling:
            if j.prefill_left <= min(most, room):
                first.append(j)
                room -= math.ceil(j.prefill_left)
            else:
                rest.append(j)
        if not first:
            return self.prefilling, chunk, False
        alone = sum(j.prefill_left for j in first)
        # (a job done to the last 1e-9 tokens, not yet settled, is no step of its own)
        if alone > 1e-6 and self.t >= self.long_owed_until and any(j.prefill_left > most for j in rest):
            return first + rest, alone, True
        return first + rest, chunk, False

    def _rates(self, plan: Plan | None = None) -> tuple[float, float, float]:
        """(step s, decode tok/s per stream, prefill tok/s) at the current composition (`plan`: its
        `_prefill_plan`, if the caller has it already)."""
        m = self.spec.model
        order, chunk, _ = self._prefill_plan() if plan is None else plan
        context = (
            sum(j.req.prompt_tokens + j.req.output_tokens - j.decode_left for j in self.decoding)
            if m.decode_ms_per_context_token
            else 0.0
        )
        # The step's prompt tokens, in the engine's order, each at its position (cached blocks come first); a
        # job's chunk in progress counts whole, at the positions it began with (`Job.chunk`), so an event
        # inside a step neither charges the rest of the chunk as if it began where the prompt now stands nor
        # makes the chunk's last tokens a step of their own (its overhead over fewer tokens). Only on a curve
        # with a context cost (every measured one); a prompt arriving inside a step joins it here, where the
        # engine would start it with the next one.
        before, budget, tokens = 0.0, chunk, 0.0
        if m.prefill_ms_per_context_token:
            for j in order:
                done = j.req.prompt_tokens - j.prefill_left
                lo, hi = j.chunk
                k, start = (hi - lo, lo) if j.in_chunk() else (min(j.prefill_left, budget), done)
                if k <= 0:
                    break
                before += positions(k, start)
                tokens += k
                budget -= k
            chunk = tokens or chunk
        step_ms = m.step_ms(len(self.decoding), chunk, context, before)
        if self.blend and self.contended is not None:
            busy = self.contended.step_ms(len(self.decoding), chunk, context, before)
            step_ms += self.blend * (busy - step_ms)
        step_s = step_ms * self.slowdown / 1000
        return step_s, 1 / step_s, chunk / step_s

    def advance(self, now: float) -> None:
        dt = now - self.t
        self.t = now
        if dt <= 0 or not self.running:
            return
        self._progress(dt)
        self.requeue_late()

    def _progress(self, dt: float) -> None:
        self.busy_s += dt
        plan = self._prefill_plan()
        order, _, self.step_alone = plan
        _, per_stream, prefill_rate = self._rates(plan)
        for j in self.decoding:
            j.decode_left -= per_stream * dt
        budget = plan[1]
        for j in order:  # each job's chunk of this step begins where it stands, unless one is in progress
            k = min(j.prefill_left, budget)
            if k <= 0:
                break
            if not j.in_chunk():
                done = j.req.prompt_tokens - j.prefill_left
                j.chunk = (done, done + k)
            budget -= k
        work = prefill_rate * dt
        for j in order:
            done = min(j.prefill_left, work)
            j.prefill_left -= done
            work -= done
            if work <= 0:
                break

    def next_event_s(self) -> float:
        if not self.running:
            return math.inf
        plan = self._prefill_plan()
        step_s, per_stream, prefill_rate = self._rates(plan)
        times = (
            [self.t + max(0.0, min(j.decode_left for j in self.decoding)) / per_stream]
            if self.decoding
            else []
        )
        if self.prefilling:
            # One step finishes every prompt in flight, or computes its chunk of them: the next step's
            # rate is then re-read, its tokens at their new positions (a long prompt's later chunks attend
            # to more tokens before them).
            times.append(self.t + step_s)
            first = plan[0][0]  # its chunk in progress ends: the next step's chunk is read then
            if first.in_chunk():
                done = first.req.prompt_tokens - first.prefill_left
                times.append(self.t + (first.chunk[1] - done) / prefill_rate)
            pending = sum(j.prefill_left for j in self.prefilling)
            if pending > self.spec.model.max_prefill_tokens:
                times.append(self.t + plan[0][0].prefill_left / prefill_rate)
        # Late in a long run a leftover of 1e-9 tokens is less time than the clock can step (an ulp of t is
        # ~1e-13 s at t ~ 900 s): the event must still move the clock, or the loop livelocks (it did, on a
        # 15-minute decode-bound trace at 0.056 ms a prompt token).
        return max(min(times), math.nextafter(self.t, math.inf))

    def cached_for(self, req: Request) -> int:
        """Prompt tokens of `req` this box holds (whole blocks only): in running requests' computed blocks
        (the same prefix key, or an earlier turn it extends), or in its prefix cache."""
        held = self.cache.lookup(req)
        for j in (*self.decoding, *self.prefilling):
            computed = j.req.prompt_tokens - math.ceil(j.prefill_left)
            if req.prefix_key and j.req.prefix_key == req.prefix_key:
                held = max(held, min(j.req.prefix_tokens, computed))
            if j.req.rid in req.earlier_turns:
                held = max(held, computed)
        usable = min(held, req.prompt_tokens - 1)
        block = self.spec.model.block_size
        return usable // block * block

    @property
    def running_tokens(self) -> int:
        """KV tokens the running requests hold (prompt and output so far)."""
        held = sum(j.req.prompt_tokens - math.ceil(j.prefill_left) for j in self.prefilling)
        return held + sum(
            j.req.prompt_tokens + j.req.output_tokens - int(j.decode_left) for j in self.decoding
        )

    def requeue_late(self) -> None:
        """As the engine's scheduler at each step (`Scheduler._requeue_late`): a job whose named deadline has
        passed without a first token is queued as if due the engine's default after it."""
        if self.t <= self.next_requeue_s:
            return
        self.next_requeue_s = math.inf
        moved = False
        for j in (*self.waiting, *self.prefilling):
            if j.requeue_s == math.inf:
                continue
            if self.t > j.requeue_s:
                j.rank_s, j.requeue_s, moved = j.due_s + DEFAULT_DEADLINE_MS / 1000, math.inf, True
            else:
                self.next_requeue_s = min(self.next_requeue_s, j.requeue_s)
        if moved:
            self.waiting.sort(key=_rank)
            self.prefilling.sort(key=_rank)

    def admit(self) -> None:
        self.requeue_late()
        while self.waiting and self.running < self.spec.model.max_batch:
            j = self.waiting.pop(0)
            j.cached_tokens = self.cached_for(j.req)
            j.prefill_left = j.req.prompt_tokens - j.cached_tokens
            bisect.insort(self.prefilling, j, key=_rank)

    def settle(self, eps: float = 1e-6) -> list[Job]:
        """Move finished prefills to decoding and return the jobs that finished; admit from the queue."""
        finished: list[Job] = []
        still: list[Job] = []
        for j in self.prefilling:
            if j.prefill_left > eps:
                still.append(j)
                continue
            self.prefill_computed += j.req.prompt_tokens - j.cached_tokens
            j.prefill_left = 0.0
            j.ttft_s = self.t - j.req.arrival_s
            j.decode_left = j.req.output_tokens - 1
            (self.decoding if j.decode_left > 0 else finished).append(j)
        ended_alone = self.step_alone and len(still) < len(self.prefilling)
        self.prefilling = still
        if ended_alone:  # a step of short prompts alone ended: the next carries the longer ones' chunk, so
            self.long_owed_until = math.inf  # it is timed as a full step
            self.long_owed_until = self.t + self._rates()[0]
        keep: list[Job] = []
        for j in self.decoding:
            (finished if j.decode_left <= eps else keep).append(j)
        self.decoding = keep
        for j in finished:
            j.e2e_s = self.t - j.req.arrival_s
            self.decoded += j.req.output_tokens
            self.cache.retain(j.req, j.cached_tokens, self.running_tokens)
        self.admit()
        return finished


def _rank(job: Job) -> float:
    return job.rank_s


def _counted(job: Job) -> int:
    return job.req.prompt_tokens if job.counted_prompt < 0 else job.counted_prompt


def _context(job: Job) -> float:
    n = _counted(job)
    return prompt_context(n, job.req.prompt_tokens - n)


class Policy(Protocol):
    name: str

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        """A box name, CLOUD, or None to reject."""

    def observe(self, job: Job) -> None:
        """Told of each finished job (for policies that learn from latency)."""


@dataclass(slots=True)
class Result:
    policy: str
    fleet: Fleet
    duration_s: float
    jobs: list[Job]
    rejected: list[Request]
    boxes: dict[str, Box]


class Simulation:
    """One policy over one trace on one fleet. Read-only state for policies: `boxes`, `cloud_in_flight`."""

    def __init__(
        self,
        fleet: Fleet,
        seed: int,
        *,
        shared_cores: float | None = None,
        contended: StepModel | None = None,
    ) -> None:
        """`shared_cores`: the boxes are one-thread processes on this many cores (the live replay's engine
        replicas on one machine), so while more of them are busy than there are cores each steps that much
        slower; None: every box has its own hardware (the fleets of the evaluation). `contended`, with
        `shared_cores`: the step model measured with every box busy at once (`calibrate --engines N`), which
        time slicing, caches and memory make slower than busy / cores; while more boxes are busy than there
        are cores, a box's step time moves from its own curve towards that one, reaching it with all busy."""
        self.fleet = fleet
        self.shared_cores = shared_cores
        self.boxes = {b.name: Box(b, contended=contended) for b in fleet.boxes}
        self._contended = contended is not None
        self.cloud_in_flight = 0
        self.rng = random.Random(seed)
        self._heap: list[tuple[float, int, str, int, Job | None]] = []
        self._seq = 0

    def _push(self, t: float, kind: str, version: int, job: Job | None, name: str = "") -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind + ":" + name, version, job))

    def _reschedule(self, box: Box) -> None:
        box.version += 1
        t = box.next_event_s()
        if t < math.inf:
            self._push(t, "box", box.version, None, box.spec.name)

    def _contend(self, now: float) -> None:
        """Re-rate every box for the number busy now (with `shared_cores`): each box is first advanced to now
        at its old rate, then rescheduled at the new one."""
        if self.shared_cores is None:
            return
        busy = sum(1 for b in self.boxes.values() if b.running)
        slowdown, blend = max(1.0, busy / self.shared_cores), 0.0
        if self._contended:
            over = len(self.boxes) - self.shared_cores  # boxes past the cores when all are busy
            slowdown, blend = 1.0, min(1.0, max(0.0, busy - self.shared_cores) / over) if over > 0 else 0.0
        for box in self.boxes.values():
            if box.slowdown != slowdown or box.blend != blend:
                box.advance(now)
                box.slowdown, box.blend = slowdown, blend
                self._reschedule(box)

    def _dispatch(
        self,
        req: Request,
        target: str,
        now: float,
        counted_prompt: int = -1,
        deadline_ms: float | None = None,
    ) -> Job:
        job = Job(req, target, now, counted_prompt=counted_prompt)
        job.due_s = req.arrival_s + (DEFAULT_DEADLINE_MS if deadline_ms is None else deadline_ms) / 1000
        job.rank_s = job.due_s
        if target == CLOUD:
            cloud = self.fleet.cloud
            ttft, rate = cloud.sample(self.rng)
            job.ttft_s = ttft
            job.e2e_s = ttft + max(0, req.output_tokens - 1) / rate
            job.cost_usd = cloud.cost_usd(req.prompt_tokens, req.output_tokens)
            self.cloud_in_flight += 1
            self._push(now + job.e2e_s, "cloud", 0, job)
            return job
        box = self.boxes[target]
        box.advance(now)
        bisect.insort(box.waiting, job, key=_rank)  # after those due no later: FIFO among equals
        if deadline_ms is not None:
            job.requeue_s = job.due_s
            box.next_requeue_s = min(box.next_requeue_s, job.due_s)
        box.admit()
        self._reschedule(box)
        self._contend(now)
        return job

    def run(self, trace: list[Request], policy: Policy) -> Result:
        jobs: list[Job] = []
        rejected: list[Request] = []
        i = 0
        while i < len(trace) or self._heap:
            if i < len(trace) and (not self._heap or trace[i].arrival_s <= self._heap[0][0]):
                req = trace[i]
                i += 1
                now = req.arrival_s
                for box in self.boxes.values():
                    box.advance(now)  # policies read current queues
                target = policy.route(req, now, self)
                if target is None:
                    rejected.append(req)
                else:
                    counted = getattr(policy, "counted_prompt", None)  # what its gateway counts as pending
                    deadline = getattr(policy, "deadline_ms", None)  # what its gateway tells the engine
                    jobs.append(
                        self._dispatch(
                            req,
                            target,
                            now,
                            counted(req) if counted else -1,
                            deadline(req) if deadline else None,
                        )
                    )
                continue
            t, _, kind, version, job = heapq.heappop(self._heap)
            if kind == "cloud:" and job is not None:
                self.cloud_in_flight -= 1
                policy.observe(job)
                continue
            box = self.boxes[kind.split(":", 1)[1]]
            if version != box.version:
                continue
            box.advance(t)
            for done in box.settle():
                policy.observe(done)
            self._reschedule(box)
            self._contend(t)
        end = max([trace[-1].arrival_s if trace else 0.0, *(b.t for b in self.boxes.values())])
        return Result(policy.name, self.fleet, end, jobs, rejected, self.boxes)
