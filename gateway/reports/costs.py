"""How reports value served capacity: self-hosted busy time shared out by tokens, at USD per hour.

Busy time is measured per backend and hour (backend_busy_hourly, rolled-up hours only); a group of requests
is charged its share of each hour by tokens (by requests where an hour has no tokens), and busy time in hours
where a backend started no request goes to the groups by their share of its tokens over the window.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from gateway.reports import sql
from gateway.reports.model import ReportQuery
from gateway.store.db import backend_busy_hourly, usage_hourly, usage_hourly_coarse
from routing.fleet import owned_share_micro_usd

ListPrice = Callable[[str, str], tuple[Decimal, Decimal] | None]  # (provider, model) -> USD per Mtok in, out


def busy_cost_micro_usd(busy_ms: float, usd_per_hour: Decimal) -> int:
    """usd_per_hour x busy time, in whole micro-dollars (half up): the ledger's owned share uses the same."""
    return owned_share_micro_usd(busy_ms, usd_per_hour)


def busy_ms_by(
    conn: Connection,
    columns: Sequence[str],
    hours: tuple[dt.datetime | None, dt.datetime | None],
    backends: list[str],
    query: ReportQuery,
) -> dict[tuple[str | None, ...], float]:
    """Busy time per (*usage_hourly `columns`, backend) of the rows `query`'s filters select, each hour's
    busy time shared by token share (by requests where an hour has no tokens); see the module doc."""
    coarse = query.batch is None and set(columns) <= {"team", "model", "endpoint"}
    table = usage_hourly_coarse if coarse else usage_hourly  # the same sums in fewer rows
    h, b = table.c, backend_busy_hourly.c
    scope: list[ColumnElement[bool]] = [h.backend.in_(backends)]
    scope += [h.hour >= hours[0]] if hours[0] is not None else []
    scope += [h.hour < hours[1]] if hours[1] is not None else []
    mine = [*scope, *sql.rollup_filters(query, table)]
    tokens = sa.func.sum(h.prompt_tokens + h.completion_tokens)
    extra = [h[c] for c in columns]
    g = _hour_sums(table, sa.select(h.hour, h.backend, *extra), tokens, mine, [h.hour, h.backend, *extra])
    t = _hour_sums(table, sa.select(h.hour, h.backend), tokens, scope, [h.hour, h.backend])
    busy = sa.select(b.hour, b.backend, b.busy_ms).where(b.backend.in_(backends))
    busy = busy.where(*([b.hour >= hours[0]] if hours[0] else []), *([b.hour < hours[1]] if hours[1] else []))
    bb = busy.subquery("bb")
    share = sa.case(
        (t.c.tok > 0, sa.cast(g.c.tok, sa.Float) / sa.cast(t.c.tok, sa.Float)),
        (t.c.req > 0, sa.cast(g.c.req, sa.Float) / sa.cast(t.c.req, sa.Float)),
        else_=sa.literal_column("0.0"),
    )
    same_hour = sa.and_(g.c.hour == t.c.hour, g.c.backend == t.c.backend)
    keys = [*(g.c[c] for c in columns), g.c.backend]
    joined = g.join(t, same_hour).outerjoin(bb, sa.and_(bb.c.hour == g.c.hour, bb.c.backend == g.c.backend))
    stmt = (
        sa.select(*keys, sa.func.sum(sa.func.coalesce(bb.c.busy_ms, 0.0) * share), sa.func.sum(g.c.tok))
        .select_from(joined)
        .group_by(*keys)
    )
    shared: dict[tuple[str | None, ...], tuple[float, int]] = {}
    for row in conn.execute(stmt):
        shared[tuple(row[: len(keys)])] = (float(row[-2] or 0.0), int(row[-1] or 0))
    return _add_unshared(conn, shared, bb, t)


def _hour_sums(table: sa.Table, select: Any, tokens: Any, where: list[Any], group: list[Any]) -> Any:
    return (
        select.add_columns(tokens.label("tok"), sa.func.sum(table.c.requests).label("req"))
        .where(*where)
        .group_by(*group)
        .subquery()
    )


def _add_unshared(
    conn: Connection, shared: Mapping[tuple[str | None, ...], tuple[float, int]], bb: Any, t: Any
) -> dict[tuple[str | None, ...], float]:
    """Busy time in hours where a backend started no request (a long one ran into them) goes to the groups
    by their share of the backend's tokens over the window."""
    out = {key: busy for key, (busy, _tok) in shared.items()}
    all_tokens = conn.execute(sa.select(t.c.backend, sa.func.sum(t.c.tok)).group_by(t.c.backend))
    window_tokens = {backend: int(tok or 0) for backend, tok in all_tokens}
    uncovered = (
        sa.select(bb.c.backend, sa.func.sum(bb.c.busy_ms))
        .where(~sa.exists().where(t.c.hour == bb.c.hour, t.c.backend == bb.c.backend))
        .group_by(bb.c.backend)
    )
    for backend, busy_ms in conn.execute(uncovered):
        total = window_tokens.get(backend, 0)
        for key, (_busy, tok) in shared.items():
            if key[-1] == backend and total > 0:
                out[key] = out[key] + float(busy_ms) * tok / total
    return out
