"""Source rows: cleaning, and streaming from a real database."""

from pathlib import Path

import pytest

from worker.errors import SourceError
from worker.sources import SourceRow, check_query, clean_row, stream_source
from worker.testing.databases import ShopSource


@pytest.mark.parametrize(
    ("user_id", "anonymous_id", "email", "expected"),
    [
        ("u1", None, "a@x.io", SourceRow("u1", False, "a@x.io")),
        (17, None, None, SourceRow("17", False, None)),
        (None, "anon", None, SourceRow("anon", True, None)),
        ("", "anon", None, SourceRow("anon", True, None)),
        ("u1", "anon", None, SourceRow("u1", False, None)),
        ("  u1  ", None, "  ", SourceRow("u1", False, None)),
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
