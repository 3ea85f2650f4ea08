"""Daily rollups: usage_daily, usage_hourly's columns summed per UTC day (`hour` holds the day's start).

Long reports (the console's 30-day pages) read whole days from it instead of ~24x as many hourly rows. It is
filled here from usage_hourly, and each rollup run rebuilds the days whose hours it touched
(gateway/store/daily.py). The measure columns are spelled out as 0011 wrote usage_hourly's.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BUCKETS = 48
_KEYS = ("team", "key_id", "model", "backend", "privacy", "endpoint", "batch_id")
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
    ("owned_micro_usd", sa.BigInteger),
)


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("team", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("backend", sa.String(200), primary_key=True),
        sa.Column("privacy", sa.String(32), primary_key=True),
        sa.Column("endpoint", sa.String(32), primary_key=True),
        sa.Column("batch_id", sa.String(64), primary_key=True),
        *(sa.Column(name, type_, nullable=False, server_default="0") for name, type_ in _MEASURES),
    )
    if op.get_context().dialect.name == "postgresql":
        day = "date_trunc('day', hour, 'UTC')"
    else:  # SQLite keeps UTCDateTime as 'YYYY-MM-DD HH:MM:SS.ffffff' text
        day = "substr(hour, 1, 10) || ' 00:00:00.000000'"
    keys = ", ".join(_KEYS)
    measures = ", ".join(name for name, _type in _MEASURES)
    sums = ", ".join(f"sum({name})" for name, _type in _MEASURES)
    op.execute(
        f"INSERT INTO usage_daily (hour, {keys}, {measures}) "
        f"SELECT {day}, {keys}, {sums} FROM usage_hourly GROUP BY {day}, {keys}"
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
