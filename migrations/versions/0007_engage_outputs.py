"""Engage outputs: the workspace's space id per audience; per pair, what changes are sent as
(`send_as`) and the name of its native Ortto audience; the anonymous id that travels with
a user id, in the synced state and a run's changes

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows keep what they did before: the default space id, identify calls.
    with op.batch_alter_table("audiences") as batch:
        batch.add_column(
            sa.Column(
                "space_id", sa.String(length=100), server_default="audience-sync", nullable=False
            )
        )
    with op.batch_alter_table("audience_destinations") as batch:
        batch.add_column(
            sa.Column("send_as", sa.String(length=10), server_default="identify", nullable=False)
        )
        batch.add_column(sa.Column("ortto_audience_name", sa.String(length=200), nullable=True))

    # Both ids: existing rows keep their values; a member's anonymous id is learnt from the
    # source by the next run that sends it.
    for table in ("synced_members", "run_changes"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("anonymous_id", sa.String(length=255), nullable=True))


def downgrade() -> None:
    for table in ("run_changes", "synced_members"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("anonymous_id")
    with op.batch_alter_table("audience_destinations") as batch:
        batch.drop_column("ortto_audience_name")
        batch.drop_column("send_as")
    with op.batch_alter_table("audiences") as batch:
        batch.drop_column("space_id")
