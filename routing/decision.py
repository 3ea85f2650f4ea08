"""Deployments and route decisions: which backends may serve a public model name, in which order.

Pure functions over frozen values; no I/O, no clock. `choose` here is the [core] rule (config order); the
scored choice lives in `routing.scoring` and returns the same `RouteDecision`, with its explanation filled in:
`ranked` (every eligible deployment with its score terms) and `rejected` (every other one, with its reasons).
Invariant: `candidates` is always the try order dispatch uses, a prefix of `ranked` when `ranked` is filled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import NamedTuple

from backends.base import BackendKind


@dataclass(frozen=True, slots=True)
class Price:
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal

    def cost_micro_usd(self, prompt_tokens: int, completion_tokens: int) -> int:
        """USD per million tokens equals micro-USD per token; rounded half-up to whole micro-dollars."""
        exact = prompt_tokens * self.input_usd_per_mtok + completion_tokens * self.output_usd_per_mtok
        return int(exact.to_integral_value(rounding="ROUND_HALF_UP"))


FREE = Price(Decimal(0), Decimal(0))


@dataclass(frozen=True, slots=True)
class Deployment:
    """One way to serve a public model: a backend plus the name the upstream knows it by."""

    public_model: str
    backend: str
    backend_kind: BackendKind
    upstream_model: str
    price: Price
    supports_tools: bool = True
    supports_response_format: bool = True
    context_tokens: int | None = None
    usd_per_hour: Decimal | None = None  # owned capacity's fixed cost (its `price` is the marginal one: 0)


class RejectCode(StrEnum):
    """Why a deployment was not eligible; a closed set so metrics can count them."""

    PRIVACY = "privacy"
    CONTEXT = "context"
    TOOLS = "tools"
    JSON = "json"
    QUALITY = "quality"
    UNHEALTHY = "unhealthy"
    CIRCUIT_OPEN = "circuit_open"
    LABEL = "label"
    NOT_IN_ONLY = "not_in_only"
    IGNORED = "ignored"
    PRICE = "price"
    LATENCY = "latency"
    TTFT = "ttft"  # predicted past the first token's deadline (`RoutePolicy.max_ttft_ms`)
    COST = "cost"


class ScoredCandidate(NamedTuple):
    """One eligible deployment and the terms it was ranked by; the fields lead with the sort keys.

    A NamedTuple, not a frozen dataclass, on purpose: one is built per eligible deployment per request, and
    `tuple.__new__` builds one in ~120 ns against ~760 ns for a frozen dataclass (measured here): at 100
    deployments that difference alone is most of the 100 µs budget.
    """

    order_position: int  # index in the requested `order`; len(order) when not listed, so listed ones go first
    score: float  # lower is better: weighted latency/max + cost/max over the eligible set, + label penalty
    latency_ms: float  # predicted: queue wait + TTFT + expected output / decode rate
    cost_pusd: int  # predicted, in pico-USD (1e-12 USD): exact integers, and fast in the loop
    deployment_id: str  # unique, so ties never reach `deployment`
    deployment: Deployment
    ttft_ms: float = 0.0  # predicted time to first token
    slo_met: bool = True  # predicted TTFT and latency within the policy's SLO (True when it sets none)
    affinity: int = 0  # prefix affinity: rank in rendezvous order among tied owned replicas; 0: none

    @property
    def cost_usd(self) -> Decimal:
        return Decimal(self.cost_pusd).scaleb(-12)


class Rejection(NamedTuple):
    """One deployment of the model that may not serve this request, with every reason (not just the first).

    A NamedTuple for the same reason as `ScoredCandidate`: built in the per-deployment loop.
    """

    deployment_id: str
    backend: str
    codes: tuple[RejectCode, ...]
    reasons: tuple[str, ...]  # human text, same order as `codes`, e.g. "tier external < floor internal"


@dataclass(frozen=True, slots=True)
class RouteDecision:
    public_model: str
    candidates: tuple[Deployment, ...]  # in the order dispatch tries them; empty means fail closed
    reason: str
    ranked: tuple[ScoredCandidate, ...] = ()  # every eligible deployment, best first (scored choice only)
    rejected: tuple[Rejection, ...] = ()
    privacy_verdict: str = ""


def choose(public_model: str, deployments: Mapping[str, Sequence[Deployment]]) -> RouteDecision:
    """Candidates for `public_model`, best first. The caller has already checked that the model exists."""
    candidates = tuple(deployments[public_model])
    reason = "single deployment" if len(candidates) == 1 else f"{len(candidates)} deployments, config order"
    return RouteDecision(public_model=public_model, candidates=candidates, reason=reason)
