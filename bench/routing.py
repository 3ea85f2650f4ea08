"""Micro-benchmark of `routing.scoring.choose`: decision time per request at 10 and 100 deployments.

Each case times `--iterations` single decisions with time.perf_counter_ns (after a warm-up) over a snapshot
of cloud (per-token), self-hosted (hourly) and edge deployments, about a quarter of them below the request's
privacy floor, and prints a markdown table of p50/p99/max. Invariant: inputs are built before timing starts
and are identical for every iteration, so only `choose` (with its preference fold) is measured.
Run: python -m bench.routing [--iterations 20000]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from decimal import Decimal

from backends.base import BackendKind
from routing.decision import Price
from routing.privacy import PrivacyTier
from routing.scoring import choose
from routing.snapshot import (
    DeploymentSpec,
    DeploymentStats,
    HourlyPrice,
    Objective,
    RoutePolicy,
    RoutePreferences,
    RouteRequest,
    RoutingSnapshot,
)

_TIERS = (PrivacyTier.INTERNAL, PrivacyTier.EXTERNAL_ZDR, PrivacyTier.EDGE, PrivacyTier.EXTERNAL)
_KINDS = (BackendKind.LOCAL, BackendKind.CLOUD, BackendKind.EDGE, BackendKind.CLOUD)


def make_snapshot(n: int) -> RoutingSnapshot:
    """`n` deployments of one model; every fourth is `external` (below the benchmark's floor)."""
    deployments = {}
    for i in range(n):
        tier, kind = _TIERS[i % 4], _KINDS[i % 4]
        hourly = kind in (BackendKind.LOCAL, BackendKind.EDGE)
        price = HourlyPrice(Decimal("2.5")) if hourly else Price(Decimal(i % 7) / 4, Decimal(i % 5) + 1)
        spec = DeploymentSpec(
            public_model="m", deployment_id=f"d{i:03}", backend=f"b{i:03}", backend_kind=kind,
            upstream_model="up", privacy_tier=tier, price=price, quality_tier=i % 3, context_tokens=32_768,
            labels={"region": "eu" if i % 2 else "us"},
        )  # fmt: skip
        stats = DeploymentStats(
            ttft_ms=80.0 + 13 * (i % 11), decode_tokens_per_s=40.0 + 7 * (i % 9), p50_latency_ms=900.0,
            in_flight=i % 6, queue_depth=i % 3, kv_cache_used_frac=(i % 10) / 10, sample_count=100,
        )  # fmt: skip
        deployments[spec.deployment_id] = (spec, stats)
    return RoutingSnapshot(deployments)


CASES = {
    "balanced": (RoutePolicy(), RoutePreferences()),
    "cost + prefs": (
        RoutePolicy(objective=Objective.COST, preferred_labels={"region": "eu"}),
        RoutePreferences(ignore=frozenset({"b001"}), max_latency_ms=60_000.0, order=("d002",)),
    ),
}


def measure(n: int, case: str, iterations: int) -> tuple[float, float, float, int, int]:
    """(p50 µs, p99 µs, max µs, eligible, rejected) for one case."""
    policy, prefs = CASES[case]
    snapshot = make_snapshot(n)
    request = RouteRequest("m", 1200, 300, PrivacyTier.EXTERNAL_ZDR, needs_json=True, preferences=prefs)
    for _ in range(iterations // 10):
        decision = choose(request, snapshot, policy, now_s=0.0)
    gc.collect()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        started = clock()
        choose(request, snapshot, policy, now_s=0.0)
        samples.append(clock() - started)
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49] / 1e3, cuts[98] / 1e3, max(samples) / 1e3, len(decision.ranked), len(decision.rejected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"{args.iterations} decisions per row; Python {platform.python_version()} on {cpu}\n")
    print("| deployments | case | eligible | rejected | p50 µs | p99 µs | max µs |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in (10, 100):
        for case in CASES:
            p50, p99, worst, eligible, rejected = measure(n, case, args.iterations)
            print(f"| {n} | {case} | {eligible} | {rejected} | {p50:.1f} | {p99:.1f} | {worst:.0f} |")


if __name__ == "__main__":
    main()
