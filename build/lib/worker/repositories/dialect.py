"""The one place that asks which database the state lives in, and the upsert it speaks
(PostgreSQL and SQLite both speak ON CONFLICT)."""

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert_for(session: Session, table: Table) -> Any:
    """An INSERT that supports on_conflict_do_* on the session's backend."""
    if is_postgresql(session):
        return postgresql.insert(table)
    return sqlite.insert(table)
