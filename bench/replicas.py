"""Throughput of three gateway replicas vs one, sharing Redis and PostgreSQL, limits and cache on.

One run starts the fake provider (0 ms answers) and three `switchboard serve` processes on one PostgreSQL
schema and one Redis prefix, with the config's Redis defaults. Three teams: `full` (request and token limits
for team and key, a concurrency cap and a daily budget, none of which refuses), `limited` (the limits only)
and `plain` (nothing to check: what Redis costs). Requests are not cacheable, so every one takes the backend
path (cache on, not consulted). Each repeat runs, per team, all connections to replica 0 (the other two
idle), then the same number split evenly over the three, one load generator process per replica. Nothing is
pinned. Tables quote medians over repeats, all measured in this run; the ledger must hold one row per answer.
Run: `python -m bench.replicas [--duration-s 4] [--repeats 3] [--connections 48] [--out docs/BENCHMARKS.md]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench.loadgen import LoadResult, run_python, run_wrk, wrk_path
from bench.overhead import _wrk_version, machine_info
from bench.redis_paths import DEFAULT_PG_URL, DEFAULT_REDIS_URL, Stack, stack, write_section
from gateway.config import RedisConfig

# bench.redis_paths.TEAMS: `full` has request and token limits (team and key), a concurrency cap and a
# daily budget, none of which refuses; `limited` only the limits; `plain` nothing (what Redis costs).
TEAMS = {
    "full": "limits + concurrency cap + budget",
    "limited": "request and token limits",
    "plain": "none (baseline)",
}

Load = Callable[..., LoadResult]


@dataclass
class Phase:
    team: str
    replicas: int
    rps: list[float] = field(default_factory=list)  # 2xx per second, per repeat, summed over generators
    p50_ms: list[float] = field(default_factory=list)  # per repeat, the worst generator's
    p99_ms: list[float] = field(default_factory=list)
    completed: int = 0  # responses over all repeats
    ok: int = 0
    bad: int = 0  # non-2xx answers and socket errors


def run_phase(load: Load, s: Stack, phase: Phase, connections: int, duration_s: float, tmp: Path) -> None:
    """`connections` split evenly over the first `phase.replicas` replicas, one generator each, at once."""
    body = orjson.dumps(
        {"model": "delay0", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    )
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {s.keys[phase.team]}"}
    urls = s.replicas.urls[: phase.replicas]
    per = [connections // len(urls) + (i < connections % len(urls)) for i in range(len(urls))]
    dirs = [tmp / f"load-{i}" for i in range(len(urls))]
    for d in dirs:
        d.mkdir(exist_ok=True)
    with ThreadPoolExecutor(len(urls)) as pool:
        futures = [
            pool.submit(
                load,
                url + "/v1/chat/completions",
                body,
                headers,
                connections=c,
                duration_s=duration_s,
                script_dir=d,
            )
            for url, c, d in zip(urls, per, dirs, strict=True)
        ]
        results = [f.result() for f in futures]
    phase.rps.append(sum(r.ok / r.duration_s for r in results if r.duration_s))
    phase.p50_ms.append(max(r.p50_ms for r in results))
    phase.p99_ms.append(max(r.p99_ms for r in results))
    phase.completed += sum(r.requests for r in results)
    phase.ok += sum(r.ok for r in results)
    phase.bad += sum(r.non2xx + r.errors for r in results)


def ledger_counts(engine: Engine) -> Counter[str]:
    """Rows by `http_status error_type`."""
    query = "SELECT http_status, coalesce(error_type, ''), count(*) FROM usage GROUP BY 1, 2"
    with engine.connect() as conn:
        return Counter({f"{s} {e}".strip(): int(n) for s, e, n in conn.execute(sa.text(query))})


def settled_counts(engine: Engine, timeout_s: float = 20.0) -> Counter[str]:
    """Row counts once the writers have flushed: unchanged over one second."""
    deadline = time.monotonic() + timeout_s
    last = ledger_counts(engine)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = ledger_counts(engine)
        if now == last:
            return now
        last = now
    return last


def render(phases: Sequence[Phase], rows: Counter[str], info: dict[str, str], meta: dict[str, str]) -> str:
    completed = sum(p.completed for p in phases)
    in_flight = int(meta["connections"]) * int(meta["repeats"]) * len(phases)
    verdict = "OK" if completed <= rows.total() <= completed + in_flight else "MISMATCH"
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}; 1-minute load average {meta['load']} at the start "
        "(other work shares this machine when it is well above 0).",
        "",
        f"Command: `{meta['command']}`. Load: {meta['generator']}, one process per replica targeted, "
        f"{meta['connections']} connections in total. Nothing pinned: gateways, load generators, the fake "
        f"provider (0 ms answers), Redis and PostgreSQL share the machine's cores. Redis: {meta['redis']}, "
        "`retry_after_s = 1`, fail closed; cache on, requests not cacheable (every one "
        f"goes to the backend). {meta['repeats']} repeat(s) of {meta['duration']} s per phase, phases "
        "alternating; each cell is the median over repeats (p50/p99: the worst load generator's, over every "
        "answer); non-2xx counts are totals over repeats. A 503 `limiter_unavailable` is the limiter failing "
        "closed after Redis calls outlasted `timeout_ms` three times in a row.",
        "",
        "| team checks | replicas | 2xx req/s | p50 ms | p99 ms | non-2xx + errors | 3 vs 1 replica |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    one = {p.team: statistics.median(p.rps) for p in phases if p.replicas == 1}
    for p in phases:
        ratio = f"{statistics.median(p.rps) / one[p.team]:.2f}x" if p.replicas > 1 else ""
        lines.append(
            f"| {TEAMS[p.team]} | {p.replicas} | **{statistics.median(p.rps):.0f}** "
            f"| {statistics.median(p.p50_ms):.2f} | {statistics.median(p.p99_ms):.2f} | {p.bad} | {ratio} |"
        )
    by_status = ", ".join(f"{k}: {v}" for k, v in sorted(rows.items()))
    lines += [
        "",
        f"- Ledger: {rows.total()} rows for {completed} answers counted by the load generators (at most "
        f"{in_flight} more may have been in flight when a phase stopped); by HTTP status and error: "
        f"{by_status}. Verdict: {verdict}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=4.0, help="seconds per phase and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=48, help="in total, split over the replicas")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--out", type=Path, help="write/replace the section in this markdown file")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator, not wrk")
    parser.add_argument(
        "--redis-timeout-ms", type=float, help="redis.timeout_ms and connect_timeout_ms (default: config's)"
    )
    args = parser.parse_args(argv)
    load_at_start = f"{os.getloadavg()[0]:.2f}"
    wrk = None if args.python_load else wrk_path()
    if wrk:
        generator = f"wrk ({_wrk_version(wrk)}), 1 thread"

        def load(*a: object, **kw: object) -> LoadResult:
            return run_wrk(wrk, *a, **kw)  # type: ignore[arg-type]
    else:
        generator, load = "bench.loadgen Python asyncio client (wrk not installed)", run_python
    phases = [Phase(team, n) for team in TEAMS for n in (1, 3)]
    with tempfile.TemporaryDirectory(prefix="sb-bench-replicas-") as tmp_name:
        tmp = Path(tmp_name)
        timeouts = {}
        if args.redis_timeout_ms is not None:
            timeouts = {"timeout_ms": args.redis_timeout_ms, "connect_timeout_ms": args.redis_timeout_ms}
        with stack(tmp, n=3, pg_url=args.pg_url, redis_url=args.redis_url, redis_extra=timeouts) as s:
            for p in phases:  # warm every replica: key cache, pools, the Lua script
                run_phase(load, s, p, len(s.replicas.urls), 1.0, tmp)
            phases = [Phase(p.team, p.replicas) for p in phases]
            warm = settled_counts(s.engine)
            for i in range(args.repeats):
                for p in phases:
                    run_phase(load, s, p, args.connections, args.duration_s, tmp)
                    print(
                        f"[{i + 1}/{args.repeats}] {p.team:<8} x{p.replicas} {p.rps[-1]:8.0f} req/s"
                        f"  p50 {p.p50_ms[-1]:7.2f} ms  p99 {p.p99_ms[-1]:7.2f} ms  bad {p.bad}",
                        file=sys.stderr,
                    )
            rows = settled_counts(s.engine) - warm
    meta = {
        "load": load_at_start,
        "command": " ".join(["python -m bench.replicas", *(argv if argv is not None else sys.argv[1:])]),
        "generator": generator,
        "redis": (
            f"config defaults (`timeout_ms = {RedisConfig().timeout_ms:g}`, "
            f"`connect_timeout_ms = {RedisConfig().connect_timeout_ms:g}`)"
            if args.redis_timeout_ms is None
            else f"`timeout_ms` and `connect_timeout_ms` = {args.redis_timeout_ms:g}"
        ),
        "connections": str(args.connections),
        "repeats": str(args.repeats),
        "duration": f"{args.duration_s:g}",
    }
    section = render(phases, rows, machine_info(), meta)
    print(section)
    if args.out:
        write_section(args.out, "replicas", "Three replicas vs one", section)
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
