"""`usage_report`: a `ReportQuery` answered from raw ledger rows, hourly rollups, or both; sums always exact.

RAW reads `usage` rows in [since, until): exact percentiles. ROLLUP reads `usage_hourly` for the window's
whole UTC hours and raw rows for a partial hour at either end (if not pruned); it may lag by a rollup run.
AUTO reads raw rows alone when no rollup has run, or when the window's rows are not pruned and it is at most
RAW_ONLY_MAX_SPAN long or starts after watermark - PENDING_MARGIN. Otherwise ROLLUP, but hours holding rows
written after watermark - PENDING_MARGIN come from raw rows instead, plus late raw rows of pruned hours:
each row counts exactly once. Rollup percentiles come from merged histograms (error: live/histogram.py).
All statements see one snapshot, so a concurrent rollup can neither double-count nor drop rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from gateway.live import histogram
from gateway.reports import sql
from gateway.reports.model import Dimension, Report, ReportQuery, ReportRow, Source
from gateway.reports.runner import Guard
from gateway.store.daily import DAY, ceil_day, floor_day
from gateway.store.db import (
    rollup_state,
    usage,
    usage_daily,
    usage_daily_coarse,
    usage_hourly,
    usage_hourly_coarse,
)

RAW_ONLY_MAX_SPAN = dt.timedelta(hours=24)  # AUTO reads shorter windows from raw rows: exact percentiles
# Rows written later than watermark - PENDING_MARGIN may be missing from their hour's rollup; it must be at
# least gateway.store.rollups.Rollup's margin_s (300 s by default), which covers writers' commit delay.
PENDING_MARGIN = dt.timedelta(hours=1)
HOUR_FORMAT = "%Y-%m-%dT%H:00Z"
ROLLUP_CHUNK = dt.timedelta(days=31)  # rollup hours read per statement (one progress step each)
ROLLUP_JOB = "usage"  # rollup_state.name of the usage rollup (gateway/store/rollups.py)
HOUR = dt.timedelta(hours=1)
_COARSE_DIMS = frozenset(
    (Dimension.TEAM, Dimension.MODEL, Dimension.BACKEND, Dimension.ENDPOINT, Dimension.DAY, Dimension.HOUR)
)
REPORT_WORK_MEM = "64MB"  # PostgreSQL, per sort/hash node of a report's statements
Progress = Callable[[int, int], None]
_N_SUMS = len(sql.SUM_FIELDS)
_LAT = slice(_N_SUMS, _N_SUMS + histogram.BUCKETS)
_TTFT = slice(_N_SUMS + histogram.BUCKETS, sql.HIST_WIDTH)


@dataclass(frozen=True, slots=True)
class RollupState:
    watermark: dt.datetime  # rows written up to watermark - the rollup's margin are in the rollups
    pruned_before: dt.datetime | None  # raw rows created before it are exactly those not yet rolled up


@dataclass(frozen=True, slots=True)
class Plan:
    """How to answer: raw alone (exact percentiles), or rollup hours plus some raw rows (`raw_where`)."""

    exact: bool
    rollup_start: dt.datetime | None = None  # whole-hour range [start, end) read from usage_hourly ...
    rollup_end: dt.datetime | None = None
    rollup_skip: tuple[dt.datetime, ...] = ()  # ... except these hours, read from raw rows instead
    raw_where: ColumnElement[bool] | None = None  # raw rows added to the rollups; None: none


def floor_hour(at: dt.datetime) -> dt.datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def ceil_hour(at: dt.datetime) -> dt.datetime:
    floor = floor_hour(at)
    return floor if floor == at else floor + HOUR


def usage_report(
    engine: Engine, query: ReportQuery, *, progress: Progress | None = None, guard: Guard | None = None
) -> Report:
    """The report for `query`; `progress(done, total)` is called after each statement (rollups are read
    ROLLUP_CHUNK at a time). Synchronous: run it on `ReportRunner` (or a thread) from the event loop;
    `guard` stops it between statements and inside one."""
    with snapshot(engine, guard) as conn:
        return report_on(conn, query, _checked(progress or no_progress, guard))


def _checked(progress: Progress, guard: Guard | None) -> Progress:
    if guard is None:
        return progress

    def step(done: int, total: int) -> None:
        guard.check()
        progress(done, total)

    return step


def report_on(conn: Connection, query: ReportQuery, progress: Progress, plan: Plan | None = None) -> Report:
    """`usage_report` on an open connection (savings read it in the same snapshot as their own figures, and
    pass the `plan` their cache hits are read by)."""
    plan = make_plan(conn, query, read_state(conn)) if plan is None else plan
    if plan.exact:
        return _exact_report(conn, query, progress)
    return _merged_report(conn, query, plan, progress)


@contextmanager
def snapshot(engine: Engine, guard: Guard | None = None) -> Iterator[Connection]:
    """A read-only connection that sees one snapshot for all its statements (bounded by `guard`)."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
            # JIT-compiling ~100 aggregates takes longer than running them over a month of rollups, and
            # hashing thousands of groups of ~100 sums needs more than the default 4 MB to stay in memory.
            conn.exec_driver_sql("SET LOCAL jit = off")
            conn.exec_driver_sql(f"SET LOCAL work_mem = '{REPORT_WORK_MEM}'")
        elif conn.dialect.name == "sqlite":
            # pysqlite opens no transaction for SELECTs; in WAL mode BEGIN holds one read snapshot.
            conn.exec_driver_sql("BEGIN")
        if guard is not None:
            guard.arm(conn)
        try:
            yield conn
        finally:
            if guard is not None:
                guard.disarm(conn)
            conn.rollback()


def read_state(conn: Connection) -> RollupState | None:
    state = rollup_state.c
    query = sa.select(state.watermark, state.pruned_before).where(state.name == ROLLUP_JOB)
    row = conn.execute(query).first()
    return None if row is None else RollupState(row.watermark, row.pruned_before)


def make_plan(conn: Connection, query: ReportQuery, state: RollupState | None) -> Plan:
    """The rule of the module docstring: what AUTO and ROLLUP read."""
    since, until = query.since, query.until
    if query.source is Source.RAW or (query.source is Source.AUTO and raw_suffices(query, state)):
        return Plan(exact=True)
    start = None if since is None else ceil_hour(since)
    end = None if until is None else floor_hour(until)
    if start is not None and end is not None and start >= end:
        return Plan(exact=True)  # no whole hour inside the window: rollups cannot help
    parts = []
    if since is not None and start != since:
        parts.append(sa.and_(usage.c.created_at >= since, usage.c.created_at < start))
    if until is not None and end != until:
        parts.append(sa.and_(usage.c.created_at >= end, usage.c.created_at < until))
    skip: tuple[dt.datetime, ...] = ()
    if query.source is Source.AUTO and state is not None:
        pruned = state.pruned_before
        if pruned is not None and (start is None or start < pruned):
            late_end = pruned if end is None else min(end, pruned)  # late rows: in no rollup yet
            parts.append(sa.and_(*created_between(start, late_end)))
        skip = _pending_hours(conn, state, start, end)
        parts += [sa.and_(*created_between(a, b)) for a, b in _ranges(skip)]
    return Plan(False, start, end, skip, sa.or_(*parts) if parts else None)


def raw_suffices(query: ReportQuery, state: RollupState | None) -> bool:
    if state is None:
        return True
    since, until = query.since, query.until
    if since is None or (state.pruned_before is not None and since < state.pruned_before):
        return False
    if since >= state.watermark - PENDING_MARGIN:
        return True
    return until is not None and until - since <= RAW_ONLY_MAX_SPAN


def _pending_hours(
    conn: Connection, state: RollupState, start: dt.datetime | None, end: dt.datetime | None
) -> tuple[dt.datetime, ...]:
    """Hours (not pruned) holding rows that may be written after the last rollup saw their hour: rows
    written after watermark - PENDING_MARGIN (NULL written_at: created_at, as the rollup takes it)."""
    cutoff = state.watermark - PENDING_MARGIN
    u = usage.c
    pending = sa.or_(u.written_at > cutoff, sa.and_(u.written_at.is_(None), u.created_at > cutoff))
    lower = state.pruned_before if start is None else max(start, state.pruned_before or start)
    hour = sql.time_text(u.created_at, Dimension.HOUR, conn.dialect.name)
    stmt = sa.select(hour).where(pending, *created_between(lower, end)).distinct()
    found = (dt.datetime.strptime(h, HOUR_FORMAT).replace(tzinfo=dt.UTC) for (h,) in conn.execute(stmt))
    return tuple(sorted(found))


def _ranges(hours: Sequence[dt.datetime]) -> list[tuple[dt.datetime, dt.datetime]]:
    """Sorted hours as [start, end) runs of consecutive hours."""
    out: list[tuple[dt.datetime, dt.datetime]] = []
    for hour in hours:
        if out and out[-1][1] == hour:
            out[-1] = (out[-1][0], hour + HOUR)
        else:
            out.append((hour, hour + HOUR))
    return out


def created_between(start: dt.datetime | None, end: dt.datetime | None) -> list[ColumnElement[bool]]:
    """usage.created_at in [start, end); None: unbounded."""
    out = []
    if start is not None:
        out.append(usage.c.created_at >= start)
    if end is not None:
        out.append(usage.c.created_at < end)
    return out


def no_progress(_done: int, _total: int) -> None:
    return None


def _exact_report(conn: Connection, query: ReportQuery, progress: Progress) -> Report:
    where = sa.and_(*created_between(query.since, query.until)) if query.since or query.until else None
    filters = sql.raw_filters(query, where)
    steps = 2 if query.group_by else 1
    progress(0, steps)
    groups = sql.raw_exact(conn, query.group_by, filters)
    progress(1, steps)
    totals = sql.raw_exact(conn, (), filters) if query.group_by else groups
    progress(steps, steps)
    rows = [_exact_row(key, sums, pcts) for key, (sums, pcts) in groups.items()]
    total_sums, total_pcts = totals.get((), ([0] * _N_SUMS, [None] * 4))
    return Report(
        query=query,
        rows=_sorted(rows),
        totals=_exact_row((), total_sums, total_pcts),
        source=Source.RAW.value,
        percentiles_exact=True,
    )


def _merged_report(conn: Connection, query: ReportQuery, plan: Plan, progress: Progress) -> Report:
    chunks = rollup_chunks(conn, plan.rollup_start, plan.rollup_end)
    steps = len(chunks) + (plan.raw_where is not None)
    progress(0, steps)
    merged: dict[sql.GroupKey, list[int]] = {}
    rollup_requests = raw_requests = 0
    tables = rollup_tables(query.group_by, query)
    for done, (start, end) in enumerate(chunks, start=1):
        for table, a, b in rollup_pieces(start, end, plan.rollup_skip, query.group_by, tables):
            part = sql.rollup_histograms(conn, query.group_by, (a, b), plan.rollup_skip, query, table)
            rollup_requests += _merge(merged, part)
        progress(done, steps)
    if plan.raw_where is not None:
        filters = sql.raw_filters(query, plan.raw_where)
        raw_requests = _merge(merged, sql.raw_histograms(conn, query.group_by, filters))
        progress(steps, steps)
    total = [0] * sql.HIST_WIDTH
    for vector in merged.values():
        total = [a + b for a, b in zip(total, vector, strict=True)]
    source = "mixed" if rollup_requests and raw_requests else "raw" if raw_requests else "rollup"
    return Report(
        query=query,
        rows=_sorted([_hist_row(key, v) for key, v in merged.items()]),
        totals=_hist_row((), total),
        source=source,
        percentiles_exact=False,
    )


def rollup_chunks(
    conn: Connection, start: dt.datetime | None, end: dt.datetime | None
) -> list[tuple[dt.datetime, dt.datetime]]:
    """[start, end) cut into ROLLUP_CHUNK pieces, within the rollups' first and last hour: a window that
    opens in year 1 reads as many chunks as there are rollups, not one per month since then."""
    hours = usage_hourly.c.hour
    first, last = conn.execute(sa.select(sa.func.min(hours), sa.func.max(hours))).one()
    if first is None:
        return []
    first, last = _aware(first), _aware(last)
    start = first if start is None else max(start, first)
    end = last + HOUR if end is None else min(end, last + HOUR)
    out = []
    while start < end:
        out.append((start, min(end, start + ROLLUP_CHUNK)))
        start += ROLLUP_CHUNK
    return out


def rollup_tables(dims: Sequence[Dimension], query: ReportQuery) -> tuple[sa.Table, sa.Table]:
    """(hourly, daily) rollups to read: the coarse copies (no key_id, privacy or batch_id; ~10x fewer rows)
    when `dims` and `query`'s filters need none of those."""
    if query.batch is None and set(dims) <= _COARSE_DIMS:
        return usage_hourly_coarse, usage_daily_coarse
    return usage_hourly, usage_daily


def rollup_pieces(
    start: dt.datetime,
    end: dt.datetime,
    skip: Sequence[dt.datetime],
    dims: Sequence[Dimension],
    tables: tuple[sa.Table, sa.Table] = (usage_hourly, usage_daily),
) -> list[tuple[sa.Table, dt.datetime, dt.datetime]]:
    """The rollup hours [start, end) as reads: whole UTC days holding no `skip` hour from the daily table
    (the same sums, ~24x fewer rows), the rest from the hourly one (whose reader leaves `skip` out); all
    hourly when the report groups by hour. `tables`: (hourly, daily), see `rollup_tables`."""
    hourly, daily = tables
    first, last = ceil_day(start), floor_day(end)
    if Dimension.HOUR in dims or first >= last:
        return [(hourly, start, end)]
    skipped = {floor_day(s) for s in skip}
    out: list[tuple[sa.Table, dt.datetime, dt.datetime]] = []

    def add(table: sa.Table, a: dt.datetime, b: dt.datetime) -> None:
        if a >= b:
            return
        if out and out[-1][0] is table and out[-1][2] == a:
            out[-1] = (table, out[-1][1], b)
        else:
            out.append((table, a, b))

    add(hourly, start, first)
    day = first
    while day < last:
        add(hourly if day in skipped else daily, day, day + DAY)
        day += DAY
    add(hourly, last, end)
    return out


def _aware(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)


def _merge(into: dict[sql.GroupKey, list[int]], part: dict[sql.GroupKey, list[int]]) -> int:
    """Add `part`'s vectors into `into`; returns the requests it held."""
    requests = 0
    for key, vector in part.items():
        requests += vector[0]
        have = into.get(key)
        into[key] = vector if have is None else [a + b for a, b in zip(have, vector, strict=True)]
    return requests


def _exact_row(key: sql.GroupKey, sums: list[int], pcts: list[float | None]) -> ReportRow:
    return _row(key, sums, pcts)


def _hist_row(key: sql.GroupKey, vector: list[int]) -> ReportRow:
    lat, ttft = vector[_LAT], vector[_TTFT]
    return _row(key, vector[:_N_SUMS], [histogram.quantile(c, q) for c in (lat, ttft) for q in sql.QUANTILES])


def _row(key: sql.GroupKey, s: list[int], p: list[float | None]) -> ReportRow:
    """`s` in SUM_FIELDS order; `p`: latency p50, p95, TTFT p50, p95. '' group values (none) become None."""
    return ReportRow(
        group=tuple(v or None for v in key),
        requests=s[0],
        errors=s[1],
        client_closed=s[2],
        prompt_tokens=s[3],
        completion_tokens=s[4],
        cost_micro_usd=s[5],
        cache_hits=s[6],
        cost_saved_micro_usd=s[7],
        fallbacks=s[8],
        latency_p50_ms=p[0],
        latency_p95_ms=p[1],
        ttft_p50_ms=p[2],
        ttft_p95_ms=p[3],
        owned_micro_usd=s[9],
    )


def _sorted(rows: list[ReportRow]) -> tuple[ReportRow, ...]:
    return tuple(sorted(rows, key=lambda r: tuple((v is None, v or "") for v in r.group)))
