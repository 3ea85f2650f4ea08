"""What a routing decision looks like outside the pipeline: the ledger's privacy class and ranked candidates,
the explain endpoint's views, and the prediction headers of an answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from routing.decision import RouteDecision
from routing.privacy import PrivacyVerdict
from routing.snapshot import RoutePolicy

if TYPE_CHECKING:
    from gateway.pipeline.plan import Routed


def privacy_class(verdict: PrivacyVerdict) -> str:
    """What the ledger keeps: the floor and the kinds detected, e.g. `internal:email,phone`."""
    kinds = ",".join(verdict.detections)
    return f"{verdict.floor}:{kinds}" if kinds else str(verdict.floor)


def candidates_json(decision: RouteDecision, *, rejected: bool = False) -> str:
    """The ranked candidates with their score terms, for the ledger and the explain endpoint; with
    `rejected` (a refused request's row), then each rejected deployment with its reasons."""
    view: list[dict[str, object]] = ranked_view(decision)
    if rejected:
        view += [
            {"deployment": r.deployment_id, "backend": r.backend, "rejected": ", ".join(r.reasons)}
            for r in decision.rejected
        ]
    return orjson.dumps(view).decode()


def ranked_view(decision: RouteDecision) -> list[dict[str, object]]:
    """Each candidate's predictions and marginal cost (`cost_usd`: 0 on owned capacity, whose fixed cost is
    `usd_per_hour`), whether it meets the SLO, and its prefix-affinity rank (0: none)."""
    return [
        {
            "deployment": c.deployment_id,
            "backend": c.deployment.backend,
            "ttft_ms": round(c.ttft_ms, 1),
            "latency_ms": round(c.latency_ms, 1),
            "cost_usd": str(c.cost_usd.normalize()),
            "score": round(c.score, 4),
            "slo_met": c.slo_met,
            "usd_per_hour": None if c.deployment.usd_per_hour is None else str(c.deployment.usd_per_hour),
            "affinity": c.affinity,
        }
        for c in decision.ranked
    ]


def slo_view(policy: RoutePolicy) -> dict[str, float | None]:
    return {"p95_ttft_ms": policy.slo_p95_ttft_ms, "p95_e2e_ms": policy.slo_p95_e2e_ms}


def prediction_headers(routed: Routed) -> list[tuple[bytes, bytes]]:
    """The first candidate's predicted TTFT and latency, marginal cost, SLO verdict and affinity."""
    ranked = routed.decision.ranked
    if not ranked:
        return []
    best, policy = ranked[0], routed.policy
    out = [
        (b"x-switchboard-predicted-ttft-ms", b"%.0f" % best.ttft_ms),
        (b"x-switchboard-predicted-latency-ms", b"%.0f" % best.latency_ms),
        (b"x-switchboard-marginal-cost-usd", str(best.cost_usd.normalize()).encode()),
    ]
    terms = [f"ttft<={v:.0f}ms" for v in (policy.slo_p95_ttft_ms,) if v is not None]
    terms += [f"e2e<={v:.0f}ms" for v in (policy.slo_p95_e2e_ms,) if v is not None]
    if terms:
        verdict = "met" if best.slo_met else "missed"
        out.append((b"x-switchboard-slo", f"p95 {' '.join(terms)}; predicted {verdict}".encode()))
    if best.affinity:
        out.append((b"x-switchboard-affinity", f"{best.deployment_id}; hrw rank {best.affinity}".encode()))
    return out
