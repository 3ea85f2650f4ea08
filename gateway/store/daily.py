"""Rollups derived from usage_hourly, rebuilt for the days a rollup run touched, in its transaction:
usage_daily (its rows summed per UTC day) and the coarse copies of both (usage_hourly_coarse,
usage_daily_coarse: summed over key_id, privacy and batch_id).

Invariant: each derived row is the sum of the usage_hourly rows of its day (or hour) and group, so a report
reads a whole day from any of them and gets the same figures (gateway/reports/query.py `rollup_pieces`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from gateway.store.db import (
    UTCDateTime,
    usage,
    usage_daily,
    usage_daily_coarse,
    usage_hourly,
    usage_hourly_coarse,
)

DAY = dt.timedelta(days=1)


def floor_day(at: dt.datetime) -> dt.datetime:
    """The start of the UTC day containing `at`."""
    return at.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def ceil_day(at: dt.datetime) -> dt.datetime:
    floor = floor_day(at)
    return floor if floor == at else floor + DAY


def first_late(conn: Connection, pruned_before: dt.datetime | None) -> dt.datetime | None:
    """When the oldest raw row created before `pruned_before` (a late row the run adds) was created."""
    if pruned_before is None:
        return None
    late = usage.c.created_at < pruned_before
    first: dt.datetime | None = conn.execute(sa.select(sa.func.min(usage.c.created_at)).where(late)).scalar()
    return first


def rebuild_days(
    conn: Connection,
    hours: Iterable[dt.datetime],
    late_from: dt.datetime | None,
    late_until: dt.datetime | None,
) -> None:
    """Recompute usage_daily for the days of `hours` and of [late_from, late_until) (late rows added)."""
    days = {floor_day(h) for h in hours}
    if late_from is not None and late_until is not None:
        day = floor_day(late_from)
        while day < late_until:
            days.add(day)
            day += DAY
    for start, end in _runs(sorted(days)):
        rebuild(conn, start, end)


def rebuild(conn: Connection, start: dt.datetime, end: dt.datetime) -> None:
    """The derived rows for the days in [start, end) (whole days): usage_daily and usage_hourly_coarse from
    usage_hourly, then usage_daily_coarse from usage_daily."""
    pg = conn.dialect.name == "postgresql"
    _sum_into(conn, usage_daily, usage_hourly, (start, end), _day_of(usage_hourly.c.hour, pg))
    _sum_into(conn, usage_hourly_coarse, usage_hourly, (start, end), usage_hourly.c.hour)
    _sum_into(conn, usage_daily_coarse, usage_daily, (start, end), usage_daily.c.hour)


def _sum_into(
    conn: Connection,
    target: sa.Table,
    source: sa.Table,
    span: tuple[dt.datetime, dt.datetime],
    hour: ColumnElement[dt.datetime],
) -> None:
    """Replace `target`'s rows in [span) by `source`'s measures summed per `hour` and `target`'s keys."""
    conn.execute(sa.delete(target).where(target.c.hour >= span[0], target.c.hour < span[1]))
    keys = [source.c[c.name] for c in target.primary_key.columns if c.name != "hour"]
    measures = [sa.func.sum(source.c[c.name]) for c in target.columns if not c.primary_key]
    rows = (
        sa.select(hour.label("bucket"), *keys, *measures)
        .where(source.c.hour >= span[0], source.c.hour < span[1])
        .group_by(sa.literal_column("bucket"), *keys)
    )
    conn.execute(sa.insert(target).from_select([c.name for c in target.columns], rows))


def _day_of(column: ColumnElement[Any], pg: bool) -> ColumnElement[dt.datetime]:
    if pg:  # the three-argument date_trunc (PostgreSQL 12+) truncates in UTC whatever the session zone
        expr: ColumnElement[Any] = sa.func.date_trunc(
            sa.literal_column("'day'"), column, sa.literal_column("'UTC'")
        )
    else:  # SQLite keeps UTCDateTime as 'YYYY-MM-DD HH:MM:SS.ffffff' text
        expr = sa.func.substr(column, sa.literal_column("1"), sa.literal_column("10")).op("||")(
            sa.literal_column("' 00:00:00.000000'")
        )
    return sa.type_coerce(expr, UTCDateTime)


def _runs(days: list[dt.datetime]) -> list[tuple[dt.datetime, dt.datetime]]:
    out: list[tuple[dt.datetime, dt.datetime]] = []
    for day in days:
        if out and out[-1][1] == day:
            out[-1] = (out[-1][0], day + DAY)
        else:
            out.append((day, day + DAY))
    return out
