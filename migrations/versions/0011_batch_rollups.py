"""Batches in the rollups: usage_hourly keyed by batch_id too, so reports group and filter by batch.

'' stands for "no batch" (an interactive request), as for the other key columns (a primary key cannot be
NULL). usage_hourly gains a primary-key column, which neither dialect can ALTER in place: it is rebuilt (new
table, copy, drop, rename) as 0006 did, and existing rollup rows are recomputed from the raw rows that still
exist, so hours holding batch rows written since 0009 get their batch split. Hours whose raw rows were
pruned keep their figures under batch '' (their batch split is gone with the rows). Downgrade sums each
group's batches back into one row. The measure columns are spelled out as 0004 wrote them, plus 0010's
`owned_micro_usd`.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-16
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BUCKETS = 48
_TMP = "usage_hourly_0011"
_KEYS = ("hour", "team", "key_id", "model", "backend", "privacy", "endpoint")
_MEASURES: tuple[tuple[str, Any], ...] = (
    ("requests", sa.Integer),
    ("errors", sa.Integer),
    ("client_closed", sa.Integer),
    ("prompt_tokens", sa.BigInteger),
    ("completion_tokens", sa.BigInteger),
    ("cost_micro_usd", sa.BigInteger),
    ("cache_hits", sa.Integer),
    ("cost_saved_micro_usd", sa.BigInteger),
    ("fallbacks", sa.Integer),
    ("latency_sum_ms", sa.Float(precision=53)),
    ("ttft_count", sa.Integer),
    ("ttft_sum_ms", sa.Float(precision=53)),
    *((f"lat_h{i:02d}", sa.BigInteger) for i in range(_BUCKETS)),
    *((f"ttft_h{i:02d}", sa.BigInteger) for i in range(_BUCKETS)),
    ("owned_micro_usd", sa.BigInteger),  # 0010's, last as it added it
)
_MEASURE_NAMES = tuple(name for name, _type in _MEASURES)


def _hourly_columns(with_batch: bool) -> list[sa.Column[Any]]:
    keys = [
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("team", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("backend", sa.String(200), primary_key=True),
        sa.Column("privacy", sa.String(32), primary_key=True),
        sa.Column("endpoint", sa.String(32), primary_key=True),
    ]
    if with_batch:
        keys.append(sa.Column("batch_id", sa.String(64), primary_key=True))
    measures = [sa.Column(name, type_, nullable=False, server_default="0") for name, type_ in _MEASURES]
    return [*keys, *measures]


def _rebuild_hourly(with_batch: bool) -> None:
    """usage_hourly in the layout with or without `batch_id`, keeping its figures."""
    op.create_table(_TMP, *_hourly_columns(with_batch))
    old_names = (*_KEYS, *_MEASURE_NAMES) if with_batch else (*_KEYS, "batch_id", *_MEASURE_NAMES)
    old = sa.table("usage_hourly", *(sa.column(name) for name in old_names))
    new_names = (*_KEYS, "batch_id", *_MEASURE_NAMES) if with_batch else (*_KEYS, *_MEASURE_NAMES)
    new = sa.table(_TMP, *(sa.column(name) for name in new_names))
    keys = [old.c[name] for name in _KEYS]
    if with_batch:
        rows = sa.select(*keys, sa.literal_column("''"), *(old.c[name] for name in _MEASURE_NAMES))
    else:  # an hour and group may hold several batches: one row of their sums (histograms add up too)
        sums = (sa.func.sum(old.c[name]) for name in _MEASURE_NAMES)
        rows = sa.select(*keys, *sums).group_by(*keys)
    op.execute(new.insert().from_select(list(new_names), rows))
    op.drop_table("usage_hourly")
    op.rename_table(_TMP, "usage_hourly")
    if op.get_context().dialect.name == "postgresql":  # PostgreSQL named it after the table it was created as
        op.execute(f"ALTER TABLE usage_hourly RENAME CONSTRAINT {_TMP}_pkey TO usage_hourly_pkey")


def _recompute_from_raw_rows() -> None:
    """Make the next rollup run recompute every hour that still has raw rows: it then splits batch rows
    out of batch ''. Rewinding the watermark to the oldest unpruned row does that (rollups recompute the
    hours of rows written after watermark - margin), and rows of pruned hours stay where they are."""
    op.execute(
        "UPDATE rollup_state SET watermark = "
        "(SELECT MIN(created_at) FROM usage WHERE batch_id IS NOT NULL) "
        "WHERE name = 'usage' AND EXISTS (SELECT 1 FROM usage WHERE batch_id IS NOT NULL)"
    )


def upgrade() -> None:
    _rebuild_hourly(with_batch=True)
    _recompute_from_raw_rows()


def downgrade() -> None:
    _rebuild_hourly(with_batch=False)
