"""The one place that asks which database the state lives in, and the upsert it speaks
(PostgreSQL and SQLite both speak ON CONFLICT)."""

from typing import Any

from sqlalchemy import Table, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert_for(session: Session, table: Table) -> Any:
    """An INSERT that supports on_conflict_do_* on the session's backend."""
    if is_postgresql(session):
        return postgresql.insert(table)
    return sqlite.insert(table)


def tune_for_whole_audience(session: Session) -> None:
    """For the rest of the transaction (PostgreSQL): statements over a whole audience hash
    it in memory rather than spill it to disk in batches, and are not JIT-compiled
    (compiling them costs more than it saves)."""
    if is_postgresql(session):
        session.execute(text("SET LOCAL work_mem = '256MB'"))
        session.execute(text("SET LOCAL jit = off"))
