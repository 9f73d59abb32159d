"""Guarantees about the source, on SQLite and PostgreSQL sources:

5. Source failures send nothing: an SQL error, a source that cannot be reached, a statement
   timeout (also one that strikes after rows were read): the run fails, no snapshot is
   kept, nothing is sent, no exit is computed.
6. Source queries cannot write: the database refuses it (and `apply` refuses the query).
7. Bad rows are counted, not fatal: `skipped_rows` on the run, shown by `runs show`.
"""

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from models import AudienceMember, MembershipPeriod, Snapshot, SyncedMember, SyncRun
from worker.config import load_config
from worker.domain import SyncRequest
from worker.errors import ConfigError
from worker.repositories import snapshots as snapshot_repo
from worker.runtime import Runtime, build_runtime
from worker.service import SyncService
from worker.settings import Settings
from worker.testing.databases import ShopSource, postgres_database
from worker.testing.factories import audience, read_calls, write_config
from worker.testing.guarantees import invoke

KEY = "source_test"
GOOD_QUERY = "select user_id, email from people where a = 1"
HEAVY_SQLITE = (
    "(with recursive r(n) as (select 1 union all select n + 1 from r where n < 2000000000) "
    "select count(*) as n from r)"
)


def _apply(
    runtime: Runtime,
    tmp_path: Path,
    source_url: str,
    query: str,
    *,
    timeout: float = 30,
    check_queries: bool = False,
) -> None:
    path = write_config(
        tmp_path,
        source_url=source_url,
        audiences=[{**audience("Source Test", "a"), "query": query}],
    )
    text = path.read_text().replace("    url: ", f"    statement_timeout: {timeout}\n    url: ", 1)
    path.write_text(text)
    runtime.service.apply(load_config(path), check_queries=check_queries)


def _counts(runtime: Runtime) -> dict[str, Any]:
    with runtime.sessions() as session:
        return {
            "snapshots": session.scalar(select(func.count()).select_from(Snapshot)),
            "members": session.scalar(select(func.count()).select_from(AudienceMember)),
            "membership_log": session.scalar(select(func.count()).select_from(MembershipPeriod)),
            "staging": snapshot_repo.drop_stale_staging(session),
            "synced": sorted(
                session.execute(select(SyncedMember.member_id, SyncedMember.is_member)).all()
            ),
        }


def _last_run(runtime: Runtime) -> SyncRun:
    with runtime.sessions() as session:
        run = session.scalar(select(SyncRun).order_by(SyncRun.id.desc()).limit(1))
        assert run is not None
        return run


def _failing_sources(backend: str, shop: ShopSource, tmp_path: Path) -> list[tuple[str, ...]]:
    """(what, source url, query, expected in the error) for each way a source fails."""
    if backend == "postgresql":
        unreachable = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
        slow = f"{GOOD_QUERY} and pg_sleep(3) is not null"
        slow_after_rows = f"{GOOD_QUERY} union all select 'late', null from pg_sleep(3)"
    else:
        unreachable = f"sqlite:///{tmp_path / 'no-such-directory' / 'shop.db'}"
        slow = f"{GOOD_QUERY} and (select n from {HEAVY_SQLITE}) > 0"
        slow_after_rows = f"{GOOD_QUERY} union all select 'late', null from {HEAVY_SQLITE}"
    return [
        ("SQL error", shop.url, f"{GOOD_QUERY} and no_such_column = 1", "no_such_column"),
        ("unreachable source", unreachable, GOOD_QUERY, "source shop:"),
        ("statement timeout", shop.url, slow, "statement timeout"),
        ("timeout after rows were read", shop.url, slow_after_rows, "statement timeout"),
    ]


def test_source_failures_send_nothing(
    tmp_path: Path,
    shop: ShopSource,
    runtime: Runtime,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    subtests: pytest.Subtests,
) -> None:
    shop.add((f"u{i}", f"u{i}@example.com", 1, 0, 0) for i in range(5))
    _apply(runtime, tmp_path, shop.url, GOOD_QUERY, check_queries=True)
    [pair] = runtime.service.select_pairs()
    assert runtime.service.sync_pair(pair, SyncRequest()).status == "succeeded"
    out = tmp_path / "identify.ndjson"
    sent, before = len(read_calls(out)), _counts(runtime)
    # Two rows a fetch, so a query failing late has already handed rows to the snapshot.
    service = SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings.model_copy(update={"source_fetch_size": 2}),
        destinations=runtime.destinations,
    )
    written: list[int] = []
    _count_snapshot_writes(monkeypatch, written)

    for what, url, query, expected in _failing_sources(backend, shop, tmp_path):
        with subtests.test(what):
            written.clear()
            _apply(runtime, tmp_path, url, query, timeout=0.5)
            summary = service.sync_pair(pair, SyncRequest())
            assert summary.status == "failed", summary
            assert summary.error is not None and expected in summary.error, summary.error
            run = _last_run(runtime)
            assert (run.members, run.entered, run.exited, run.sent) == (0, 0, 0, 0)
            assert run.snapshot_id is None
            assert _counts(runtime) == before
            assert len(read_calls(out)) == sent
            if what == "timeout after rows were read":
                assert sum(written) >= 2, "the query failed before any row was read"

    # Nothing was left locked or half-done: the fixed source syncs at once, and sends nothing
    # because nothing changed.
    _apply(runtime, tmp_path, shop.url, GOOD_QUERY)
    summary = service.sync_pair(pair, SyncRequest())
    assert (summary.status, summary.sent) == ("succeeded", 0)


def _count_snapshot_writes(monkeypatch: pytest.MonkeyPatch, written: list[int]) -> None:
    """Record how many rows each chunk the service writes to a snapshot holds (either path:
    cleaned rows streamed, or raw rows by COPY)."""
    original = snapshot_repo.add_members
    original_block = snapshot_repo.add_copy_block

    def add_members(session: Any, snapshot_id: int, rows: Any) -> None:
        written.append(len(rows))
        original(session, snapshot_id, rows)

    def add_copy_block(load: Any, block: Any) -> None:
        written.append(len(block))
        original_block(load, block)

    monkeypatch.setattr(snapshot_repo, "add_members", add_members)
    monkeypatch.setattr(snapshot_repo, "add_copy_block", add_copy_block)


def _writing_queries(backend: str) -> list[tuple[str, bool, str]]:
    """(query, refused by `apply` already, what the database says when the run tries it)."""
    if backend == "postgresql":
        return [
            ("update people set a = 0 returning user_id, email", True, "syntax error"),
            (
                "with gone as (delete from people returning user_id, email) select * from gone",
                True,
                "data-modifying",
            ),
            # `apply` asks for no rows, so these write only when rows are read: the
            # read-only transaction is what stops them.
            (f"{GOOD_QUERY} and nextval('audience_seq') > 0", False, "read-only transaction"),
            (f"{GOOD_QUERY} and intrude() = 1", False, "read-only transaction"),
        ]
    return [
        ("update people set a = 0 returning user_id, email", True, "readonly database"),
        (
            "insert into people (user_id) values ('intruder') returning user_id",
            True,
            "readonly database",
        ),
    ]


def test_a_query_that_writes_is_refused_by_the_database(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, backend: str, subtests: pytest.Subtests
) -> None:
    shop.add((f"u{i}", None, 1, 0, 0) for i in range(3))
    if backend == "postgresql":
        shop.execute("create sequence audience_seq")
        shop.execute(
            "create function intrude() returns int language sql as "
            "$$ insert into people (user_id) values ('intruder') returning 1 $$"
        )
    _apply(runtime, tmp_path, shop.url, GOOD_QUERY)
    [pair] = runtime.service.select_pairs()
    for query, is_refused_at_apply, refusal in _writing_queries(backend):
        with subtests.test(query):
            if is_refused_at_apply:
                with pytest.raises(ConfigError):
                    _apply(runtime, tmp_path, shop.url, query, check_queries=True)
                _apply(runtime, tmp_path, shop.url, query)  # as if the check were skipped
            else:
                _apply(runtime, tmp_path, shop.url, query, check_queries=True)
            summary = runtime.service.sync_pair(pair, SyncRequest())
            assert summary.status == "failed"
            assert summary.error is not None and refusal in summary.error, summary.error
            assert shop.members("a") == {"u0", "u1", "u2"}
            assert "intruder" not in _all_users(shop)
    if backend == "postgresql":
        with shop.engine.connect() as connection:
            assert not connection.execute(text("select is_called from audience_seq")).scalar()
    # The refusals left no connection stuck read-only or in a failed transaction.
    _apply(runtime, tmp_path, shop.url, GOOD_QUERY)
    assert runtime.service.sync_pair(pair, SyncRequest()).status == "succeeded"
    shop.execute("update people set a = 0 where user_id = 'u0'")  # the source stays writable
    assert shop.members("a") == {"u1", "u2"}


def _all_users(shop: ShopSource) -> list[str | None]:
    with shop.engine.connect() as connection:
        return [row[0] for row in connection.execute(text("select user_id from people"))]


BAD_ROWS: list[tuple[str | None, str | None, int, int, int]] = [
    ("u1", "u1@example.com", 1, 0, 0),
    ("u1", "other@example.com", 1, 0, 0),  # duplicate id
    (" u1 ", None, 1, 0, 0),  # another user (ids are exact), counted as padded_id
    ("u2", " ", 1, 0, 0),  # a blank email is dropped, not the user
    ("u3", "x" * 300, 1, 0, 0),  # so is one too long for any destination
    (None, "nobody@example.com", 1, 0, 0),
    ("", None, 1, 0, 0),
    ("   ", None, 1, 0, 0),
    ("x" * 256, None, 1, 0, 0),
]


def test_bad_rows_are_counted_not_fatal(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, cli: None
) -> None:
    shop.add(BAD_ROWS)
    _apply(runtime, tmp_path, shop.url, GOOD_QUERY, check_queries=True)
    [pair] = runtime.service.select_pairs()
    summary = runtime.service.sync_pair(pair, SyncRequest())
    assert (summary.status, summary.members, summary.sent) == ("succeeded", 4, 4)
    calls = read_calls(tmp_path / "identify.ndjson")
    assert {c["userId"]: c["traits"].get("email") for c in calls} == {
        "u1": "u1@example.com",
        " u1 ": None,
        "u2": None,
        "u3": None,
    }
    expected = {"null_id": 3, "id_too_long": 1, "duplicate_id": 1, "padded_id": 1}

    shown = invoke("runs", "show", str(summary.run_id))
    assert shown.exit_code == 0, shown.output
    [line] = [ln for ln in shown.stdout.splitlines() if ln.startswith("skipped_rows:")]
    assert sorted(line.removeprefix("skipped_rows:").strip().split(", ")) == sorted(
        f"{reason}={count}" for reason, count in expected.items()
    )
    as_json = invoke("runs", "show", str(summary.run_id), "--json")
    assert json.loads(as_json.stdout)["skipped_rows"] == expected
    history = invoke("history", "--json")
    assert json.loads(history.stdout)[0]["skipped_rows"] == expected


@pytest.mark.postgres
def test_an_id_postgresql_cannot_store_is_skipped(tmp_path: Path) -> None:
    """A SQLite source may hold a NUL character, which no PostgreSQL text column takes."""
    shop = ShopSource(f"sqlite:///{tmp_path / 'shop.db'}")
    shop.add([("u1", None, 1, 0, 0), ("bad\x00id", None, 1, 0, 0), ("u2", "e\x00@x", 1, 0, 0)])
    with postgres_database() as state_url:
        runtime = build_runtime(Settings(database_url=state_url))
        try:
            _apply(runtime, tmp_path, shop.url, GOOD_QUERY, check_queries=True)
            [pair] = runtime.service.select_pairs()
            summary = runtime.service.sync_pair(pair, SyncRequest())
            assert (summary.status, summary.members) == ("succeeded", 2)
            assert _last_run(runtime).skipped_rows == {"invalid_id": 1}
        finally:
            runtime.close()
            shop.engine.dispose()
