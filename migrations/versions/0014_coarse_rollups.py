"""Rollups for the console's long windows: the cache hits' sums in usage_hourly and usage_daily, and coarse
copies of both (usage_hourly_coarse, usage_daily_coarse) summed over key_id, privacy and batch_id.

The savings report then takes the cache hits out of each backend's row from the rollups instead of scanning
raw rows over its window, and reports that group and filter by team, model, backend, endpoint and time read
~10x fewer rows. The cache columns of hours whose raw rows still exist are filled from them here; hours
already pruned keep 0 (their cache hits stay in their backend's row, as before). The measure columns are
spelled out as 0013 wrote them.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BUCKETS = 48
_KEYS = ("team", "key_id", "model", "backend", "privacy", "endpoint", "batch_id")
_COARSE_KEYS = ("team", "model", "backend", "endpoint")
_CACHE = ("cache_prompt_tokens", "cache_completion_tokens", "cache_cost_micro_usd", "cache_owned_micro_usd")
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
    *((name, sa.BigInteger) for name in _CACHE),
)
_SOURCES = ("prompt_tokens", "completion_tokens", "cost_micro_usd", "owned_micro_usd")  # usage's, as _CACHE


def upgrade() -> None:
    pg = op.get_context().dialect.name == "postgresql"
    for table in ("usage_hourly", "usage_daily"):
        with op.batch_alter_table(table) as batch:
            for name in _CACHE:
                batch.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))
    _fill_hourly_cache(pg)
    day = "date_trunc('day', hour, 'UTC')" if pg else "substr(hour, 1, 10) || ' 00:00:00.000000'"
    op.execute("DELETE FROM usage_daily")
    _insert_sums("usage_daily", "usage_hourly", _KEYS, day)
    for name in ("usage_hourly_coarse", "usage_daily_coarse"):
        op.create_table(
            name,
            sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
            sa.Column("team", sa.String(64), primary_key=True),
            sa.Column("model", sa.String(200), primary_key=True),
            sa.Column("backend", sa.String(200), primary_key=True),
            sa.Column("endpoint", sa.String(32), primary_key=True),
            *(sa.Column(m, type_, nullable=False, server_default="0") for m, type_ in _MEASURES),
        )
    _insert_sums("usage_hourly_coarse", "usage_hourly", _COARSE_KEYS, "hour")
    _insert_sums("usage_daily_coarse", "usage_daily", _COARSE_KEYS, "hour")


def _insert_sums(target: str, source: str, keys: Sequence[str], hour: str) -> None:
    names = ", ".join(keys)
    measures = ", ".join(name for name, _type in _MEASURES)
    sums = ", ".join(f"sum({name})" for name, _type in _MEASURES)
    op.execute(
        f"INSERT INTO {target} (hour, {names}, {measures}) "
        f"SELECT {hour}, {names}, {sums} FROM {source} GROUP BY {hour}, {names}"
    )


def _fill_hourly_cache(pg: bool) -> None:
    """usage_hourly's cache columns from the cache hits among raw rows, keyed as gateway/store/rollups.py
    keys them (hours without a rollup row yet are filled by the next rollup run)."""
    if pg:
        hour = "date_trunc('hour', created_at, 'UTC')"
        tier = "split_part(coalesce(privacy_class, ''), ':', 1)"
    else:
        hour = "substr(created_at, 1, 13) || ':00:00.000000'"
        whole = "coalesce(privacy_class, '')"
        colon = f"instr({whole}, ':')"
        tier = f"CASE WHEN {colon} > 0 THEN substr({whole}, 1, {colon} - 1) ELSE {whole} END"
    keys = {
        "hour": hour,
        "team": "team",
        "key_id": "coalesce(key_id, '')",
        "model": "substr(coalesce(requested_model, ''), 1, 200)",
        "backend": "substr(coalesce(backend, ''), 1, 200)",
        "privacy": f"substr({tier}, 1, 32)",
        "endpoint": "endpoint",
        "batch_id": "coalesce(batch_id, '')",
    }
    grouped = ", ".join(f"{expr} AS {name}" for name, expr in keys.items())
    sums = ", ".join(f"sum({src}) AS {name}" for src, name in zip(_SOURCES, _CACHE, strict=True))
    positions = ", ".join(str(i + 1) for i in range(len(keys)))
    assign = ", ".join(f"{name} = c.{name}" for name in _CACHE)
    match = " AND ".join(f"usage_hourly.{name} = c.{name}" for name in keys)
    true = "true" if pg else "1"
    op.execute(
        f"UPDATE usage_hourly SET {assign} FROM (SELECT {grouped}, {sums} FROM usage "
        f"WHERE cache_hit = {true} GROUP BY {positions}) AS c WHERE {match}"
    )


def downgrade() -> None:
    op.drop_table("usage_daily_coarse")
    op.drop_table("usage_hourly_coarse")
    for table in ("usage_daily", "usage_hourly"):
        with op.batch_alter_table(table) as batch:
            for name in reversed(_CACHE):
                batch.drop_column(name)
