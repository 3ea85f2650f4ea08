"""Initial schema: teams, api_keys, usage.

Hand-written to match store/db.py. Datetimes are `timestamptz` on PostgreSQL (naive UTC text on SQLite,
normalised by `gateway.store.db.UTCDateTime`); cost is BIGINT micro-dollars.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("models", sa.JSON, nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("team", sa.String(64), sa.ForeignKey("teams.name"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("display_prefix", sa.String(16), nullable=False),
        sa.Column("models", sa.JSON, nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("expires_at", _utc(), nullable=True),
        sa.Column("revoked_at", _utc(), nullable=True),
    )
    op.create_index("ix_api_keys_team", "api_keys", ["team"])
    op.create_table(
        "usage",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("requested_model", sa.Text, nullable=False),
        sa.Column("backend", sa.Text, nullable=True),
        sa.Column("served_model", sa.Text, nullable=True),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cost_micro_usd", sa.BigInteger, nullable=False),
        sa.Column("latency_ms", sa.Float(precision=53), nullable=False),
        sa.Column("ttft_ms", sa.Float(precision=53), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("http_status", sa.Integer, nullable=False),
        sa.Column("error_type", sa.String(64), nullable=True),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("cache_hit", sa.Boolean, nullable=False),
        sa.Column("privacy_class", sa.String(64), nullable=True),
        sa.Column("route_reason", sa.Text, nullable=True),
    )
    op.create_index("ix_usage_created_at", "usage", ["created_at"])
    op.create_index("ix_usage_team_created_at", "usage", ["team", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_team_created_at", table_name="usage")
    op.drop_index("ix_usage_created_at", table_name="usage")
    op.drop_table("usage")
    op.drop_index("ix_api_keys_team", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("teams")
