"""The migrations build exactly the schema the models describe, on both backends."""

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from models import Base
from worker import db


def test_models_match_migrations(state_url: str) -> None:
    engine = create_engine(state_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_to_nothing_and_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    db.upgrade(url)
    db.downgrade(url, "base")
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    db.upgrade(url)
    engine = create_engine(url)
    assert "sync_runs" in inspect(engine).get_table_names()
    engine.dispose()


def test_the_latest_migration_goes_down_and_up_on_both_backends(state_url: str) -> None:
    """0003 adds resends_owed and drops pending_chunks; its downgrade undoes both."""

    def columns(table: str) -> set[str]:
        engine = create_engine(state_url)
        names = {c["name"] for c in inspect(engine).get_columns(table)}
        engine.dispose()
        return names

    db.downgrade(state_url, "0002")
    assert "pending_chunks" in columns("sync_runs")
    assert "resends_owed" not in columns("failing_members")
    db.upgrade(state_url)
    assert "pending_chunks" not in columns("sync_runs")
    assert "resends_owed" in columns("failing_members")
    test_models_match_migrations(state_url)


def test_the_observability_migration_goes_down_and_up(state_url: str) -> None:
    """0008 adds the alert tables, the heartbeats and an index on sync_runs; its downgrade
    removes them and nothing else."""

    def names() -> tuple[set[str], set[str]]:
        engine = create_engine(state_url)
        inspector = inspect(engine)
        tables = set(inspector.get_table_names())
        indexes = {i["name"] for i in inspector.get_indexes("sync_runs")}
        engine.dispose()
        return tables, {str(name) for name in indexes}

    ours = {"alert_channels", "alert_states", "alerts_sent", "heartbeats"}
    db.downgrade(state_url, "0008-1")
    tables, indexes = names()
    assert not ours & tables and "sync_runs" in tables
    assert "ix_sync_runs_pair_status" not in indexes
    db.upgrade(state_url)
    tables, indexes = names()
    assert ours <= tables and "ix_sync_runs_pair_status" in indexes
    test_models_match_migrations(state_url)


def test_the_phase_timings_migration_goes_down_and_up(state_url: str) -> None:
    """0009 adds the run timings per phase to sync_runs; its downgrade removes them."""

    def columns() -> set[str]:
        engine = create_engine(state_url)
        names = {c["name"] for c in inspect(engine).get_columns("sync_runs")}
        engine.dispose()
        return names

    ours = {"snapshot_seconds", "diff_seconds", "delivery_seconds", "delivery_started_at"}
    db.downgrade(state_url, "0008")
    assert not ours & columns() and "cancel_requested_at" in columns()
    db.upgrade(state_url)
    assert ours <= columns()
    test_models_match_migrations(state_url)


def test_the_schema_revision_every_command_checks_is_the_migrations_head() -> None:
    assert db.head_revision() == db.SCHEMA_REVISION
