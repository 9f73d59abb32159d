"""Operations: where each run runs (host, pid, Celery task id), a cancel request per run,
and a pair's owed full sync

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(sa.Column("host", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("pid", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("task_id", sa.String(length=255), nullable=True))
        batch.add_column(
            sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("audience_destinations") as batch:
        batch.add_column(
            sa.Column("is_full_sync_owed", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("audience_destinations") as batch:
        batch.drop_column("is_full_sync_owed")
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("cancel_requested_at")
        batch.drop_column("task_id")
        batch.drop_column("pid")
        batch.drop_column("host")
