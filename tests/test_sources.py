"""Source rows: cleaning, and streaming from a real database."""

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from worker.errors import SourceError
from worker.sources import (
    PADDED_ID,
    SourceRow,
    check_query,
    clean_row,
    dispose_source_engines,
    stream_source,
)
from worker.testing.databases import ShopSource, postgres_database


@pytest.mark.parametrize(
    ("user_id", "anonymous_id", "email", "expected"),
    [
        ("u1", None, "a@x.io", SourceRow("u1", False, "a@x.io")),
        (17, None, None, SourceRow("17", False, None)),
        (None, "anon", None, SourceRow("anon", True, None)),
        ("", "anon", None, SourceRow("anon", True, None)),
        # Both ids: the user id is the identity, the anonymous id travels with it.
        ("u1", "anon", None, SourceRow("u1", False, None, "anon")),
        ("u1", "  ", None, SourceRow("u1", False, None)),
        ("u1", "a" * 256, None, SourceRow("u1", False, None)),
        ("u1", "a\x00", None, SourceRow("u1", False, None)),
        ("  u1  ", None, "  ", SourceRow("  u1  ", False, None)),  # the id as it is
        ("Alice", None, None, SourceRow("Alice", False, None)),  # no case folding
        ("\talice\n", None, None, SourceRow("\talice\n", False, None)),
        ("   ", "anon", None, SourceRow("anon", True, None)),  # only whitespace: no id
        ("u1", None, "x" * 256, SourceRow("u1", False, None)),
        (None, None, "a@x.io", "null_id"),
        ("   ", None, None, "null_id"),
        ("u" * 256, None, None, "id_too_long"),
        ("u" * 255, None, None, SourceRow("u" * 255, False, None)),
    ],
)
def test_clean_row(
    user_id: object, anonymous_id: object, email: object, expected: SourceRow | str
) -> None:
    assert clean_row(user_id, anonymous_id, email) == expected


@pytest.mark.parametrize(
    ("member_id", "is_padded"),
    [(" alice ", True), ("alice ", True), ("\talice", True), ("alice", False), ("a b", False)],
)
def test_padded_ids(member_id: str, is_padded: bool) -> None:
    assert SourceRow(member_id, False, None).is_padded is is_padded


def test_padded_ids_are_kept_and_counted(shop: ShopSource) -> None:
    shop.add([(" alice ", None, 1, 0, 0), ("alice", None, 1, 0, 0), ("ALICE", None, 1, 0, 0)])
    [chunk] = stream_source(
        shop.url,
        "select user_id, email from people",
        timeout_seconds=10,
        fetch_size=10,
        source_name="shop",
    )
    rows = [item for item in chunk if isinstance(item, SourceRow)]
    assert sorted(row.member_id for row in rows) == [" alice ", "ALICE", "alice"]
    assert [item for item in chunk if isinstance(item, str)] == [PADDED_ID]
    assert chunk[chunk.index(SourceRow(" alice ", False, None)) + 1] == PADDED_ID


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgres_urls_without_a_driver_are_postgresql(scheme: str) -> None:
    with postgres_database(migrated=False) as url:
        plain = make_url(url).set(drivername=scheme).render_as_string(hide_password=False)
        columns = check_query(plain, "select 1 as user_id", timeout_seconds=10, source_name="s")
        assert columns == ["user_id"]
        dispose_source_engines()


def test_stream_in_chunks(shop: ShopSource) -> None:
    shop.add((f"u{i}", None, 1, 0, 0) for i in range(25))
    chunks = list(
        stream_source(
            shop.url,
            "select user_id, email from people",
            timeout_seconds=10,
            fetch_size=10,
            source_name="shop",
        )
    )
    assert [len(c) for c in chunks] == [10, 10, 5]


def test_query_without_id_column_names_the_columns(shop: ShopSource) -> None:
    with pytest.raises(SourceError, match=r"returned the columns email, a but needs a user_id"):
        check_query(shop.url, "select email, a from people", timeout_seconds=10, source_name="shop")


def test_check_query_reports_sql_errors(shop: ShopSource) -> None:
    with pytest.raises(SourceError, match=r"source shop: .*nope"):
        check_query(shop.url, "select user_id from nope", timeout_seconds=10, source_name="shop")


def test_unreachable_source(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing' / 'db.sqlite'}"
    with pytest.raises(SourceError, match="source far"):
        list(
            stream_source(
                url, "select 1 as user_id", timeout_seconds=5, fetch_size=10, source_name="far"
            )
        )
