"""failing_members.resends_owed (users in doubt are re-sent twice); drop the unused
sync_runs.pending_chunks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("failing_members") as batch:
        batch.add_column(
            sa.Column("resends_owed", sa.Integer(), server_default="1", nullable=False)
        )
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("pending_chunks")


def downgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(
            sa.Column("pending_chunks", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("failing_members") as batch:
        batch.drop_column("resends_owed")
