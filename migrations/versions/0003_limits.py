"""Per-key rate limits and budgets on api_keys; cache savings and a per-key spend index on usage.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY_COLUMNS = (
    "limit_requests",
    "limit_tokens",
    "budget_period",
    "budget_micro_usd",
    "soft_budget_micro_usd",
)


def upgrade() -> None:
    # Adding nullable (or defaulted) columns needs no table copy, even in SQLite's batch mode.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("limit_requests", sa.Integer, nullable=True))
        batch.add_column(sa.Column("limit_tokens", sa.Integer, nullable=True))
        batch.add_column(sa.Column("budget_period", sa.String(8), nullable=True))
        batch.add_column(sa.Column("budget_micro_usd", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("soft_budget_micro_usd", sa.BigInteger, nullable=True))
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("cost_saved_micro_usd", sa.BigInteger, nullable=False, server_default="0"))
    # Budgets rebuild their counters from SUM(cost) per team or key over a period (gateway/store/spend.py).
    op.create_index("ix_usage_team_created_at", "usage", ["team", "created_at"], if_not_exists=True)
    op.create_index("ix_usage_key_id_created_at", "usage", ["key_id", "created_at"], if_not_exists=True)


def downgrade() -> None:
    op.drop_index("ix_usage_key_id_created_at", table_name="usage")
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("cost_saved_micro_usd")
    with op.batch_alter_table("api_keys") as batch:
        for name in reversed(_KEY_COLUMNS):
            batch.drop_column(name)
