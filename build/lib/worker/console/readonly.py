"""Sessions that cannot write: the console's database connections are read-only at the
database (SQLite `query_only`, a PostgreSQL read-only session) and its sessions refuse to
flush."""

from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

from worker.db import make_engine, make_session_factory


class ReadOnlyError(RuntimeError):
    """Something tried to write through the console's session."""


def read_only_engine(url: str) -> Engine:
    engine = make_engine(url)
    backend = engine.dialect.name

    @event.listens_for(engine, "connect")
    def _read_only(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if backend == "sqlite":
            cursor.execute("PRAGMA query_only = ON")
        elif backend == "postgresql":
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        cursor.close()
        if backend == "postgresql":
            dbapi_connection.commit()

    return engine


def read_only_sessions(engine: Engine) -> sessionmaker[Session]:
    sessions = make_session_factory(engine)

    @event.listens_for(sessions, "before_flush")
    def _refuse(session: Session, _context: Any, _instances: Any) -> None:
        raise ReadOnlyError("the console's database session is read-only")

    return sessions
