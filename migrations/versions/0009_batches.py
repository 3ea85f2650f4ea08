"""Batches: `/v1/batches` state, one row per input line with its lease and result, and `usage.batch_id`.

A batch's items are claimed by workers on every replica (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL)
under a lease that expires when a replica dies; `(batch_id, line)` is the key, so each input line has one
result and each `custom_id` appears once in the output.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-14
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metadata", sa.JSON, nullable=True),
        sa.Column("errors", sa.JSON, nullable=True),
        sa.Column("output_file_id", sa.String(64), nullable=True),
        sa.Column("error_file_id", sa.String(64), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("expires_at", _utc(), nullable=False),
        sa.Column("in_progress_at", _utc(), nullable=True),
        sa.Column("finalizing_at", _utc(), nullable=True),
        sa.Column("completed_at", _utc(), nullable=True),
        sa.Column("failed_at", _utc(), nullable=True),
        sa.Column("expired_at", _utc(), nullable=True),
        sa.Column("cancelling_at", _utc(), nullable=True),
        sa.Column("cancelled_at", _utc(), nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", _utc(), nullable=True),
    )
    op.create_index("ix_batches_team_created", "batches", ["team", "created_at", "id"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_items",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("custom_id", sa.String(512), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("body", sa.JSON, nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", _utc(), nullable=True),
        sa.Column("backend", sa.String(200), nullable=True),
    )
    op.create_index("ix_batch_items_state", "batch_items", ["state", "batch_id"])
    with op.batch_alter_table("usage") as table:
        table.add_column(sa.Column("batch_id", sa.String(64), nullable=True))
    op.create_index("ix_usage_batch_id", "usage", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_usage_batch_id", table_name="usage")
    with op.batch_alter_table("usage") as table:
        table.drop_column("batch_id")
    op.drop_index("ix_batch_items_state", table_name="batch_items")
    op.drop_table("batch_items")
    op.drop_index("ix_batches_status", table_name="batches")
    op.drop_index("ix_batches_team_created", table_name="batches")
    op.drop_table("batches")
