"""Reports: usage.written_at (finds late rows), hourly rollups of usage, backend busy time, rollup state.

The histogram columns are spelled out for 48 buckets (gateway.live.histogram.BUCKETS when this was written):
a migration is a snapshot and must not change when the code does.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BUCKETS = 48


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _measure(name: str, type_: Any) -> sa.Column[Any]:
    return sa.Column(name, type_, nullable=False, server_default="0")


def upgrade() -> None:
    # A nullable column needs no table copy, even in SQLite's batch mode.
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("written_at", _utc(), nullable=True))
    op.create_index("ix_usage_written_at", "usage", ["written_at"])
    op.create_table(
        "usage_hourly",
        sa.Column("hour", _utc(), primary_key=True),
        sa.Column("team", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("backend", sa.String(200), primary_key=True),
        sa.Column("privacy", sa.String(32), primary_key=True),
        _measure("requests", sa.Integer),
        _measure("errors", sa.Integer),
        _measure("client_closed", sa.Integer),
        _measure("prompt_tokens", sa.BigInteger),
        _measure("completion_tokens", sa.BigInteger),
        _measure("cost_micro_usd", sa.BigInteger),
        _measure("cache_hits", sa.Integer),
        _measure("cost_saved_micro_usd", sa.BigInteger),
        _measure("fallbacks", sa.Integer),
        _measure("latency_sum_ms", sa.Float(precision=53)),
        _measure("ttft_count", sa.Integer),
        _measure("ttft_sum_ms", sa.Float(precision=53)),
        *(_measure(f"lat_h{i:02d}", sa.BigInteger) for i in range(_BUCKETS)),
        *(_measure(f"ttft_h{i:02d}", sa.BigInteger) for i in range(_BUCKETS)),
    )
    op.create_table(
        "backend_busy_hourly",
        sa.Column("hour", _utc(), primary_key=True),
        sa.Column("backend", sa.String(200), primary_key=True),
        _measure("busy_ms", sa.Float(precision=53)),
        _measure("requests", sa.Integer),
    )
    op.create_table(
        "rollup_state",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("watermark", _utc(), nullable=False),
        sa.Column("pruned_before", _utc(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rollup_state")
    op.drop_table("backend_busy_hourly")
    op.drop_table("usage_hourly")
    op.drop_index("ix_usage_written_at", table_name="usage")
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("written_at")
