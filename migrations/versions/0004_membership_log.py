"""Membership kept once, changes kept as a log: audience_members and membership_log replace
snapshot_members; synced_members loses updated_at

Existing state is converted without sending anything: the kept snapshots of each audience
are replayed in order into the current membership and the log of past periods, and the
synced state (what each destination was told) is left as it is.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _create_membership_tables() -> None:
    op.create_table(
        "audience_members",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("member_id", sa.String(length=255), nullable=False),
        sa.Column("entered_snapshot_id", BigId, nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_audience_members_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("audience_id", "member_id", name=op.f("pk_audience_members")),
    )
    op.create_table(
        "membership_log",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("member_id", sa.String(length=255), nullable=False),
        sa.Column("exited_snapshot_id", BigId, nullable=False),
        sa.Column("entered_snapshot_id", BigId, nullable=False),
        sa.Column("exited_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_membership_log_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "audience_id", "member_id", "exited_snapshot_id", name=op.f("pk_membership_log")
        ),
    )


# Replaying one old snapshot S of audience A into the new tables (only what changed).
_REPLAY = [
    "INSERT INTO membership_log (audience_id, member_id, exited_snapshot_id, "
    "entered_snapshot_id, exited_at) "
    "SELECT m.audience_id, m.member_id, :s, m.entered_snapshot_id, :at "
    "FROM audience_members m WHERE m.audience_id = :a AND NOT EXISTS "
    "(SELECT 1 FROM snapshot_members x WHERE x.snapshot_id = :s AND x.member_id = m.member_id)",
    "DELETE FROM audience_members WHERE audience_id = :a AND NOT EXISTS "
    "(SELECT 1 FROM snapshot_members x WHERE x.snapshot_id = :s "
    "AND x.member_id = audience_members.member_id)",
    "INSERT INTO audience_members (audience_id, member_id, entered_snapshot_id) "
    "SELECT :a, x.member_id, :s FROM snapshot_members x "
    "WHERE x.snapshot_id = :s AND NOT EXISTS (SELECT 1 FROM audience_members m "
    "WHERE m.audience_id = :a AND m.member_id = x.member_id)",
]


def upgrade() -> None:
    _create_membership_tables()
    bind = op.get_bind()
    snapshots = bind.execute(
        sa.text("SELECT id, audience_id, created_at FROM snapshots ORDER BY audience_id, id")
    ).all()
    for snapshot_id, audience_id, created_at in snapshots:
        for statement in _REPLAY:
            bind.execute(sa.text(statement), {"s": snapshot_id, "a": audience_id, "at": created_at})
    op.drop_table("snapshot_members")
    with op.batch_alter_table("synced_members") as batch:
        batch.drop_column("updated_at")


def downgrade() -> None:
    with op.batch_alter_table("synced_members") as batch:
        batch.add_column(
            sa.Column(
                "updated_at",
                sa.DateTime(timezone=True),
                server_default=sa.text("CURRENT_TIMESTAMP"),
                nullable=False,
            )
        )
    op.create_table(
        "snapshot_members",
        sa.Column("snapshot_id", BigId, nullable=False),
        sa.Column("member_id", sa.String(length=255), nullable=False),
        sa.Column("is_anonymous", sa.Boolean(), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_snapshot_members_snapshot_id_snapshots"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("snapshot_id", "member_id", name=op.f("pk_snapshot_members")),
    )
    # The current membership becomes each audience's latest snapshot (older ones keep only
    # their counts: the old schema has no log), with the email a destination was sent.
    op.execute(
        "INSERT INTO snapshot_members (snapshot_id, member_id, is_anonymous, email) "
        "SELECT s.id, m.member_id, "
        "coalesce((SELECT max(CASE WHEN y.is_anonymous THEN 1 ELSE 0 END) FROM synced_members y "
        "WHERE y.audience_id = m.audience_id AND y.member_id = m.member_id), 0) = 1, "
        "(SELECT max(y.email) FROM synced_members y "
        "WHERE y.audience_id = m.audience_id AND y.member_id = m.member_id) "
        "FROM audience_members m "
        "JOIN snapshots s ON s.id = (SELECT max(l.id) FROM snapshots l "
        "WHERE l.audience_id = m.audience_id)"
    )
    op.drop_table("membership_log")
    op.drop_table("audience_members")
