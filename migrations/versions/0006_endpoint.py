"""Endpoints in the ledger: usage.endpoint, and usage_hourly keyed by endpoint too.

Every row written before this revision came from /v1/chat/completions, so existing usage rows and rollups
get "chat.completions". usage_hourly gains a primary-key column, which neither dialect can ALTER in place:
it is rebuilt (new table, copy, drop, rename), also on PostgreSQL, where the rebuilt table's primary key is
renamed back to the usual `usage_hourly_pkey`. Downgrade sums each group's endpoints back into one row.
Names are unqualified: a PostgreSQL schema applies through `search_path` (migrations/env.py). The measure
columns are spelled out as 0004 wrote them: a migration is a snapshot.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ENDPOINT = "chat.completions"  # the only endpoint before this revision
_BUCKETS = 48
_TMP = "usage_hourly_0006"
_KEYS = ("hour", "team", "key_id", "model", "backend", "privacy")
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
)
_MEASURE_NAMES = tuple(name for name, _type in _MEASURES)


def _hourly_columns(with_endpoint: bool) -> list[sa.Column[Any]]:
    keys = [
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("team", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("backend", sa.String(200), primary_key=True),
        sa.Column("privacy", sa.String(32), primary_key=True),
    ]
    if with_endpoint:
        keys.append(sa.Column("endpoint", sa.String(32), primary_key=True))
    measures = [sa.Column(name, type_, nullable=False, server_default="0") for name, type_ in _MEASURES]
    return [*keys, *measures]


def _rebuild_hourly(with_endpoint: bool) -> None:
    """usage_hourly in the layout with or without `endpoint`, keeping its figures."""
    op.create_table(_TMP, *_hourly_columns(with_endpoint))
    old_names = (*_KEYS, *_MEASURE_NAMES) if with_endpoint else (*_KEYS, "endpoint", *_MEASURE_NAMES)
    old = sa.table("usage_hourly", *(sa.column(name) for name in old_names))
    new_names = (*_KEYS, "endpoint", *_MEASURE_NAMES) if with_endpoint else (*_KEYS, *_MEASURE_NAMES)
    new = sa.table(_TMP, *(sa.column(name) for name in new_names))
    keys = [old.c[name] for name in _KEYS]
    if with_endpoint:
        endpoint = sa.literal_column(f"'{_ENDPOINT}'")
        rows = sa.select(*keys, endpoint, *(old.c[name] for name in _MEASURE_NAMES))
    else:  # an hour and group may hold several endpoints: one row of their sums (histograms add up too)
        sums = (sa.func.sum(old.c[name]) for name in _MEASURE_NAMES)
        rows = sa.select(*keys, *sums).group_by(*keys)
    op.execute(new.insert().from_select(list(new_names), rows))
    op.drop_table("usage_hourly")
    op.rename_table(_TMP, "usage_hourly")
    if op.get_context().dialect.name == "postgresql":  # PostgreSQL named it after the table it was created as
        op.execute(f"ALTER TABLE usage_hourly RENAME CONSTRAINT {_TMP}_pkey TO usage_hourly_pkey")


def upgrade() -> None:
    # NOT NULL with a constant default: PostgreSQL 11+ fills it without rewriting the table, SQLite in place.
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("endpoint", sa.String(32), nullable=False, server_default=_ENDPOINT))
    _rebuild_hourly(with_endpoint=True)


def downgrade() -> None:
    _rebuild_hourly(with_endpoint=False)
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("endpoint")
