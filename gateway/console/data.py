"""What the console's pages read: the overview's figures (through gateway/reports, in one snapshot), the
per-minute series of the live hour, recent routing decisions from the ledger's route columns, the routing
state's live view of each deployment, and batches with their item counts and files.

Invariant: every reader that can see the ledger takes a `team` (None only for the admin) and filters on it
in SQL, so a team session's figures are its own. Synchronous SQL: run on the report pool or a thread.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.live import histogram
from gateway.live.state import RoutingState
from gateway.reports import Dimension, ReportQuery, ReportRow, Source, sql
from gateway.reports.query import (
    ROLLUP_CHUNK,
    Plan,
    make_plan,
    read_state,
    report_on,
    rollup_pieces,
    snapshot,
)
from gateway.reports.runner import Guard
from gateway.reports.sql import GroupKey
from gateway.store.db import batch_items, batches, files, usage

MINUTE_SERIES_MAX = dt.timedelta(hours=3)  # up to this span the chart has one column per minute
HOURLY_SERIES_MAX = dt.timedelta(days=3)  # then per hour; longer: per day


@dataclass(frozen=True, slots=True)
class Overview:
    totals: ReportRow
    by_backend: tuple[ReportRow, ...]
    by_team: tuple[ReportRow, ...]
    series: tuple[tuple[str, int, int], ...]  # (bucket, requests, errors)
    series_unit: str  # minute | hour | day
    source: str  # what the figures were read from: raw | rollup | mixed


def overview(
    engine: Engine, since: dt.datetime, until: dt.datetime, team: str | None, guard: Guard
) -> Overview:
    """Up to MINUTE_SERIES_MAX (the live hour): raw rows, exact percentiles. Longer: one pass over the hourly
    rollups (plus raw rows for the partial hours at the ends) grouped by team and backend, folded here into
    totals, per-team and per-backend rows, and a second that sums only requests and errors per hour or day
    for the chart (thousands of groups of ~100 histogram sums would spill PostgreSQL's hash aggregate to
    disk). It may lag by one rollup run, as `switchboard report --source rollup` does; its percentiles come
    from merged histograms."""
    with snapshot(engine, guard) as conn:
        state = read_state(conn)
        if until - since > MINUTE_SERIES_MAX and state is not None:
            unit = Dimension.HOUR if until - since <= HOURLY_SERIES_MAX else Dimension.DAY
            query = ReportQuery((Dimension.TEAM, Dimension.BACKEND), since, until, team, source=Source.ROLLUP)
            plan = make_plan(conn, query, state)
            if not plan.exact:
                series = _series(conn, query, plan, unit)
                return _folded(_vectors(conn, query, plan, guard), series, str(unit))
        return _exact(conn, since, until, team, guard)


def _exact(
    conn: Connection, since: dt.datetime, until: dt.datetime, team: str | None, guard: Guard
) -> Overview:
    def grouped(*dims: Dimension) -> Any:
        return report_on(conn, ReportQuery(dims, since, until, team=team), _step(guard))

    by_backend, by_team = grouped(Dimension.BACKEND), grouped(Dimension.TEAM)
    if until - since <= MINUTE_SERIES_MAX:
        series, unit = minute_series(conn, since, until, team), "minute"
    else:  # no rollups yet: a long window from raw rows
        unit = "hour" if until - since <= HOURLY_SERIES_MAX else "day"
        timed = grouped(Dimension.HOUR if unit == "hour" else Dimension.DAY)
        series = [(str(r.group[0]), r.requests, r.errors) for r in timed.rows]
    by_cost = sorted(by_backend.rows, key=lambda r: -r.cost_micro_usd)
    teams = sorted(by_team.rows, key=lambda r: -r.cost_micro_usd)
    return Overview(by_backend.totals, tuple(by_cost), tuple(teams), tuple(series), unit, by_backend.source)


def _step(guard: Guard) -> Any:
    def step(_done: int, _total: int) -> None:
        guard.check()

    return step


def _series(conn: Connection, query: ReportQuery, plan: Plan, unit: Dimension) -> list[tuple[str, int, int]]:
    """Requests and errors per hour or day: the plan's rollup hours (whole days from usage_daily), then its
    raw rows."""
    assert plan.rollup_start is not None and plan.rollup_end is not None  # the overview's window is bounded
    counts: dict[str, list[int]] = {}
    for table, start, end in rollup_pieces(plan.rollup_start, plan.rollup_end, plan.rollup_skip, (unit,)):
        h = table.c
        at = sql.rollup_group_values((unit,), conn.dialect.name, table)[0].label("g0")
        where = [h.hour >= start, h.hour < end, *sql.rollup_filters(query, table)]
        skip = [s for s in plan.rollup_skip if start <= s < end]
        if skip:
            where.append(h.hour.not_in(skip))
        stmt = sa.select(at, sa.func.sum(h.requests), sa.func.sum(h.errors)).where(*where)
        for bucket, n, e in conn.execute(stmt.group_by(sa.literal_column("g0"))):
            have = counts.setdefault(bucket, [0, 0])
            have[0], have[1] = have[0] + int(n or 0), have[1] + int(e or 0)
    if plan.raw_where is not None:
        raw = sql.raw_sum_vectors(conn, (unit,), sql.raw_filters(query, plan.raw_where))
        for (bucket,), vector in raw.items():
            have = counts.setdefault(bucket, [0, 0])
            have[0], have[1] = have[0] + vector[0], have[1] + vector[1]
    return [(b, n, e) for b, (n, e) in sorted(counts.items()) if n]


def _vectors(conn: Connection, query: ReportQuery, plan: Plan, guard: Guard) -> dict[GroupKey, list[int]]:
    """Sums and latency/TTFT histograms per (team, backend): rollup hours, then raw rows."""
    out: dict[GroupKey, list[int]] = {}
    start, end = plan.rollup_start, plan.rollup_end
    assert start is not None and end is not None  # the overview's window is bounded
    while start < end:
        guard.check()
        chunk_end = min(end, start + ROLLUP_CHUNK)
        for table, a, b in rollup_pieces(start, chunk_end, plan.rollup_skip, query.group_by):
            _add(out, sql.rollup_histograms(conn, query.group_by, (a, b), plan.rollup_skip, query, table))
        start += ROLLUP_CHUNK
    if plan.raw_where is not None:
        guard.check()
        _add(out, sql.raw_histograms(conn, query.group_by, sql.raw_filters(query, plan.raw_where)))
    return out


def _add(into: dict[GroupKey, list[int]], part: dict[GroupKey, list[int]]) -> None:
    for key, vector in part.items():
        have = into.get(key)
        into[key] = vector if have is None else [a + b for a, b in zip(have, vector, strict=True)]


def _folded(vectors: dict[GroupKey, list[int]], series: list[tuple[str, int, int]], unit: str) -> Overview:
    total = [0] * sql.HIST_WIDTH
    teams: dict[GroupKey, list[int]] = {}
    backends: dict[GroupKey, list[int]] = {}
    for (team, backend), vector in vectors.items():
        total = [a + b for a, b in zip(total, vector, strict=True)]
        _add(teams, {(team,): vector})
        _add(backends, {(backend,): vector})

    def rows(groups: dict[GroupKey, list[int]]) -> tuple[ReportRow, ...]:
        return tuple(sorted((_row(k, v) for k, v in groups.items()), key=lambda r: -r.cost_micro_usd))

    return Overview(_row((), total), rows(backends), rows(teams), tuple(series), unit, "rollup")


def _row(key: GroupKey, v: list[int]) -> ReportRow:
    """A group's row from its vector (sums in SUM_FIELDS order, then latency and TTFT bucket counts)."""
    n = len(sql.SUM_FIELDS)
    lat, ttft = v[n : n + histogram.BUCKETS], v[n + histogram.BUCKETS :]
    p = [histogram.quantile(counts, q) for counts in (lat, ttft) for q in sql.QUANTILES]
    return ReportRow(tuple(k or None for k in key), *v[:9], *p)


def minute_series(
    conn: Connection, since: dt.datetime, until: dt.datetime, team: str | None
) -> list[tuple[str, int, int]]:
    """Requests and errors per UTC minute in [since, until), from raw rows (a short window only)."""
    u = usage.c
    if conn.dialect.name == "postgresql":
        minute: Any = sa.func.to_char(
            sa.func.date_trunc("minute", sa.func.timezone("UTC", u.created_at)), "HH24:MI"
        )
    else:
        minute = sa.func.strftime("%H:%M", u.created_at)
    errors = sa.func.sum(sa.case((u.status == "error", 1), else_=0))
    stmt = sa.select(minute.label("m"), sa.func.count(), errors).where(
        u.created_at >= since, u.created_at < until
    )
    if team is not None:
        stmt = stmt.where(u.team == team)
    found = {m: (int(n), int(e or 0)) for m, n, e in conn.execute(stmt.group_by("m"))}
    out, at = [], since.replace(second=0, microsecond=0)
    while at < until:
        label = at.strftime("%H:%M")
        n, e = found.get(label, (0, 0))
        out.append((label, n, e))
        at += dt.timedelta(minutes=1)
    return out


def recent_decisions(engine: Engine, limit: int, team: str | None = None) -> list[dict[str, Any]]:
    """The newest ledger rows with their routing decision: reason, ranked candidates with score terms."""
    u = usage.c
    cols = (
        u.request_id, u.created_at, u.team, u.key_id, u.requested_model, u.backend, u.status, u.http_status,
        u.latency_ms, u.ttft_ms, u.privacy_class, u.route_reason, u.route_candidates, u.attempts,
        u.cost_micro_usd, u.endpoint,
    )  # fmt: skip
    stmt = sa.select(*cols).order_by(u.created_at.desc()).limit(limit)
    if team is not None:
        stmt = stmt.where(u.team == team)
    with engine.connect() as conn:
        rows = [_plain(r) for r in conn.execute(stmt).mappings()]
    for row in rows:
        row["candidates"] = _candidates(row.pop("route_candidates"))
    return rows


def _plain(row: Any) -> dict[str, Any]:
    """A row as a dict with plain `str` keys (SQLAlchemy's are a str subclass that orjson refuses)."""
    return {str(k): v for k, v in row.items()}


def _candidates(text: str | None) -> list[dict[str, Any]]:
    if not text:
        return []
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return []
    return [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []


def deployments(routing: RoutingState, now_s: float) -> list[dict[str, Any]]:
    """Each deployment as routing sees it now: health, circuit breaker, live latency and load."""
    out = []
    for dep_id, (spec, stats) in sorted(routing.snapshot(now_s).deployments.items()):
        open_until = stats.circuit_open_until_s
        if open_until is None or open_until <= now_s:
            breaker = "closed"
        else:
            breaker = "open" if math.isinf(open_until) else f"open ({open_until - now_s:.0f} s left)"
        out.append(
            {
                "deployment": dep_id,
                "model": spec.public_model,
                "backend": spec.backend,
                "kind": str(spec.backend_kind),
                "privacy": str(spec.privacy_tier),
                "healthy": stats.healthy,
                "breaker": breaker,
                "p50_latency_ms": stats.p50_latency_ms or None,
                "p95_latency_ms": stats.p95_latency_ms or None,
                "ttft_ms": stats.ttft_ms,
                "tokens_per_s": round(stats.decode_tokens_per_s, 1),
                "error_rate": stats.error_rate,
                "in_flight": stats.in_flight,
                "queue_depth": stats.queue_depth,
                "kv_used_frac": stats.kv_cache_used_frac,
                "samples": stats.sample_count,
            }
        )
    return out


def recent_batches(engine: Engine, limit: int, team: str | None = None) -> list[dict[str, Any]]:
    """The newest batches with their items' counts by state and their files' names and sizes."""
    b = batches.c
    stmt = sa.select(
        b.id, b.team, b.endpoint, b.status, b.created_at, b.expires_at, b.completed_at,
        b.input_file_id, b.output_file_id, b.error_file_id,
    ).order_by(b.created_at.desc()).limit(limit)  # fmt: skip
    if team is not None:
        stmt = stmt.where(b.team == team)
    with engine.connect() as conn:
        rows = [_plain(r) for r in conn.execute(stmt).mappings()]
        ids = [r["id"] for r in rows]
        counts = _item_counts(conn, ids)
        file_ids = {r[k] for r in rows for k in ("input_file_id", "output_file_id", "error_file_id") if r[k]}
        named = _files(conn, sorted(file_ids))
    for row in rows:
        row["counts"] = counts.get(row["id"], {})
        total = sum(row["counts"].values())
        finished = sum(row["counts"].get(s, 0) for s in ("done", "failed", "cancelled"))
        row["total"], row["progress"] = total, (finished / total if total else 0.0)
        row["files"] = {k: named.get(row[k]) for k in ("input_file_id", "output_file_id", "error_file_id")}
    return rows


def _item_counts(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, int]]:
    if not ids:
        return {}
    i = batch_items.c
    stmt = sa.select(i.batch_id, i.state, sa.func.count()).where(i.batch_id.in_(ids))
    out: dict[str, dict[str, int]] = {}
    for batch_id, state, n in conn.execute(stmt.group_by(i.batch_id, i.state)):
        out.setdefault(batch_id, {})[state] = int(n)
    return out


def _files(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    if not ids:
        return {}
    f = files.c
    stmt = sa.select(f.id, f.filename, f.bytes, f.lines).where(f.id.in_(ids))
    return {
        r.id: {"id": r.id, "filename": r.filename, "bytes": r.bytes, "lines": r.lines}
        for r in conn.execute(stmt)
    }
