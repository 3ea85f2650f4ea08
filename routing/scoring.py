"""Scored route choice: the deployment that meets the privacy floor and the team's goals at the best score.

`choose` filters every deployment of the public model (hard rules, each failure a reason), predicts latency
and cost for the rest, normalises both over the eligible set and weighs them by the objective. Owned
capacity costs 0 at the margin. With an SLO or a prefix key, `routing.placement` then reorders: the cheapest
deployment predicted to meet the SLO first (overflow to the cloud only when owned capacity would break it),
and among tying owned replicas the prefix's rendezvous-hashing favourite, or, for a later turn, the one
predicted to give the first token soonest (the replica that served the previous turn, `prefix_holder`,
counts only the prompt its prefix cache lacks).
Invariants: pure (no I/O, clock or randomness; time arrives as `now_s`); eligible + rejected is exactly the
model's deployments; nothing below the request's privacy floor is ever eligible; nothing eligible means no
candidates (fail closed) and a reason that names the floor and every rejection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from operator import itemgetter

from routing.decision import RejectCode, Rejection, RouteDecision, ScoredCandidate
from routing.placement import Affinity, by_affinity, by_slo, has_slo, overflow_text, slo_text
from routing.preferences import narrow
from routing.snapshot import (
    LACKS_JSON,
    LACKS_TOOLS,
    PUSD_PER_USD,
    Entry,
    HotRow,
    Objective,
    RoutePolicy,
    RouteRequest,
    RoutingSnapshot,
)

_HEADLINE = {
    Objective.COST: "cheapest eligible",
    Objective.LATENCY: "fastest eligible",
    Objective.BALANCED: "best cost/latency balance",
}
Row = tuple[float, int, Entry, float]  # predicted (latency ms, cost pico-USD), entry, predicted TTFT ms
_POSITION, _SCORE, _LATENCY, _COST = (itemgetter(i) for i in range(4))  # fields of ScoredCandidate
_new = tuple.__new__  # builds a NamedTuple ~4x faster than calling the class (no Python-level __new__)


def _cap(usd: Decimal | None, per_tokens: int = 1) -> float:
    return math.inf if usd is None else float(usd * PUSD_PER_USD / per_tokens)


class _Context:
    """One decision's rules in the loop's units (inf where there is no cap). Internal; never leaves here."""

    __slots__ = (
        "policy", "request", "floor_rank", "needed_tokens", "needs", "max_latency_ms", "max_pusd",
        "max_in_pusd", "max_out_pusd", "request_only", "narrowed",
    )  # fmt: skip

    def __init__(self, policy: RoutePolicy, request: RouteRequest) -> None:
        self.policy, self.request = policy, request
        self.floor_rank = request.privacy_floor.rank
        self.needed_tokens = request.prompt_tokens + request.expected_output_tokens
        json_needed = request.needs_json and policy.require_parameters
        self.needs = (LACKS_TOOLS if request.needs_tools else 0) | (LACKS_JSON if json_needed else 0)
        self.max_latency_ms = math.inf if policy.max_latency_ms is None else policy.max_latency_ms
        self.max_pusd = _cap(policy.max_usd_per_request)
        self.max_in_pusd = _cap(policy.max_input_usd_per_mtok, 1_000_000)
        self.max_out_pusd = _cap(policy.max_output_usd_per_mtok, 1_000_000)
        self.request_only = request.preferences.only
        optional = (
            policy.only,
            self.request_only,
            policy.max_input_usd_per_mtok,
            policy.max_output_usd_per_mtok,
        )
        # When any rarer rule is in force, `_narrowed_out` must screen every entry (an empty `only` too).
        self.narrowed = bool(policy.required_labels or policy.ignore) or any(r is not None for r in optional)


def _spec_reasons(e: Entry, ctx: _Context, codes: list[RejectCode], texts: list[str]) -> None:
    """Rules on what the deployment is, independent of load. The authority; `_scan` only pre-screens."""
    spec, policy = e.spec, ctx.policy
    if e.privacy_rank > ctx.floor_rank:
        codes.append(RejectCode.PRIVACY)
        texts.append(f"tier {spec.privacy_tier} < floor {ctx.request.privacy_floor}")
    if e.context_tokens < ctx.needed_tokens:
        codes.append(RejectCode.CONTEXT)
        texts.append(f"context {e.context_tokens} < {ctx.needed_tokens} tokens needed")
    if e.lacks & ctx.needs & LACKS_TOOLS:
        codes.append(RejectCode.TOOLS)
        texts.append("no tool support")
    if e.lacks & ctx.needs & LACKS_JSON:
        codes.append(RejectCode.JSON)
        texts.append("no JSON mode")
    if e.quality_tier < policy.min_quality_tier:
        codes.append(RejectCode.QUALITY)
        texts.append(f"quality {e.quality_tier} < min {policy.min_quality_tier}")
    for key, allowed in policy.required_labels.items():
        if (value := spec.labels.get(key)) not in allowed:
            codes.append(RejectCode.LABEL)
            texts.append(f"label {key}={value or '(none)'} not in {', '.join(sorted(allowed))}")
    for only, whose in ((policy.only, "team"), (ctx.request_only, "request")):
        if only is not None and e.names.isdisjoint(only):
            codes.append(RejectCode.NOT_IN_ONLY)
            texts.append(f"not in {whose} `only`")
    if not e.names.isdisjoint(policy.ignore):
        codes.append(RejectCode.IGNORED)
        texts.append("in `ignore`")


def _load_reasons(
    e: Entry, ctx: _Context, predicted: tuple[float, int, float], codes: list[RejectCode], texts: list[str]
) -> None:
    """Rules on the deployment's state, its current price and the `predicted` (latency ms, cost, now_s)."""
    latency_ms, cost_pusd, now_s = predicted
    if not e.healthy:
        codes.append(RejectCode.UNHEALTHY)
        texts.append("unhealthy")
    if now_s < e.circuit_open_until_s:
        codes.append(RejectCode.CIRCUIT_OPEN)
        texts.append("circuit open")
    price = e.deployment.price
    if e.input_pusd_per_token > ctx.max_in_pusd:
        codes.append(RejectCode.PRICE)
        texts.append(f"input {price.input_usd_per_mtok} USD/Mtok > max")
    if e.output_pusd_per_token > ctx.max_out_pusd:
        codes.append(RejectCode.PRICE)
        texts.append(f"output {price.output_usd_per_mtok} USD/Mtok > max")
    if latency_ms > ctx.max_latency_ms:
        codes.append(RejectCode.LATENCY)
        texts.append(f"predicted {latency_ms:.0f} ms > max {ctx.max_latency_ms:.0f} ms")
    if cost_pusd > ctx.max_pusd:
        codes.append(RejectCode.COST)
        texts.append(
            f"predicted {cost_pusd / PUSD_PER_USD:.6f} USD > max {ctx.max_pusd / PUSD_PER_USD:.6f} USD"
        )


def _narrowed_out(e: Entry, ctx: _Context) -> bool:
    """The screen for the rarer rules: price caps, labels, `only`, `ignore`."""
    if e.input_pusd_per_token > ctx.max_in_pusd or e.output_pusd_per_token > ctx.max_out_pusd:
        return True
    policy = ctx.policy
    if policy.required_labels:
        labels = e.spec.labels
        if any(labels.get(key) not in allowed for key, allowed in policy.required_labels.items()):
            return True
    names = e.names
    return (
        (policy.only is not None and names.isdisjoint(policy.only))
        or (ctx.request_only is not None and names.isdisjoint(ctx.request_only))
        or not names.isdisjoint(policy.ignore)
    )


def _scan(hot: tuple[HotRow, ...], ctx: _Context, now_s: float) -> tuple[list[Row], list[Rejection]]:
    """Predict and filter. The screen repeats the reason functions' tests without building text, because
    this loop runs per deployment per request; an entry it flags is judged by the reason functions."""
    rows: list[Row] = []
    rejected: list[Rejection] = []
    out_tokens, prompt_tokens = ctx.request.expected_output_tokens, ctx.request.prompt_tokens
    floor_rank, needed, needs, narrowed = ctx.floor_rank, ctx.needed_tokens, ctx.needs, ctx.narrowed
    min_quality, max_latency_ms, max_pusd = ctx.policy.min_quality_tier, ctx.max_latency_ms, ctx.max_pusd
    for e, privacy_rank, ctx_tokens, lacks, quality, blocked_s, base_ms, ms_per_tok, in_pusd, out_pusd, \
            ttft_ms, ttft_per_tok, ms_per_prompt, ms_per_prompt_sq in hot:  # fmt: skip
        prefill_ms = prompt_tokens * (ms_per_prompt + prompt_tokens * ms_per_prompt_sq)
        latency_ms = base_ms + out_tokens * ms_per_tok + prefill_ms
        cost_pusd = prompt_tokens * in_pusd + out_tokens * out_pusd
        below = privacy_rank > floor_rank
        flagged = (
            ctx_tokens < needed
            or lacks & needs
            or quality < min_quality
            or now_s < blocked_s
            or latency_ms > max_latency_ms
            or cost_pusd > max_pusd
            or (narrowed and _narrowed_out(e, ctx))
        )
        if below and not flagged:
            rejection = e.below_floor[floor_rank]  # privacy alone: the snapshot built this one already
            if rejection is not None:
                rejected.append(rejection)
                continue
        if below or flagged:
            codes: list[RejectCode] = []
            texts: list[str] = []
            _spec_reasons(e, ctx, codes, texts)
            _load_reasons(e, ctx, (latency_ms, cost_pusd, now_s), codes, texts)
            if codes:
                rejected.append(
                    _new(Rejection, (e.deployment_id, e.spec.backend, tuple(codes), tuple(texts)))
                )
                continue
        rows.append((latency_ms, cost_pusd, e, ttft_ms + out_tokens * ttft_per_tok + prefill_ms))
    return rows, rejected


def _positions(order: tuple[str, ...]) -> dict[str, int]:
    """Name -> index of its first appearance in `order`."""
    positions: dict[str, int] = {}
    for i, name in enumerate(order):
        positions.setdefault(name, i)
    return positions


def _label_misses(labels: Mapping[str, str], preferred: Mapping[str, str]) -> int:
    misses = 0
    for key, value in preferred.items():
        if labels.get(key) != value:
            misses += 1
    return misses


def _rank(rows: list[Row], policy: RoutePolicy) -> list[ScoredCandidate]:
    """Score = w_latency * latency/max + w_cost * cost/max over the eligible set, + label penalty.

    Sorted by (order position, score), ties to the other term (cost under `latency`, else latency), then id.
    """
    if not rows:
        return []
    w_latency, w_cost = policy.objective.weights
    w_latency /= max([row[0] for row in rows]) or 1.0
    w_cost /= max([row[1] for row in rows]) or 1
    if policy.order or policy.preferred_labels:
        ranked = _rank_preferred(rows, policy, w_latency, w_cost)
    else:
        ranked = [
            _new(
                ScoredCandidate,
                (0, w_latency * lat + w_cost * cost, lat, cost, e.deployment_id, e.deployment, ttft, True, 0),
            )
            for lat, cost, e, ttft in rows
        ]
    # Stable sorts on single keys, least significant first: ~4x faster than comparing whole tuples.
    ranked.sort(key=_COST if policy.objective is Objective.LATENCY else _LATENCY)  # rows came in id order
    ranked.sort(key=_SCORE)
    if policy.order:
        ranked.sort(key=_POSITION)
    return ranked


def _rank_preferred(
    rows: list[Row], policy: RoutePolicy, w_latency: float, w_cost: float
) -> list[ScoredCandidate]:
    """`_rank`'s candidates when `order` or preferred labels apply."""
    preferred = policy.preferred_labels
    per_miss = policy.preferred_label_weight / len(preferred) if preferred else 0.0
    positions, unlisted = _positions(policy.order), len(policy.order)
    ranked = []
    for latency_ms, cost_pusd, e, ttft_ms in rows:
        score = w_latency * latency_ms + w_cost * cost_pusd
        if preferred:
            score += per_miss * _label_misses(e.spec.labels, preferred)
        position = min(positions.get(e.deployment_id, unlisted), positions.get(e.spec.backend, unlisted))
        row = (position, score, latency_ms, cost_pusd, e.deployment_id, e.deployment, ttft_ms, True, 0)
        ranked.append(_new(ScoredCandidate, row))
    return ranked


def _privacy_verdict(request: RouteRequest, total: int, rejected: list[Rejection]) -> str:
    below = [r.deployment_id for r in rejected if r.codes[0] is RejectCode.PRIVACY]  # checked first
    verdict = f"floor {request.privacy_floor}: {total - len(below)} of {total} deployments private enough"
    if below:
        verdict = f"{verdict}; below floor: {', '.join(below)}"
    return f"{request.privacy_reason} -> {verdict}" if request.privacy_reason else verdict


def _reason(
    request: RouteRequest,
    policy: RoutePolicy,
    ranked: tuple[ScoredCandidate, ...],
    rejected: list[Rejection],
    placed: tuple[Mapping[str, Entry], Affinity | None] | None = None,
) -> str:
    if not ranked:
        if not rejected:
            return f"no deployment serves `{request.public_model}`"
        why = "; ".join(f"{r.deployment_id}: {', '.join(r.reasons)}" for r in rejected)
        model, floor = request.public_model, request.privacy_floor
        return f"no eligible deployment for `{model}` (privacy floor {floor}): {why}"
    best = ranked[0]
    ordered = best.deployment_id in policy.order or best.deployment.backend in policy.order
    tally = f"{len(ranked)} eligible, {len(rejected)} rejected"
    if placed is None:
        headline = "first in requested order" if ordered else _HEADLINE[policy.objective]
        return (
            f"{headline}: {best.deployment_id} ({best.cost_usd:.4f} USD, {best.latency_ms:.0f} ms); {tally}"
        )
    entries, affinity = placed
    if ordered:
        headline = "first in requested order"
    elif not has_slo(policy):
        headline = _HEADLINE[policy.objective]
    else:
        headline = "cheapest meeting SLO" if best.slo_met else "none meets SLO, closest"
    terms = f"{best.cost_usd:.4f} USD, ttft {best.ttft_ms:.0f} ms, {best.latency_ms:.0f} ms"
    slo = f"; {slo_text(policy)}" if has_slo(policy) else ""
    extra = overflow_text(ranked, entries, policy) + (f"; {affinity.text()}" if affinity is not None else "")
    return f"{headline}: {best.deployment_id} ({terms}){slo}{extra}; {tally}"


def _discount_cached_prefix(rows: list[Row], holder: str, cached: int, prompt_tokens: int) -> list[Row]:
    """The owned deployment `holder` holds `cached` of the prompt tokens in its prefix cache (the engine
    recomputes at least the last one): its predicted TTFT and latency count only the rest at its prefill
    rate (the rest still attends to the `kept` tokens: c x n + q x n^2 becomes c x (n - kept) + q x (n^2 -
    kept^2), c and q the entry's per-token and per-token-squared terms), and when the rest is short enough
    for its engine to compute it ahead of the prompts pending there, only the part of those it still waits
    for (`Entry.short_saving_ms`). Others, and a holder that is not eligible, owned or without a prefill
    rate, are unchanged."""
    best = next((i for i, row in enumerate(rows) if row[2].deployment_id == holder and row[2].owned), -1)
    if best < 0:
        return rows
    latency_ms, cost_pusd, e, ttft_ms = rows[best]
    kept = min(cached, prompt_tokens - 1)
    saved_ms = kept * (e.ms_per_prompt_token + kept * e.ms_per_prompt_token_sq)
    if saved_ms > 0 and prompt_tokens - kept <= e.short_prompt_tokens:
        saved_ms += e.short_saving_ms
    if saved_ms <= 0:
        return rows
    out = list(rows)
    out[best] = (latency_ms - saved_ms, cost_pusd, e, ttft_ms - saved_ms)
    return out


def _within_first_token_deadline(rows: list[Row], max_ttft_ms: float, rejected: list[Rejection]) -> list[Row]:
    """The rows predicted to give the first token within `max_ttft_ms` (after the prefix holder's saving);
    each other one goes to `rejected`."""
    kept = []
    for row in rows:
        if row[3] <= max_ttft_ms:
            kept.append(row)
            continue
        e = row[2]
        why = f"predicted first token {row[3]:.0f} ms > max {max_ttft_ms:.0f} ms"
        rejected.append(_new(Rejection, (e.deployment_id, e.spec.backend, (RejectCode.TTFT,), (why,))))
    return kept


def _place(
    rows: list[Row], ranked: list[ScoredCandidate], policy: RoutePolicy, request: RouteRequest
) -> tuple[list[ScoredCandidate], tuple[Mapping[str, Entry], Affinity | None] | None]:
    """The SLO and prefix-affinity reorderings (routing.placement); None when neither applies."""
    slo, key = has_slo(policy), request.prefix_key
    if not ranked or (not slo and key is None):
        return ranked, None
    entries = {e.deployment_id: e for _, _, e, _ in rows if e.owned}  # the owned eligible ones
    if slo:
        tails = {e.deployment_id: e.ttft_tail_factor for _, _, e, _ in rows if e.ttft_tail_factor > 1.0}
        loosest = max(e.privacy_rank for _, _, e, _ in rows)
        ranked = by_slo(ranked, policy, entries, loosest, tails)
    affinity = None
    if key is not None:
        cached = request.prefix_tokens if request.prefix_holder in entries else 0
        ranked, affinity = by_affinity(ranked, entries, policy, key, cached)
    return ranked, (entries, affinity)


def choose(
    request: RouteRequest, snapshot: RoutingSnapshot, policy: RoutePolicy, *, now_s: float
) -> RouteDecision:
    """Rank the deployments of `request.public_model` that may serve it; explain every one that may not."""
    policy = narrow(policy, request.preferences)
    hot = snapshot.hot_by_model.get(request.public_model, ())
    rows, rejected = _scan(hot, _Context(policy, request), now_s)
    if request.prefix_key is not None and request.prefix_tokens > 0 and request.prefix_holder is not None:
        rows = _discount_cached_prefix(
            rows, request.prefix_holder, request.prefix_tokens, request.prompt_tokens
        )
    if policy.max_ttft_ms is not None:
        rows = _within_first_token_deadline(rows, policy.max_ttft_ms, rejected)
    placed_list, placed = _place(rows, _rank(rows, policy), policy, request)
    ranked = tuple(placed_list)
    attempts = policy.max_attempts if policy.allow_fallbacks else 1
    return RouteDecision(
        public_model=request.public_model,
        candidates=tuple(c.deployment for c in ranked[:attempts]),
        reason=_reason(request, policy, ranked, rejected, placed),
        ranked=ranked,
        rejected=tuple(rejected),
        privacy_verdict=_privacy_verdict(request, len(hot), rejected),
    )
