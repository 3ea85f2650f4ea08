"""SLO-aware placement and prefix affinity: two reorderings `routing.scoring.choose` applies to its ranking.

`by_slo`: with an SLO in the policy (`slo_p95_ttft_ms`, `slo_p95_e2e_ms`), deployments predicted to meet it
come first, the cheapest first (owned capacity costs 0 at the margin, so it wins while it has room), then
those predicted to miss it, the closest to meeting it first: a request that may not leave queues on owned
capacity rather than overflow. `by_affinity`: with a prefix key, the owned replicas that tie for first place
(same requested-order position, SLO met, same marginal cost) are reordered by rendezvous hashing of the key,
skipping a replica with more than `affinity_max_waiting` requests waiting for a slot (its spill goes to the
next in rendezvous order). Pure and deterministic: every gateway replica places a prefix on the same engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from routing.decision import ScoredCandidate
from routing.fleet import hrw_weight
from routing.snapshot import Entry, RoutePolicy


class Affinity(NamedTuple):
    """What prefix affinity did: the preferred replica (first in rendezvous order) and the one chosen."""

    preferred: str  # deployment id
    chosen: str
    replicas: int  # owned replicas that tied and met the SLO
    spilled: tuple[str, ...]  # skipped as overloaded, in rendezvous order

    def text(self) -> str:
        rank = f"HRW {1 + len(self.spilled)} of {self.replicas}"
        spill = f"; spilled past {', '.join(self.spilled)} (queue)" if self.spilled else ""
        return f"prefix affinity {self.chosen} ({rank}{spill})"


def overshoot(c: ScoredCandidate, policy: RoutePolicy) -> float:
    """Predicted / target for the tighter of the SLO's terms: <= 1 meets it."""
    ratio = 0.0
    if policy.slo_p95_ttft_ms is not None:
        ratio = c.ttft_ms / policy.slo_p95_ttft_ms if policy.slo_p95_ttft_ms > 0 else float("inf")
    if policy.slo_p95_e2e_ms is not None:
        e2e = c.latency_ms / policy.slo_p95_e2e_ms if policy.slo_p95_e2e_ms > 0 else float("inf")
        ratio = max(ratio, e2e)
    return ratio


def has_slo(policy: RoutePolicy) -> bool:
    return policy.slo_p95_ttft_ms is not None or policy.slo_p95_e2e_ms is not None


def by_slo(ranked: list[ScoredCandidate], policy: RoutePolicy) -> list[ScoredCandidate]:
    """Meeting the SLO first, cheapest first (ties keep the objective's order); then misses, closest first."""
    keyed = []
    for c in ranked:
        over = overshoot(c, policy)
        met = over <= 1.0
        key = (c.order_position, 0, c.cost_pusd, 0.0) if met else (c.order_position, 1, 0, over)
        keyed.append((key, c if met else c._replace(slo_met=False)))
    keyed.sort(key=_first)  # stable: equal keys keep the objective's order
    return [c for _, c in keyed]


def _first(pair: tuple[tuple[int, int, int, float], ScoredCandidate]) -> tuple[int, int, int, float]:
    return pair[0]


def by_affinity(
    ranked: list[ScoredCandidate], entries: Mapping[str, Entry], policy: RoutePolicy, prefix_key: int
) -> tuple[list[ScoredCandidate], Affinity | None]:
    """The owned replicas tying with the best-ranked owned one, placed in their slots in rendezvous order."""
    lead = next((c for c in ranked if entries[c.deployment_id].owned and c.slo_met), None)
    if lead is None:
        return ranked, None
    tie = (lead.order_position, lead.cost_pusd)
    slots = [
        i
        for i, c in enumerate(ranked)
        if c.slo_met and entries[c.deployment_id].owned and (c.order_position, c.cost_pusd) == tie
    ]
    if len(slots) < 2:
        return ranked, None
    members = [ranked[i] for i in slots]
    members.sort(key=lambda c: hrw_weight(prefix_key, entries[c.deployment_id].affinity_seed), reverse=True)
    limit = policy.affinity_max_waiting
    ok = [c for c in members if entries[c.deployment_id].waiting <= limit]
    spilled = tuple(c.deployment_id for c in members[: members.index(ok[0])]) if ok else ()
    placed = ok + [c for c in members if entries[c.deployment_id].waiting > limit]
    out = list(ranked)
    for i, c in zip(slots, placed, strict=True):
        out[i] = c._replace(affinity=1 + members.index(c))
    if not ok:
        return out, None
    return out, Affinity(members[0].deployment_id, ok[0].deployment_id, len(members), spilled)


def slo_text(policy: RoutePolicy) -> str:
    parts = []
    if policy.slo_p95_ttft_ms is not None:
        parts.append(f"ttft<={policy.slo_p95_ttft_ms:.0f}")
    if policy.slo_p95_e2e_ms is not None:
        parts.append(f"e2e<={policy.slo_p95_e2e_ms:.0f}")
    return f"SLO p95 {' '.join(parts)} ms"


def overflow_text(ranked: Sequence[ScoredCandidate], entries: Mapping[str, Entry]) -> str:
    """When the best is not owned but owned capacity was eligible: why it overflowed."""
    if not ranked or entries[ranked[0].deployment_id].owned:
        return ""
    missed = [c for c in ranked if entries[c.deployment_id].owned and not c.slo_met]
    if not missed:
        return ""
    c = missed[0]
    return f"; overflow: {c.deployment_id} predicted ttft {c.ttft_ms:.0f} ms, {c.latency_ms:.0f} ms"
