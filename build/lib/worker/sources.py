"""Reading audience membership from a source database: read-only, time-limited, streamed."""

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import URL, Connection, Engine, create_engine, make_url, text
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from worker.db import with_postgres_driver
from worker.errors import SourceError

MAX_ID_LENGTH = 255
MAX_EMAIL_LENGTH = 255
ID_COLUMNS = ("user_id", "anonymous_id")


# Counted in a run's skipped_rows although the row is kept: an id with whitespace around it
# is most likely a data problem the user wants to hear about, but it is still an id.
PADDED_ID = "padded_id"


@dataclass(frozen=True, slots=True)
class SourceRow:
    member_id: str
    is_anonymous: bool
    email: str | None

    @property
    def is_padded(self) -> bool:
        """Whether the id has whitespace around it (kept as it is: ' alice ' is not 'alice')."""
        return self.member_id != self.member_id.strip()


def clean_row(user_id: Any, anonymous_id: Any, email: Any) -> SourceRow | str:
    """A source row as a member, or the reason it is skipped (`null_id`, `id_too_long`,
    `invalid_id`).

    The id is the exact text the source returned: never stripped nor case-folded, so
    ' alice ' and 'alice' are two users. Only a NULL or empty id (nothing but whitespace
    counts as empty) is no id. `user_id` wins over `anonymous_id` when both are present. An
    email that cannot be valid (empty, over 255 characters, a NUL character) is dropped, not
    the member.
    """
    for value, is_anonymous in ((user_id, False), (anonymous_id, True)):
        if value is None:
            continue
        member_id = str(value)
        if not member_id.strip():
            continue
        if len(member_id) > MAX_ID_LENGTH:
            return "id_too_long"
        if "\x00" in member_id:  # no database text column takes it (PostgreSQL refuses it)
            return "invalid_id"
        clean_email = str(email).strip() if email is not None else ""
        if not clean_email or len(clean_email) > MAX_EMAIL_LENGTH or "\x00" in clean_email:
            return SourceRow(member_id, is_anonymous, None)
        return SourceRow(member_id, is_anonymous, clean_email)
    return "null_id"


_engines: dict[str, Engine] = {}


def source_engine(url: str) -> Engine:
    """One engine per source URL per process."""
    engine = _engines.get(url)
    if engine is None:
        engine = _engines[url] = create_engine(_driver_url(url), pool_pre_ping=True)
    return engine


def _driver_url(url: str) -> str | URL:
    """`postgres://` sources are PostgreSQL through psycopg, as for the state database."""
    try:
        return with_postgres_driver(make_url(url))
    except ArgumentError:
        return url  # create_engine says what is wrong with it


def dispose_source_engines() -> None:
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()


def _begin_read_only(connection: Connection, timeout_seconds: float) -> None:
    """Make the transaction unable to write and bound its run time."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(text("SET TRANSACTION READ ONLY"))
        connection.execute(text(f"SET LOCAL statement_timeout = {int(timeout_seconds * 1000)}"))
    elif dialect == "sqlite":
        connection.exec_driver_sql("PRAGMA query_only = ON")
        deadline = time.monotonic() + timeout_seconds
        raw: Any = connection.connection.driver_connection
        # SQLite has no statement timeout: abort from the VM's progress callback instead.
        raw.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    elif dialect in ("mysql", "mariadb"):
        connection.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
        connection.exec_driver_sql(
            f"SET SESSION max_execution_time = {int(timeout_seconds * 1000)}"
        )


def _end_read_only(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        raw: Any = connection.connection.driver_connection
        raw.set_progress_handler(None, 0)
        connection.exec_driver_sql("PRAGMA query_only = OFF")


def stream_source(
    url: str, query: str, *, timeout_seconds: float, fetch_size: int, source_name: str
) -> Iterator[list[SourceRow | str]]:
    """Run the audience query and yield cleaned rows in chunks (never the whole result).

    A text item of a chunk is a reason to count in the run's skipped_rows: a row skipped
    for that reason, or `padded_id` right after a row that is kept.

    Raises SourceError for anything the source does wrong: the caller keeps nothing.
    """
    engine = source_engine(url)
    try:
        with engine.connect() as connection, connection.begin():
            _begin_read_only(connection, timeout_seconds)
            try:
                result = connection.execution_options(
                    stream_results=True, yield_per=fetch_size
                ).execute(text(query))
                columns = [str(c).lower() for c in list(result.keys())]
                positions = _column_positions(columns, source_name)
                for partition in result.partitions(fetch_size):
                    yield _clean_chunk(partition, positions)
            finally:
                _end_read_only(connection)
    except SourceError:
        raise
    except DBAPIError as exc:
        raise SourceError(f"source {source_name}: {_db_message(exc)}") from None
    except SQLAlchemyError as exc:
        raise SourceError(f"source {source_name}: {exc}") from None


def check_query(url: str, query: str, *, timeout_seconds: float, source_name: str) -> list[str]:
    """Run the query with no rows wanted, to refuse a broken one at `apply`; return columns."""
    engine = source_engine(url)
    try:
        with engine.connect() as connection, connection.begin():
            _begin_read_only(connection, timeout_seconds)
            try:
                # On lines of its own: a `--` comment ending the query must not hide the `)`.
                result = connection.execute(text(f"SELECT * FROM (\n{query}\n) AS q WHERE 1 = 0"))
                columns = [str(c).lower() for c in list(result.keys())]
                result.close()
            finally:
                _end_read_only(connection)
    except DBAPIError as exc:
        raise SourceError(f"source {source_name}: {_db_message(exc)}") from None
    except SQLAlchemyError as exc:
        raise SourceError(f"source {source_name}: {exc}") from None
    _column_positions(columns, source_name)
    return columns


def _column_positions(columns: list[str], source_name: str) -> tuple[int | None, ...]:
    if not any(name in columns for name in ID_COLUMNS):
        raise SourceError(
            f"source {source_name}: the query returned the columns "
            f"{', '.join(columns) or '(none)'} but needs a user_id or anonymous_id column "
            "(alias one, e.g. `select id as user_id, email from users`)"
        )
    return tuple(
        columns.index(name) if name in columns else None
        for name in ("user_id", "anonymous_id", "email")
    )


def _clean_chunk(partition: Any, positions: tuple[int | None, ...]) -> list[SourceRow | str]:
    cleaned: list[SourceRow | str] = []
    for row in partition:
        item = _clean(row, positions)
        cleaned.append(item)
        if isinstance(item, SourceRow) and item.is_padded:
            cleaned.append(PADDED_ID)
    return cleaned


def _clean(row: Any, positions: tuple[int | None, ...]) -> SourceRow | str:
    user, anonymous, email = (row[p] if p is not None else None for p in positions)
    return clean_row(user, anonymous, email)


def _db_message(exc: DBAPIError) -> str:
    message = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    if "interrupted" in message or "statement timeout" in message:
        return f"the query ran past its statement timeout ({message})"
    return message
