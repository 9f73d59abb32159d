"""Run timings per phase: snapshot, diff and delivery seconds, and when delivery began

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(sa.Column("snapshot_seconds", sa.Float(), nullable=True))
        batch.add_column(sa.Column("diff_seconds", sa.Float(), nullable=True))
        batch.add_column(sa.Column("delivery_seconds", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("delivery_started_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("delivery_started_at")
        batch.drop_column("delivery_seconds")
        batch.drop_column("diff_seconds")
        batch.drop_column("snapshot_seconds")
