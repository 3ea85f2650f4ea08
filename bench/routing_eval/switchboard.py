"""The Switchboard policy: the real `routing.scoring.choose` over a `RoutingSnapshot` of the simulated fleet.

Specs are what a gateway config would say: owned engine boxes and edge nodes at an hourly price with their
throughput curve (`routing.fleet.Capacity`, from the same step model the simulator runs), the cloud at its
list price; boxes carry their prefill rate and a reserve for must-stay traffic (`RESERVE_*`). Stats are
what the gateway would see: its own in-flight count and the prompt tokens of its requests still without a
first token per deployment, the engine's running and waiting counts (its /metrics), TTFT and per-stream
decode rate as moving averages of finished requests, and the median latency of the last 100. Like the
gateway (`gateway/live/state.py`), a snapshot is rebuilt at most every 50 ms, and between rebuilds only the
gateway's own load counts (in flight, prompt tokens pending) move. Team policies carry the
objective and SLOs. As the gateway keys a conversation by its opening (`gateway/pipeline/prefix.py`), an
agent turn's prefix key is its session's, and, like the gateway (`gateway.live.state.PrefixHolders`), it
remembers which box served a session's last turn: a later turn expects its earlier turns cached there
(`RouteRequest.prefix_tokens`: the prompt but its new message, `prefix_holder`), and counts only the rest
as pending prefill there. Dispatch takes the first candidate; no candidate (fail closed) is a rejection.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field, replace

from backends.base import BackendKind
from bench.routing_eval.fleet import BoxSpec, Fleet, StepModel
from bench.routing_eval.sim import CLOUD, Job, Simulation
from bench.routing_eval.workload import TEAMS, Request
from gateway.live.stats import Load
from routing.decision import Price, RouteDecision
from routing.fleet import Capacity, holds_prefix, lateness, stable_hash64, tail_factor
from routing.scoring import choose
from routing.snapshot import (
    DeploymentSpec,
    DeploymentStats,
    HourlyPrice,
    Objective,
    RoutePolicy,
    RouteRequest,
    RoutingSnapshot,
)

MODEL = "auto"
REFRESH_S = 0.05  # gateway/live/state.py: a decision may see stats this stale
AFFINITY_MIN_PREFIX_TOKENS = 256  # shorter shared prefixes are not worth pinning to a replica
_ALPHA = 0.2  # moving-average weight of each new sample


# The reserve for must-stay traffic each owned box and edge node keeps (`Capacity.reserve_*`), chosen once
# from the workload's shape, not per table: about a quarter of the slots (the share of requests whose floor
# keeps them on owned capacity is 27-30%), and requests that could go to the cloud only while their
# predicted TTFT is within half the tightest SLO a must-stay request carries (support's 2500 ms), so one
# arriving next still has half its target for its own prefill.
RESERVE_SHARE = 0.25
RESERVE_TTFT_MS = 1250.0


def capacity_of(model: StepModel) -> Capacity:
    """The box's curve as a config would give it: aggregate decode tok/s at 1, 2, 4 ... max_batch streams;
    its prefill rate (each prompt token at its flat cost: routing adds a step of the decoding streams per
    chunk), what a prompt token costs more per token before it (calibrate's `e`) and a decoding stream's step
    per context token (`d`); its reserve."""
    points, n = [], 1
    while n < model.max_batch:
        points.append((float(n), model.aggregate_tok_s(n)))
        n *= 2
    points.append((float(model.max_batch), model.aggregate_tok_s(model.max_batch)))
    return Capacity(
        tokens_per_s=tuple(points),
        max_concurrency=model.max_batch,
        prefill_tokens_per_s=1000 / model.prefill_ms_per_token,
        reserve_slots=max(1, round(RESERVE_SHARE * model.max_batch)),
        reserve_ttft_ms=RESERVE_TTFT_MS,
        kv_cache_tokens=model.kv_tokens,
        prefill_chunk_tokens=model.max_prefill_tokens,
        short_prefill_tokens=model.short_prefill_tokens,
        prefill_us_per_context_token=1000 * model.prefill_ms_per_context_token,
        decode_us_per_context_token=1000 * model.decode_ms_per_context_token,
    )


def dep_id(target: str) -> str:
    return f"{MODEL}@{target}"


def _box_spec(box: BoxSpec) -> DeploymentSpec:
    kind = BackendKind.EDGE if box.kind == "edge" else BackendKind.LOCAL
    return DeploymentSpec(
        MODEL, dep_id(box.name), box.name, kind, "smollm2", box.tier, HourlyPrice(box.usd_per_hour),
        context_tokens=8192, capacity=capacity_of(box.model),
    )  # fmt: skip


def specs_of(fleet: Fleet) -> list[DeploymentSpec]:
    cloud = fleet.cloud
    price = Price(cloud.input_usd_per_mtok, cloud.output_usd_per_mtok)
    cloud_spec = DeploymentSpec(
        MODEL, dep_id(CLOUD), CLOUD, BackendKind.CLOUD, cloud.name, cloud.tier, price, context_tokens=128_000
    )
    return [*(_box_spec(b) for b in fleet.boxes), cloud_spec]


def policy_of(team_name: str) -> RoutePolicy:
    team = next(t for t in TEAMS if t.name == team_name)
    return RoutePolicy(
        objective=Objective(team.objective),
        slo_p95_ttft_ms=team.slo_p95_ttft_ms,
        slo_p95_e2e_ms=team.slo_p95_e2e_ms,
        max_ttft_ms=team.max_ttft_ms,
    )


@dataclass
class _Seen:
    """The gateway's live evidence about one deployment (config priors until samples arrive)."""

    ttft_ms: float
    decode_tok_s: float
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    p50_ms: float = 0.0
    samples: int = 0
    ratios: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # measured / predicted TTFT
    tail: float = 1.0

    def add_ratio(self, ratio: float) -> None:
        self.ratios.append(ratio)
        self.tail = tail_factor(self.ratios)

    def add(self, job: Job) -> None:
        a = _ALPHA
        self.ttft_ms += a * (job.ttft_s * 1000 - self.ttft_ms)
        if job.req.output_tokens > 1 and job.e2e_s > job.ttft_s:
            rate = (job.req.output_tokens - 1) / (job.e2e_s - job.ttft_s)
            self.decode_tok_s += a * (rate - self.decode_tok_s)
        self.latencies_ms.append(job.e2e_s * 1000)
        self.samples += 1
        if self.samples % 10 == 1:
            self.p50_ms = statistics.median(self.latencies_ms)


def _prior(box: BoxSpec | None, fleet: Fleet) -> _Seen:
    if box is None:
        return _Seen(fleet.cloud.ttft_median_ms, fleet.cloud.decode_tok_s)
    m = box.model
    ttft_ms = m.step_base_ms + m.prompt_ms(300)  # a 300-token prompt on an idle box
    return _Seen(ttft_ms, m.aggregate_tok_s(1))


@dataclass
class Switchboard:
    name: str = "switchboard"
    affinity: bool = True
    use_cloud: bool = True  # False: the cloud reads as unhealthy (the live check's affinity comparison)
    decisions: int = 0
    last: RouteDecision | None = None
    _specs: dict[str, DeploymentSpec] = field(default_factory=dict)
    _seen: dict[str, _Seen] = field(default_factory=dict)
    tail_aware: bool = True  # False: SLO checks trust the predicted TTFT as it is (no ttft_tail_factor)
    routed_to: dict[int, str] = field(default_factory=dict)  # request id -> the target its prediction was for
    fresh_load: bool = True  # False: the whole snapshot is 50 ms stale, as the gateway's was before
    _snapshot: RoutingSnapshot | None = None
    _built: RoutingSnapshot | None = None
    _built_s: float = -1.0
    _built_load: dict[str, Load] = field(default_factory=dict)
    _policies: dict[str, RoutePolicy] = field(default_factory=dict)
    predicted_ttft_ms: dict[int, float] = field(default_factory=dict)  # request id -> routing's prediction
    _counted: int = 0
    # prefix key -> (box of its last turn on owned capacity, KV tokens written there by then, tokens it holds:
    # that turn's prompt and reply; 0 for a system prompt's key)
    _holders: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    _written: dict[str, int] = field(default_factory=dict)  # box -> KV tokens written there (gateway-style)
    system_affinity: bool = True  # a conversation without a holder: the system prompt's last replica
    eviction_aware: bool = True  # False: a holder is trusted however much was written on its box since

    def _setup(self, fleet: Fleet) -> None:
        self._specs = {s.backend: s for s in specs_of(fleet)}
        boxes = {b.name: b for b in fleet.boxes}
        self._seen = {name: _prior(boxes.get(name), fleet) for name in self._specs}
        self._policies = {t.name: policy_of(t.name) for t in TEAMS}

    def _stats(self, name: str, sim: Simulation) -> DeploymentStats:
        seen = self._seen[name]
        if name == CLOUD:
            in_flight, waiting, running = sim.cloud_in_flight, 0, None
        else:
            box = sim.boxes[name]
            in_flight, waiting, running = box.in_system, len(box.waiting), box.running
        pending, context, held = (0, 0.0, 0) if name == CLOUD else self._load(name, sim)[1:]
        return DeploymentStats(
            ttft_ms=seen.ttft_ms,
            decode_tokens_per_s=max(seen.decode_tok_s, 1e-3),
            p50_latency_ms=seen.p50_ms,
            in_flight=in_flight,
            queue_depth=waiting,
            sample_count=seen.samples,
            healthy=self.use_cloud or name != CLOUD,
            running=running,
            pending_prompt_tokens=pending,
            pending_prompt_context=context,
            in_flight_context=held,
            ttft_tail_factor=seen.tail,
        )

    def snapshot(self, now: float, sim: Simulation) -> RoutingSnapshot:
        if not self._specs:
            self._setup(sim.fleet)
        if self._built is None or now - self._built_s >= REFRESH_S:
            deployments = {s.deployment_id: (s, self._stats(n, sim)) for n, s in self._specs.items()}
            self._built = self._snapshot = RoutingSnapshot(deployments)
            self._built_s = now
            self._built_load = {n: self._load(n, sim) for n in sim.boxes}
        elif self.fresh_load:  # the gateway's own counts are current between rebuilds (gateway/live/state.py)
            changed = {}
            for name, load_0 in self._built_load.items():
                load = self._load(name, sim)
                if load != load_0:
                    spec, stats = self._built.deployments[dep_id(name)]
                    changed[spec.deployment_id] = replace(stats, **load._asdict())
            self._snapshot = self._built.with_stats(changed) if changed else self._built
        assert self._snapshot is not None
        return self._snapshot

    @staticmethod
    def _load(name: str, sim: Simulation) -> Load:
        """What the box's gateway counts (`gateway.live.stats.Load`)."""
        b = sim.boxes[name]
        return Load(b.in_system, b.pending_prompt_tokens, b.pending_prompt_context, b.in_flight_context)

    def _held(self, key: int) -> tuple[str, int] | None:
        """(holder, tokens it holds) as `RoutingState.prefix_held` gives them, or None."""
        held = self._holders.get(key)
        if held is None:
            return None
        holder, written_at, tokens = held
        box = holder.split("@", 1)[1]
        since = self._written.get(box, 0) - written_at
        if self.eviction_aware and not holds_prefix(self._specs[box].capacity, since):
            return None  # its box has written more than its cache keeps since: evicted
        return holder, tokens

    def _holder(self, key: int) -> str | None:
        held = self._held(key)
        return None if held is None else held[0]

    def request_of(self, req: Request) -> RouteRequest:
        team = next(t for t in TEAMS if t.name == req.team)
        key, cached, holder = None, 0, None
        if self.affinity and req.prefix_tokens >= AFFINITY_MIN_PREFIX_TOKENS:
            key = stable_hash64(f"session:{req.session}" if req.session >= 0 else req.prefix_key)
            held = self._held(key)
            holder = None if held is None else held[0]
            # A later turn: what its holder served, all but its new message if the previous turn ran there
            # (turns the cloud served since are not). Once its oldest turns are cut (the trace's `follows`
            # -1), its opening changed: the gateway, which keys a conversation by its opening, finds no
            # holder for it.
            if req.history_tokens and req.follows >= 0 and held is not None:
                whole = req.prefix_tokens + req.history_tokens
                cached = min(held[1] or whole, whole)
            elif self.system_affinity:  # else the replica that last served its system prompt holds that
                holder = self._holder(stable_hash64(f"system:{req.prefix_key}"))
                cached = req.prefix_tokens if holder is not None else 0
        return RouteRequest(
            public_model=MODEL,
            prompt_tokens=req.prompt_tokens,
            expected_output_tokens=team.max_tokens,
            privacy_floor=req.floor,
            prefix_key=key,
            prefix_tokens=min(cached, req.prompt_tokens),
            prefix_holder=holder if cached else None,
        )

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        request = self.request_of(req)
        decision = choose(request, self.snapshot(now, sim), self._policies[req.team], now_s=now)
        self.decisions += 1
        self.last = decision
        self._counted = req.prompt_tokens
        target = decision.candidates[0].backend if decision.candidates else None
        if decision.ranked:
            self.predicted_ttft_ms[req.rid] = decision.ranked[0].ttft_ms
            self.routed_to[req.rid] = decision.ranked[0].deployment.backend
            if decision.ranked[0].deployment_id == request.prefix_holder:  # the cached part is not pending
                self._counted = req.prompt_tokens - request.prefix_tokens
        if target is not None and target != CLOUD:
            self._written[target] = self._written.get(target, 0) + self._counted
        # Where this conversation is served now; a cloud turn leaves the holder of the turns before it.
        if request.prefix_key is not None and target is not None and target != CLOUD:
            held = req.prompt_tokens + req.output_tokens
            self._holders[request.prefix_key] = (dep_id(target), self._written[target], held)
            if self.system_affinity:
                system = stable_hash64(f"system:{req.prefix_key}")
                self._holders[system] = (dep_id(target), self._written[target], 0)
        return target

    def deadline_ms(self, req: Request) -> float | None:
        """The first token's deadline the gateway sends an engine (`gateway.pipeline.plan.with_deadline`)."""
        return (self._policies.get(req.team) or policy_of(req.team)).first_token_deadline_ms

    def counted_prompt(self, req: Request) -> int:
        """The prompt tokens the gateway counts as pending prefill for the request just routed."""
        return self._counted if req.prompt_tokens >= self._counted else req.prompt_tokens

    def observe(self, job: Job) -> None:
        seen = self._seen[job.target]
        seen.add(job)
        if job.target != CLOUD:
            self._written[job.target] = self._written.get(job.target, 0) + job.req.output_tokens
        predicted = self.predicted_ttft_ms.get(job.req.rid, 0.0)
        if self.tail_aware and predicted > 0 and self.routed_to.get(job.req.rid) == job.target:
            seen.add_ratio(lateness(job.ttft_s * 1000, predicted))
