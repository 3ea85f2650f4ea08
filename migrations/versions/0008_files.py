"""`/v1/files` metadata: uploaded files per team (the bytes live in file storage, not here).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("team", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("storage_key", sa.String(600), nullable=False),
        sa.Column("lines", sa.Integer, nullable=True),
        sa.Column("invalid_lines", sa.Integer, nullable=True),
    )
    op.create_index("ix_files_team_created", "files", ["team", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_files_team_created", table_name="files")
    op.drop_table("files")
