"""The console's Overview figures: totals, per team, per backend and a traffic series, in one snapshot.

Up to MINUTE_SERIES_MAX (the live hour): raw rows, exact percentiles, a per-minute series. Longer: one pass
that groups by (hour or day, team, backend), folded here into all four: whole days from usage_daily_coarse,
the hours at the ends from usage_hourly_coarse (gateway/reports/query.py `rollup_tables`), and raw rows for
partial hours; percentiles from merged histograms. Invariant: its sums equal the raw ledger's over the same
window (as of the last rollup run), and a team session's figures are read with its team filter in SQL.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.live import histogram
from gateway.reports import Dimension, ReportQuery, ReportRow, Source, sql
from gateway.reports.query import (
    Plan,
    make_plan,
    read_state,
    report_on,
    rollup_chunks,
    rollup_pieces,
    rollup_tables,
    snapshot,
)
from gateway.reports.runner import Guard
from gateway.reports.sql import GroupKey
from gateway.store.db import usage

ALL = "\x00all"  # the key value of a grouping set's rolled-up column (no team, backend or bucket is it)
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
    """The figures of [since, until) (see the module doc). Past the live hour it may lag by one rollup run,
    as `switchboard report --source rollup` does."""
    with snapshot(engine, guard) as conn:
        state = read_state(conn)
        if until - since > MINUTE_SERIES_MAX and state is not None:
            unit = Dimension.HOUR if until - since <= HOURLY_SERIES_MAX else Dimension.DAY
            query = ReportQuery(
                (unit, Dimension.TEAM, Dimension.BACKEND), since, until, team, source=Source.ROLLUP
            )
            plan = make_plan(conn, query, state)
            if not plan.exact:
                return _folded(_vectors(conn, query, plan, guard), str(unit))
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


def _vectors(conn: Connection, query: ReportQuery, plan: Plan, guard: Guard) -> dict[GroupKey, list[int]]:
    """Sums and latency/TTFT histograms per (bucket, team, backend): rollup hours, then raw rows. On
    PostgreSQL each rollup read returns (ALL, team, backend) and (bucket, ALL, ALL) rows (grouping sets:
    ~100 rows, not thousands of 106-wide vectors to fold here); `_folded` takes both shapes."""
    out: dict[GroupKey, list[int]] = {}
    tables = rollup_tables(query.group_by, query)
    read = _grouping_sets if conn.dialect.name == "postgresql" else sql.rollup_histograms
    for start, end in rollup_chunks(conn, plan.rollup_start, plan.rollup_end):
        guard.check()
        for table, a, b in rollup_pieces(start, end, plan.rollup_skip, query.group_by, tables):
            _add(out, read(conn, query.group_by, (a, b), plan.rollup_skip, query, table))
    if plan.raw_where is not None:
        guard.check()
        _add(out, sql.raw_histograms(conn, query.group_by, sql.raw_filters(query, plan.raw_where)))
    return out


def _grouping_sets(
    conn: Connection,
    dims: Sequence[Dimension],
    hours: tuple[dt.datetime, dt.datetime],
    skip: Sequence[dt.datetime],
    query: ReportQuery,
    table: sa.Table,
) -> dict[GroupKey, list[int]]:
    """`sql.rollup_histograms` grouped by the sets (team, backend) and (bucket): keys (ALL, team, backend)
    and (bucket, ALL, ALL)."""
    h = table.c
    bucket, team, backend = sql.rollup_group_values(dims, "postgresql", table)
    where = [h.hour >= hours[0], h.hour < hours[1], *sql.rollup_filters(query, table)]
    skipped = [s for s in skip if hours[0] <= s < hours[1]]
    if skipped:
        where.append(h.hour.not_in(skipped))
    sets = sa.func.grouping_sets(sa.tuple_(team, backend), sa.tuple_(bucket))
    stmt = sa.select(sa.func.grouping(bucket), bucket, team, backend, *sql.rollup_sums(table)).where(*where)
    out: dict[GroupKey, list[int]] = {}
    for row in conn.execute(stmt.group_by(sets)):
        if not row[4]:  # no requests
            continue
        key = (ALL, row[2], row[3]) if row[0] else (row[1], ALL, ALL)
        out[key] = [int(v or 0) for v in row[4:]]
    return out


def _add(into: dict[GroupKey, list[int]], part: dict[GroupKey, list[int]]) -> None:
    for key, vector in part.items():
        have = into.get(key)
        into[key] = vector if have is None else [a + b for a, b in zip(have, vector, strict=True)]


def _folded(vectors: dict[GroupKey, list[int]], unit: str) -> Overview:
    total = [0] * sql.HIST_WIDTH
    teams: dict[GroupKey, list[int]] = {}
    backends: dict[GroupKey, list[int]] = {}
    series: dict[str, list[int]] = {}
    for (bucket, team, backend), vector in vectors.items():
        if bucket != ALL:
            have = series.setdefault(bucket, [0, 0])
            have[0], have[1] = have[0] + vector[0], have[1] + vector[1]  # requests, errors (SUM_FIELDS)
        if team == ALL:  # a (bucket, ALL, ALL) row of `_grouping_sets`: its figures are in the team rows
            continue
        total = [a + b for a, b in zip(total, vector, strict=True)]
        _add(teams, {(team,): vector})
        _add(backends, {(backend,): vector})

    def rows(groups: dict[GroupKey, list[int]]) -> tuple[ReportRow, ...]:
        return tuple(sorted((_row(k, v) for k, v in groups.items()), key=lambda r: -r.cost_micro_usd))

    timed = tuple((b, n, e) for b, (n, e) in sorted(series.items()) if n)
    return Overview(_row((), total), rows(backends), rows(teams), timed, unit, "rollup")


def _row(key: GroupKey, v: list[int]) -> ReportRow:
    """A group's row from its vector (sums in SUM_FIELDS order, then latency and TTFT bucket counts)."""
    n = len(sql.SUM_FIELDS)
    lat, ttft = v[n : n + histogram.BUCKETS], v[n + histogram.BUCKETS :]
    p = [histogram.quantile(counts, q) for counts in (lat, ttft) for q in sql.QUANTILES]
    return ReportRow(
        group=tuple(k or None for k in key),
        requests=v[0],
        errors=v[1],
        client_closed=v[2],
        prompt_tokens=v[3],
        completion_tokens=v[4],
        cost_micro_usd=v[5],
        cache_hits=v[6],
        cost_saved_micro_usd=v[7],
        fallbacks=v[8],
        latency_p50_ms=p[0],
        latency_p95_ms=p[1],
        ttft_p50_ms=p[2],
        ttft_p95_ms=p[3],
        owned_micro_usd=v[9],
    )


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
