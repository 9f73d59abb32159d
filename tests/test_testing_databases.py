"""The throwaway databases the tests and the benchmark make on a server."""

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.rules.warehouse import MARIADB_URL
from worker.testing.databases import POSTGRES_URL, scratch_database


def _names(server_url: str, query: str) -> set[str]:
    engine = create_engine(server_url)
    try:
        with engine.connect() as connection:
            return {row[0] for row in connection.execute(text(query))}
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("server_url", "list_databases"),
    [
        pytest.param(
            POSTGRES_URL, "select datname from pg_database", marks=pytest.mark.postgres, id="pg"
        ),
        pytest.param(MARIADB_URL, "show databases", marks=pytest.mark.mariadb, id="mariadb"),
    ],
)
def test_a_scratch_database_is_dropped_even_with_a_connection_open(
    server_url: str, list_databases: str
) -> None:
    with scratch_database(server_url, prefix="scratch_test") as url:
        name = make_url(url).database
        assert name is not None and name.startswith("scratch_test_")
        assert name in _names(server_url, list_databases)
        left_open = create_engine(url).connect()  # a test that forgot to close its own
        left_open.execute(text("select 1"))
    assert name not in _names(server_url, list_databases)
    left_open.invalidate()


def test_a_scratch_database_needs_a_server() -> None:
    with (
        pytest.raises(ValueError, match="needs a PostgreSQL or MariaDB server, not sqlite"),
        scratch_database("sqlite:///x.db"),
    ):
        pass
