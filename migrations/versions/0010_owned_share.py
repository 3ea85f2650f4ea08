"""Owned capacity in the ledger: usage.owned_micro_usd and usage_hourly.owned_micro_usd.

`cost_micro_usd` is the cloud money a request spent (0 on owned capacity, whose marginal cost is 0);
`owned_micro_usd` is its share of owned capacity (self-hosted engines, edge nodes) for chargeback: its
serving time divided among the requests sharing the box, at the box's usd_per_hour. Rows from before this
revision get 0 (their owned share was folded into cost_micro_usd by load).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("usage", "usage_hourly"):
        op.add_column(table, sa.Column("owned_micro_usd", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    for table in ("usage_hourly", "usage"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("owned_micro_usd")
