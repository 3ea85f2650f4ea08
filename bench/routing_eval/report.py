"""Runs every policy on every fleet size for one workload, and renders the table and the goals.

Fleet sizes are owned capacity at 30%, 60% and 100% of the trace's mean load, where one box's capacity is
the output tok/s it sustains at full batch for requests of the trace's mean shape (prefill included:
`fleet.box_capacity_tok_s`). The trace's rate is set so that its mean load is `load_boxes` boxes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from bench.routing_eval.baselines import baselines
from bench.routing_eval.fleet import EDGE_NODES, Fleet, StepModel, box_capacity_tok_s, make_fleet
from bench.routing_eval.metrics import Metrics, percentile, summarise, violates_slo
from bench.routing_eval.sim import CLOUD, Job, Policy, Simulation
from bench.routing_eval.switchboard import Switchboard
from bench.routing_eval.workload import TEAM_BY_NAME, WORKLOADS, Request, generate, mean_work
from routing.privacy import PrivacyTier

SIZES = (0.3, 0.6, 1.0)


@dataclass(frozen=True, slots=True)
class Run:
    size: float
    boxes: int
    metrics: Metrics
    ttft_error: tuple[float, float] = (math.nan, math.nan)  # switchboard: p50, p95 of actual / predicted
    late: LateKinds | None = None  # switchboard: what its late requests were


@dataclass(frozen=True, slots=True)
class LateKinds:
    """A policy's late requests by what could have saved them. `beyond_reach`: requests that may not leave
    whose prefill alone, on an idle box they may use and with everything any policy could have had cached
    there (the system prompt, and a session's earlier turns where this turn extends them), takes longer than
    their TTFT SLO: no policy that keeps the privacy floors serves them in time. `cold`: requests that may
    not leave and would have made it with that cache, but ran with less (their session's earlier turns went
    elsewhere, or were evicted). `other`: the rest (queueing, a prediction that ran late). `refused`: not
    served at all (`Result.rejected`)."""

    beyond_reach: int
    cold: int
    other: int
    refused: int = 0  # refused at once (503): predicted past their first token's deadline on every box


def idle_ttft_ms(model: StepModel, tokens: int, start: int = 0) -> float:
    """TTFT of `tokens` uncached prompt tokens after `start` cached ones, alone on an idle box: chunked
    prefill, one stream per step."""
    chunks = max(1, -(-tokens // model.max_prefill_tokens))
    return chunks * (model.step_base_ms + model.step_ms_per_stream) + model.prompt_ms(tokens, start)


def late_kinds(jobs: list[Job], fleet: Fleet, refused: int = 0) -> LateKinds:
    fastest = {b.tier: b.model for b in fleet.boxes}  # engine boxes INTERNAL, edge nodes EDGE
    beyond = cold = other = 0
    for job in jobs:
        if not violates_slo(job):
            continue
        req = job.req
        slo = TEAM_BY_NAME[req.team].slo_p95_ttft_ms
        if req.floor.rank > PrivacyTier.INTERNAL.rank or slo is None:
            other += 1
            continue
        usable = [m for tier, m in fastest.items() if req.floor.allows(tier)]
        best = min(usable, key=lambda m: m.prefill_ms_per_token)
        reachable = req.prefix_tokens + (req.history_tokens if req.follows >= 0 else 0)
        reachable = min(reachable, req.prompt_tokens)
        if idle_ttft_ms(best, req.prompt_tokens - reachable, reachable) > slo:
            beyond += 1
        elif idle_ttft_ms(best, req.prompt_tokens - job.cached_tokens, job.cached_tokens) > slo:
            cold += 1
        else:
            other += 1
    return LateKinds(beyond, cold, other, refused)


def ttft_error(policy: Switchboard, jobs: list[Job]) -> tuple[float, float]:
    """How far routing's predicted TTFT was from the simulated one, on owned boxes (actual / predicted)."""
    ratios = [
        j.ttft_s * 1000 / policy.predicted_ttft_ms[j.req.rid]
        for j in jobs
        if j.target != CLOUD and policy.predicted_ttft_ms.get(j.req.rid, 0) > 0
    ]
    return percentile(ratios, 50), percentile(ratios, 95)


def make_trace(
    workload: str, model: StepModel, *, load_boxes: float, minutes: float, seed: int
) -> list[Request]:
    """The workload at the rate whose mean load is `load_boxes` boxes of `model` (a pilot trace sets it)."""
    w = WORKLOADS[workload]
    pilot = generate(w, rate_per_s=1.0, duration_s=600, seed=seed + 1000)
    prompt, output = mean_work(pilot)
    per_request_box_s = output / box_capacity_tok_s(model, prompt, output)
    return generate(w, rate_per_s=load_boxes / per_request_box_s, duration_s=minutes * 60, seed=seed)


def boxes_for(trace: list[Request], model: StepModel, duration_s: float, share: float) -> int:
    prompt, output = mean_work(trace)
    load = len(trace) * output / duration_s / box_capacity_tok_s(model, prompt, output)
    return max(1, round(share * load))


def evaluate(trace: list[Request], model: StepModel, duration_s: float, seed: int) -> list[Run]:
    runs = []
    for size in SIZES:
        n = boxes_for(trace, model, duration_s, size)
        policies: list[Policy] = [*baselines(), Switchboard()]
        for policy in policies:
            fleet = make_fleet(model, n, f"{size:.0%}")
            result = Simulation(fleet, seed).run(trace, policy)
            if isinstance(policy, Switchboard):
                error = ttft_error(policy, result.jobs)
                late = late_kinds(result.jobs, fleet, len(result.rejected))
            else:
                error, late = (math.nan, math.nan), None
            runs.append(Run(size, n, summarise(result), error, late))
    return runs


def _box_s(model: StepModel, prompt_tokens: float, output_tokens: float) -> float:
    """Seconds of one box at full batch a request of this shape takes (its prompt uncached)."""
    per_token_ms = model.full_batch_ms_per_token(prompt_tokens, output_tokens)
    return (output_tokens * per_token_ms + model.prompt_ms(prompt_tokens)) / 1000


def must_stay_line(trace: list[Request], model: StepModel, duration_s: float, runs: list[Run]) -> str:
    """How much work may not leave owned capacity, against what each fleet size owns: where the mean or
    the busiest minute passes it, no policy that keeps the privacy floors can meet every SLO."""
    stay = [r for r in trace if r.floor.rank <= 1]
    minutes: dict[int, float] = {}
    for r in stay:
        minutes[int(r.arrival_s // 60)] = minutes.get(int(r.arrival_s // 60), 0.0) + _box_s(
            model, r.prompt_tokens, r.output_tokens
        )
    mean = sum(minutes.values()) / duration_s
    peak = max(minutes.values(), default=0.0) / 60
    prompt, output = mean_work(trace)
    edge = model.scaled(2.0, max_batch=4)
    edge_boxes = EDGE_NODES * _box_s(model, prompt, output) / _box_s(edge, prompt, output)
    sizes = sorted({(r.size, r.boxes) for r in runs})
    owned = ", ".join(f"{b} at {s:.0%}" for s, b in sizes)
    return (
        f"Work that may not leave (floor internal or edge: {len(stay)} requests), in boxes busy at full "
        f"batch with prompts uncached: {mean:.1f} on average, {peak:.1f} in the busiest minute; owned boxes: "
        f"{owned}, plus {EDGE_NODES} edge nodes worth {edge_boxes:.1f}."
    )


def _ms(v: float) -> str:
    return f"{v / 1000:.1f} s" if v >= 10_000 else f"{v:.0f}"


def table(runs: list[Run]) -> list[str]:
    head = (
        "| owned | policy | cloud USD | total USD | TTFT p50 / p95 ms | e2e p50 / p95 ms | SLO violations "
        "| meets SLO | privacy violations | owned busy | prefix hit | agent TTFT p50 |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        m = r.metrics
        meets = "yes" if m.meets_slo else f"no ({m.worst_team})"
        refused = f"; {m.rejected} refused" if m.rejected else ""
        lines.append(
            f"| {r.size:.0%} ({r.boxes} boxes) | {m.policy} | {m.cloud_usd:.3f} | {m.total_usd:.3f} | "
            f"{_ms(m.ttft_p50_ms)} / {_ms(m.ttft_p95_ms)} | {_ms(m.e2e_p50_ms)} / {_ms(m.e2e_p95_ms)} | "
            f"{m.slo_violations} ({100 * m.slo_violations / max(1, m.requests):.1f}%{refused}) | {meets} | "
            f"{m.privacy_violations} | {m.owned_busy:.0%} | {m.prefix_hit:.0%} | {_ms(m.agent_ttft_p50_ms)} |"
        )
    return lines


def goals(runs: list[Run]) -> list[str]:
    """The issue's three goals, each met or not, with the figures behind the verdict."""
    out = []
    lowest_ok = []
    for size in SIZES:
        here = [r.metrics for r in runs if r.size == size]
        sb = next(m for m in here if m.policy == "switchboard")
        meeting = [m for m in here if m.meets_slo]
        cheapest = min(meeting, key=lambda m: m.cloud_usd) if meeting else None
        ok = sb.meets_slo and cheapest is not None and sb.cloud_usd <= cheapest.cloud_usd
        lowest_ok.append(ok)
        who = (
            f"cheapest meeting the SLO: {cheapest.policy} {cheapest.cloud_usd:.3f} USD"
            if cheapest
            else "none"
        )
        error = next(r.ttft_error for r in runs if r.size == size and r.metrics.policy == "switchboard")
        out.append(
            f"  - {size:.0%}: switchboard TTFT on owned boxes vs routing's prediction: p50 {error[0]:.1f}x, "
            f"p95 {error[1]:.1f}x"
        )
        private = [m for m in meeting if m.privacy_violations == 0 and m.policy != "switchboard"]
        rival = min(private, key=lambda m: m.cloud_usd) if private else None
        kept = (
            f"; of those that also keep every privacy floor: {rival.policy} {rival.cloud_usd:.3f} USD"
            if rival
            else "; none other keeps every privacy floor"
        )
        out.append(
            f"  - {size:.0%}: switchboard {sb.cloud_usd:.3f} USD, meets SLO: "
            f"{'yes' if sb.meets_slo else 'no'}; {who}{kept}: {'met' if ok else '**not met**'}"
        )
    at60 = [r.metrics for r in runs if r.size == 0.6]
    sb = next(m for m in at60 if m.policy == "switchboard")
    cloud = next(m for m in at60 if m.policy == "always-cloud")
    ratio = float(sb.cloud_usd / cloud.cloud_usd) if cloud.cloud_usd else float("nan")
    ok60 = ratio <= 0.5 and sb.slo_violations <= cloud.slo_violations
    priv = sum(r.metrics.privacy_violations for r in runs if r.metrics.policy == "switchboard")
    late = next(r.late for r in runs if r.size == 0.6 and r.metrics.policy == "switchboard")
    kinds = (
        f" (of Switchboard's: {late.beyond_reach} beyond any privacy-keeping policy's reach, {late.cold} "
        f"cold, {late.other} other, {late.refused} refused; `LateKinds`)"
        if late is not None and sb.slo_violations
        else ""
    )
    return [
        f"- Lowest cloud spend among policies meeting the SLO, at every size: "
        f"{'met' if all(lowest_ok) else '**not met**'}",
        *out,
        f"- At 60%: switchboard cloud spend {ratio:.2f}x always-cloud (goal <= 0.5x), SLO violations "
        f"{sb.slo_violations} vs always-cloud {cloud.slo_violations}{kinds}: "
        f"{'met' if ok60 else '**not met**'}",
        f"- Switchboard privacy violations across sizes: {priv}: {'met' if priv == 0 else '**not met**'}",
    ]


def run_workload(
    workload: str, model: StepModel, *, load_boxes: float, minutes: float, seed: int
) -> tuple[list[Request], list[Run], float]:
    started = time.perf_counter()
    trace = make_trace(workload, model, load_boxes=load_boxes, minutes=minutes, seed=seed)
    runs = evaluate(trace, model, minutes * 60, seed)
    return trace, runs, time.perf_counter() - started
