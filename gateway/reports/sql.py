"""The report's SQL (SQLAlchemy Core, SQLite and PostgreSQL): group values, sums, percentiles, histograms.

Invariant: raw ledger rows and hourly rollups produce the same group values for the same request (missing
key, backend or privacy as ''; no batch as "interactive"; day "YYYY-MM-DD"; hour "YYYY-MM-DDTHH:00Z", UTC),
so their results merge by group. Every statement groups in SQL and returns one row per group: nothing
iterates over ledger rows in Python. Exact percentiles are PostgreSQL's `percentile_cont`; SQLite has none,
so `sqlite_percentiles` computes the same value from window functions (ranks floor(q*(n-1)) and the next,
interpolated linearly).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from gateway.live import histogram
from gateway.reports.model import ANY_BATCH, INTERACTIVE, Dimension, ReportQuery
from gateway.store.db import usage, usage_hourly

GroupKey = tuple[str, ...]
SUM_FIELDS = (
    "requests", "errors", "client_closed", "prompt_tokens", "completion_tokens", "cost_micro_usd",
    "cache_hits", "cost_saved_micro_usd", "fallbacks", "owned_micro_usd",
)  # fmt: skip
LAT_COLUMNS = histogram.column_names(histogram.LATENCY_PREFIX)
TTFT_COLUMNS = histogram.column_names(histogram.TTFT_PREFIX)
HIST_WIDTH = len(SUM_FIELDS) + 2 * histogram.BUCKETS  # a "measures" vector: sums, then lat, then ttft
QUANTILES = (0.5, 0.95)
_TIME = (Dimension.DAY, Dimension.HOUR)


def _const(text: str) -> ColumnElement[Any]:
    """A SQL string constant rendered inline, so equal expressions stay textually equal (GROUP BY)."""
    return sa.literal_column("'" + text.replace("'", "''") + "'")


def time_text(column: ColumnElement[Any], dim: Dimension, dialect: str) -> ColumnElement[str]:
    """A UTC timestamp column as "YYYY-MM-DD" (DAY) or "YYYY-MM-DDTHH:00Z" (HOUR)."""
    if dialect == "postgresql":
        fmt = "YYYY-MM-DD" if dim is Dimension.DAY else 'YYYY-MM-DD"T"HH24":00Z"'
        return sa.func.to_char(sa.func.timezone(_const("UTC"), column), _const(fmt))
    # SQLite keeps UTCDateTime as naive UTC text "YYYY-MM-DD HH:MM:SS.ffffff" (gateway/store/db.py).
    fmt = "%Y-%m-%d" if dim is Dimension.DAY else "%Y-%m-%dT%H:00Z"
    return sa.func.strftime(_const(fmt), column)


def privacy_tier(column: ColumnElement[Any], dialect: str) -> ColumnElement[str]:
    """The tier of a privacy class ("internal:email" -> "internal"); '' for none."""
    text = sa.func.coalesce(column, _const(""))
    if dialect == "postgresql":
        return sa.func.split_part(text, _const(":"), sa.literal_column("1"))
    colon = sa.func.instr(text, _const(":"))
    return sa.case((colon > 0, sa.func.substr(text, 1, colon - 1)), else_=text)


def raw_group_values(dims: Sequence[Dimension], dialect: str) -> list[ColumnElement[Any]]:
    u = usage.c
    out: list[ColumnElement[Any]] = []
    for dim in dims:
        if dim is Dimension.TEAM:
            out.append(u.team)
        elif dim is Dimension.KEY:
            out.append(sa.func.coalesce(u.key_id, _const("")))
        elif dim is Dimension.MODEL:
            out.append(u.requested_model)
        elif dim is Dimension.BACKEND:
            out.append(sa.func.coalesce(u.backend, _const("")))
        elif dim is Dimension.PRIVACY:
            out.append(privacy_tier(u.privacy_class, dialect))
        elif dim is Dimension.ENDPOINT:
            out.append(u.endpoint)
        elif dim is Dimension.BATCH:
            out.append(sa.func.coalesce(u.batch_id, _const(INTERACTIVE)))
        else:
            out.append(time_text(u.created_at, dim, dialect))
    return out


_ROLLUP_COLUMN = {
    Dimension.TEAM: "team", Dimension.KEY: "key_id", Dimension.MODEL: "model", Dimension.BACKEND: "backend",
    Dimension.PRIVACY: "privacy", Dimension.ENDPOINT: "endpoint",
}  # fmt: skip


def rollup_group_values(
    dims: Sequence[Dimension], dialect: str, table: sa.Table = usage_hourly
) -> list[ColumnElement[Any]]:
    """Group values of `table`'s rows: usage_hourly, or usage_daily (same columns; no HOUR then)."""
    return [_rollup_group_value(d, dialect, table) for d in dims]


def _rollup_group_value(dim: Dimension, dialect: str, table: sa.Table) -> ColumnElement[Any]:
    h = table.c
    if dim in _TIME:
        return time_text(h.hour, dim, dialect)
    if dim is Dimension.BATCH:  # rollups key "no batch" as ''
        return sa.case((h.batch_id == _const(""), _const(INTERACTIVE)), else_=h.batch_id)
    return h[_ROLLUP_COLUMN[dim]]


def _batch_filter(column: ColumnElement[Any], batch: str, none: ColumnElement[bool]) -> ColumnElement[bool]:
    """`column` (a batch id; `none` where a row has no batch) as the query's batch filter selects it."""
    if batch == INTERACTIVE:
        return none
    if batch == ANY_BATCH:
        return sa.not_(none)
    return column == batch


def raw_filters(query: ReportQuery, where: ColumnElement[bool] | None) -> list[ColumnElement[bool]]:
    """`where` and the query's team, model, endpoint and batch filters, on `usage` rows."""
    out = [] if where is None else [where]
    if query.team is not None:
        out.append(usage.c.team == query.team)
    if query.model is not None:
        out.append(usage.c.requested_model == query.model)
    if query.endpoint is not None:
        out.append(usage.c.endpoint == query.endpoint)
    if query.batch is not None:
        out.append(_batch_filter(usage.c.batch_id, query.batch, usage.c.batch_id.is_(None)))
    return out


def rollup_filters(query: ReportQuery, table: sa.Table = usage_hourly) -> list[ColumnElement[bool]]:
    """The query's team, model, endpoint and batch filters, on `table`'s rows (usage_hourly or _daily)."""
    h = table.c
    out = []
    if query.team is not None:
        out.append(h.team == query.team)
    if query.model is not None:
        out.append(h.model == query.model)
    if query.endpoint is not None:
        out.append(h.endpoint == query.endpoint)
    if query.batch is not None:
        out.append(_batch_filter(h.batch_id, query.batch, h.batch_id == _const("")))
    return out


def _count_if(condition: ColumnElement[bool]) -> ColumnElement[Any]:
    return sa.func.sum(sa.case((condition, 1), else_=0))


def raw_sums(src: Any) -> list[ColumnElement[Any]]:
    """The SUM_FIELDS over raw rows of `src` (a subquery with usage's columns), in order."""
    return [
        sa.func.count().label("requests"),
        _count_if(src.status == "error").label("errors"),
        _count_if(src.status == "client_closed").label("client_closed"),
        sa.func.sum(src.prompt_tokens).label("prompt_tokens"),
        sa.func.sum(src.completion_tokens).label("completion_tokens"),
        sa.func.sum(src.cost_micro_usd).label("cost_micro_usd"),
        _count_if(src.cache_hit == sa.true()).label("cache_hits"),
        sa.func.sum(src.cost_saved_micro_usd).label("cost_saved_micro_usd"),
        _count_if(src.attempts > 1).label("fallbacks"),
        sa.func.sum(src.owned_micro_usd).label("owned_micro_usd"),
    ]


def _raw_base(
    dims: Sequence[Dimension], dialect: str, filters: Sequence[ColumnElement[bool]], columns: Sequence[str]
) -> Any:
    """A subquery: group values g0..gN-1 plus the usage `columns` a statement needs, filtered."""
    groups = [v.label(f"g{i}") for i, v in enumerate(raw_group_values(dims, dialect))]
    return sa.select(*groups, *(usage.c[c] for c in columns)).where(*filters).subquery("r")


_SUM_SOURCE = (
    "status", "prompt_tokens", "completion_tokens", "cost_micro_usd", "cache_hit", "cost_saved_micro_usd",
    "attempts", "owned_micro_usd",
)  # fmt: skip


def raw_histograms(
    conn: Connection, dims: Sequence[Dimension], filters: Sequence[ColumnElement[bool]]
) -> dict[GroupKey, list[int]]:
    """Per group: the sums and latency/TTFT bucket counts of raw rows (to merge with rollups)."""
    if conn.dialect.name == "postgresql":
        return pg_raw_histograms(conn, dims, filters)
    return case_raw_histograms(conn, dims, filters)


def pg_raw_histograms(
    conn: Connection, dims: Sequence[Dimension], filters: Sequence[ColumnElement[bool]]
) -> dict[GroupKey, list[int]]:
    """`raw_histograms` on PostgreSQL: each row's bucket computed once (`width_bucket` over the edges: the
    number of edges <= the value, as `histogram.bucket_of`), counted in one pass by three grouping sets,
    (group), (group, latency bucket) and (group, TTFT bucket), instead of 96 CASE sums per row."""
    base = _raw_base(dims, "postgresql", filters, (*_SUM_SOURCE, "latency_ms", "ttft_ms"))
    keys = [base.c[f"g{i}"] for i in range(len(dims))]
    array = "ARRAY[" + ", ".join(repr(e) for e in histogram.EDGES_MS) + "]::float8[]"
    edges: ColumnElement[Any] = sa.literal_column(array)
    lat, ttft = sa.func.width_bucket(base.c.latency_ms, edges), sa.func.width_bucket(base.c.ttft_ms, edges)
    sets = sa.func.grouping_sets(sa.tuple_(*keys), sa.tuple_(*keys, lat), sa.tuple_(*keys, ttft))
    stmt = sa.select(
        *keys, lat, ttft, sa.func.grouping(lat), sa.func.grouping(ttft), *raw_sums(base.c)
    ).group_by(sets)
    n = len(dims)
    width = len(SUM_FIELDS)
    out: dict[GroupKey, list[int]] = {}
    for row in conn.execute(stmt):
        key, (lat_bucket, ttft_bucket, no_lat, no_ttft) = tuple(row[:n]), row[n : n + 4]
        vector = out.setdefault(key, [0] * HIST_WIDTH)
        requests = int(row[n + 4])
        if no_lat and no_ttft:
            vector[:width] = [int(v or 0) for v in row[n + 4 :]]
        elif not no_lat:
            vector[width + lat_bucket] += requests
        elif ttft_bucket is not None:  # rows without a TTFT count in no bucket
            vector[width + histogram.BUCKETS + ttft_bucket] += requests
    return {k: v for k, v in out.items() if v[0]}


def case_raw_histograms(
    conn: Connection, dims: Sequence[Dimension], filters: Sequence[ColumnElement[bool]]
) -> dict[GroupKey, list[int]]:
    """`raw_histograms` with one CASE sum per bucket (SQLite; the reference the PostgreSQL form equals)."""
    base = _raw_base(dims, conn.dialect.name, filters, (*_SUM_SOURCE, "latency_ms", "ttft_ms"))
    keys = [base.c[f"g{i}"] for i in range(len(dims))]
    stmt = sa.select(
        *keys,
        *raw_sums(base.c),
        *histogram.sql_bucket_counts(base.c.latency_ms, histogram.LATENCY_PREFIX),
        *histogram.sql_bucket_counts(base.c.ttft_ms, histogram.TTFT_PREFIX),
    ).group_by(*keys)
    return _vectors(conn.execute(stmt), len(dims))


def rollup_histograms(
    conn: Connection,
    dims: Sequence[Dimension],
    hours: tuple[dt.datetime, dt.datetime],
    skip: Sequence[dt.datetime],
    query: ReportQuery,
    table: sa.Table = usage_hourly,
) -> dict[GroupKey, list[int]]:
    """Per group: the sums and bucket counts of the rollup hours in [hours[0], hours[1]), but `skip`, that
    `query`'s filters select; from `table`: usage_hourly, or usage_daily for whole days."""
    h = table.c
    filters = [h.hour >= hours[0], h.hour < hours[1], *rollup_filters(query, table)]
    skip = [s for s in skip if hours[0] <= s < hours[1]]
    if skip:
        filters.append(h.hour.not_in(skip))
    keys = [v.label(f"g{i}") for i, v in enumerate(rollup_group_values(dims, conn.dialect.name, table))]
    sums = rollup_sums(table)
    stmt = sa.select(*keys, *sums).where(*filters)
    if keys:  # by label: PostgreSQL matches GROUP BY expressions textually
        stmt = stmt.group_by(*(sa.literal_column(k.name) for k in keys))
    return _vectors(conn.execute(stmt), len(dims))


def rollup_sums(table: sa.Table) -> list[ColumnElement[Any]]:
    """A rollup table's SUM_FIELDS and histogram counts summed, as BIGINT: PostgreSQL's SUM(bigint) is
    numeric, and turning ~100 Decimals a group into ints costs more than the statement on a long window."""
    names = (*SUM_FIELDS, *LAT_COLUMNS, *TTFT_COLUMNS)
    return [sa.cast(sa.func.sum(table.c[n]), sa.BigInteger).label(n) for n in names]


def _vectors(result: Any, n_dims: int) -> dict[GroupKey, list[int]]:
    out: dict[GroupKey, list[int]] = {}
    for row in result:
        if not row[n_dims]:  # no GROUP BY over no rows still answers one row of NULLs
            continue
        # PostgreSQL's SUM(bigint) is numeric: int() every figure.
        out[tuple(row[:n_dims])] = [int(v or 0) for v in row[n_dims:]]
    return out


def raw_exact(
    conn: Connection, dims: Sequence[Dimension], filters: Sequence[ColumnElement[bool]]
) -> dict[GroupKey, tuple[list[int], list[float | None]]]:
    """Per group: the sums and exact percentiles [lat p50, lat p95, ttft p50, ttft p95] of raw rows."""
    dialect = conn.dialect.name
    base = _raw_base(dims, dialect, filters, (*_SUM_SOURCE, "latency_ms", "ttft_ms"))
    keys = [base.c[f"g{i}"] for i in range(len(dims))]
    cont: list[ColumnElement[Any]] = []
    if dialect == "postgresql":
        cont = [
            sa.func.percentile_cont(q).within_group(base.c[column])
            for column in ("latency_ms", "ttft_ms")
            for q in QUANTILES
        ]
    stmt = sa.select(*keys, *raw_sums(base.c), *cont).group_by(*keys)
    out: dict[GroupKey, tuple[list[int], list[float | None]]] = {}
    width = len(SUM_FIELDS)
    for row in conn.execute(stmt):
        if not row[len(dims)]:
            continue
        values = row[len(dims) :]
        pcts: list[float | None] = [None] * 4
        if cont:
            pcts = [None if v is None else float(v) for v in values[width:]]
        out[tuple(row[: len(dims)])] = ([int(v or 0) for v in values[:width]], pcts)
    if not cont:
        for i, column in enumerate(("latency_ms", "ttft_ms")):
            for key, found in sqlite_percentiles(conn, dims, filters, column).items():
                if key in out:
                    out[key][1][2 * i : 2 * i + 2] = found
    return out


def sqlite_percentiles(
    conn: Connection, dims: Sequence[Dimension], filters: Sequence[ColumnElement[bool]], column: str
) -> dict[GroupKey, list[float | None]]:
    """`percentile_cont` for QUANTILES of `column` per group, from ROW_NUMBER over each group's values.

    Only the (at most 4) rows at ranks floor(q*(n-1)) and floor(q*(n-1)) + 1 leave the database; the
    interpolation is done here in float64, exactly as PostgreSQL does it (lo + (hi - lo) * fraction)."""
    base = _raw_base(dims, conn.dialect.name, [*filters, usage.c[column].is_not(None)], (column,))
    keys = [base.c[f"g{i}"] for i in range(len(dims))]
    value = base.c[column]
    ranked = sa.select(
        *keys,
        value.label("v"),
        (sa.func.row_number().over(partition_by=keys or None, order_by=value) - 1).label("i"),
        sa.func.count().over(partition_by=keys or None).label("n"),
    ).subquery("ranked")
    rkeys = [ranked.c[f"g{i}"] for i in range(len(dims))]
    floors = [sa.cast(q * (ranked.c.n - 1), sa.Integer) for q in QUANTILES]
    picks = []
    for first in floors:
        picks.append(sa.func.max(sa.case((ranked.c.i == first, ranked.c.v))))
        picks.append(sa.func.max(sa.case((ranked.c.i == first + 1, ranked.c.v))))
    wanted = sa.or_(*(ranked.c.i == f for f in floors), *(ranked.c.i == f + 1 for f in floors))
    stmt = sa.select(*rkeys, sa.func.max(ranked.c.n), *picks).where(wanted)
    if rkeys:
        stmt = stmt.group_by(*rkeys)
    out: dict[GroupKey, list[float | None]] = {}
    n_dims = len(dims)
    for row in conn.execute(stmt):
        n = row[n_dims]
        if not n:
            continue
        found: list[float | None] = []
        for k, q in enumerate(QUANTILES):
            lo, hi = row[n_dims + 1 + 2 * k], row[n_dims + 2 + 2 * k]
            found.append(interpolate(q, int(n), float(lo), None if hi is None else float(hi)))
        out[tuple(row[:n_dims])] = found
    return out


def interpolate(q: float, n: int, lo: float, hi: float | None) -> float:
    """percentile_cont from the values at ranks floor(q*(n-1)) (`lo`) and the next (`hi`)."""
    position = q * (n - 1)
    fraction = position - math.floor(position)
    if fraction <= 0 or hi is None:
        return lo
    return lo + (hi - lo) * fraction


def raw_sum_vectors(
    conn: Connection, dims: Sequence[Dimension], filters: Sequence[ColumnElement[bool]]
) -> dict[GroupKey, list[int]]:
    """Per group: the SUM_FIELDS of raw rows."""
    base = _raw_base(dims, conn.dialect.name, filters, _SUM_SOURCE)
    keys = [base.c[f"g{i}"] for i in range(len(dims))]
    return _vectors(conn.execute(sa.select(*keys, *raw_sums(base.c)).group_by(*keys)), len(dims))
