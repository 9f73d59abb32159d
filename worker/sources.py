"""Reading audience membership from a source database: read-only, time-limited, streamed.

Two paths. The streamed path reads rows in chunks and cleans them in Python (any source,
any state database). The COPY path, from a PostgreSQL source into a PostgreSQL state
database, hands over the raw bytes of `COPY (query) TO STDOUT` for the state database to
load with `COPY ... FROM STDIN` and clean in SQL: rows never become Python objects.
"""

import select
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import psycopg
from sqlalchemy import (
    URL,
    Connection,
    Engine,
    Executable,
    Select,
    create_engine,
    false,
    make_url,
    text,
)
from sqlalchemy import select as select_from
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
    # The anonymous id of a member identified by its user id, when the source has both: it
    # travels with the member and is sent, but is not its identity.
    anonymous_id: str | None = None

    @property
    def is_padded(self) -> bool:
        """Whether the id has whitespace around it (kept as it is: ' alice ' is not 'alice')."""
        return self.member_id != self.member_id.strip()


@dataclass(frozen=True, slots=True)
class CopyBlock:
    """Rows of a `COPY ... TO STDOUT` exactly as the source sent them (COPY text, one line
    each), ready for `COPY ... FROM STDIN`; its length is its number of rows."""

    data: bytes | bytearray
    rows: int

    def __len__(self) -> int:
        return self.rows


def clean_row(user_id: Any, anonymous_id: Any, email: Any) -> SourceRow | str:
    """A source row as a member, or the reason it is skipped (`null_id`, `id_too_long`,
    `invalid_id`).

    The id is the exact text the source returned: never stripped nor case-folded, so
    ' alice ' and 'alice' are two users. Only a NULL or empty id (nothing but whitespace
    counts as empty) is no id. `user_id` wins over `anonymous_id` when both are present: it is
    the member's identity, and the anonymous id travels with it (one that could not be an id,
    empty, too long or with a NUL character, is dropped). An email that cannot be valid
    (empty, over 255 characters, a NUL character) is dropped, not the member.
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
            clean_email = ""
        other = None if is_anonymous else travelling_anonymous_id(anonymous_id)
        return SourceRow(member_id, is_anonymous, clean_email or None, other)
    return "null_id"


def travelling_anonymous_id(value: Any) -> str | None:
    """The anonymous id that travels with a user id, or None when it could not be an id."""
    if value is None:
        return None
    text_ = str(value)
    if not text_.strip() or len(text_) > MAX_ID_LENGTH or "\x00" in text_:
        return None
    return text_


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


# An audience's query: SQL text as written, or a rule audience's compiled SELECT (its values
# bound parameters). Both take the same path from here on.
AudienceQuery = str | Select[Any]


def _statement(query: AudienceQuery) -> Executable:
    return text(query) if isinstance(query, str) else query


def stream_source(
    url: str, query: AudienceQuery, *, timeout_seconds: float, fetch_size: int, source_name: str
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
                ).execute(_statement(query))
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


# Column types whose PostgreSQL text form is what Python's str() gives the streamed path
# (text, varchar, int2, int4, int8, uuid), so both paths keep the very same ids and emails.
_COPY_SAFE_TYPES = {25, 1043, 21, 23, 20, 2950}


def copy_statement(
    url: str, query: AudienceQuery, *, timeout_seconds: float, source_name: str
) -> str | None:
    """The `COPY (...) TO STDOUT` statement that reads the query's user_id, anonymous_id and
    email as text, or None when the source cannot take the COPY path (not PostgreSQL, or a
    column whose text form could differ from the streamed path's).

    Raises SourceError when the source fails, as `stream_source` does.
    """
    try:
        if make_url(_driver_url(url)).get_backend_name() != "postgresql":
            return None
    except ArgumentError:
        return None  # the streamed path says what is wrong with the URL
    engine = source_engine(url)
    try:
        with engine.connect() as connection, connection.begin():
            _begin_read_only(connection, timeout_seconds)
            raw: Any = connection.connection.driver_connection
            if not isinstance(query, str):
                query = _client_bound(query, connection)
            with raw.cursor() as cursor:
                # On lines of its own: a `--` comment ending the query must not hide the `)`.
                cursor.execute(f"SELECT * FROM (\n{query}\n) AS q LIMIT 0")
                description = list(cursor.description or [])
    except DBAPIError as exc:
        raise SourceError(f"source {source_name}: {_db_message(exc)}") from None
    except SQLAlchemyError as exc:
        raise SourceError(f"source {source_name}: {exc}") from None
    except psycopg.Error as exc:
        raise SourceError(f"source {source_name}: {_driver_message(exc)}") from None
    names = [str(column.name) for column in description]
    lowered = [name.lower() for name in names]
    _column_positions(lowered, source_name)
    selected = []
    for wanted in ("user_id", "anonymous_id", "email"):
        if wanted not in lowered:
            selected.append("NULL")
            continue
        if lowered.count(wanted) > 1:
            return None
        column = description[lowered.index(wanted)]
        if column.type_code not in _COPY_SAFE_TYPES:
            return None
        quoted = '"' + column.name.replace('"', '""') + '"'
        selected.append(f"q.{quoted}::text")
    return f"COPY (SELECT {', '.join(selected)} FROM (\n{query}\n) AS q) TO STDOUT"


def _client_bound(query: Select[Any], connection: Connection) -> str:
    """A compiled SELECT as SQL text for COPY, which takes no server-side parameters: its
    values are bound by the driver, as psycopg binds a COPY's parameters, never pasted in
    by this code."""
    compiled = query.compile(
        dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    raw: Any = connection.connection.driver_connection
    return psycopg.ClientCursor(raw).mogrify(str(compiled), compiled.params)


def copy_rows(
    url: str, statement: str, *, timeout_seconds: float, fetch_size: int, source_name: str
) -> Iterator[CopyBlock]:
    """Run a `copy_statement` and yield its rows in blocks of `fetch_size`: the COPY
    text bytes the source sent (user_id, anonymous_id, email; never decoded here).

    Raises SourceError for anything the source does wrong: the caller keeps nothing.
    """
    engine = source_engine(url)
    try:
        with engine.connect() as connection, connection.begin():
            _begin_read_only(connection, timeout_seconds)
            raw: Any = connection.connection.driver_connection
            with raw.cursor() as cursor, cursor.copy(statement) as copy:
                yield from _copy_blocks(copy, raw.pgconn, fetch_size)
    except DBAPIError as exc:
        raise SourceError(f"source {source_name}: {_db_message(exc)}") from None
    except SQLAlchemyError as exc:
        raise SourceError(f"source {source_name}: {exc}") from None
    except psycopg.Error as exc:
        raise SourceError(f"source {source_name}: {_driver_message(exc)}") from None


def _copy_blocks(copy: Any, pgconn: Any, size: int) -> Iterator[CopyBlock]:
    """The rows of a COPY TO, as the driver receives them, in blocks of `size` rows.

    Rows libpq already holds are appended to one buffer in a tight loop (each Python step
    added per row costs a million-row audience most of a second; a list of a million
    small buffers, a third of a second more). Only when libpq holds no whole row is the
    socket read, and only when that brought nothing does the loop wait, in poll(), which
    lets the state database's writer thread run. Needs the driver's COPY object to say it
    is finished; where it cannot, the driver's own iteration is used.
    """
    if not hasattr(copy, "_finished"):
        rows = iter(copy)
        while taken := list(islice(rows, size)):
            yield CopyBlock(b"".join(taken), len(taken))
        return
    get_copy_data, consume_input = pgconn.get_copy_data, pgconn.consume_input
    readable = select.poll()
    readable.register(pgconn.socket, select.POLLIN)
    buffer = bytearray()
    extend = buffer.extend
    received = block_start = received_at_last_read = 0
    while True:
        nbytes, data = get_copy_data(1)  # 1: only rows libpq already holds
        if nbytes > 0:
            extend(data)
            received += 1
            if received - block_start < size:
                continue
            yield CopyBlock(buffer, size)
            # The writer may still hold the block: the next one gets a buffer of its own.
            buffer, block_start = bytearray(), received
            extend = buffer.extend
        elif nbytes == 0:
            if received == received_at_last_read:  # the last read brought no whole row
                readable.poll()
            consume_input()
            received_at_last_read = received
        else:  # the COPY ended (-1) or failed (-2): take its outcome as the driver would
            copy._finished = True
            results = []
            while (result := pgconn.get_result()) is not None:
                results.append(result)
            if nbytes == -2 or not results:
                raise psycopg.OperationalError(pgconn.error_message.decode(errors="replace"))
            if results[0].status != psycopg.pq.ExecStatus.COMMAND_OK:
                raise psycopg.errors.error_from_result(results[0])
            if received > block_start:
                yield CopyBlock(buffer, received - block_start)
            return


def check_query(
    url: str, query: AudienceQuery, *, timeout_seconds: float, source_name: str
) -> list[str]:
    """Run the query with no rows wanted, to refuse a broken one at `apply`; return columns."""
    engine = source_engine(url)
    try:
        with engine.connect() as connection, connection.begin():
            _begin_read_only(connection, timeout_seconds)
            try:
                if isinstance(query, str):
                    # On lines of its own: a `--` comment ending the query must not hide the `)`.
                    wrapped: Executable = text(f"SELECT * FROM (\n{query}\n) AS q WHERE 1 = 0")
                else:
                    wrapped = select_from(query.subquery("q")).where(false())
                result = connection.execute(wrapped)
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
    return _timeout_message(message)


def _driver_message(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return _timeout_message(lines[0] if lines else type(exc).__name__)


def _timeout_message(message: str) -> str:
    if "interrupted" in message or "statement timeout" in message:
        return f"the query ran past its statement timeout ({message})"
    return message
