"""Test databases: migrated state databases on SQLite or PostgreSQL, and source databases.

PostgreSQL tests get a fresh database per test, cloned from a migrated template, so each
test sees exactly the schema the migrations build. PostgreSQL must be reachable: the tests
fail (never skip) when it is not.
"""

import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from worker import db

POSTGRES_URL = os.environ.get(
    "AUDIENCE_SYNC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("AUDIENCE_SYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BACKENDS = ("sqlite", "postgresql")
_TEMPLATE = f"audience_sync_template_{os.getpid()}"
_template_ready = False


def redis_client(url: str = REDIS_URL) -> "redis.Redis":
    """A client of the test Redis; fails (never skips) when Redis does not answer."""
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise RuntimeError(
            f"Redis is required for these tests and is not reachable at {url} ({exc}); "
            "start it or set AUDIENCE_SYNC_TEST_REDIS_URL"
        ) from None
    return client


def _admin_engine() -> Engine:
    return create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")


def check_postgres() -> None:
    try:
        with _admin_engine().connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        raise RuntimeError(
            f"PostgreSQL is required for these tests and is not reachable at "
            f"{make_url(POSTGRES_URL).render_as_string(hide_password=True)} ({exc}); start it "
            "or set AUDIENCE_SYNC_TEST_POSTGRES_URL"
        ) from None


def _ensure_template() -> None:
    global _template_ready
    if _template_ready:
        return
    check_postgres()
    engine = _admin_engine()
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{_TEMPLATE}"'))
        conn.execute(text(f'CREATE DATABASE "{_TEMPLATE}"'))
    template_url = make_url(POSTGRES_URL).set(database=_TEMPLATE)
    db.upgrade(template_url.render_as_string(hide_password=False))
    engine.dispose()
    _template_ready = True


@contextmanager
def postgres_database(*, migrated: bool = True) -> Iterator[str]:
    """A fresh PostgreSQL database for one test (migrated from the template, or empty)."""
    if migrated:
        _ensure_template()
    else:
        check_postgres()
    name = f"audience_sync_test_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine()
    with engine.connect() as conn:
        template = f' TEMPLATE "{_TEMPLATE}"' if migrated else ""
        conn.execute(text(f'CREATE DATABASE "{name}"{template}'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def drop_template() -> None:
    if _template_ready:
        with _admin_engine().connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{_TEMPLATE}" WITH (FORCE)'))


@contextmanager
def state_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A migrated state database URL on the given backend."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
        db.upgrade(url)
        yield url
    else:
        with postgres_database() as url:
            yield url


@contextmanager
def source_database(backend: str, tmp_path: Path) -> Iterator["ShopSource"]:
    """A source database holding one `people` table with a flag column per audience."""
    if backend == "sqlite":
        source = ShopSource(f"sqlite:///{tmp_path / 'shop.db'}")
        try:
            yield source
        finally:
            source.engine.dispose()
    else:
        with postgres_database(migrated=False) as url:
            source = ShopSource(url)
            try:
                yield source
            finally:
                source.engine.dispose()


class ShopSource:
    """A source table `people(user_id, email, a, b, c)`; audiences select on the flags."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "create table people (user_id varchar(300), email varchar(300), "
                    "a integer not null default 0, b integer not null default 0, "
                    "c integer not null default 0)"
                )
            )

    def add(self, rows: Iterable[tuple[str | None, str | None, int, int, int]]) -> None:
        rows = list(rows)
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(
                text("insert into people values (:u, :e, :a, :b, :c)"),
                [{"u": u, "e": e, "a": a, "b": b, "c": c} for u, e, a, b, c in rows],
            )

    def set_flag(self, flag: str, user_ids: Iterable[str], value: int) -> None:
        assert flag in ("a", "b", "c")
        with self.engine.begin() as conn:
            conn.execute(
                text(f"update people set {flag} = :v where user_id = :u"),
                [{"v": value, "u": u} for u in user_ids],
            )

    def members(self, flag: str) -> set[str]:
        with self.engine.connect() as conn:
            return {
                row[0] for row in conn.execute(text(f"select user_id from people where {flag} = 1"))
            }

    def execute(self, sql: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(sql))
