"""Observability: alert channels, alert states, alerts sent, heartbeats; an index on
sync_runs for the metrics

Revision ID: 0008
Revises: 0006
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "alert_channels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("audience_keys", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_channels")),
        sa.UniqueConstraint("name", name=op.f("uq_alert_channels_name")),
    )
    op.create_table(
        "alert_states",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("destination_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("run_id", BigId, nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_alert_states_audience_id_audiences"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["destinations.id"],
            name=op.f("fk_alert_states_destination_id_destinations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("audience_id", "destination_id", name=op.f("pk_alert_states")),
    )
    op.create_table(
        "alerts_sent",
        sa.Column("id", BigId, nullable=False),
        sa.Column("channel", sa.String(100), nullable=False),
        sa.Column("event", sa.String(20), nullable=False),
        sa.Column("audience_key", sa.String(200), nullable=True),
        sa.Column("destination", sa.String(100), nullable=True),
        sa.Column("run_id", BigId, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts_sent")),
    )
    op.create_index("ix_alerts_sent_created", "alerts_sent", ["created_at"])
    op.create_table(
        "heartbeats",
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_heartbeats")),
    )
    op.create_index(
        "ix_sync_runs_pair_status",
        "sync_runs",
        ["audience_id", "destination_id", "status", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_sync_runs_pair_status", table_name="sync_runs")
    op.drop_table("heartbeats")
    op.drop_index("ix_alerts_sent_created", table_name="alerts_sent")
    op.drop_table("alerts_sent")
    op.drop_table("alert_states")
    op.drop_table("alert_channels")
