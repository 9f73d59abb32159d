"""State database: URLs, engines, sessions, migrations and the check that the schema is
there before a command reads it."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, pool, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from worker.errors import ConfigError

# Alembic is imported by the functions that migrate or check the schema: it costs about
# 0.2 s, which every process would otherwise pay at start.
if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The PostgreSQL driver the project installs; `postgres://` (Heroku, many hosts) and a bare
# `postgresql://` would otherwise mean no driver or one that is not installed.
POSTGRES_DRIVER = "postgresql+psycopg"
_POSTGRES_ALIASES = ("postgres", "postgresql")
# A state database that does not answer within this is reported, not waited on.
CHECK_CONNECT_TIMEOUT_SECONDS = 5


class StateDatabaseError(ConfigError):
    """The state database cannot be used as it is: unreachable, without the schema, or at
    another revision than this version's. The message names it with its password hidden."""


@dataclass(frozen=True, slots=True)
class UpgradeOutcome:
    """What `upgrade` did: the revision before (None: no schema) and after."""

    before: str | None
    after: str | None

    def describe(self) -> str:
        if self.before is None:
            return f"created the schema at revision {self.after}"
        if self.before == self.after:
            return f"already at revision {self.after}"
        return f"upgraded from revision {self.before} to {self.after}"


def normalise_url(url: str) -> URL:
    """The URL as SQLAlchemy should open it: `postgres://` and `postgresql://` mean
    PostgreSQL through psycopg. Raises StateDatabaseError for a URL that cannot be parsed."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # The message of make_url repeats the URL, password included.
        raise StateDatabaseError(
            "the state database URL cannot be parsed (expected e.g. "
            "sqlite:///./audience_sync.db or postgresql://user:password@host/db)"
        ) from None
    return with_postgres_driver(parsed)


def with_postgres_driver(parsed: URL) -> URL:
    """`postgres://` and `postgresql://` as PostgreSQL through psycopg; others unchanged."""
    if parsed.drivername in _POSTGRES_ALIASES:
        return parsed.set(drivername=POSTGRES_DRIVER)
    return parsed


def safe_url(url: str | URL) -> str:
    """The URL with its password hidden, to show the user."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError:
        return "(an unparsable URL)"
    return parsed.render_as_string(hide_password=True)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create the engine for the state database (once per process)."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        # Several processes (CLI, workers) share one file: wait for locks instead of failing.
        engine = create_engine(parsed, connect_args={"timeout": 60}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(parsed, pool_pre_ping=True, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str) -> "AlembicConfig":
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    rendered = normalise_url(url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


# The revision this version's schema is at, so that the check before every command need not
# load the migrations (a test holds it equal to their head), and the table alembic keeps it in.
SCHEMA_REVISION = "0009"
VERSION_TABLE = "alembic_version"


def head_revision() -> str | None:
    """The newest revision the migrations know."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _sqlite_file(parsed: URL) -> Path | None:
    """The file of a SQLite URL (None for an in-memory database)."""
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


def _unreachable(url: str, exc: SQLAlchemyError) -> StateDatabaseError:
    orig = getattr(exc, "orig", None)
    lines = str(orig if orig is not None else exc).strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    return StateDatabaseError(
        f"state database at {safe_url(url)} is unreachable ({reason}): check "
        "AUDIENCE_SYNC_DATABASE_URL"
    )


def _not_initialised(url: str) -> StateDatabaseError:
    return StateDatabaseError(
        f"state database at {safe_url(url)} is not initialised: run `audience-sync db upgrade`"
    )


def _probe_engine(parsed: URL) -> Engine:
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = CHECK_CONNECT_TIMEOUT_SECONDS
    return create_engine(parsed, poolclass=pool.NullPool, connect_args=connect_args)


def current_revision(url: str) -> str | None:
    """The schema revision of the state database (None: no schema yet); creates nothing.

    Raises StateDatabaseError if the database cannot be reached.
    """
    parsed = normalise_url(url)
    sqlite_file = _sqlite_file(parsed)
    if sqlite_file is not None and not sqlite_file.exists():
        # Opening it would create an empty file: a read must leave the disk as it was.
        return None
    engine = _probe_engine(parsed)
    try:
        with engine.connect() as connection:
            # Read as alembic keeps it, without loading alembic (every command checks this).
            if not inspect(connection).has_table(VERSION_TABLE):
                return None
            revision = connection.scalar(text(f"SELECT version_num FROM {VERSION_TABLE}"))
            return None if revision is None else str(revision)
    except SQLAlchemyError as exc:
        raise _unreachable(url, exc) from None
    finally:
        engine.dispose()


def is_known_revision(revision: str) -> bool:
    """Whether this version's migrations know `revision`: a database at a revision they do
    not know was migrated by a newer version of audience-sync."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError as AlembicCommandError

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    try:
        return script.get_revision(revision) is not None
    except AlembicCommandError:  # alembic turns "no such revision" into this
        return False


def check_schema(url: str) -> None:
    """Refuse, in one line, a state database a command cannot use: unreachable, without the
    schema, at an older revision than this version needs, or at a newer one (migrated by a
    newer version of audience-sync, which this older one must not write to)."""
    revision = current_revision(url)
    if revision is None:
        raise _not_initialised(url)
    if revision == SCHEMA_REVISION:
        return
    head = head_revision()
    if not is_known_revision(revision):
        raise StateDatabaseError(
            f"state database at {safe_url(url)} is at revision {revision}, newer than this "
            f"version of audience-sync knows (its newest is {head}): this audience-sync is "
            "older than the database; run the version that upgraded it"
        )
    raise StateDatabaseError(
        f"state database at {safe_url(url)} is at revision {revision}, "
        f"this version needs {head}: run `audience-sync db upgrade`"
    )


def upgrade(url: str, revision: str = "head") -> UpgradeOutcome:
    """Bring the state database schema up to `revision`; say what was done."""
    from alembic import command

    parsed = normalise_url(url)
    sqlite_file = _sqlite_file(parsed)
    if sqlite_file is not None and not sqlite_file.parent.is_dir():
        raise StateDatabaseError(
            f"state database at {safe_url(url)} cannot be created: the directory "
            f"{sqlite_file.parent} does not exist"
        )
    # Reaching the database first: an unreachable one is told in one line.
    before = current_revision(url)
    command.upgrade(alembic_config(url), revision)
    return UpgradeOutcome(before, current_revision(url))


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
