"""run_changes: each run's change set, computed once when the run starts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "run_changes",
        sa.Column("run_id", BigId, nullable=False),
        sa.Column("member_id", sa.String(length=255), nullable=False),
        sa.Column("is_anonymous", sa.Boolean(), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("value", sa.Boolean(), nullable=False),
        sa.Column("previous_run_id", BigId, nullable=True),
        sa.Column("is_in_flight", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sync_runs.id"],
            name=op.f("fk_run_changes_run_id_sync_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "member_id", name=op.f("pk_run_changes")),
    )


def downgrade() -> None:
    op.drop_table("run_changes")
