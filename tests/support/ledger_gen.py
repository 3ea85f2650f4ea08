"""A deterministic generator of `usage` ledger rows and a pure-Python reference of what reports must say.

`generate_rows(spec)` yields row dicts (the shape `store.ledger.insert_usage_rows` takes); the same spec
always yields the same rows. `aggregate(rows, ...)` computes, independently of the report's SQL, the exact
sums per group and the continuous percentiles (`percentile_cont`: linear interpolation between the two
closest ranks, as PostgreSQL computes it). Rows cover every dimension's awkward cases: no key, no backend,
no or empty privacy class, several endpoints, rows exactly on hour boundaries, tied latencies, NULL TTFTs,
cache hits and fallbacks. `insert_rows` loads them, each with its own `written_at`, in batches (COPY on
PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store.db import usage

Row = dict[str, Any]
GroupKey = tuple[str | None, ...]
START = dt.datetime(2030, 3, 1, tzinfo=dt.UTC)
USAGE_COLUMNS = (
    "request_id", "created_at", "team", "key_id", "requested_model", "backend", "served_model",
    "prompt_tokens", "completion_tokens", "cost_micro_usd", "latency_ms", "ttft_ms", "status", "http_status",
    "error_type", "stream", "cache_hit", "privacy_class", "route_reason", "attempts", "route_candidates",
    "cost_saved_micro_usd", "written_at", "endpoint", "batch_id", "owned_micro_usd",
)  # fmt: skip
WRITE_DELAY = dt.timedelta(seconds=1.5)  # written_at - created_at of generated rows
SUM_FIELDS = (
    "requests", "errors", "client_closed", "prompt_tokens", "completion_tokens", "cost_micro_usd",
    "cache_hits", "cost_saved_micro_usd", "fallbacks", "owned_micro_usd",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LedgerSpec:
    rows: int = 3_000
    start: dt.datetime = START
    hours: int = 54  # rows fall in [start, start + hours); crosses two UTC midnights
    seed: int = 7
    teams: tuple[str, ...] = ("research", "support", "ops")
    keys_per_team: int = 2
    models: tuple[str, ...] = ("smollm2", "gpt-4o-mini", "claude-haiku")
    backends: tuple[str, ...] = ("gpu0", "cloud", "edge1")
    privacy_classes: tuple[str | None, ...] = (
        None, "", "internal", "internal:email", "external", "edge:phone,email", "external_zdr:iban",
    )  # fmt: skip
    # The first is the usual one: correlated specs send 90% of requests there.
    endpoints: tuple[str, ...] = ("chat.completions", "completions", "embeddings", "messages", "responses")
    prefix: str = "gen"  # request ids: f"{prefix}-{seed}-{i:09d}"
    # False: every key, model, backend and privacy class mixes freely (most groups; the tests' worst case).
    # True: like real traffic, a key mostly uses one model, a model one backend, a team one privacy class.
    correlated: bool = False


# The reports benchmark: 10M rows over 30 days, shaped like real traffic.
BENCH_SPEC = LedgerSpec(
    rows=10_000_000,
    hours=720,
    teams=tuple(f"team{i}" for i in range(8)),
    keys_per_team=4,
    models=("smollm2", "llama-8b", "gpt-4o-mini", "gpt-4o", "claude-haiku"),
    backends=("gpu0", "gpu1", "cloud"),
    correlated=True,
    prefix="bench",
)


def generate_rows(spec: LedgerSpec = LedgerSpec()) -> Iterator[Row]:
    rng = random.Random(spec.seed)
    span_us = spec.hours * 3_600_000_000
    for i in range(spec.rows):
        yield _row(rng, spec, i, span_us)


def _row(rng: random.Random, spec: LedgerSpec, i: int, span_us: int) -> Row:
    # Rows come in time order, give or take a minute, as a ledger is written; every 97th lies exactly on an
    # hour boundary (it belongs to the hour that starts there).
    offset_us = min(span_us - 1, max(0, span_us * i // spec.rows + rng.randrange(-60_000_000, 60_000_000)))
    if i % 97 == 0:
        offset_us -= offset_us % 3_600_000_000
    team = rng.choice(spec.teams)
    key = rng.randrange(spec.keys_per_team)
    key_id = None if rng.random() < 0.05 else f"k-{team}-{key}"
    roll = rng.random()
    status, http = ("ok", 200) if roll < 0.82 else ("error", 502) if roll < 0.94 else ("client_closed", 499)
    model, backend, privacy = _placement(rng, spec, spec.teams.index(team), key)
    backend = None if status == "error" and rng.random() < 0.3 else backend
    cache_hit = status == "ok" and rng.random() < 0.08
    stream = rng.random() < 0.5
    prompt = rng.randrange(1, 4_000) if status != "error" else rng.choice((0, 0, 17))
    completion = rng.randrange(0, 1_500) if status == "ok" else 0
    cost = 0 if cache_hit or backend == "gpu0" else prompt * 3 + completion * 11
    latency = 250.0 if rng.random() < 0.03 else round(rng.lognormvariate(5.8, 1.1), 3)  # ties at 250 ms
    ttft = round(latency * rng.uniform(0.05, 0.6), 3) if stream and status != "error" else None
    created_at = spec.start + dt.timedelta(microseconds=offset_us)
    endpoint = spec.endpoints[0] if spec.correlated and rng.random() < 0.9 else rng.choice(spec.endpoints)
    return {
        "request_id": f"{spec.prefix}-{spec.seed}-{i:09d}",
        "created_at": created_at,
        "team": team,
        "key_id": key_id,
        "requested_model": model,
        "backend": backend,
        "served_model": None if backend is None else f"{backend}-model",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_micro_usd": cost,
        "latency_ms": 0.5 if cache_hit else latency,
        "ttft_ms": (0.5 if stream else None) if cache_hit else ttft,
        "status": status,
        "http_status": http,
        "error_type": "upstream_unavailable" if status == "error" else None,
        "stream": stream,
        "cache_hit": cache_hit,
        "privacy_class": privacy,
        "route_reason": "generated",
        "attempts": 0 if cache_hit else rng.choice((1, 1, 1, 1, 2, 3)),
        "route_candidates": None,
        "cost_saved_micro_usd": prompt * 3 + completion * 11 if cache_hit else 0,
        "written_at": created_at + WRITE_DELAY,
        "endpoint": endpoint,
        "owned_micro_usd": 0 if cache_hit or cost else int(latency * 7) % 997,  # owned: no cloud cost
        "batch_id": _batch_of(i, spec.rows),
    }


def _batch_of(i: int, rows: int) -> str | None:
    """Every fifth row belongs to one of four batches, each spanning a quarter of the window (so batches
    cross hours and days); drawn from the index, not the random stream, so the other columns stay put."""
    if i % 5:
        return None
    return f"batch_{4 * i // rows:032x}"


def _placement(rng: random.Random, spec: LedgerSpec, team: int, key: int) -> tuple[str, str, str | None]:
    """(model, backend, privacy class) of a request of key number `key` of team number `team`."""
    if not spec.correlated:
        return rng.choice(spec.models), rng.choice(spec.backends), rng.choice(spec.privacy_classes)
    m = (
        (team * spec.keys_per_team + key) % len(spec.models)
        if rng.random() < 0.9
        else rng.randrange(len(spec.models))
    )
    backend = spec.backends[m % len(spec.backends)] if rng.random() < 0.95 else rng.choice(spec.backends)
    privacy = spec.privacy_classes[team % len(spec.privacy_classes)] if rng.random() < 0.9 else None
    return spec.models[m], backend, privacy


# ---- the reference: what every report must say ----------------------------------------------------------


def group_value(row: Row, dim: str) -> str | None:
    """A row's value of one report dimension, defined independently of the report's SQL."""
    at: dt.datetime = row["created_at"].astimezone(dt.UTC)
    if dim == "day":
        return at.strftime("%Y-%m-%d")
    if dim == "hour":
        return at.strftime("%Y-%m-%dT%H:00Z")
    if dim == "privacy":
        return (row["privacy_class"] or "").split(":", 1)[0] or None
    if dim == "batch":
        return row.get("batch_id") or "interactive"
    names = {"team": "team", "key": "key_id", "model": "requested_model", "backend": "backend"}
    column = {**names, "endpoint": "endpoint"}[dim]
    return row[column] or None


@dataclass(slots=True)
class Expected:
    """One group's exact figures, and the values its percentiles rank."""

    requests: int = 0
    errors: int = 0
    client_closed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micro_usd: int = 0
    cache_hits: int = 0
    cost_saved_micro_usd: int = 0
    fallbacks: int = 0
    owned_micro_usd: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    ttfts_ms: list[float] = field(default_factory=list)

    def add(self, row: Row, keep_values: bool) -> None:
        self.requests += 1
        self.errors += row["status"] == "error"
        self.client_closed += row["status"] == "client_closed"
        self.prompt_tokens += row["prompt_tokens"]
        self.completion_tokens += row["completion_tokens"]
        self.cost_micro_usd += row["cost_micro_usd"]
        self.cache_hits += bool(row["cache_hit"])
        self.cost_saved_micro_usd += row["cost_saved_micro_usd"]
        self.fallbacks += row["attempts"] > 1
        self.owned_micro_usd += row["owned_micro_usd"]
        if keep_values:
            self.latencies_ms.append(row["latency_ms"])
            if row["ttft_ms"] is not None:
                self.ttfts_ms.append(row["ttft_ms"])

    def sums(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in SUM_FIELDS}


def row_filter(
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    team: str | None = None,
    model: str | None = None,
    endpoint: str | None = None,
    batch: str | None = None,
) -> Callable[[Row], bool]:
    def batch_kept(row: Row) -> bool:
        if batch is None:
            return True
        if batch == "batch":
            return row.get("batch_id") is not None
        return (row.get("batch_id") or "interactive") == batch

    def keep(row: Row) -> bool:
        at = row["created_at"]
        return (
            (since is None or at >= since)
            and (until is None or at < until)
            and (team is None or row["team"] == team)
            and (model is None or row["requested_model"] == model)
            and (endpoint is None or row["endpoint"] == endpoint)
            and batch_kept(row)
        )

    return keep


def aggregate(
    rows: Iterable[Row],
    group_by: Sequence[str],
    *,
    keep: Callable[[Row], bool] = lambda _row: True,
    keep_values: bool = True,
) -> dict[GroupKey, Expected]:
    """Exact figures per group of the rows `keep` accepts; `keep_values=False` skips the percentile inputs
    (for millions of rows)."""
    groups: dict[GroupKey, Expected] = {}
    for row in rows:
        if keep(row):
            key = tuple(group_value(row, d) for d in group_by)
            groups.setdefault(key, Expected()).add(row, keep_values)
    return groups


def percentile_cont(values: Sequence[float], q: float) -> float | None:
    """PostgreSQL's percentile_cont: rank q*(n-1) in the sorted values, linear between its neighbours."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    lo = math.floor(position)
    hi = math.ceil(position)
    if hi == lo:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


# ---- loading ---------------------------------------------------------------------------------------------


def insert_rows(engine: Engine, rows: Iterable[Row], *, batch: int = 20_000) -> int:
    """Insert rows in batches; PostgreSQL uses COPY (about 10x faster than INSERT for millions). Returns the
    number of rows inserted."""
    done = 0
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= batch:
            done += _insert_chunk(engine, chunk)
            chunk = []
    if chunk:
        done += _insert_chunk(engine, chunk)
    return done


def _insert_chunk(engine: Engine, chunk: list[Row]) -> int:
    """Rows keep their own `written_at` (`gateway.store.ledger.insert_usage_rows` would stamp one for all)."""
    if engine.dialect.name != "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.insert(usage), chunk)
        return len(chunk)
    columns = ", ".join(USAGE_COLUMNS)
    with engine.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY usage ({columns}) FROM STDIN") as copy:
            for row in chunk:
                copy.write_row(
                    tuple(row.get(c, 0) if c == "owned_micro_usd" else row.get(c) for c in USAGE_COLUMNS)
                )
    return len(chunk)
