"""SLO-aware placement and prefix affinity: two reorderings `routing.scoring.choose` applies to its ranking.

`by_slo`: with an SLO in the policy (`slo_p95_ttft_ms`, `slo_p95_e2e_ms`), deployments predicted to meet it
come first, the cheapest first (owned capacity costs 0 at the margin, so it wins while it has room), then
those predicted to miss it, the closest to meeting it first: a request that may not leave queues on owned
capacity rather than overflow. A request that could be served on a less private tier than an owned box's (the
cloud; for an edge node, the engines too) meets the SLO on that box only outside its reserve for the traffic
that needs its tier (`Capacity.reserve_*`): a free unreserved slot, and a predicted TTFT within the reserve's
bound, or, for a prompt that takes the box past that bound, a queue ahead of it within the bound while most
of the tier's boxes would still have room (a must-stay request arriving next finds a short queue on one of
them, and a long prompt does not overflow from an idle fleet). `by_affinity`: with a prefix key, the owned
replicas that tie for first place (same kind as the best-ranked one: engine replicas, or edge nodes; same
requested-order position and marginal cost, SLO met, or all missing it when none meets it) are reordered
by rendezvous hashing of the key, skipping a replica with more than `affinity_max_waiting` requests waiting
for a slot. For a later turn whose previous one went to an owned replica (`RouteRequest.prefix_tokens`,
`prefix_holder`) and where the prediction models prefill (a `capacity.prefill_tokens_per_s`), the rest are
then ordered by predicted TTFT, rendezvous order on ties: the holder's prediction counts only the prompt its
prefix cache lacks (`routing.scoring`), so the conversation stays there unless another replica would still
answer sooner (other requests spill by the waiting limit alone). Pure and deterministic: every gateway
replica places a prefix on the same engine."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import NamedTuple

from routing.decision import ScoredCandidate
from routing.fleet import hrw_weight
from routing.snapshot import Entry, RoutePolicy


class Affinity(NamedTuple):
    """What prefix affinity did: the preferred replica (first in rendezvous order) and the one chosen."""

    preferred: str  # deployment id
    chosen: str
    replicas: int  # owned replicas that tied and met the SLO
    spilled: tuple[str, ...]  # passed over, in rendezvous order
    rank: int = 0  # the chosen one's place in rendezvous order (1: the favourite); 0: 1 + len(spilled)
    why: str = "queue"  # what passed them over: "queue" (waiting for a slot) or "predicted ttft"

    def text(self) -> str:
        rank = f"HRW {self.rank or 1 + len(self.spilled)} of {self.replicas}"
        spill = f"; spilled past {', '.join(self.spilled)} ({self.why})" if self.spilled else ""
        return f"prefix affinity {self.chosen} ({rank}{spill})"


_new = tuple.__new__  # rebuilds a ScoredCandidate ~4x faster than `_replace`
_POSITION, _COST = itemgetter(0), itemgetter(3)  # fields of ScoredCandidate
_SLO_MET, _AFFINITY = 7, 8  # field indices of ScoredCandidate


def overshoot(c: ScoredCandidate, policy: RoutePolicy, tail: float = 1.0) -> float:
    """Predicted / target for the tighter of the SLO's terms: <= 1 meets it. `tail`: the deployment's
    `ttft_tail_factor`, applied to the predicted TTFT."""
    ratio = 0.0
    if policy.slo_p95_ttft_ms is not None:
        ttft = c.ttft_ms * tail
        ratio = ttft / policy.slo_p95_ttft_ms if policy.slo_p95_ttft_ms > 0 else math.inf
    if policy.slo_p95_e2e_ms is not None:
        e2e = c.latency_ms / policy.slo_p95_e2e_ms if policy.slo_p95_e2e_ms > 0 else math.inf
        ratio = max(ratio, e2e)
    return ratio


def has_slo(policy: RoutePolicy) -> bool:
    return policy.slo_p95_ttft_ms is not None or policy.slo_p95_e2e_ms is not None


def by_slo(
    ranked: list[ScoredCandidate],
    policy: RoutePolicy,
    owned: Mapping[str, Entry],
    loosest_rank: int,
    tails: Mapping[str, float] | None = None,
) -> list[ScoredCandidate]:
    """Meeting the SLO first, cheapest first (ties keep the objective's order); then misses, closest first;
    the requested `order` stays outermost. Stable single-key sorts, least significant first. `owned`: id ->
    entry of the owned eligible deployments, whose reserves bind for a request that could be served on a
    less private tier (`loosest_rank`: the largest privacy rank among the eligible; the cloud's, or for an
    edge node's reserve also the engines'), so each private tier is kept for the traffic that needs it.
    `tails`: id -> `ttft_tail_factor` where above 1: the SLO is a p95, so a deployment whose measured
    TTFTs run later than predicted (a queue the load figures do not show, an evicted prefix) is judged by
    its predicted TTFT x that factor, here and against the reserve's bound. A request whose predicted TTFT
    passes the bound (its own prompt, mostly) may still take a box whose queue ahead of it is within the
    bound while, without that box, most of its tier's boxes keep room (`_tiers_to_spare`)."""
    max_ttft = math.inf if policy.slo_p95_ttft_ms is None else policy.slo_p95_ttft_ms
    max_e2e = math.inf if policy.slo_p95_e2e_ms is None else policy.slo_p95_e2e_ms
    get = owned.get
    tail_of = (tails or {}).get
    met: list[ScoredCandidate] = []
    missed: list[tuple[float, ScoredCandidate]] = []
    spare: set[int] | None = None  # built on first need: most boxes keep room without one (privacy ranks)
    for c in ranked:
        tail = tail_of(c.deployment_id, 1.0)
        ttft = c.ttft_ms * tail
        e = get(c.deployment_id)
        # Where nothing eligible is less private than the box, its reserve is for requests like this one.
        reserved = False
        if e is not None and e.privacy_rank < loosest_rank:
            reserved = not e.unreserved
            if not reserved and ttft > e.reserve_ttft_ms:  # past the bound: only a box the tier can spare
                if spare is None:
                    spare = _tiers_to_spare(owned, loosest_rank, tail_of)
                reserved = e.privacy_rank not in spare or not _has_room(e, tail)
        if ttft <= max_ttft and c.latency_ms <= max_e2e and not reserved:
            met.append(c)
        else:
            flagged = _new(ScoredCandidate, (*c[:_SLO_MET], False, c[_AFFINITY]))
            missed.append((overshoot(c, policy, tail), flagged))
    met.sort(key=_COST)
    missed.sort(key=_first)
    out = met + [c for _, c in missed]
    if ranked and ranked[-1].order_position:  # some request `order` applies: it stays outermost
        out.sort(key=_POSITION)
    return out


def _has_room(e: Entry, tail: float) -> bool:
    """Whether a must-stay request arriving now finds room on the box: a free slot outside the reserve
    and the queue ahead of its own prompt (x the box's measured lateness) within the reserve's bound."""
    return e.unreserved and e.ttft_base_ms * tail <= e.reserve_ttft_ms


def _tiers_to_spare(
    owned: Mapping[str, Entry], loosest_rank: int, tail_of: Callable[[str, float], float]
) -> set[int]:
    """The privacy ranks (of owned boxes more private than `loosest_rank`) where, with one of the boxes
    that have room taken, more than half of the tier's boxes still have room."""
    boxes: dict[int, int] = {}
    roomy: dict[int, int] = {}
    for e in owned.values():
        if e.privacy_rank < loosest_rank:
            boxes[e.privacy_rank] = boxes.get(e.privacy_rank, 0) + 1
            if _has_room(e, tail_of(e.deployment_id, 1.0)):
                roomy[e.privacy_rank] = roomy.get(e.privacy_rank, 0) + 1
    return {rank for rank, n in roomy.items() if 2 * (n - 1) > boxes[rank]}


def _first(pair: tuple[float, ScoredCandidate]) -> float:
    return pair[0]


def by_affinity(
    ranked: list[ScoredCandidate],
    owned: Mapping[str, Entry],
    policy: RoutePolicy,
    prefix_key: int,
    cached_tokens: int = 0,
) -> tuple[list[ScoredCandidate], Affinity | None]:
    """The owned replicas (`owned`: id -> entry of the owned eligible ones) tying with the best-ranked owned
    one, placed in their slots in rendezvous order. When no owned replica meets the SLO (a request that
    queues on owned capacity), those missing it tie instead: a cached prefix is then worth the most. With
    `cached_tokens` (the holder's predicted TTFT already counts only the rest of the prompt) and a prefill
    rate, those within the waiting limit go by predicted TTFT. Without them the prediction cannot see the
    cache, so only the waiting limit spills (a conversation's first turn stays on its favourite)."""
    lead = next((c for c in ranked if c.slo_met and c.deployment_id in owned), None)
    met = lead is not None
    if lead is None:
        lead = next((c for c in ranked if c.deployment_id in owned), None)
        if lead is None:
            return ranked, None
    position, cost = lead.order_position, lead.cost_pusd
    kind = owned[lead.deployment_id].spec.backend_kind  # replicas: an edge node is no engine replica's peer
    slots: list[int] = []
    members: list[tuple[int, int, ScoredCandidate]] = []  # (HRW weight, waiting, candidate)
    get = owned.get
    for i, c in enumerate(ranked):
        if c.slo_met == met and c.cost_pusd == cost and c.order_position == position:
            e = get(c.deployment_id)
            if e is not None and e.spec.backend_kind == kind:
                slots.append(i)
                members.append((hrw_weight(prefix_key, e.affinity_seed), e.waiting, c))
    if len(slots) < 2:
        return ranked, None
    members.sort(key=_first_int, reverse=True)
    limit = policy.affinity_max_waiting
    ok = [(rank, c) for rank, (_, waiting, c) in enumerate(members, 1) if waiting <= limit]
    over = [(rank, c) for rank, (_, waiting, c) in enumerate(members, 1) if waiting > limit]
    by_ttft = cached_tokens > 0 and bool(ok) and owned[ok[0][1].deployment_id].ms_per_prompt_token > 0
    if by_ttft:
        ok.sort(key=_predicted_ttft)  # stable: rendezvous order on ties
    out = list(ranked)
    for i, (rank, c) in zip(slots, ok + over, strict=True):
        out[i] = _new(ScoredCandidate, (*c[:_AFFINITY], rank))
    if not ok:
        return out, None
    chosen_rank, chosen = ok[0]
    spilled = tuple(m[2].deployment_id for m in members[: chosen_rank - 1])
    why = "predicted ttft" if by_ttft and any(r < chosen_rank for r, _ in ok) else "queue"
    affinity = Affinity(
        members[0][2].deployment_id, chosen.deployment_id, len(members), spilled, chosen_rank, why
    )
    return out, affinity


def _predicted_ttft(row: tuple[int, ScoredCandidate]) -> float:
    return row[1].ttft_ms


def _first_int(row: tuple[int, int, ScoredCandidate]) -> int:
    return row[0]


def slo_text(policy: RoutePolicy) -> str:
    parts = []
    if policy.slo_p95_ttft_ms is not None:
        parts.append(f"ttft<={policy.slo_p95_ttft_ms:.0f}")
    if policy.slo_p95_e2e_ms is not None:
        parts.append(f"e2e<={policy.slo_p95_e2e_ms:.0f}")
    return f"SLO p95 {' '.join(parts)} ms"


def overflow_text(ranked: Sequence[ScoredCandidate], owned: Mapping[str, Entry], policy: RoutePolicy) -> str:
    """When the best is not owned but owned capacity was eligible: why it overflowed."""
    if not ranked or ranked[0].deployment_id in owned:
        return ""
    missed = [c for c in ranked if not c.slo_met and c.deployment_id in owned]
    if not missed:
        return ""
    c = missed[0]
    tail = owned[c.deployment_id].ttft_tail_factor
    late = f" (x{tail:.1f} measured lateness)" if tail > 1.0 else ""
    text = f"; overflow: {c.deployment_id} predicted ttft {c.ttft_ms:.0f} ms{late}, {c.latency_ms:.0f} ms"
    return text if overshoot(c, policy, tail) > 1 else f"{text} (reserve kept for must-stay traffic)"
