"""The console's pages on a large ledger: load N rows (bench/reports' generator), roll them up, then serve
the gateway with the console and time every page's server time as an admin (and the overview as a team).

Server time is the gateway's `x-switchboard-overhead-ms` header (time in the app until the response headers
go out: the whole handler, SQL and rendering included); the client's loopback wall time is reported beside
it. Requests run one at a time, `--repeats` per page after one warm-up. The last hour holds an hour's worth of
fresh rows not yet rolled up, as a live gateway's would. Goal: p95 < 1 s per page. The schema is dropped.
Run: `python -m bench.console [--rows 2000000] [--days 32] [--repeats 20] [--out docs/BENCHMARKS.md]`
(`--keep` leaves the schema; `--reuse SCHEMA` times the pages again on it without loading).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.overhead import machine_info
from bench.reports import DEFAULT_PG_URL, _append, ledger_lines, load, vacuum_analyze
from gateway.config import parse_config
from gateway.http.app import create_app
from gateway.store.db import make_engine, migrate
from gateway.store.rollups import Rollup
from tests.support.live import LiveServer

GOAL_S = 1.0
ADMIN_ENV = "SB_BENCH_CONSOLE_ADMIN_KEY"


def _pages(today: dt.date) -> list[tuple[str, str]]:
    week = (today - dt.timedelta(days=7)).isoformat()
    month = (today - dt.timedelta(days=30)).isoformat()
    return [
        ("Overview, last hour (live)", "/console/overview?range=1h"),
        ("Overview, 24 h", "/console/overview?range=24h"),
        ("Overview, 7 days", "/console/overview?range=7d"),
        ("Overview, 30 days", "/console/overview?range=30d"),
        ("Overview JSON, last hour", "/console/api/overview?range=1h"),
        ("Teams and keys", "/console/teams"),
        ("Usage, 7 days by team (default)", "/console/usage"),
        ("Usage, 30 days by team,model", f"/console/usage?group_by=team,model&since={month}"),
        ("Usage CSV, 30 days by team,model", f"/console/usage?group_by=team,model&since={month}&format=csv"),
        ("Savings, 7 days", f"/console/savings?since={week}"),
        ("Backends and routing (50 recent decisions)", "/console/backends"),
        ("Route explanation", "/console/backends/explain?team=bench&model=gpt-4o-mini"),
        ("Edge nodes", "/console/edge"),
        ("Batches", "/console/batches"),
        ("Audit log", "/console/audit"),
    ]


@dataclass
class Result:
    rows: int
    days: int
    load_s: float = 0.0
    rollup_s: float = 0.0
    pages: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # server ms, wall ms


def _time(client: httpx.Client, path: str, repeats: int) -> tuple[list[float], list[float]]:
    server, wall = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        resp = client.get(path)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        if resp.status_code != 200:
            raise RuntimeError(f"{path}: {resp.status_code} {resp.text[:300]}")
        if i:  # the first is a warm-up (template compilation, connection pool)
            server.append(float(resp.headers["x-switchboard-overhead-ms"]))
            wall.append(elapsed_ms)
    return server, wall


@contextmanager
def _login(base_url: str, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        resp = client.post("/console/login", data={"key": key})
        if resp.status_code != 303:
            raise RuntimeError(f"login refused: {resp.status_code}")
        yield client


ROLLUP_TABLES = (
    "usage_hourly",
    "usage_daily",
    "usage_hourly_coarse",
    "usage_daily_coarse",
    "backend_busy_hourly",
)


def run(
    url: str, rows: int, days: int, repeats: int, seed: int, keep: bool = False, reuse: str | None = None
) -> Result:
    """`keep`: leave the schema (to EXPLAIN its statements); `reuse`: time the pages on a schema a kept run
    loaded (a catch-up rollup run, then a new live hour), without loading again."""
    schema = reuse or "bench_console_" + uuid.uuid4().hex[:8]
    hours = days * 24
    end = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    start = end - dt.timedelta(hours=hours)
    result = Result(rows, days)
    admin = make_engine(url)
    migrate(url, schema)
    engine = make_engine(url, schema)
    try:
        if reuse is None:
            print(f"loading {rows:,} rows over {days} days into {schema} ...", file=sys.stderr)
            t0 = time.perf_counter()
            load(engine, ledger_lines(rows, start, hours, seed, "b"), on_rows=lambda n: None)
            result.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        Rollup(engine).run_once()
        vacuum_analyze(engine, *ROLLUP_TABLES)
        result.rollup_s = time.perf_counter() - t0
        # The live hour: an hour's traffic written just now, not yet in any rollup.
        now = dt.datetime.now(dt.UTC)
        live_start = now - dt.timedelta(hours=1)
        prefix = "n" if reuse is None else "r" + uuid.uuid4().hex[:6]
        _append(engine, ledger_lines(max(rows // hours, 1), live_start, 1, seed + 99, prefix, written_at=now))
        print(f"  {schema}: load {result.load_s:.0f} s, rollup {result.rollup_s:.0f} s", file=sys.stderr)
        result.pages = _serve_and_time(url, schema, repeats)
        return result
    finally:
        engine.dispose()
        if not keep:
            with admin.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def _serve_and_time(url: str, schema: str, repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    admin_key = "admin-" + uuid.uuid4().hex
    os.environ[ADMIN_ENV] = admin_key
    config = parse_config(
        {
            "server": {"admin_key_env": ADMIN_ENV},
            "database": {"url": url, "schema_name": schema},
            "reports": {
                "reference_input_usd_per_mtok": "2.5",
                "reference_output_usd_per_mtok": "10",
                "rollup_interval_s": 3600,
            },
            # One model on an OpenAI-compatible backend nobody listens on: the explain page routes to it.
            "backends": {"oai": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": {
                "gpt-4o-mini": {"backend": "oai", "input_usd_per_mtok": "0.15", "output_usd_per_mtok": "0.6"}
            },
            "teams": {"bench": {"models": ["*"]}},
        }
    )
    out: dict[str, tuple[list[float], list[float]]] = {}
    with LiveServer(create_app(config)) as server, _login(server.base_url, admin_key) as client:
        headers = {"authorization": f"Bearer {admin_key}"}
        client.post("/admin/teams", json={"name": "team-00"}, headers=headers)
        created = client.post("/admin/keys", json={"team": "team-00", "name": "bench"}, headers=headers)
        team_key = created.json()["plaintext"]
        for i in range(20):  # a listing and an audit log with something in them
            client.post("/admin/keys", json={"team": "team-00", "name": f"k{i}"}, headers=headers)
        for name, path in _pages(dt.datetime.now(dt.UTC).date()):
            out[name] = _time(client, path, repeats)
            print(f"  {name}: p95 {_p95(out[name][0]):.0f} ms", file=sys.stderr)
        with _login(server.base_url, team_key) as team:
            for name, path in (
                ("Team session: overview, last hour", "/console/overview?range=1h"),
                ("Team session: overview, 30 days", "/console/overview?range=30d"),
            ):
                out[name] = _time(team, path, repeats)
                print(f"  {name}: p95 {_p95(out[name][0]):.0f} ms", file=sys.stderr)
    return out


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def render(r: Result, command: str, info: dict[str, str], load_avg: str) -> str:
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}; PostgreSQL on the same machine; 1-minute load average "
        f"{load_avg} at the start (the machine was shared with other jobs).",
        "",
        f"Command: `{command}`. {r.rows:,} ledger rows over {r.days} days from bench/reports' generator "
        + (
            f"(loaded in {r.load_s:.0f} s, rolled up in {r.rollup_s:.0f} s)"
            if r.load_s
            else f"(loaded by an earlier `--keep` run; its catch-up rollup took {r.rollup_s:.0f} s)"
        )
        + ", plus one hour of fresh rows not yet "
        "rolled up. Server time is `x-switchboard-overhead-ms` (the handler: SQL and rendering); wall time "
        "is the client's, over loopback. One request at a time, after one warm-up.",
        "",
        "| page | runs | server p50 ms | server p95 ms | wall p95 ms | goal < 1 s p95 |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, (server, wall) in r.pages.items():
        met = "met" if _p95(server) < GOAL_S * 1000 else "**not met**"
        lines.append(
            f"| {name} | {len(server)} | {statistics.median(server):,.0f} | {_p95(server):,.0f} | "
            f"{_p95(wall):,.0f} | {met} |"
        )
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    start, end = "<!-- bench/console:start -->", "<!-- bench/console:end -->"
    block = f"{start}\n{section}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (
            text.rstrip("\n") + "\n\n## The console's pages on a large ledger (`bench/console`)\n\n" + block
        )
        text += "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--out", type=Path, help="write the section into this markdown file")
    parser.add_argument("--keep", action="store_true", help="leave the schema (to EXPLAIN, or --reuse it)")
    parser.add_argument("--reuse", metavar="SCHEMA", help="time the pages on a kept run's schema, no load")
    args = parser.parse_args()
    load_avg = f"{os.getloadavg()[0]:.2f}"
    result = run(args.pg_url, args.rows, args.days, args.repeats, args.seed, args.keep, args.reuse)
    section = render(
        result, ("python -m bench.console " + " ".join(sys.argv[1:])).strip(), machine_info(), load_avg
    )
    print(section)
    if args.out:
        write_section(args.out, section)


if __name__ == "__main__":
    main()
