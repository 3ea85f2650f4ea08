"""The cache hits' sums per group that the savings report takes out of each backend's row, read the way the
traffic was (`Plan`): rollup hours from the rollups' cache_* columns (migration 0014), the plan's raw rows
from the ledger, and only raw rows when the plan is exact. So a long window scans no raw rows.

Invariant: vectors are in sql.SUM_FIELDS order with requests, prompt and completion tokens, cost, cache hits
and owned share filled (the other fields 0), equal to what the cache hits' raw rows sum to, except in hours
pruned before migration 0014 (their cache hits were never split out: 0, and they stay in their backend's row).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.reports import sql
from gateway.reports.model import ReportQuery
from gateway.reports.query import Plan, created_between, rollup_chunks, rollup_pieces, rollup_tables
from gateway.store.db import CACHE_MEASURES, usage

_FILLED = (0, 3, 4, 5, 6, 9)  # requests, prompt_tokens, completion_tokens, cost_micro_usd, cache_hits, owned


def cache_hit_sums(conn: Connection, query: ReportQuery, plan: Plan) -> dict[sql.GroupKey, list[int]]:
    """Per group of `query.group_by`: the sums of the cache hits `query` selects (see the module doc)."""
    hit = usage.c.cache_hit == sa.true()
    if plan.exact:
        where = sa.and_(*created_between(query.since, query.until), hit)
        return _project(sql.raw_sum_vectors(conn, query.group_by, sql.raw_filters(query, where)))
    out: dict[sql.GroupKey, list[int]] = {}
    tables = rollup_tables(query.group_by, query)
    for start, end in rollup_chunks(conn, plan.rollup_start, plan.rollup_end):
        for table, a, b in rollup_pieces(start, end, plan.rollup_skip, query.group_by, tables):
            _add(out, _rollup_part(conn, query, plan, table, (a, b)))
    if plan.raw_where is not None:
        raw = sql.raw_sum_vectors(conn, query.group_by, sql.raw_filters(query, sa.and_(plan.raw_where, hit)))
        _add(out, _project(raw))
    return out


def _rollup_part(
    conn: Connection, query: ReportQuery, plan: Plan, table: sa.Table, hours: tuple[dt.datetime, dt.datetime]
) -> dict[sql.GroupKey, list[int]]:
    h = table.c
    values = sql.rollup_group_values(query.group_by, conn.dialect.name, table)
    keys = [v.label(f"g{i}") for i, v in enumerate(values)]
    where = [h.hour >= hours[0], h.hour < hours[1], h.cache_hits > 0, *sql.rollup_filters(query, table)]
    skip = [s for s in plan.rollup_skip if hours[0] <= s < hours[1]]
    if skip:
        where.append(h.hour.not_in(skip))
    sums = [sa.func.sum(h.cache_hits), *(sa.func.sum(h[name]) for name in CACHE_MEASURES)]
    stmt = sa.select(*keys, *sums).where(*where)
    if keys:
        stmt = stmt.group_by(*(sa.literal_column(k.name) for k in keys))
    out: dict[sql.GroupKey, list[int]] = {}
    n = len(keys)
    for row in conn.execute(stmt):
        if not row[n]:
            continue
        hits, prompt, completion, cost, owned = (int(v or 0) for v in row[n:])
        out[tuple(row[:n])] = [hits, 0, 0, prompt, completion, cost, hits, 0, 0, owned]
    return out


def _project(vectors: dict[sql.GroupKey, list[int]]) -> dict[sql.GroupKey, list[int]]:
    """Raw rows' vectors with only the fields the rollups hold."""
    return {k: [v[i] if i in _FILLED else 0 for i in range(len(v))] for k, v in vectors.items()}


def _add(into: dict[sql.GroupKey, list[int]], part: dict[sql.GroupKey, list[int]]) -> None:
    for key, vector in part.items():
        have = into.get(key)
        into[key] = vector if have is None else [a + b for a, b in zip(have, vector, strict=True)]
