"""Micro-benchmarks of routing's per-request work: `choose` at 10 and 100 deployments, and the detectors.

Each case times `--iterations` single decisions with time.perf_counter_ns (after a warm-up) over a snapshot
of cloud (per-token), self-hosted (hourly) and edge deployments, about a quarter of them below the request's
privacy floor, and prints a markdown table of p50/p99/max; then `detect_messages` on typical prompts.
Invariant: inputs are built before timing starts and are identical for every iteration, so only `choose`
(with its preference fold) or the detectors are measured.
Run: python -m bench.routing [--iterations 20000] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from backends.base import BackendKind
from routing.decision import Price
from routing.privacy import PrivacyTier, detect_messages
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


CASES = {  # name -> (team policy, request preferences, prefix key)
    "balanced": (RoutePolicy(), RoutePreferences(), None),
    "cost + prefs": (
        RoutePolicy(objective=Objective.COST, preferred_labels={"region": "eu"}),
        RoutePreferences(ignore=frozenset({"b001"}), max_latency_ms=60_000.0, order=("d002",)),
        None,
    ),
    # SLO placement (some deployments miss it) and prefix affinity over the owned ones that meet it
    "SLO + prefix": (RoutePolicy(slo_p95_ttft_ms=1500.0), RoutePreferences(), 0x5EED_CAFE_F00D_BEEF),
}


def _quantiles(samples_ns: list[int]) -> tuple[float, float, float]:
    """(p50 µs, p99 µs, max µs)."""
    cuts = statistics.quantiles(samples_ns, n=100)
    return cuts[49] / 1e3, cuts[98] / 1e3, max(samples_ns) / 1e3


def _timed(fn: Callable[[], object], iterations: int) -> list[int]:
    for _ in range(max(1, iterations // 10)):
        fn()
    gc.collect()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        started = clock()
        fn()
        samples.append(clock() - started)
    return samples


def measure(n: int, case: str, iterations: int) -> tuple[float, float, float, int, int]:
    """(p50 µs, p99 µs, max µs, eligible, rejected) for one case."""
    policy, prefs, key = CASES[case]
    snapshot = make_snapshot(n)
    request = RouteRequest(
        "m", 1200, 300, PrivacyTier.EXTERNAL_ZDR, needs_json=True, preferences=prefs, prefix_key=key
    )
    decision = choose(request, snapshot, policy, now_s=0.0)
    samples = _timed(lambda: choose(request, snapshot, policy, now_s=0.0), iterations)
    return (*_quantiles(samples), len(decision.ranked), len(decision.rejected))


_PROSE = (
    "Please summarise the attached incident review for the weekly platform meeting. The cache warmed too "
    "late after the deploy, so several customers saw slow pages during peak hours; list the follow-ups. "
)
_LOG = "2026-11-21T10:30:45Z worker-7 job 8841 took 1532 ms, retries 2, queue 17, batch 0042 of 0100\n"
PROMPTS = {  # name -> one user message; the card and IBAN are documentation test numbers
    "200 chars, clean prose": _PROSE[:200],
    "200 chars, one email": _PROSE[:170] + " Mail jane.oneil@example.com.",
    "4 KB, clean prose": (_PROSE * 21)[:4096],
    "4 KB, log lines with numbers": (_LOG * 45)[:4096],
    "4 KB, card + IBAN": (_PROSE * 21)[:4000] + " card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00",
}


def measure_detectors(iterations: int) -> list[str]:
    rows = []
    for name, text in PROMPTS.items():
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ]
        kinds = detect_messages(messages)
        p50, p99, worst = _quantiles(_timed(functools.partial(detect_messages, messages), iterations))
        found = ", ".join(kinds) or "none"
        rows.append(f"| {name} | {len(text)} | {found} | {p50:.1f} | {p99:.1f} | {worst:.0f} |")
    return rows


def update_section(path: Path, name: str, title: str, body: str) -> None:
    """Replace the text between `<!-- {name}:start -->` and `<!-- {name}:end -->`, or append a section."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--out", type=Path, help="write the tables into this markdown file's section")
    args = parser.parse_args()
    from bench.overhead import machine_info  # bench.overhead is heavy; only the report needs it

    info = machine_info()
    out = " --out " + str(args.out) if args.out else ""
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}; 1-minute load average "
        f"{os.getloadavg()[0]:.2f} at the start (other work shares this machine when it is above 0).",
        "",
        f"Command: `python -m bench.routing --iterations {args.iterations}{out}`. {args.iterations} timed "
        "calls per row after a warm-up of a tenth as many; one process, one thread.",
        "",
        "`routing.scoring.choose`, one decision (request floor `external_zdr`, JSON mode needed):",
        "",
        "| deployments | case | eligible | rejected | p50 µs | p99 µs | max µs |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in (10, 100):
        for case in CASES:
            p50, p99, worst, eligible, rejected = measure(n, case, args.iterations)
            lines.append(f"| {n} | {case} | {eligible} | {rejected} | {p50:.1f} | {p99:.1f} | {worst:.0f} |")
    lines += [
        "",
        "`routing.privacy.detect_messages` on a system message plus one user message (what "
        "`gateway/pipeline/plan.py` runs on every request; it is now `detect_request`: every field, "
        "normalised and decoded, plus the seam between the two messages):",
        "",
        "| user message | chars | detected | p50 µs | p99 µs | max µs |",
        "|---|---:|---|---:|---:|---:|",
        *measure_detectors(max(1, args.iterations // 4)),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        update_section(args.out, "bench/routing", "Routing decision time (`bench/routing`)", text)


if __name__ == "__main__":
    main()
