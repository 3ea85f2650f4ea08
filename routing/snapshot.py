"""The frozen inputs of a scored route decision: deployment specs, live stats, the request, the team policy.

A `RoutingSnapshot` is built once per stats refresh (off the request path) and precomputes everything that
does not depend on the request: the per-model index, each deployment's marginal per-token price (0 on owned
capacity: `HourlyPrice`), its latency terms (`routing.fleet.predict`, from live load and the optional
`DeploymentSpec.capacity` curve, prompt length included where it gives a prefill rate) and the
dispatch-facing `Deployment`. SLOs (`RoutePolicy.slo_p95_*`) and prefix affinity (`RouteRequest.prefix_key`)
are read by `routing.scoring.choose`. Invariant: nothing here changes after construction, so `choose` can
share a snapshot across requests and threads without locks.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from backends.base import BackendKind
from routing.decision import FREE, Deployment, Price, RejectCode, Rejection
from routing.fleet import Capacity, predict, stable_hash64
from routing.privacy import PrivacyTier

PUSD_PER_USD = 10**12  # routing money is integer pico-USD: exact, and ~5x faster than Decimal in the loop
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _no_labels() -> Mapping[str, Any]:
    return _EMPTY  # one shared read-only default (a MappingProxyType is not a legal dataclass default)


@dataclass(frozen=True, slots=True)
class HourlyPrice:
    """Owned capacity (self-hosted GPU, edge box): a fixed cost per hour, paid whatever it serves.

    Its marginal cost in routing is 0: the hour is already paid. What limits it is latency, not money: once
    its predicted TTFT or end-to-end latency would break the request's SLO, routing overflows to the cloud
    (`routing.scoring`). The ledger keeps the cloud money a request spent (0 here) apart from its share of
    owned capacity for chargeback (`routing.fleet.owned_share_micro_usd`); reports show the hourly cost.
    """

    usd_per_hour: Decimal


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One way to serve a public model, as configured. `deployment_id` is unique across the snapshot."""

    public_model: str
    deployment_id: str
    backend: str
    backend_kind: BackendKind
    upstream_model: str
    privacy_tier: PrivacyTier
    price: Price | HourlyPrice
    quality_tier: int = 0  # higher is better; compared with RoutePolicy.min_quality_tier
    context_tokens: int | None = None  # None: unknown, not checked
    supports_tools: bool = True
    supports_json: bool = True
    labels: Mapping[str, str] = field(default_factory=_no_labels)  # e.g. {"site": "fra1", "region": "eu"}
    capacity: Capacity | None = None  # the box's throughput curve (owned capacity); None: measured rates only


@dataclass(frozen=True, slots=True)
class DeploymentStats:
    """Live (or prior, from config) measurements of one deployment. Rates must be positive."""

    ttft_ms: float
    decode_tokens_per_s: float  # per stream, as measured at the current load
    p50_latency_ms: float = 0.0  # 0: no measurement yet; then a request's own service time stands in
    p95_latency_ms: float = 0.0
    error_rate: float = 0.0
    in_flight: int = 0
    queue_depth: int = 0
    kv_cache_used_frac: float = 0.0
    healthy: bool = True
    circuit_open_until_s: float | None = None  # None: closed; compared with `now_s`; math.inf: until told
    sample_count: int = 0  # 0: these are the config priors
    running: int | None = None  # the engine's running requests (its /metrics); None: not reported
    pending_prompt_tokens: int = 0  # prompt tokens of the gateway's in-flight requests without a first token
    pending_prompt_context: float = 0.0  # their attention's share: routing.fleet.predict
    in_flight_context: int = 0  # prompt tokens of the gateway's in-flight requests: routing.fleet.predict
    # How far late the predictions run here: the 90th percentile of measured / predicted TTFT over recent
    # requests (>= 1; 1 until enough are measured). SLO checks use predicted TTFT x this (routing.placement).
    ttft_tail_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.ttft_tail_factor < 1.0 or not math.isfinite(self.ttft_tail_factor):
            raise ValueError(f"ttft_tail_factor must be finite and >= 1, got {self.ttft_tail_factor}")
        if self.decode_tokens_per_s <= 0 or self.ttft_ms < 0:
            raise ValueError(
                f"decode_tokens_per_s must be > 0 and ttft_ms >= 0, got {self.decode_tokens_per_s}, "
                f"{self.ttft_ms}"
            )


LACKS_TOOLS, LACKS_JSON = 1, 2  # bits of `Entry.lacks`


@dataclass(frozen=True, slots=True)
class Entry:
    """A spec and its stats, flattened into what `choose` reads per request (built by `RoutingSnapshot`): the
    copies of spec/stats fields save attribute hops in the loop that runs once per deployment per request."""

    spec: DeploymentSpec
    stats: DeploymentStats
    deployment: Deployment  # what dispatch gets; owned capacity appears at marginal price 0
    deployment_id: str
    names: frozenset[str]  # deployment id and backend name: what `order`, `only` and `ignore` match
    privacy_rank: int
    context_tokens: int  # sys.maxsize when unknown
    lacks: int  # LACKS_TOOLS | LACKS_JSON
    quality_tier: int
    healthy: bool
    circuit_open_until_s: float  # -inf when closed
    blocked_until_s: float  # inf when unhealthy, else circuit_open_until_s: one test in the loop
    base_latency_ms: float  # predicted latency = base + expected output tokens * per-token (routing.fleet)
    latency_ms_per_output_token: float
    input_pusd_per_token: int
    output_pusd_per_token: int
    # Indexed by a request's floor rank: the rejection when privacy is the only rule that fails (the common
    # case), built once per snapshot instead of per request; None where the tier is private enough.
    below_floor: tuple[Rejection | None, ...] = ()
    ttft_base_ms: float = 0.0  # predicted TTFT = base + expected output tokens * per-token
    ttft_ms_per_output_token: float = 0.0
    owned: bool = False  # owned capacity (HourlyPrice): fixed cost, marginal 0
    waiting: int = 0  # requests that would queue for a slot, this one included (0: it starts at once)
    affinity_seed: int = 0  # routing.fleet.stable_hash64(backend): its box's rendezvous identity, any name
    ms_per_prompt_token: float = 0.0  # added to predicted TTFT and latency per prompt token (prefill)
    unreserved: bool = True  # a request that could go elsewhere fits outside the must-stay reserve
    reserve_ttft_ms: float = math.inf  # such a request only where its predicted TTFT is at most this
    ttft_tail_factor: float = 1.0  # stats.ttft_tail_factor: SLO checks use predicted TTFT x this
    # A request with at most this many prompt tokens left to compute (after a cached prefix) starts this much
    # sooner: the engine computes short prompts ahead of those pending (routing.fleet.Prediction).
    short_prompt_tokens: int = 0
    short_saving_ms: float = 0.0
    # Added to predicted TTFT and latency per prompt token squared: its attention over the prompt's own
    # earlier tokens (routing.fleet.Prediction.ms_per_prompt_token_sq).
    ms_per_prompt_token_sq: float = 0.0

    def hot(self) -> HotRow:
        """The fields `choose` screens every entry by, in the order its loop unpacks them."""
        return (
            self, self.privacy_rank, self.context_tokens, self.lacks, self.quality_tier, self.blocked_until_s,
            self.base_latency_ms, self.latency_ms_per_output_token, self.input_pusd_per_token,
            self.output_pusd_per_token, self.ttft_base_ms, self.ttft_ms_per_output_token,
            self.ms_per_prompt_token, self.ms_per_prompt_token_sq,
        )  # fmt: skip


# An entry's fields as `choose` unpacks them in its loop: tuple unpacking is ~3x cheaper than attribute loads.
HotRow = tuple[Entry, int, int, int, int, float, float, float, int, int, float, float, float, float]


def _pusd(usd_per_token: Decimal) -> int:
    return int((usd_per_token * PUSD_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def _deployment(spec: DeploymentSpec, price: Price) -> Deployment:
    return Deployment(
        public_model=spec.public_model,
        backend=spec.backend,
        backend_kind=spec.backend_kind,
        upstream_model=spec.upstream_model,
        price=price,
        supports_tools=spec.supports_tools,
        supports_response_format=spec.supports_json,
        context_tokens=spec.context_tokens,
        usd_per_hour=spec.price.usd_per_hour if isinstance(spec.price, HourlyPrice) else None,
    )


def _entry(spec: DeploymentSpec, stats: DeploymentStats) -> Entry:
    owned = isinstance(spec.price, HourlyPrice)
    if isinstance(spec.price, HourlyPrice):
        in_pusd, out_pusd, price = 0, 0, FREE  # already paid for: its marginal cost is 0
    else:
        price = spec.price  # USD per Mtok is micro-USD per token
        in_pusd = _pusd(price.input_usd_per_mtok / 1_000_000)
        out_pusd = _pusd(price.output_usd_per_mtok / 1_000_000)
    open_until_s = -math.inf if stats.circuit_open_until_s is None else stats.circuit_open_until_s
    lacks = (0 if spec.supports_tools else LACKS_TOOLS) | (0 if spec.supports_json else LACKS_JSON)
    p = predict(
        ttft_ms=stats.ttft_ms, decode_tokens_per_s=stats.decode_tokens_per_s,
        p50_latency_ms=stats.p50_latency_ms, in_flight=stats.in_flight, queue_depth=stats.queue_depth,
        running=stats.running, capacity=spec.capacity, pending_prompt_tokens=stats.pending_prompt_tokens,
        pending_prompt_context=stats.pending_prompt_context, in_flight_context=stats.in_flight_context,
    )  # fmt: skip
    reserve_ttft_ms = spec.capacity.reserve_ttft_ms if spec.capacity is not None else None
    return Entry(
        spec=spec,
        stats=stats,
        deployment=_deployment(spec, price),
        deployment_id=spec.deployment_id,
        names=frozenset((spec.deployment_id, spec.backend)),
        privacy_rank=spec.privacy_tier.rank,
        context_tokens=sys.maxsize if spec.context_tokens is None else spec.context_tokens,
        lacks=lacks,
        quality_tier=spec.quality_tier,
        healthy=stats.healthy,
        circuit_open_until_s=open_until_s,
        blocked_until_s=open_until_s if stats.healthy else math.inf,
        base_latency_ms=p.base_ms,
        latency_ms_per_output_token=p.ms_per_output_token,
        input_pusd_per_token=in_pusd,
        output_pusd_per_token=out_pusd,
        below_floor=_below_floor(spec),
        ttft_base_ms=p.ttft_base_ms,
        ttft_ms_per_output_token=p.ttft_ms_per_output_token,
        owned=owned,
        waiting=p.waiting,
        affinity_seed=stable_hash64(spec.backend),
        ms_per_prompt_token=p.ms_per_prompt_token,
        unreserved=p.unreserved,
        short_prompt_tokens=p.short_prompt_tokens,
        short_saving_ms=p.short_saving_ms,
        ms_per_prompt_token_sq=p.ms_per_prompt_token_sq,
        reserve_ttft_ms=math.inf if reserve_ttft_ms is None else reserve_ttft_ms,
        ttft_tail_factor=stats.ttft_tail_factor,
    )


def _below_floor(spec: DeploymentSpec) -> tuple[Rejection | None, ...]:
    """Must match `routing.scoring._spec_reasons`'s privacy text (a test compares them)."""
    out: list[Rejection | None] = []
    for floor in sorted(PrivacyTier, key=lambda t: t.rank):
        if spec.privacy_tier.rank > floor.rank:
            text = f"tier {spec.privacy_tier} < floor {floor}"
            out.append(Rejection(spec.deployment_id, spec.backend, (RejectCode.PRIVACY,), (text,)))
        else:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    """Deployment id -> (spec, stats), frozen. Derived: model -> entries (in id order), and their hot rows."""

    deployments: Mapping[str, tuple[DeploymentSpec, DeploymentStats]]
    by_model: Mapping[str, tuple[Entry, ...]] = field(init=False, repr=False, compare=False)
    hot_by_model: Mapping[str, tuple[HotRow, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        grouped: dict[str, list[Entry]] = {}
        for deployment_id in sorted(self.deployments):
            spec, stats = self.deployments[deployment_id]
            if spec.deployment_id != deployment_id:
                raise ValueError(
                    f"snapshot key `{deployment_id}` != spec.deployment_id `{spec.deployment_id}`"
                )
            grouped.setdefault(spec.public_model, []).append(_entry(spec, stats))
        object.__setattr__(self, "deployments", MappingProxyType(dict(self.deployments)))
        object.__setattr__(self, "by_model", MappingProxyType({m: tuple(es) for m, es in grouped.items()}))
        hot = {m: tuple(e.hot() for e in es) for m, es in grouped.items()}
        object.__setattr__(self, "hot_by_model", MappingProxyType(hot))

    def with_stats(self, changed: Mapping[str, DeploymentStats]) -> RoutingSnapshot:
        """This snapshot with the stats of the deployments in `changed` replaced: only their entries are
        rebuilt (and their models' rows), so a gateway can keep its load counts current between rebuilds
        for the cost of the deployments whose load moved. Unknown ids raise KeyError."""
        deployments = dict(self.deployments)
        models: set[str] = set()
        for deployment_id, stats in changed.items():
            spec, _ = deployments[deployment_id]
            deployments[deployment_id] = (spec, stats)
            models.add(spec.public_model)
        by_model, hot = dict(self.by_model), dict(self.hot_by_model)
        for model in models:
            entries = tuple(
                _entry(*deployments[e.deployment_id]) if e.deployment_id in changed else e
                for e in self.by_model[model]
            )
            by_model[model] = entries
            hot[model] = tuple(e.hot() for e in entries)
        out: RoutingSnapshot = object.__new__(RoutingSnapshot)
        object.__setattr__(out, "deployments", MappingProxyType(deployments))
        object.__setattr__(out, "by_model", MappingProxyType(by_model))
        object.__setattr__(out, "hot_by_model", MappingProxyType(hot))
        return out


class Objective(StrEnum):
    LATENCY = "latency"
    COST = "cost"
    BALANCED = "balanced"

    @property
    def weights(self) -> tuple[float, float]:
        """(latency weight, cost weight); ties on the weighted term fall to latency, then cost, then id."""
        return _WEIGHTS[self]


_WEIGHTS = {Objective.LATENCY: (1.0, 0.0), Objective.COST: (0.0, 1.0), Objective.BALANCED: (0.5, 0.5)}


class SortBy(StrEnum):
    """OpenRouter's `provider.sort`; it replaces the team's objective for ranking only."""

    PRICE = "price"
    LATENCY = "latency"

    @property
    def objective(self) -> Objective:
        return Objective.COST if self is SortBy.PRICE else Objective.LATENCY


@dataclass(frozen=True, slots=True)
class MaxPrice:
    """Caps from a request (OpenRouter's `provider.max_price`); None means no cap."""

    prompt_usd_per_mtok: Decimal | None = None
    completion_usd_per_mtok: Decimal | None = None
    request_usd: Decimal | None = None


@dataclass(frozen=True, slots=True)
class RoutePreferences:
    """What one request asks for, in the spirit of OpenRouter's `provider` object. It can only narrow."""

    order: tuple[str, ...] = ()  # deployment ids or backend names tried first, in this order
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    sort: SortBy | None = None
    require_parameters: bool | None = None
    allow_fallbacks: bool | None = None
    max_price: MaxPrice = MaxPrice()
    max_latency_ms: float | None = None
    max_ttft_ms: float | None = None  # the first token's deadline (`RoutePolicy.max_ttft_ms`)


NO_PREFERENCES = RoutePreferences()


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """A team's routing rules; `routing.preferences.narrow` folds a request's preferences into a copy."""

    objective: Objective = Objective.BALANCED
    max_latency_ms: float | None = None
    max_usd_per_request: Decimal | None = None
    max_input_usd_per_mtok: Decimal | None = None
    max_output_usd_per_mtok: Decimal | None = None
    required_labels: Mapping[str, frozenset[str]] = field(
        default_factory=_no_labels
    )  # key -> allowed values; must carry the key
    preferred_labels: Mapping[str, str] = field(
        default_factory=_no_labels
    )  # soft: each mismatch adds to the score
    preferred_label_weight: float = 0.25
    min_quality_tier: int = 0
    require_parameters: bool = True  # False: a deployment without JSON mode may serve `response_format`
    allow_fallbacks: bool = True
    max_attempts: int = 3
    only: frozenset[str] | None = None  # deployment ids or backend names; None: all
    ignore: frozenset[str] = frozenset()
    order: tuple[str, ...] = ()
    # Latency targets (config: teams.X / models.X slo_p95_*): deployments predicted to meet them win, the
    # cheapest first; owned capacity overflows to the cloud only when it would break them. None: no target.
    slo_p95_ttft_ms: float | None = None
    slo_p95_e2e_ms: float | None = None
    # The first token's hard deadline (teams.X / models.X max_ttft_ms): deployments predicted past it are
    # not eligible, so a request that may not leave gets a 503 rather than queueing beyond it. None: queues.
    max_ttft_ms: float | None = None
    affinity_max_waiting: int = 2  # prefix affinity skips a replica with more requests waiting for a slot

    @property
    def first_token_deadline_ms(self) -> float | None:
        """When a request's first token is due, what a self-hosted engine orders its queue by: the TTFT
        target, else the end-to-end one (the first token is due by then too); None without a target."""
        return self.slo_p95_ttft_ms or self.slo_p95_e2e_ms


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing needs to know of one chat request. Token counts are estimates made by the gateway."""

    public_model: str
    prompt_tokens: int
    expected_output_tokens: int
    privacy_floor: PrivacyTier
    needs_tools: bool = False
    needs_json: bool = False
    preferences: RoutePreferences = NO_PREFERENCES
    privacy_reason: str = (
        ""  # how the floor was set (routing.privacy.PrivacyVerdict.reason); echoed in the verdict
    )
    prefix_key: int | None = None  # 64-bit hash of a long shared prompt prefix: prefix affinity; None: none
    # Of `prompt_tokens`, those `prefix_holder` (a deployment id: where the caller sent this conversation's
    # previous turn) is expected to hold in its prefix cache: routing counts only the rest as prefill there.
    prefix_tokens: int = 0
    prefix_holder: str | None = None
