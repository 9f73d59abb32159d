"""Rule audiences: sources.layout, audiences.rules and include_anonymous; a rule audience
has no query

Revision ID: 0006
Revises: 0007
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sources") as batch:
        batch.add_column(sa.Column("layout", sa.JSON(), nullable=True))
    with op.batch_alter_table("audiences") as batch:
        batch.add_column(sa.Column("rules", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column("include_anonymous", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.alter_column("query", existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    # Without rules, a rule audience has nothing to run: its query becomes one that selects
    # nobody, so an older version keeps it as an empty audience instead of failing.
    op.execute(
        "UPDATE audiences SET query = 'select null as user_id where 1 = 0' WHERE query IS NULL"
    )
    with op.batch_alter_table("audiences") as batch:
        batch.alter_column("query", existing_type=sa.Text(), nullable=False)
        batch.drop_column("include_anonymous")
        batch.drop_column("rules")
    with op.batch_alter_table("sources") as batch:
        batch.drop_column("layout")
