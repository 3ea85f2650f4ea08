"""Routing explainability in the ledger: attempts, ranked candidates; room for detector kinds.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("route_candidates", sa.Text, nullable=True))
        batch.alter_column("privacy_class", type_=sa.String(256), existing_type=sa.String(64))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.alter_column("privacy_class", type_=sa.String(64), existing_type=sa.String(256))
        batch.drop_column("route_candidates")
        batch.drop_column("attempts")
