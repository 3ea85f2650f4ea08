"""Deployments and route decisions: which backends may serve a public model name, in which order.

Pure functions over frozen values; no I/O, no clock. In [core] a public model maps to one deployment, so the
decision is that deployment; scoring across several deployments arrives with [routing].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

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


@dataclass(frozen=True, slots=True)
class RouteDecision:
    public_model: str
    candidates: tuple[Deployment, ...]  # in the order dispatch tries them
    reason: str


def choose(public_model: str, deployments: Mapping[str, Sequence[Deployment]]) -> RouteDecision:
    """Candidates for `public_model`, best first. The caller has already checked that the model exists."""
    candidates = tuple(deployments[public_model])
    reason = "single deployment" if len(candidates) == 1 else f"{len(candidates)} deployments, config order"
    return RouteDecision(public_model=public_model, candidates=candidates, reason=reason)
