"""Hourly rollups of the usage ledger (usage_hourly, backend_busy_hourly; usage_daily and the coarse copies
from them, gateway/store/daily.py).

`run_once` recomputes every UTC hour touched by rows written since watermark - margin (every hour on the
first run): DELETE + INSERT ... SELECT ... GROUP BY in SQL, busy time as a sweep over request intervals in
Python, so running it twice changes nothing. Invariant: raw rows created before `pruned_before` are exactly
the rows not yet in the rollups: `prune` deletes what it rolled up within one snapshot, and `run_once` ADDS
late rows for pruned hours to the rollups and deletes them. A run is one transaction: REPEATABLE READ under
a session advisory lock on PostgreSQL (a replica finding it taken skips its run), BEGIN IMMEDIATE on SQLite.
Sync and blocking: call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from gateway.live.histogram import LATENCY_PREFIX, TTFT_PREFIX, sql_bucket_counts
from gateway.store import daily
from gateway.store.db import UTCDateTime, backend_busy_hourly, rollup_state, usage, usage_hourly

STATE_NAME = "usage"
HOUR = dt.timedelta(hours=1)
_HOUR_MS = 3_600_000.0
_MS = dt.timedelta(milliseconds=1)
_LOCK_KEY = 0x53425255  # "SBRU"; the second key is the schema, so test schemas do not contend
_ONE = sa.literal_column("1", sa.Integer)  # constants inline rather than as hundreds of bound parameters
_ZERO = sa.literal_column("0", sa.Integer)
_CACHE_SOURCES = ("prompt_tokens", "completion_tokens", "cost_micro_usd", "owned_micro_usd")


_ANALYZE_AFTER_HOURS = 48  # a run that recomputed this many hours refreshes the planner's statistics
# Rows the busy-time sweep holds at once (a server-side cursor's fetch). The sweep itself keeps one
# interval per backend, so this is the job's working set: at 20_000 rows it grew with each run through the
# hour's first 20k rows and left the gateway's RSS some MiB higher (bench/soak); fetching 2_000 rows at a
# time costs ~1 ms per fetch on a local server.
SWEEP_BATCH_ROWS = 2_000


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def floor_hour(at: dt.datetime) -> dt.datetime:
    """The start of the UTC hour containing `at`."""
    return at.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class RollupResult:
    hours_recomputed: int  # hours whose rollup rows were rebuilt from raw rows
    rows_added_late: int  # raw rows for already pruned hours, added to the rollups (then deleted)
    elapsed_s: float
    skipped: bool = False  # another process held the rollup lock; nothing was done
    rows_pruned: int = 0  # raw rows deleted by `prune`
    watermark: dt.datetime | None = None  # rows written up to watermark - margin are in the rollups


class Rollup:
    """The rollup job for one database. `margin_s` covers commit delays and clock skew between the
    writers and this job: rows written up to that long before a run may become visible after it.
    `max_request_s` bounds how far back busy time looks for requests still running when an hour starts
    (a longer request's busy time is cut short); `chunk_hours` bounds the hours one statement covers."""

    def __init__(
        self,
        engine: Engine,
        *,
        margin_s: float = 300.0,
        clock: Callable[[], dt.datetime] = _utc_now,
        max_request_s: float = 7_200.0,
        chunk_hours: int = 744,
    ) -> None:
        if engine.dialect.name not in ("postgresql", "sqlite"):
            raise ValueError(f"rollups support sqlite and postgresql, not {engine.dialect.name}")
        self._engine = engine
        self._margin = dt.timedelta(seconds=margin_s)
        self._clock = clock
        self._lookback = dt.timedelta(seconds=max_request_s)
        self._chunk_hours = chunk_hours
        self._pg = engine.dialect.name == "postgresql"

    def run_once(self) -> RollupResult:
        """Bring the rollups up to date with the raw rows written so far."""
        return self._run(prune_before=None)

    def prune(self, retention_days: int) -> int:
        """Roll up, then delete raw rows created before the UTC hour `retention_days` ago, in one
        transaction; returns how many rows were deleted (0 when another process holds the lock)."""
        if retention_days < 1:
            raise ValueError(f"retention must be at least 1 day, not {retention_days}")
        cutoff = floor_hour(self._clock() - dt.timedelta(days=retention_days))
        return self._run(prune_before=cutoff).rows_pruned

    def _run(self, prune_before: dt.datetime | None) -> RollupResult:
        started = time.perf_counter()
        now = self._clock()
        with self._transaction() as conn:
            if conn is None:
                return RollupResult(0, 0, time.perf_counter() - started, skipped=True)
            state = conn.execute(sa.select(rollup_state).where(rollup_state.c.name == STATE_NAME)).first()
            pruned_before: dt.datetime | None = state.pruned_before if state else None
            late_from = daily.first_late(conn, pruned_before)
            late = self._add_late_rows(conn, pruned_before) if pruned_before else 0
            since = state.watermark - self._margin if state else None
            hours = self._touched_hours(conn, since, pruned_before)
            for start, end in _ranges(hours, self._chunk_hours):
                self._recompute(conn, start, end)
            daily.rebuild_days(conn, hours, late_from, pruned_before)
            pruned = 0
            if prune_before is not None:
                pruned_before = max(prune_before, pruned_before or prune_before)
                pruned = conn.execute(sa.delete(usage).where(usage.c.created_at < pruned_before)).rowcount
            watermark = max(state.watermark, now) if state else now
            values = {"watermark": watermark, "pruned_before": pruned_before, "updated_at": now}
            if state is None:
                conn.execute(sa.insert(rollup_state).values(name=STATE_NAME, **values))
            else:
                where = rollup_state.c.name == STATE_NAME
                conn.execute(sa.update(rollup_state).where(where).values(**values))
        if self._pg and len(hours) >= _ANALYZE_AFTER_HOURS:
            # Fresh statistics: right after a large rollup the planner would guess ~1k rows where there are
            # ~500k and sort them on disk (8.9 s instead of 1.5 s for a 30-day report; bench/reports).
            with self._engine.begin() as conn:
                tables = (
                    "usage_hourly, usage_daily, usage_hourly_coarse, usage_daily_coarse, backend_busy_hourly"
                )
                conn.exec_driver_sql(f"ANALYZE {tables}")  # schema: via search_path
        elapsed_s = time.perf_counter() - started
        return RollupResult(len(hours), late, elapsed_s, rows_pruned=pruned, watermark=watermark)

    @contextmanager
    def _transaction(self) -> Iterator[Connection | None]:
        """One transaction that sees one snapshot and excludes other rollup runs; None: another holds it."""
        with self._engine.connect() as conn:
            if not self._pg:
                with conn.begin():
                    conn.exec_driver_sql("BEGIN IMMEDIATE")  # pysqlite would begin only at the first write
                    yield conn
                return
            # A session lock taken before the transaction: its snapshot then includes the previous run.
            lock = sa.text("SELECT pg_try_advisory_lock(:k, hashtext(current_schema()))")
            got = conn.execute(lock, {"k": _LOCK_KEY}).scalar_one()
            conn.commit()
            if not got:
                yield None
                return
            try:
                conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    yield conn
            finally:
                try:
                    unlock = sa.text("SELECT pg_advisory_unlock(:k, hashtext(current_schema()))")
                    conn.execute(unlock, {"k": _LOCK_KEY})
                    conn.commit()
                except sa.exc.DBAPIError:
                    conn.invalidate()  # a lost session has released its locks already

    def _touched_hours(
        self, conn: Connection, since: dt.datetime | None, pruned_before: dt.datetime | None
    ) -> list[dt.datetime]:
        """Hours with rows written after `since` (all hours when None), plus the later hours those rows'
        requests ran into; none before `pruned_before`."""
        hour = _hour_of(usage.c.created_at, self._pg)
        query = sa.select(hour, sa.func.max(usage.c.created_at), sa.func.max(usage.c.latency_ms))
        query = query.group_by(sa.literal_column("1"))
        if pruned_before is not None:
            query = query.where(usage.c.created_at >= pruned_before)
        queries = [query]
        if since is not None:  # two statements: each can use its own index
            by_created = sa.and_(usage.c.written_at.is_(None), usage.c.created_at > since)
            queries = [query.where(usage.c.written_at > since), query.where(by_created)]
        hours: set[dt.datetime] = set()
        for start, last_created_at, max_latency_ms in (row for q in queries for row in conn.execute(q)):
            ran_ms = min(dt.timedelta(milliseconds=max(max_latency_ms, 0.0)), self._lookback)
            ran_until = floor_hour(last_created_at + ran_ms)  # at least as late as any request ended
            while start <= ran_until:
                hours.add(start)
                start += HOUR
        return sorted(hours)

    def _recompute(self, conn: Connection, start: dt.datetime, end: dt.datetime) -> None:
        """Rebuild the rollup rows of the hours in [start, end) from the raw rows."""
        conn.execute(sa.delete(usage_hourly).where(usage_hourly.c.hour >= start, usage_hourly.c.hour < end))
        source = _group_select(self._pg).where(usage.c.created_at >= start, usage.c.created_at < end)
        conn.execute(sa.insert(usage_hourly).from_select([c.name for c in usage_hourly.columns], source))
        busy = backend_busy_hourly
        conn.execute(sa.delete(busy).where(busy.c.hour >= start, busy.c.hour < end))
        rows = self._busy_rows(conn, start, end)
        if rows:
            conn.execute(sa.insert(busy), rows)

    def _busy_rows(self, conn: Connection, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
        """backend_busy_hourly rows for [start, end): a sweep over each backend's intervals by start."""
        running = sa.or_(usage.c.created_at >= start, _ends_after(start - dt.timedelta(seconds=1), self._pg))
        in_range = [usage.c.created_at >= start - self._lookback, usage.c.created_at < end, running]
        sweep = _BusySweep(span_ms=(end - start) / _MS)
        for name, created_at, latency_ms in conn.execute(_served(*in_range)):
            sweep.add(name, (created_at - start) / _MS, latency_ms)
        return _busy_table_rows(start, sweep)

    def _add_late_rows(self, conn: Connection, pruned_before: dt.datetime) -> int:
        """Add the raw rows created before `pruned_before` (late: spill replays; their hours cannot be
        recomputed) to the rollups, then delete them. Busy time is added per request: the union with
        the requests already pruned is unknown. Returns how many rows were added."""
        late = usage.c.created_at < pruned_before
        first = conn.execute(sa.select(sa.func.min(usage.c.created_at)).where(late)).scalar()
        if first is None:
            return 0
        _upsert_add(conn, usage_hourly, _group_select(self._pg).where(late))
        base = floor_hour(first)
        sweep = _BusySweep(span_ms=(pruned_before - base) / _MS)
        for name, created_at, latency_ms in conn.execute(_served(late)):
            sweep.add_alone(name, (created_at - base) / _MS, latency_ms)
        _upsert_add(conn, backend_busy_hourly, _busy_table_rows(base, sweep))
        return int(conn.execute(sa.delete(usage).where(late)).rowcount)


class _BusySweep:
    """Union of [start, start + latency] per backend, each backend's requests fed in start order (ms from
    the range start), cut into hours of [0, span_ms); also counts the requests that start in the range."""

    def __init__(self, span_ms: float) -> None:
        self._span_ms = span_ms
        self._open: dict[str, list[float]] = {}  # backend -> [start, end] of the island being merged
        self._out: defaultdict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0])

    def add(self, backend: str, start_ms: float, latency_ms: float) -> None:
        end_ms = start_ms + max(latency_ms, 0.0)
        if start_ms >= 0.0:
            self._out[(int(start_ms // _HOUR_MS), backend)][1] += 1
        if end_ms <= 0.0:
            return  # ended before the range: cannot add to the clipped union
        island = self._open.get(backend)
        if island is None:
            self._open[backend] = [start_ms, end_ms]
        elif start_ms > island[1]:
            self._emit(backend, island[0], island[1])
            self._open[backend] = [start_ms, end_ms]
        elif end_ms > island[1]:
            island[1] = end_ms

    def add_alone(self, backend: str, start_ms: float, latency_ms: float) -> None:
        """Count one request's whole interval, merged with no other (any order)."""
        self._out[(int(start_ms // _HOUR_MS), backend)][1] += 1
        self._emit(backend, start_ms, start_ms + max(latency_ms, 0.0))

    def finish(self) -> dict[tuple[int, str], tuple[float, int]]:
        for backend, (start_ms, end_ms) in self._open.items():
            self._emit(backend, start_ms, end_ms)
        self._open.clear()
        return {key: (busy, int(count)) for key, (busy, count) in self._out.items()}

    def _emit(self, backend: str, start_ms: float, end_ms: float) -> None:
        start_ms, end_ms = max(start_ms, 0.0), min(end_ms, self._span_ms)
        h = int(start_ms // _HOUR_MS)
        while h * _HOUR_MS < end_ms:
            overlap = min(end_ms, (h + 1) * _HOUR_MS) - max(start_ms, h * _HOUR_MS)
            if overlap > 0.0:
                self._out[(h, backend)][0] += overlap
            h += 1


# ---- SQL expressions ------------------------------------------------------------------------------------


def _hour_of(column: ColumnElement[Any], pg: bool) -> ColumnElement[dt.datetime]:
    if pg:  # the three-argument date_trunc (PostgreSQL 12+) truncates in UTC whatever the session zone
        expr: ColumnElement[Any] = sa.func.date_trunc(
            sa.literal_column("'hour'"), column, sa.literal_column("'UTC'")
        )
    else:  # SQLite keeps UTCDateTime as 'YYYY-MM-DD HH:MM:SS.ffffff' text
        expr = sa.func.substr(column, _ONE, sa.literal_column("13")).op("||")(
            sa.literal_column("':00:00.000000'")
        )
    return sa.type_coerce(expr, UTCDateTime)


def _text_key(column: ColumnElement[Any], length: int) -> ColumnElement[str]:
    """NULL as '', cut to the rollup column's length."""
    empty: ColumnElement[str] = sa.literal_column("''")
    return sa.func.substr(sa.func.coalesce(column, empty), _ONE, sa.literal_column(str(length)))


def _privacy_tier(pg: bool) -> ColumnElement[str]:
    column = sa.func.coalesce(usage.c.privacy_class, sa.literal_column("''"))
    colon: ColumnElement[str] = sa.literal_column("':'")
    if pg:
        tier: ColumnElement[Any] = sa.func.split_part(column, colon, _ONE)
    else:
        at = sa.func.instr(column, colon)
        tier = sa.case((at > _ZERO, sa.func.substr(column, _ONE, at - _ONE)), else_=column)
    return sa.func.substr(tier, _ONE, sa.literal_column("32"))


def _ends_after(at: dt.datetime, pg: bool) -> ColumnElement[bool]:
    """created_at + latency_ms > at, roughly (SQLite's julianday has ms precision): a prefilter only."""
    if pg:
        end = usage.c.created_at + usage.c.latency_ms * sa.literal_column("interval '1 millisecond'")
        return sa.type_coerce(end, UTCDateTime) > at
    day_ms: ColumnElement[float] = sa.literal_column("86400000.0")
    end_day = sa.func.julianday(usage.c.created_at) + usage.c.latency_ms / day_ms
    return end_day > sa.func.julianday(sa.literal(at, UTCDateTime))


def _count_if(condition: ColumnElement[bool]) -> ColumnElement[Any]:
    return sa.func.sum(sa.case((condition, _ONE), else_=_ZERO))


def _group_select(pg: bool) -> sa.Select[Any]:
    """usage_hourly's columns, in order, aggregated from `usage` grouped by the eight key columns."""
    u = usage.c
    measures = [
        sa.func.count(),
        _count_if(u.status == sa.literal_column("'error'")),
        _count_if(u.status == sa.literal_column("'client_closed'")),
        sa.func.sum(u.prompt_tokens),
        sa.func.sum(u.completion_tokens),
        sa.func.sum(u.cost_micro_usd),
        _count_if(u.cache_hit),
        sa.func.sum(u.cost_saved_micro_usd),
        _count_if(u.attempts > _ONE),
        sa.func.sum(u.latency_ms),
        sa.func.count(u.ttft_ms),
        sa.func.coalesce(sa.func.sum(u.ttft_ms), _ZERO),
        *sql_bucket_counts(u.latency_ms, LATENCY_PREFIX),
        *sql_bucket_counts(u.ttft_ms, TTFT_PREFIX),
        sa.func.sum(u.owned_micro_usd),
        *(sa.func.sum(sa.case((u.cache_hit, u[c]), else_=_ZERO)) for c in _CACHE_SOURCES),  # CACHE_MEASURES
    ]
    keys = [
        _hour_of(u.created_at, pg),
        u.team,
        sa.func.coalesce(u.key_id, sa.literal_column("''")),
        _text_key(u.requested_model, 200),
        _text_key(u.backend, 200),
        _privacy_tier(pg),
        u.endpoint,
        sa.func.coalesce(u.batch_id, sa.literal_column("''")),
    ]
    # GROUP BY position: PostgreSQL would not match expressions whose constants are separate parameters.
    return sa.select(*keys, *measures).group_by(*(sa.literal_column(str(i + 1)) for i in range(len(keys))))


def _served(*where: ColumnElement[bool]) -> sa.Select[Any]:
    """(backend, created_at, latency_ms) of the requests a backend served (not cache hits), by backend and
    start. Not by created_at alone: its index would fetch rows in random heap order when they were not
    inserted in time order; this way the planner may choose a sequential scan and a sort."""
    backend = _text_key(usage.c.backend, 200)
    served = [usage.c.backend.is_not(None), usage.c.backend != "", sa.not_(usage.c.cache_hit)]
    query = sa.select(backend, usage.c.created_at, usage.c.latency_ms).where(*served, *where)
    return query.order_by(backend, usage.c.created_at).execution_options(yield_per=SWEEP_BATCH_ROWS)


def _busy_table_rows(start: dt.datetime, sweep: _BusySweep) -> list[dict[str, Any]]:
    return [
        {"hour": start + h * HOUR, "backend": name, "busy_ms": busy_ms, "requests": requests}
        for (h, name), (busy_ms, requests) in sorted(sweep.finish().items())
    ]


def _upsert_add(conn: Connection, table: sa.Table, rows: list[dict[str, Any]] | sa.Select[Any]) -> None:
    """INSERT rows (or the rows of a SELECT of all columns), adding the measures of rows already there."""
    if isinstance(rows, list) and not rows:
        return
    stmt: Any = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
    if isinstance(rows, sa.Select):
        stmt = stmt.from_select([c.name for c in table.columns], rows)
    keys = [c.name for c in table.primary_key.columns]
    measures = {c.name: table.c[c.name] + stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    upsert = stmt.on_conflict_do_update(index_elements=keys, set_=measures)
    if isinstance(rows, sa.Select):
        conn.execute(upsert)
    else:
        conn.execute(upsert, rows)


def _ranges(hours: list[dt.datetime], chunk_hours: int) -> Iterator[tuple[dt.datetime, dt.datetime]]:
    """[start, end) ranges of consecutive sorted hours, at most `chunk_hours` long."""
    i = 0
    while i < len(hours):
        j = i + 1
        while j < len(hours) and j - i < chunk_hours and hours[j] == hours[j - 1] + HOUR:
            j += 1
        yield hours[i], hours[j - 1] + HOUR
        i = j
