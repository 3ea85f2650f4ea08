"""The gateway's live routing state: deployment specs from config, live stats, breakers, engine pollers.

`snapshot(now_s)` hands routing a frozen `RoutingSnapshot`; it is rebuilt at most every `_REFRESH_S` so a
decision costs no rebuild. This replica's own load on deployments with a capacity curve (in-flight requests
and prompt tokens pending prefill, which `routing.fleet.predict` turns into queue waits) is kept current
between rebuilds: when it moved, only those deployments' entries are patched (`RoutingSnapshot.with_stats`),
so a burst of requests inside one refresh interval sees each other instead of all landing on the box that
looked idle. Stats are keyed by deployment id (`model@backend`); one team's policy comes from
`[teams.*]` config (defaults for teams created only in SQL). With several replicas, `set_shared` installs the
other replicas' stats (gateway/live/sync.py); they are merged into each rebuilt snapshot only, never
into this replica's own `StatsBook`, so nothing is counted twice. Edge nodes (`set_edge_source`: the ones this
replica holds and, through the relay, the ones other replicas hold) join each rebuilt snapshot as deployments
of their own while their heartbeats are fresh (gateway/edge/pool.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Protocol

from backends.base import Backend
from gateway.config import Config, EdgeBackendConfig, ModelConfig, OpenAIBackendConfig, TeamConfig
from gateway.edge.pool import LiveNode, edge_templates, expand, prior_for, with_node_load
from gateway.live.boxes import BoxPeers
from gateway.live.breaker import BreakerBoard, BreakerPolicy, BreakerState, BreakerView
from gateway.live.engine_load import EngineLoad, MetricsPoller
from gateway.live.stats import Evidence, LiveStats, Load, Prior, StatsBook
from routing.decision import Deployment
from routing.fleet import holds_prefix
from routing.preferences import smaller
from routing.privacy import PrivacyTier, SensitivePolicy
from routing.snapshot import (
    DeploymentSpec,
    DeploymentStats,
    HourlyPrice,
    Objective,
    RoutePolicy,
    RoutingSnapshot,
)

_REFRESH_S = 0.05  # a decision may see stats this stale; rebuilding per request would cost more than routing
_EDGE_PRUNE_EVERY_S = 60.0


class SharedStats(Protocol):
    """Other replicas' view of the deployments, folded into this replica's at snapshot time."""

    def merge(
        self, local: Mapping[str, LiveStats], evidence: Mapping[str, Evidence], now_s: float
    ) -> Mapping[str, LiveStats]: ...


class EdgeSource(Protocol):
    """The edge nodes this replica can reach (gateway/edge/hub.py), live or not; routing keeps live ones."""

    def live_nodes(self) -> Iterable[LiveNode]: ...


def is_edge(backend: object) -> bool:
    """A `kind = "edge"` backend: its deployments exist only while nodes are connected (gateway/edge/pool)."""
    return isinstance(backend, EdgeBackendConfig)


def deployment_id(public_model: str, backend: str) -> str:
    return f"{public_model}@{backend}"


def build_specs(
    config: Config, backends: Mapping[str, Backend], deployments: Mapping[str, tuple[Deployment, ...]]
) -> dict[str, DeploymentSpec]:
    specs: dict[str, DeploymentSpec] = {}
    for public, deps in deployments.items():
        configured = [
            d for d in config.models[public].all_deployments() if not is_edge(config.backends[d.backend])
        ]
        for dep, dep_cfg in zip(deps, configured, strict=True):
            bcfg = config.backends[dep.backend]
            info = backends[dep.backend].info
            hourly = bcfg.usd_per_hour is not None and dep_cfg.input_usd_per_mtok is None
            specs[deployment_id(public, dep.backend)] = DeploymentSpec(
                public_model=public,
                deployment_id=deployment_id(public, dep.backend),
                backend=dep.backend,
                backend_kind=info.kind,
                upstream_model=dep.upstream_model,
                privacy_tier=bcfg.tier,
                price=HourlyPrice(bcfg.usd_per_hour or Decimal(0)) if hourly else dep.price,
                quality_tier=dep_cfg.quality_tier,
                context_tokens=dep.context_tokens,
                supports_tools=info.supports_tools,
                supports_json=info.supports_response_format,
                labels=dict(bcfg.labels),
                capacity=bcfg.capacity.curve() if bcfg.capacity is not None else None,
            )
    return specs


def policy_of(
    team: TeamConfig | None, *, max_attempts_cap: int | None = None, affinity_max_waiting: int = 2
) -> RoutePolicy:
    if team is None:
        return RoutePolicy(affinity_max_waiting=affinity_max_waiting)
    return RoutePolicy(
        objective=Objective(team.objective),
        max_latency_ms=team.max_latency_ms,
        max_usd_per_request=team.max_usd_per_request,
        required_labels={k: frozenset(v) for k, v in team.required_labels.items()},
        preferred_labels=dict(team.preferred_labels),
        min_quality_tier=team.min_quality_tier,
        allow_fallbacks=team.allow_fallbacks,
        max_attempts=min(team.max_attempts, max_attempts_cap or team.max_attempts),
        slo_p95_ttft_ms=team.slo_p95_ttft_ms,
        slo_p95_e2e_ms=team.slo_p95_e2e_ms,
        max_ttft_ms=team.max_ttft_ms,
        affinity_max_waiting=affinity_max_waiting,
    )


def with_model_slo(policy: RoutePolicy, model: ModelConfig) -> RoutePolicy:
    """The team's policy under the model's SLO and deadlines too (`models.X`): for each, the tighter."""
    caps = (model.slo_p95_ttft_ms, model.slo_p95_e2e_ms, model.max_latency_ms, model.max_ttft_ms)
    if all(cap is None for cap in caps):
        return policy  # most models set none: no copy on every request
    return dataclasses.replace(
        policy,
        slo_p95_ttft_ms=smaller(policy.slo_p95_ttft_ms, model.slo_p95_ttft_ms),
        slo_p95_e2e_ms=smaller(policy.slo_p95_e2e_ms, model.slo_p95_e2e_ms),
        max_latency_ms=smaller(policy.max_latency_ms, model.max_latency_ms),
        max_ttft_ms=smaller(policy.max_ttft_ms, model.max_ttft_ms),
    )


def _stats(live: LiveStats, breaker: BreakerView, *, healthy: bool = True) -> DeploymentStats:
    if breaker.state is BreakerState.OPEN:
        open_until: float | None = breaker.open_until_s if breaker.open_until_s is not None else math.inf
    elif breaker.state is BreakerState.HALF_OPEN and breaker.probes_available == 0:
        open_until = math.inf
    else:
        open_until = None
    return DeploymentStats(
        ttft_ms=live.ttft_ms,
        decode_tokens_per_s=max(live.decode_tokens_per_s, 1e-3),
        p50_latency_ms=live.latency_p50_ms or 0.0,
        p95_latency_ms=live.latency_p95_ms or 0.0,
        error_rate=live.error_rate,
        in_flight=live.in_flight,
        queue_depth=live.queue_depth or 0,
        kv_cache_used_frac=live.kv_cache_used_frac or 0.0,
        circuit_open_until_s=open_until,
        sample_count=live.samples,
        healthy=healthy,
        running=live.running,
        pending_prompt_tokens=live.pending_prompt_tokens,
        pending_prompt_context=live.pending_prompt_context,
        in_flight_context=live.in_flight_context,
        ttft_tail_factor=live.ttft_tail_factor,
    )


class PrefixHolders:
    """Where this gateway replica last served each conversation on owned capacity (prefix key -> owned
    deployment id), for the `capacity` most recent: its next turn expects its earlier messages in that
    engine's prefix cache (`RouteRequest.prefix_holder`), as many as were served there. A turn the cloud
    serves leaves the holder as it was: that engine still holds the turns before it, a prefix of every later
    turn. Other gateway replicas keep their own (a conversation another replica served has none here: no
    discount, the rendezvous favourite)."""

    def __init__(self, capacity: int = 65_536) -> None:
        self._capacity = capacity
        self._holders: OrderedDict[int, tuple[str, int, int]] = OrderedDict()

    def held(self, key: int | None) -> tuple[str, int, int] | None:
        """(deployment id, KV tokens written on it when the turn was placed there, leading messages it holds:
        that turn's prompt and reply; 0 when not counted), or None."""
        return None if key is None else self._holders.get(key)

    def record(self, key: int | None, deployment_id: str | None, written: int = 0, messages: int = 0) -> None:
        """`written`: `StatsBook.kv_written_of(deployment_id)` now, against which later writes are counted.
        `deployment_id` None: the turn went to the cloud; the holder of the turns before it stays."""
        if key is None:
            return
        if deployment_id is None:
            if key in self._holders:
                self._holders.move_to_end(key)
            return
        self._holders[key] = (deployment_id, written, messages)
        self._holders.move_to_end(key)
        if len(self._holders) > self._capacity:
            self._holders.popitem(last=False)


class RoutingState:
    """Owned by `Services`; used from the event loop only (none of its parts are thread-safe)."""

    def __init__(self, config: Config, specs: Mapping[str, DeploymentSpec]) -> None:
        self.config = config
        self.specs = dict(specs)
        rc = config.routing
        priors = {
            dep_id: Prior(
                ttft_ms=config.backends[spec.backend].prior_ttft_ms,
                decode_tokens_per_s=config.backends[spec.backend].prior_tokens_per_s,
                latency_ms=config.backends[spec.backend].prior_latency_ms,
            )
            for dep_id, spec in specs.items()
        }
        self.stats = StatsBook(priors, alpha=rc.stats_alpha)
        self.breakers = BreakerBoard(
            list(specs), BreakerPolicy(failure_threshold=rc.breaker_failures, open_s=rc.breaker_open_s)
        )
        waiting = rc.affinity_max_waiting
        self.policies = {
            name: policy_of(team, affinity_max_waiting=waiting) for name, team in config.teams.items()
        }
        self._default_policy = RoutePolicy(affinity_max_waiting=waiting)
        self._snapshot: RoutingSnapshot | None = None
        self._built: RoutingSnapshot | None = None  # the last full rebuild; `_snapshot` may patch its load
        self._built_load: dict[str, Load] = {}  # curve deployment id -> load_of at the rebuild
        self._load_version = -1
        self._built_s = -math.inf
        self._pollers: list[MetricsPoller] = []
        self._shared: SharedStats | None = None
        self.edge_templates = edge_templates(config)
        self._edge: EdgeSource | None = None
        self._edge_seen: dict[str, float] = {}  # edge deployment id -> last time it was live
        self._edge_pruned_s = -math.inf
        self._down: set[str] = set()  # failing their health probe (gateway/live/health.py)
        self.prefix_holders = PrefixHolders()
        self.boxes = BoxPeers(specs)  # public models sharing a box share its load and prefix cache

    def mark_down(self, backend: str) -> bool:
        """Take a backend out of routing; True when it was in."""
        if backend in self._down:
            return False
        self._down.add(backend)
        self.refresh()
        return True

    def mark_up(self, backend: str) -> bool:
        """Put a backend back into routing; True when it was out."""
        if backend not in self._down:
            return False
        self._down.discard(backend)
        self.refresh()
        return True

    def is_down(self, backend: str) -> bool:
        return backend in self._down

    def set_edge_source(self, source: EdgeSource | None) -> None:
        """Route to the live nodes `source` holds, from the next snapshot on."""
        self._edge = source
        self._built_s = -math.inf

    def refresh(self) -> None:
        """Rebuild the next snapshot even if the current one is fresh (a node or a probe changed)."""
        self._built_s = -math.inf

    def set_shared(self, shared: SharedStats | None) -> None:
        """Use other replicas' stats from the next snapshot on (None: this replica's alone)."""
        self._shared = shared
        self._built_s = -math.inf

    def prefix_holder(self, key: int | None, model: str) -> str | None:
        """The owned deployment that served this conversation's last turn on owned capacity, while its engine
        can still hold that turn in its prefix cache (`routing.fleet.holds_prefix`, from the KV tokens this
        replica has had written there since and the box's `capacity.kv_cache_tokens`); else None. It is the
        deployment of `model` on that box (`BoxPeers.under`: the last turn may have named the box otherwise),
        None if the box does not serve `model`."""
        held = self.prefix_held(key, model)
        return None if held is None else held[0]

    def prefix_held(self, key: int | None, model: str) -> tuple[str, int] | None:
        """`prefix_holder` with the leading messages it holds (0: not counted, take every shared one)."""
        held = self.prefix_holders.held(key)
        if held is None:
            return None
        dep_id, written_at, messages = held
        spec = self.specs.get(dep_id)
        since = self.boxes.written(self.stats, dep_id) - written_at
        if not holds_prefix(spec.capacity if spec else None, since):
            return None
        here = self.boxes.under(dep_id, model)
        return None if here is None else (here, messages)

    def policy(self, team: str) -> RoutePolicy:
        return self.policies.get(team, self._default_policy)

    def team_floor(self, team: str) -> tuple[PrivacyTier, SensitivePolicy]:
        cfg = self.config.teams.get(team)
        if cfg is None:
            return PrivacyTier.EXTERNAL, SensitivePolicy.RAISE_FLOOR
        return cfg.privacy_floor, cfg.on_sensitive

    def snapshot(self, now_s: float) -> RoutingSnapshot:
        if self._built is None or now_s - self._built_s >= _REFRESH_S:
            self._rebuild(now_s)
        elif self.stats.load_version != self._load_version:
            self._snapshot = self._patched(self._built)
        self._load_version = self.stats.load_version
        assert self._snapshot is not None
        return self._snapshot

    def _patched(self, built: RoutingSnapshot) -> RoutingSnapshot:
        """`built` with this replica's load on curve deployments moved by what changed since the rebuild
        (a delta, so other replicas' share merged into the rebuild stays)."""
        changed: dict[str, DeploymentStats] = {}
        for dep_id, load_0 in self._built_load.items():
            load = self.boxes.load(self.stats, dep_id)
            if load != load_0:
                stats = built.deployments[dep_id][1]
                fields = zip(Load._fields, load, load_0, strict=True)
                moved = {f: max(0, getattr(stats, f) + now - then) for f, now, then in fields}
                changed[dep_id] = dataclasses.replace(stats, **moved)
        return built.with_stats(changed) if changed else built

    def _rebuild(self, now_s: float) -> None:
        edge = self._edge_deployments(now_s)
        live = self.stats.snapshot(now_s)
        if self._shared is not None:
            live = self._shared.merge(live, self.stats.evidence(now_s), now_s)
        breakers = self.breakers.snapshot(now_s)
        down = self._down
        entries = {
            dep_id: (spec, _stats(live[dep_id], breakers[dep_id], healthy=spec.backend not in down))
            for dep_id, spec in self.specs.items()
        }
        for spec, node in edge:
            stats = _stats(live[spec.deployment_id], self.breakers.view(spec.deployment_id, now_s))
            entries[spec.deployment_id] = (spec, with_node_load(stats, node))
        self._snapshot = self._built = RoutingSnapshot(self.boxes.pooled(entries))
        self._built_load = {
            dep_id: self.boxes.load(self.stats, dep_id)
            for dep_id, (spec, _) in entries.items()
            if spec.capacity is not None
        }
        self._built_s = now_s

    def _edge_deployments(self, now_s: float) -> list[tuple[DeploymentSpec, LiveNode]]:
        if self._edge is None or not self.edge_templates:
            return []
        found = expand(
            self.edge_templates, self._edge.live_nodes(), now_s=now_s, ttl_s=self.config.edge.ttl_s
        )
        for template, node, spec in found:
            self.stats.ensure(spec.deployment_id, prior_for(template, node))
            self._edge_seen[spec.deployment_id] = now_s
        if now_s - self._edge_pruned_s >= _EDGE_PRUNE_EVERY_S:
            self._prune_edge(now_s)
        return [(spec, node) for _, node, spec in found]

    def _prune_edge(self, now_s: float) -> None:
        """Forget nodes gone for longer than any request can last (node ids may be new at each restart)."""
        self._edge_pruned_s = now_s
        keep_s = self.config.server.request_timeout_s + _EDGE_PRUNE_EVERY_S
        for dep_id, seen_s in list(self._edge_seen.items()):
            if now_s - seen_s > keep_s and self.stats.in_flight_of(dep_id) == 0:
                self.stats.forget(dep_id)
                self.breakers.forget(dep_id)
                del self._edge_seen[dep_id]

    def start_pollers(self, clock: Callable[[], float]) -> None:
        """Read queue depth and KV use from engines that expose /metrics (config: backends.X.metrics_url)."""
        for name, bcfg in self.config.backends.items():
            if not isinstance(bcfg, OpenAIBackendConfig) or bcfg.metrics_url is None:
                continue
            ids = [dep_id for dep_id, spec in self.specs.items() if spec.backend == name]

            def on_reading(load: EngineLoad, ids: list[str] = ids) -> None:
                now_s = clock()
                for dep_id in ids:
                    self.stats.observe_engine(
                        dep_id,
                        now_s=now_s,
                        queue_depth=load.queue_depth,
                        kv_cache_used_frac=load.kv_cache_used_frac,
                        running=load.running,
                    )

            poller = MetricsPoller(bcfg.metrics_url, self.config.routing.metrics_poll_s, on_reading)
            poller.start()
            self._pollers.append(poller)

    async def aclose(self) -> None:
        for poller in self._pollers:
            await poller.aclose()
