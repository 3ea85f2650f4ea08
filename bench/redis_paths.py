"""What Redis-backed limits and the response cache add per request, through a real `switchboard serve`.

One gateway process (Redis and PostgreSQL on, pinned to core 0 when there are two cores) in front of the
fake provider answering at once (0 ms). One client on core 1 sends requests one at a time; each repeat runs
every phase in turn: no limits (baseline), rate limits, rate limits plus concurrency cap and budget, a cache
miss (a new deterministic prompt each time: lookup, upstream, store) and a cache hit (the same prompt).
Tables quote medians over repeats of each phase's p50/p99. Invariant: every number printed is measured in
this run; a phase whose answers are not all 200 with the expected cache header aborts the run.
Run: `python -m bench.redis_paths [--requests 400] [--repeats 3] [--out docs/BENCHMARKS.md]`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis
from sqlalchemy.engine import Engine

from bench.overhead import _pins, machine_info
from tests.support.replicas import FakeUpstream, GatewayReplicas, pg_schema

DEFAULT_PG_URL = os.environ.get(
    "SWITCHBOARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
DEFAULT_REDIS_URL = os.environ.get("SWITCHBOARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
UPSTREAM_KEY_ENV = "SB_BENCH_UPSTREAM_KEY"
BIG = 1_000_000_000  # limits that never refuse: the check runs, the answer is always yes

# plain: nothing to check. limited: team and key request/token limits. full: those plus a concurrency cap
# and a daily budget (acquire, admit and reserve before dispatch; settle, release and charge after).
TEAMS: dict[str, dict[str, Any]] = {
    "plain": {},
    "limited": {"limits": {"requests": BIG, "tokens": BIG, "key_requests": BIG, "key_tokens": BIG}},
    "full": {
        "limits": {
            "requests": BIG,
            "tokens": BIG,
            "key_requests": BIG,
            "key_tokens": BIG,
            "max_concurrent": 10_000,
        },
        "budgets": [{"period": "day", "usd": "1000000"}],
    },
}


def bench_config(
    upstream_url: str, pg_url: str, schema: str, redis_url: str, prefix: str, redis_extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "database": {"url": pg_url, "schema_name": schema, "auto_migrate": False},
        "backends": {
            "fake": {"kind": "openai", "base_url": upstream_url + "/v1", "api_key_env": UPSTREAM_KEY_ENV}
        },
        "models": {"delay0": {"backend": "fake", "input_usd_per_mtok": "1.5", "output_usd_per_mtok": "6"}},
        "teams": TEAMS,
        "redis": {"url": redis_url, "prefix": prefix, **redis_extra},
        "limits": {"window_s": 60.0},
        "cache": {"enabled": True, "ttl_s": 600.0},
    }


@dataclass
class Stack:
    """The running processes: one fake provider, `n` gateways, and a key per team."""

    replicas: GatewayReplicas
    keys: dict[str, str]
    engine: Engine  # on the replicas' schema


@contextmanager
def stack(
    tmp: Path,
    *,
    n: int,
    pg_url: str,
    redis_url: str,
    gateway_pins: Sequence[Sequence[str]] = (),
    upstream_pin: Sequence[str] = (),
    redis_extra: dict[str, Any] | None = None,
) -> Iterator[Stack]:
    """Fake provider and `n` gateways sharing one fresh PostgreSQL schema and Redis prefix (both removed
    after). `gateway_pins[i]` prefixes replica i's command (e.g. `taskset -c 0`); `redis_extra` is merged
    into the [redis] table (e.g. timeout_ms)."""
    from gateway.store import keys

    upstream = FakeUpstream(tmp).spawn(pin=upstream_pin)
    prefix = f"bench:{uuid.uuid4().hex[:12]}:"
    env = {UPSTREAM_KEY_ENV: "sk-bench-" + uuid.uuid4().hex}
    try:
        upstream.wait_ready()
        upstream.configure("delay0", ttft_ms=0, n_tokens=8)
        with pg_schema(pg_url, {name: ["*"] for name in TEAMS}) as (schema, engine):
            config = bench_config(upstream.base_url, pg_url, schema, redis_url, prefix, redis_extra or {})
            replicas = GatewayReplicas(config, tmp, n=n, name="bench", env=env, pins=gateway_pins)
            team_keys = {
                team: keys.create_key(engine, team, name="bench", models=None, expires_at=None).plaintext
                for team in TEAMS
            }
            with replicas:
                yield Stack(replicas, team_keys, engine)
    finally:
        upstream.stop()
        client = redis.Redis.from_url(redis_url)
        try:
            found = list(client.scan_iter(match=prefix + "*", count=1000))
            for i in range(0, len(found), 500):
                client.delete(*found[i : i + 500])
        finally:
            client.close()


def pin_self(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


# ---- phases ------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    team: str
    what: str
    cacheable: bool = False
    same_prompt: bool = False  # cacheable and always the same prompt: every request after the first hits
    expect_cache: str | None = None  # the x-switchboard-cache header every answer must carry
    client_p50: list[float] = field(default_factory=list)  # one value per repeat, ms
    client_p99: list[float] = field(default_factory=list)
    overhead_p50: list[float] = field(default_factory=list)
    overhead_p99: list[float] = field(default_factory=list)

    def reset(self) -> None:
        for values in (self.client_p50, self.client_p99, self.overhead_p50, self.overhead_p99):
            values.clear()


PHASES = [
    Phase("baseline", "plain", "no limits, not cacheable"),
    Phase("rate limits", "limited", "team + key request and token limits"),
    Phase("limits + budget", "full", "the same plus concurrency cap and daily budget"),
    Phase("cache miss", "plain", "deterministic, new prompt each time", cacheable=True, expect_cache="miss"),
    Phase(
        "cache hit",
        "plain",
        "deterministic, same prompt",
        cacheable=True,
        same_prompt=True,
        expect_cache="hit",
    ),
]


def body_for(phase: Phase, i: int, run: str) -> bytes:
    # Same length for every phase, so parsing and hashing cost the same.
    prompt = f"Say hello {run} {0 if phase.same_prompt else i:08d}"
    body: dict[str, Any] = {
        "model": "delay0",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
    }
    if phase.cacheable:
        body["temperature"] = 0
    return orjson.dumps(body)


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run_phase(client: httpx.Client, url: str, key: str, phase: Phase, n: int, run: str) -> None:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    if phase.same_prompt:  # store the entry first, so every timed request is a hit
        client.post(url, content=body_for(phase, 0, run), headers=headers).raise_for_status()
    bodies = [body_for(phase, i, run) for i in range(n)]
    client_ms, overhead_ms = [], []
    for body in bodies:
        t0 = time.perf_counter()
        resp = client.post(url, content=body, headers=headers)
        client_ms.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200:
            raise SystemExit(f"{phase.name}: HTTP {resp.status_code}: {resp.text[:500]}")
        cache = resp.headers.get("x-switchboard-cache")
        if phase.expect_cache is not None and cache != phase.expect_cache:
            raise SystemExit(
                f"{phase.name}: x-switchboard-cache is {cache!r}, expected {phase.expect_cache!r}"
            )
        overhead_ms.append(float(resp.headers["x-switchboard-overhead-ms"]))
    phase.client_p50.append(pct(client_ms, 50))
    phase.client_p99.append(pct(client_ms, 99))
    phase.overhead_p50.append(pct(overhead_ms, 50))
    phase.overhead_p99.append(pct(overhead_ms, 99))


def redis_ping_ms(redis_url: str, n: int = 500) -> float:
    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.ping()
            samples.append((time.perf_counter() - t0) * 1000)
        return statistics.median(samples)
    finally:
        client.close()


# ---- the report ----------------------------------------------------------------------------------------


def write_section(path: Path, name: str, title: str, section: str) -> None:
    """Replace the text between `<!-- bench/NAME:start -->` and `:end -->`, or append a new section."""
    start, end = f"<!-- bench/{name}:start -->", f"<!-- bench/{name}:end -->"
    block = f"{start}\n{section}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {title} (`bench/{name}`)\n\n" + block + "\n"
    path.write_text(text)


def _m(values: Sequence[float]) -> float:
    return statistics.median(values)


def render(phases: Sequence[Phase], ping_ms: float, info: dict[str, str], meta: dict[str, str]) -> str:
    base = phases[0]
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}; 1-minute load average {meta['load']} at the start "
        "(other work shares this machine when it is well above 0).",
        "",
        f"Command: `{meta['command']}`. One gateway process with Redis and PostgreSQL on; {meta['pinning']}; "
        "Redis and PostgreSQL are the machine's shared servers (not pinned). Fake upstream answers at once "
        f"(0 ms). Concurrency 1: {meta['requests']} sequential requests per phase and repeat, phases in turn "
        f"within each of {meta['repeats']} repeats; each cell is the median over repeats of that repeat's "
        "percentile. *Client* is the whole round trip measured by the Python client (httpx); *overhead* is "
        "the gateway's `x-switchboard-overhead-ms` (time in the app minus time awaiting the upstream).",
        "",
        "| phase | team / request | client p50 ms | client p99 ms | overhead p50 ms | overhead p99 ms "
        "| added p50 vs baseline (client / overhead) ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        added_client = _m(p.client_p50) - _m(base.client_p50)
        added_overhead = _m(p.overhead_p50) - _m(base.overhead_p50)
        added = "-" if p is base else f"{added_client:+.3f} / {added_overhead:+.3f}"
        lines.append(
            f"| {p.name} | `{p.team}`: {p.what} | {_m(p.client_p50):.3f} | {_m(p.client_p99):.3f} "
            f"| {_m(p.overhead_p50):.3f} | {_m(p.overhead_p99):.3f} | {added} |"
        )
    hit, miss = phases[-1], phases[-2]
    lines += [
        "",
        f"- Redis PING round trip from a Python client on this machine: p50 {ping_ms:.3f} ms.",
        f"- A cache hit vs the same request as a miss (lookup + 0 ms upstream + store): client p50 "
        f"{_m(hit.client_p50):.3f} vs {_m(miss.client_p50):.3f} ms.",
    ]
    return "\n".join(lines)


def measure(s: Stack, phases: Sequence[Phase], requests: int, repeats: int) -> None:
    url = s.replicas.urls[0] + "/v1/chat/completions"
    with httpx.Client(timeout=10) as client:
        for p in phases:  # warm: key cache, pools, the Lua script, imports
            run_phase(client, url, s.keys[p.team], p, 50, "warm")
            p.reset()
        for i in range(repeats):
            run = f"r{i}-{uuid.uuid4().hex[:6]}"
            for p in phases:
                run_phase(client, url, s.keys[p.team], p, requests, run)
                print(
                    f"[{i + 1}/{repeats}] {p.name:<16} client p50 {p.client_p50[-1]:.3f} ms"
                    f"  p99 {p.client_p99[-1]:.3f}  overhead p50 {p.overhead_p50[-1]:.3f}"
                    f"  p99 {p.overhead_p99[-1]:.3f}",
                    file=sys.stderr,
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="sequential requests per phase and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--out", type=Path, help="write/replace the section in this markdown file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    args = parser.parse_args(argv)
    load_at_start = f"{os.getloadavg()[0]:.2f}"
    phases = [copy.deepcopy(p) for p in PHASES]
    pin_gateway, pin_other, pin_note = _pins(not args.no_pin)
    with tempfile.TemporaryDirectory(prefix="sb-bench-redis-") as tmp_name:
        where = {"pg_url": args.pg_url, "redis_url": args.redis_url}
        with stack(Path(tmp_name), n=1, gateway_pins=[pin_gateway], upstream_pin=pin_other, **where) as s:
            pin_self(int(pin_other[-1]) if pin_other else None)
            measure(s, phases, args.requests, args.repeats)
    meta = {
        "load": load_at_start,
        "command": " ".join(["python -m bench.redis_paths", *(argv if argv is not None else sys.argv[1:])]),
        "pinning": pin_note.replace("load generator", "client"),
        "requests": str(args.requests),
        "repeats": str(args.repeats),
    }
    section = render(phases, redis_ping_ms(args.redis_url), machine_info(), meta)
    print(section)
    if args.out:
        write_section(args.out, "redis_paths", "Redis paths: rate-limit check and cache hit", section)
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
