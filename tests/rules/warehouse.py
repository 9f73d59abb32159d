"""A small Segment-layout warehouse on each dialect rule audiences support, for the tests."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Double,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
)
from sqlalchemy.dialects import postgresql

from tests.rules.evaluator import Dataset
from worker.testing.databases import scratch_database

POSTGRES_URL = os.environ.get(
    "AUDIENCE_SYNC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_URL = os.environ.get(
    "AUDIENCE_SYNC_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306"
)
DIALECTS = ("sqlite", "duckdb", "mariadb", "postgresql")
# The dialects whose tests need a server: `make test-sqlite` deselects them by these marks.
SERVER_MARKS = {"mariadb": [pytest.mark.mariadb], "postgresql": [pytest.mark.postgres]}

# Timestamps: timezone-aware on PostgreSQL (as Segment writes them there), naive UTC elsewhere.
_TIMESTAMP = DateTime().with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")
EVENTS = {"Order Completed": "order_completed", "Page Viewed": "page_viewed"}


def _event_columns() -> list[Column[object]]:
    return [
        Column("id", String(40), primary_key=True),
        Column("anonymous_id", String(32)),
        Column("user_id", String(32)),
        Column("timestamp", _TIMESTAMP),
    ]


metadata = MetaData()
Table(
    "users",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("email", String(64)),
    Column("plan", String(16)),
    Column("age", Integer),
)
Table(
    "identifies",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("anonymous_id", String(32)),
    Column("user_id", String(32)),
    Column("timestamp", _TIMESTAMP),
)
Table("tracks", metadata, *_event_columns(), Column("event", String(64)))
Table(
    "order_completed",
    metadata,
    *_event_columns(),
    Column("revenue", Double),
    Column("currency", String(16)),
)
Table("page_viewed", metadata, *_event_columns(), Column("path", String(16)))


@contextmanager
def warehouse(dialect: str, tmp_path: Path) -> Iterator[Engine]:
    """An empty warehouse database of `dialect`, dropped afterwards."""
    with _database(dialect, tmp_path) as url:
        engine = create_engine(url)
        try:
            metadata.create_all(engine)
            yield engine
        finally:
            engine.dispose()


@contextmanager
def _database(dialect: str, tmp_path: Path) -> Iterator[str]:
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path / 'warehouse.db'}"
    elif dialect == "duckdb":
        yield f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    elif dialect == "mariadb":
        # Binary collation: text compares as the reference evaluator compares it.
        with scratch_database(
            MARIADB_URL, prefix="rules", options="CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ) as url:
            yield url
    elif dialect == "postgresql":
        with scratch_database(POSTGRES_URL, prefix="rules") as url:
            yield url
    else:
        raise ValueError(dialect)


def load(engine: Engine, data: Dataset) -> None:
    """Replace the warehouse's rows with `data` (tracks gets every event)."""
    is_aware = engine.dialect.name == "postgresql"

    def moment(row: dict[str, object]) -> dict[str, object]:
        value = row.get("timestamp")
        if is_aware and value is not None and hasattr(value, "replace"):
            return {**row, "timestamp": value.replace(tzinfo=UTC)}  # type: ignore[call-arg]
        return row

    tables = metadata.tables
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(table.delete())
        if data.users:
            connection.execute(tables["users"].insert(), data.users)
        if data.identifies:
            connection.execute(tables["identifies"].insert(), [moment(r) for r in data.identifies])
        for event, table_name in EVENTS.items():
            rows = [moment(r) for r in data.events.get(table_name, [])]
            if rows:
                connection.execute(tables[table_name].insert(), rows)
                tracks = [
                    {k: r[k] for k in ("id", "anonymous_id", "user_id", "timestamp")}
                    | {"event": event}
                    for r in rows
                ]
                connection.execute(tables["tracks"].insert(), tracks)
