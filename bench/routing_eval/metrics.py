"""What a policy's run cost and how it served: spend, latency percentiles, SLOs, privacy, utilisation, cache.

A request violates its SLO when its TTFT or end-to-end latency is above its team's p95 target, or when it
was rejected. A policy *meets the SLO* when, for every team with a target, the team's p95 (rejections count
as infinitely late) is within it. A privacy violation is a request served on a deployment less private than
its floor (the cloud is `external`, owned boxes `internal`, edge nodes `edge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from bench.routing_eval.sim import CLOUD, Job, Result
from bench.routing_eval.workload import TEAMS, Request
from routing.privacy import PrivacyTier


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


@dataclass(frozen=True, slots=True)
class Metrics:
    policy: str
    requests: int
    rejected: int
    cloud_usd: Decimal
    fixed_usd: Decimal
    ttft_p50_ms: float
    ttft_p95_ms: float
    e2e_p50_ms: float
    e2e_p95_ms: float
    slo_violations: int
    meets_slo: bool
    worst_team: str  # the team furthest over its target ("" when all meet it)
    privacy_violations: int
    owned_busy: float  # mean share of time an owned box had work
    prefix_hit: float  # cached / prompt tokens, over requests with a prefix key served on boxes
    agent_ttft_p50_ms: float
    cloud_share: float

    @property
    def total_usd(self) -> Decimal:
        return self.cloud_usd + self.fixed_usd


def tier_of(result: Result, target: str) -> PrivacyTier:
    return result.fleet.cloud.tier if target == CLOUD else result.boxes[target].spec.tier


def violates_slo(job: Job) -> bool:
    team = next(t for t in TEAMS if t.name == job.req.team)
    late_ttft = team.slo_p95_ttft_ms is not None and job.ttft_s * 1000 > team.slo_p95_ttft_ms
    late_e2e = team.slo_p95_e2e_ms is not None and job.e2e_s * 1000 > team.slo_p95_e2e_ms
    return late_ttft or late_e2e


def _team_overshoot(jobs: list[Job], rejected: list[Request]) -> tuple[float, str]:
    """Largest p95 / target over teams and targets (<= 1: every team meets its SLO), and that team."""
    worst, who = 0.0, ""
    for team in TEAMS:
        mine = [j for j in jobs if j.req.team == team.name]
        lost = sum(1 for r in rejected if r.team == team.name)
        for target, attr in ((team.slo_p95_ttft_ms, "ttft_s"), (team.slo_p95_e2e_ms, "e2e_s")):
            if target is None or not (mine or lost):
                continue
            values = [getattr(j, attr) * 1000 for j in mine] + [math.inf] * lost
            ratio = percentile(values, 95) / target
            if ratio > worst:
                worst, who = ratio, team.name
    return worst, who


def summarise(result: Result) -> Metrics:
    jobs, rejected = result.jobs, result.rejected
    owned = [b for b in result.boxes.values() if b.spec.kind == "local"]
    on_boxes = [j for j in jobs if j.target != CLOUD and j.req.prefix_key]
    prompt = sum(j.req.prompt_tokens for j in on_boxes)
    overshoot, worst = _team_overshoot(jobs, rejected)
    return Metrics(
        policy=result.policy,
        requests=len(jobs) + len(rejected),
        rejected=len(rejected),
        cloud_usd=sum((j.cost_usd for j in jobs), Decimal(0)),
        fixed_usd=result.fleet.fixed_usd(result.duration_s),
        ttft_p50_ms=percentile([j.ttft_s * 1000 for j in jobs], 50),
        ttft_p95_ms=percentile([j.ttft_s * 1000 for j in jobs], 95),
        e2e_p50_ms=percentile([j.e2e_s * 1000 for j in jobs], 50),
        e2e_p95_ms=percentile([j.e2e_s * 1000 for j in jobs], 95),
        slo_violations=sum(1 for j in jobs if violates_slo(j)) + len(rejected),
        meets_slo=overshoot <= 1.0,
        worst_team="" if overshoot <= 1.0 else f"{worst} {overshoot:.1f}x",
        privacy_violations=sum(1 for j in jobs if tier_of(result, j.target).rank > j.req.floor.rank),
        owned_busy=sum(b.busy_s for b in owned) / max(1e-9, len(owned) * result.duration_s),
        prefix_hit=sum(j.cached_tokens for j in on_boxes) / prompt if prompt else 0.0,
        agent_ttft_p50_ms=percentile([j.ttft_s * 1000 for j in jobs if j.req.session >= 0], 50),
        cloud_share=sum(1 for j in jobs if j.target == CLOUD) / max(1, len(jobs)),
    )
