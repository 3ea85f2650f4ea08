"""Usage reports on a large ledger: load N rows, roll them up, time the 30-day team x model report.

Rows are generated in time order over `--days` days (a diurnal curve, ~20 teams with Zipf-like traffic,
~200 keys, 10 models on 5 backends, 4 privacy tiers, lognormal latency and TTFT, errors, client closes,
cache hits and fallbacks) and streamed into a fresh PostgreSQL schema with COPY; secondary indexes are
rebuilt after the load, as a bulk load would. Then: one full rollup (timed), one incremental rollup after
an hour's worth of new rows, and the 30-day report grouped by team,model from rollups and from raw rows
(median of `--repeats`). Invariant: every figure is measured in this run, the rollup report's sums must
equal the raw report's, and the schema is dropped at the end.
Run: `python -m bench.reports [--rows 10000000] [--repeats 5] [--out docs/BENCHMARKS.md]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench.overhead import machine_info
from gateway.reports import Dimension, Report, ReportQuery, Source, usage_report
from gateway.store.db import make_engine, migrate
from gateway.store.rollups import Rollup

DEFAULT_PG_URL = os.environ.get(
    "SWITCHBOARD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
GOAL_S = 2.0
REPORT_DAYS = 30
SUMS = ("requests", "errors", "client_closed", "prompt_tokens", "completion_tokens", "cost_micro_usd")
SUMS += ("cache_hits", "cost_saved_micro_usd", "fallbacks")

# ---- the synthetic ledger --------------------------------------------------------------------------------

# backend: (served model suffix, latency lognormal mu, sigma, privacy tier it satisfies)
BACKENDS = {
    "cloud_openai": ("openai", 6.6, 0.55, "external"),
    "cloud_anthropic": ("anthropic", 6.9, 0.5, "external_zdr"),
    "gpu0": ("vllm", 6.0, 0.6, "internal"),
    "gpu1": ("vllm", 6.1, 0.65, "internal"),
    "edge": ("llamacpp", 6.4, 0.7, "edge"),
}
# model: (input $/Mtok, output $/Mtok, [(backend, weight)]); self-hosted deployments cost 0 per token
MODELS = {
    "gpt-4o": (2.5, 10.0, [("cloud_openai", 1)]),
    "gpt-4o-mini": (0.15, 0.6, [("cloud_openai", 1)]),
    "claude-sonnet": (3.0, 15.0, [("cloud_anthropic", 1)]),
    "claude-haiku": (0.8, 4.0, [("cloud_anthropic", 1)]),
    "llama-70b": (0.0, 0.0, [("gpu0", 3), ("gpu1", 2)]),
    "llama-8b": (0.0, 0.0, [("gpu0", 1), ("gpu1", 1), ("edge", 1)]),
    "qwen-32b": (0.0, 0.0, [("gpu1", 1)]),
    "mistral-small": (0.0, 0.0, [("gpu0", 1), ("cloud_openai", 1)]),
    "smollm2": (0.0, 0.0, [("edge", 1)]),
    "embed-ish": (0.02, 0.0, [("cloud_openai", 1)]),
}
MODEL_WEIGHTS = dict(zip(MODELS, (12, 30, 8, 14, 10, 12, 5, 4, 3, 2), strict=True))
SELF_HOSTED = ("llama-70b", "llama-8b", "qwen-32b", "mistral-small", "smollm2")
# A team's privacy floor decides which models its keys use; ~8% of its requests carry detected data that
# raises the floor (the ledger's privacy_class is `tier:kinds`).
TIERS = {  # floor: (teams with it, models allowed, class of a request with detections)
    "external": (12, tuple(MODELS), "internal:email"),
    "external_zdr": (3, tuple(MODELS), "internal:phone"),
    "internal": (4, SELF_HOSTED, "internal:iban,email"),
    "edge": (1, ("smollm2", "llama-8b"), "edge:phone"),
}
DETECTED_SHARE = 0.08
N_TEAMS = 20
N_KEYS = 200
ERROR_TYPES = (("upstream_unavailable", 503), ("upstream_timeout", 504), ("rate_limit_exceeded", 429))
COLUMNS = (
    "request_id", "created_at", "team", "key_id", "requested_model", "backend", "served_model",
    "prompt_tokens", "completion_tokens", "cost_micro_usd", "latency_ms", "ttft_ms", "status", "http_status",
    "error_type", "stream", "cache_hit", "privacy_class", "route_reason", "attempts", "route_candidates",
    "cost_saved_micro_usd", "written_at",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Key:
    key_id: str
    models: tuple[str, ...]  # the one to four models this key's application calls
    cum_weights: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    tier: str
    detected_class: str
    keys: tuple[Key, ...]  # busiest first


@dataclass(frozen=True, slots=True)
class Population:
    teams: tuple[Team, ...]
    team_weights: tuple[float, ...]  # Zipf-like: a few teams send most traffic
    candidates: dict[str, tuple[str, ...]]  # model -> pre-rendered route_candidates JSON per deployment

    @classmethod
    def build(cls, rng: random.Random) -> Population:
        tiers = [tier for tier, (n, _, _) in TIERS.items() for _ in range(n)]
        rng.shuffle(tiers)
        key_weights = [1 / (i + 1) ** 0.7 for i in range(N_TEAMS)]  # bigger teams hold more keys
        counts = [1 + round(w * (N_KEYS - N_TEAMS) / sum(key_weights)) for w in key_weights]
        counts[0] += N_KEYS - sum(counts)
        teams = []
        for i, (tier, n_keys) in enumerate(zip(tiers, counts, strict=True)):
            allowed = TIERS[tier][1]
            keys = tuple(_key(rng, allowed) for _ in range(n_keys))
            teams.append(Team(f"team-{i:02d}", tier, TIERS[tier][2], keys))
        candidates = {m: tuple(_candidates_json(rng, m, b) for b, _ in spec[2]) for m, spec in MODELS.items()}
        return cls(tuple(teams), tuple(1 / (i + 1) ** 0.9 for i in range(N_TEAMS)), candidates)


def _key(rng: random.Random, allowed: tuple[str, ...]) -> Key:
    n = min(rng.choice((1, 2, 2, 3, 3, 4)), len(allowed))
    models: list[str] = []
    while len(models) < n:
        pick = rng.choices(allowed, [MODEL_WEIGHTS[m] for m in allowed])[0]
        if pick not in models:
            models.append(pick)
    cum, total = [], 0.0
    for rank in range(n):
        total += 1 / (rank + 1) ** 1.5  # its main model first
        cum.append(total)
    return Key(f"k{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}", tuple(models), tuple(cum))


def _candidates_json(rng: random.Random, model: str, chosen: str) -> str:
    """The ledger's ranked candidates: the model's deployments, the chosen one first (pipeline/plan.py)."""
    ranked = [chosen, *(b for b, _ in MODELS[model][2] if b != chosen)]
    parts = [
        f'{{"deployment":"{model}@{b}","backend":"{b}","latency_ms":{rng.uniform(200, 2000):.1f},'
        f'"cost_usd":"0.000{rng.randrange(10, 99)}","score":{rng.random():.4f}}}'
        for b in ranked
    ]
    return "[" + ",".join(parts) + "]"


def _hourly_counts(rows: int, hours: int, rng: random.Random) -> list[int]:
    """Rows per hour on a diurnal curve (busiest at 15:00 UTC, quiet at night), summing to `rows`."""
    weights = [1.0 + 0.8 * math.sin((h % 24 - 9) / 24 * 2 * math.pi) + rng.uniform(-0.1, 0.1)
               for h in range(hours)]  # fmt: skip
    total = sum(weights)
    counts = [int(rows * w / total) for w in weights]
    for h in rng.sample(range(hours), rows - sum(counts)):
        counts[h] += 1
    return counts


def _esc(value: str | None) -> str:
    return "\\N" if value is None else value


def ledger_lines(
    rows: int, start: dt.datetime, hours: int, seed: int, prefix: str, written_at: dt.datetime | None = None
) -> Iterator[str]:
    """COPY text-format lines, in created_at order, `rows` in all over `hours` hours from `start`; written
    half a second after each request ended, or all at `written_at`."""
    rng = random.Random(seed)
    pop = Population.build(random.Random(seed + 1))
    for hour, count in enumerate(_hourly_counts(rows, hours, rng)):
        base = start + dt.timedelta(hours=hour)
        offsets = sorted(rng.randrange(3_600_000_000) for _ in range(count))
        for us, team in zip(offsets, rng.choices(pop.teams, pop.team_weights, k=count), strict=True):
            yield _line(rng, pop, prefix, base + dt.timedelta(microseconds=us), team, written_at)


def _line(
    rng: random.Random,
    pop: Population,
    prefix: str,
    at: dt.datetime,
    team: Team,
    written_at: dt.datetime | None,
) -> str:
    key = team.keys[min(int(rng.expovariate(3 / len(team.keys))), len(team.keys) - 1)]
    model = rng.choices(key.models, cum_weights=key.cum_weights)[0] if len(key.models) > 1 else key.models[0]
    key_id = key.key_id if rng.random() > 0.01 else None  # a few rows refused before the key was known
    tier = team.detected_class if rng.random() < DETECTED_SHARE else team.tier
    price_in, price_out, deployments = MODELS[model]
    d = 0 if len(deployments) == 1 else rng.choices(range(len(deployments)), [w for _, w in deployments])[0]
    backend = deployments[d][0]
    suffix, mu, sigma, _ = BACKENDS[backend]
    roll = rng.random()
    stream = rng.random() < 0.45
    prompt = int(rng.lognormvariate(6.2, 1.0)) + 5
    completion = int(rng.lognormvariate(5.0, 0.9))
    latency = rng.lognormvariate(mu, sigma)
    ttft: float | None = latency * rng.uniform(0.08, 0.35) if stream else None
    attempts = 2 if rng.random() < 0.03 else 1
    cost = round(prompt * price_in + completion * price_out)  # $/Mtok is micro-$ per token
    cache_hit, saved, status, http, error = "f", 0, "ok", 200, None
    if roll < 0.02:  # an error after trying: the prompt counted, no completion
        status, (error, http), completion, cost = "error", rng.choice(ERROR_TYPES), 0, 0
        ttft, attempts = None, rng.choice((1, 2, 3))
    elif roll < 0.025:
        status, http, completion = "client_closed", 499, completion // 3
        cost = round(prompt * price_in + completion * price_out)
    elif roll < 0.075:
        cache_hit, saved, cost, latency, attempts = "t", cost, 0, rng.uniform(0.3, 3.0), 0
        ttft = latency if stream else None
    rid = f"{prefix}{rng.getrandbits(96):024x}"
    ttft_text = "\\N" if ttft is None else f"{ttft:.3f}"
    written = (written_at or at + dt.timedelta(milliseconds=latency + 500)).isoformat()  # batched writes
    return (
        f"{rid}\t{at.isoformat()}\t{team.name}\t{_esc(key_id)}\t{model}\t{backend}\t{model}-{suffix}\t"
        f"{prompt}\t{completion}\t{cost}\t{latency:.3f}\t{ttft_text}\t{status}\t{http}\t{_esc(error)}\t"
        f"{'t' if stream else 'f'}\t{cache_hit}\t{tier}\tcheapest eligible: {backend}\t{attempts}\t"
        f"{pop.candidates[model][d]}\t{saved}\t{written}\n"
    )


# ---- loading ---------------------------------------------------------------------------------------------


def _secondary_indexes(conn: sa.Connection) -> list[tuple[str, str]]:
    rows = conn.execute(
        sa.text(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = current_schema() "
            "AND i.tablename = 'usage' AND i.indexname NOT IN (SELECT conname FROM pg_constraint)"
        )
    )
    return [(r[0], r[1]) for r in rows]


def load(engine: Engine, lines: Iterator[str], *, on_rows: Callable[[int], None]) -> tuple[float, float]:
    """COPY the lines into `usage` with secondary indexes dropped, then rebuild them and ANALYZE.
    Returns (copy seconds, index + analyze seconds)."""
    with engine.connect() as conn:
        indexes = _secondary_indexes(conn)
    with engine.begin() as conn:
        for name, _ in indexes:
            conn.exec_driver_sql(f'DROP INDEX "{name}"')
    t0 = time.perf_counter()
    done = 0
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY usage ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            block: list[str] = []
            for line in lines:
                block.append(line)
                if len(block) == 20_000:
                    copy.write("".join(block))
                    done += len(block)
                    block.clear()
                    on_rows(done)
            copy.write("".join(block))
            done += len(block)
    t_copy = time.perf_counter() - t0
    on_rows(done)
    t0 = time.perf_counter()
    with engine.begin() as conn:
        for _, ddl in indexes:
            conn.exec_driver_sql(ddl)
    vacuum_analyze(engine, "usage")
    return t_copy, time.perf_counter() - t0


def vacuum_analyze(engine: Engine, *tables: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"VACUUM ANALYZE {', '.join(tables)}")


# ---- timing ----------------------------------------------------------------------------------------------


@dataclass
class Timings:
    rows: int
    days: int
    load_copy_s: float = 0.0
    load_index_s: float = 0.0
    table_mb: float = 0.0
    rollup_s: float = 0.0
    analyze_s: float = 0.0
    rollup_result: str = ""
    hourly_rows: int = 0
    incremental_rows: int = 0
    incremental_s: float = 0.0
    report_s: dict[str, list[float]] = field(default_factory=dict)
    groups: int = 0
    sums_equal: bool = False
    max_p95_ratio: float = 0.0
    pg_version: str = ""
    shared_buffers: str = ""


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def p95_ratio(a: Report, b: Report, min_requests: int = 1_000) -> float:
    """The largest ratio between the two reports' p95 latencies of the same group (>= 1), over groups of at
    least `min_requests` (in small groups interpolated and nearest-rank percentiles differ by themselves)."""
    theirs = {r.group: r.latency_p95_ms for r in b.rows}
    worst = 1.0
    for r in a.rows:
        other = theirs.get(r.group)
        if r.requests >= min_requests and r.latency_p95_ms and other:
            worst = max(worst, r.latency_p95_ms / other, other / r.latency_p95_ms)
    return worst


def time_reports(engine: Engine, end: dt.datetime, t: Timings, repeats: int, raw_repeats: int) -> None:
    since = end - dt.timedelta(days=REPORT_DAYS)
    dims = (Dimension.TEAM, Dimension.MODEL)
    reports: dict[str, Report] = {}
    for source, n in ((Source.ROLLUP, repeats), (Source.AUTO, repeats), (Source.RAW, raw_repeats)):
        query = ReportQuery(dims, since, end, source=source)
        for _ in range(n):
            elapsed, reports[source.value] = timed(lambda q=query: usage_report(engine, q))
            t.report_s.setdefault(source.value, []).append(elapsed)
            print(f"  report from {source.value}: {elapsed:.3f} s", file=sys.stderr)
    rolled, raw = reports[Source.ROLLUP.value], reports[Source.RAW.value]
    t.groups = len(raw.rows)
    t.sums_equal = all(
        [getattr(a, f) for f in SUMS] == [getattr(b, f) for f in SUMS] and a.group == b.group
        for a, b in zip(rolled.rows, raw.rows, strict=False)
    ) and len(rolled.rows) == len(raw.rows)
    t.sums_equal = t.sums_equal and all(getattr(rolled.totals, f) == getattr(raw.totals, f) for f in SUMS)
    t.max_p95_ratio = p95_ratio(rolled, raw)


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


def run(url: str, rows: int, days: int, repeats: int, raw_repeats: int, seed: int) -> Timings:
    schema = "bench_reports_" + uuid.uuid4().hex[:8]
    hours = days * 24
    end = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=2)
    start = end - dt.timedelta(hours=hours)
    t = Timings(rows, days)
    admin = make_engine(url)
    migrate(url, schema)
    engine = make_engine(url, schema)
    try:
        print(f"loading {rows:,} rows over {days} days into schema {schema} ...", file=sys.stderr)
        step = max(rows // 10, 1)

        def on_rows(done: int) -> None:
            if done % step < 20_000 or done == rows:
                print(f"  {done:,} rows", file=sys.stderr)

        t.load_copy_s, t.load_index_s = load(
            engine, ledger_lines(rows, start, hours, seed, "b"), on_rows=on_rows
        )
        with engine.connect() as conn:
            size = conn.exec_driver_sql("SELECT pg_total_relation_size('usage')").scalar_one()
            t.pg_version = conn.exec_driver_sql("SHOW server_version").scalar_one().split()[0]
            t.shared_buffers = conn.exec_driver_sql("SHOW shared_buffers").scalar_one()
        t.table_mb = size / 2**20
        print(f"  copy {t.load_copy_s:.1f} s, indexes {t.load_index_s:.1f} s", file=sys.stderr)
        rollup = Rollup(engine)
        t.rollup_s, result = timed(rollup.run_once)
        t.rollup_result = str(result)
        t.hourly_rows = _count(engine, "usage_hourly")
        print(f"  full rollup {t.rollup_s:.1f} s: {result}", file=sys.stderr)
        # Autovacuum analyzes the new rollup rows soon after; until then the planner has no statistics
        # and sorts every rollup row of the window on disk. Measure the steady state.
        t.analyze_s, _ = timed(
            lambda: vacuum_analyze(engine, "usage_hourly", "usage_daily", "backend_busy_hourly")
        )
        # An hour's worth of new traffic lands in the last (not yet rolled) hour; the gateway's periodic
        # rollup then folds in only what was written since its watermark.
        t.incremental_rows = max(rows // hours, 1)
        fresh = ledger_lines(t.incremental_rows, end, 1, seed + 99, "n", written_at=dt.datetime.now(dt.UTC))
        _append(engine, fresh)
        t.incremental_s, result = timed(rollup.run_once)
        print(f"  incremental rollup of {t.incremental_rows:,} rows {t.incremental_s:.2f} s: {result}",
              file=sys.stderr)  # fmt: skip
        time_reports(engine, end, t, repeats, raw_repeats)
        return t
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def _append(engine: Engine, lines: Iterator[str]) -> None:
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY usage ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            copy.write("".join(lines))


# ---- the report ----------------------------------------------------------------------------------------


def write_section(path: Path, section: str) -> None:
    """Replace the text between the `bench/reports` markers, or append the section."""
    start, end = "<!-- bench/reports:start -->", "<!-- bench/reports:end -->"
    block = f"{start}\n{section}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (
            text.rstrip("\n") + "\n\n## Usage reports on a large ledger (`bench/reports`)\n\n" + block + "\n"
        )
    path.write_text(text)


def _cell(values: Sequence[float]) -> str:
    return f"**{statistics.median(values):.3f}** ({min(values):.3f}–{max(values):.3f})"


def render(t: Timings, command: str, info: dict[str, str], load_avg: str) -> str:
    median_rollup = statistics.median(t.report_s[Source.ROLLUP.value])
    goal = "met" if median_rollup < GOAL_S else "NOT met"
    raw_over_rollup = statistics.median(t.report_s[Source.RAW.value]) / median_rollup
    verdict = "equal" if t.sums_equal else "DIFFERENT (a bug)"
    lines = [
        f"Measured {info['date']} on {info['nproc']} x {info['cpu']} (Linux {info['kernel']}, Python "
        f"{info['python']}), commit {info['commit']}; PostgreSQL {t.pg_version} on the same machine "
        f"(shared_buffers {t.shared_buffers}); 1-minute load average {load_avg} at the start.",
        "",
        f"Command: `{command}`. {t.rows:,} ledger rows over {t.days} days (in time order, diurnal; 20 teams, "
        "200 keys, 10 models on 5 backends, 4 privacy tiers; ~2% errors, 0.5% client closes, 5% cache hits, "
        f"3% fallbacks), COPYed into a fresh schema: {t.load_copy_s:.0f} s, secondary indexes rebuilt and "
        f"VACUUM ANALYZE {t.load_index_s:.0f} s; `usage` is {t.table_mb:,.0f} MiB with indexes.",
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| full rollup, first run (`Rollup.run_once`: {t.hourly_rows:,} `usage_hourly` rows) "
        f"| {t.rollup_s:.1f} |",
        "| VACUUM ANALYZE of the rollup tables (what autovacuum does soon after; without statistics the "
        f"planner sorts every rollup row of the window on disk) | {t.analyze_s:.1f} |",
        f"| incremental rollup after {t.incremental_rows:,} new rows (one hour's traffic) "
        f"| {t.incremental_s:.2f} |",
        "",
        f"30-day report grouped by team,model ({t.groups} groups); median (min–max) seconds:",
        "",
        "| source | runs | seconds |",
        "|---|---:|---:|",
    ]
    for source, label in (
        (Source.ROLLUP, "rollup (`--source rollup`: hourly rollups, partial hours from raw rows)"),
        (Source.AUTO, "auto (the default: rollups plus raw rows written since the last rollup)"),
        (Source.RAW, "raw (`--source raw`: every ledger row, exact percentiles)"),
    ):
        values = t.report_s[source.value]
        lines.append(f"| {label} | {len(values)} | {_cell(values)} |")
    lines += [
        "",
        "- Sums (requests, tokens, cost, errors, cache hits, savings, fallbacks) from rollups and from raw "
        f"rows: {verdict}. Largest ratio between a group's p95 latency from histograms and the exact one "
        f"(groups of 1,000+ requests): {t.max_p95_ratio:.3f} (histogram bound 1.376, live/histogram.py).",
        f"- Goal: 30-day team x model report from rollups < {GOAL_S:.0f} s: {goal} ({median_rollup:.3f} s); "
        f"from raw rows it takes {raw_over_rollup:,.1f}x as long.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=32, help="days of traffic (>= 31: the report reads 30)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the rollup and auto reports")
    parser.add_argument("--raw-repeats", type=int, default=3, help="runs of the raw report (slow)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--out", type=Path, help="write the section into this markdown file")
    args = parser.parse_args()
    if args.days <= REPORT_DAYS:
        parser.error(f"--days must be more than {REPORT_DAYS}: the report reads the last {REPORT_DAYS}")
    load_avg = f"{os.getloadavg()[0]:.2f}"
    t = run(args.pg_url, args.rows, args.days, args.repeats, args.raw_repeats, args.seed)
    command = "python -m bench.reports " + " ".join(sys.argv[1:])
    section = render(t, command.strip(), machine_info(), load_avg)
    print(section)
    if args.out:
        write_section(args.out, section)
        print(f"wrote {args.out}", file=sys.stderr)
    if not t.sums_equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
