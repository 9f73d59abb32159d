"""The staging load: from a PostgreSQL source into a PostgreSQL state database rows go COPY
to COPY and the bad-row rules run in SQL; they must keep and count exactly the rows the
streamed path (cleaned in Python) keeps and counts. Then the snapshot is applied to the
membership, and a migrated old state sends nothing."""

from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

from models import AudienceMember, MembershipPeriod, Snapshot
from worker import db, snapshotting
from worker.context import ServiceContext, utcnow
from worker.crashpoints import no_crash
from worker.domain import NoProgress, SyncRequest
from worker.repositories import snapshots as snapshot_repo
from worker.runtime import Runtime
from worker.snapshotting import TakenSnapshot, take_snapshot
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, read_calls, write_config

KEY = "staging_test"
QUERY = "select user_id, anonymous_id, email from raw_people"
NBSP, EM_SPACE = "\u00a0", "\u2003"
# (user_id, anonymous_id, email): every rule of worker.sources.clean_row, and duplicates.
TRICKY_ROWS = [
    ("alice", None, "alice@example.com"),
    (" alice ", None, "  padded@example.com  "),  # padded id: kept as is, counted
    (None, None, "nobody@example.com"),  # null_id
    ("   ", None, "blank@example.com"),  # blank id and no anonymous id: null_id
    (f"{NBSP}{EM_SPACE}", "anon-1", "x@example.com"),  # unicode-blank user id: anonymous
    ("x" * 256, None, None),  # id_too_long
    ("y" * 255, None, "ok@example.com"),  # exactly as long as allowed
    ("bob", None, ""),  # empty email: dropped, member kept
    ("carol", None, "c" * 256),  # email too long: dropped
    ("dave", None, f"{EM_SPACE}dave@example.com\t"),  # trimmed like str.strip()
    ("alice", None, "second-alice@example.com"),  # duplicate: the first row read wins
    (None, "anon-2", None),
    (None, "  ", None),  # null_id
    ("bob", None, "again@example.com"),  # duplicate
]


def _context(runtime: Runtime) -> ServiceContext:
    return ServiceContext(
        sessions=runtime.sessions,
        settings=runtime.settings.model_copy(update={"source_fetch_size": 3}),
        destinations=runtime.destinations,
        clock=utcnow,
        progress=NoProgress,
        env={},
        crash_point=no_crash,
    )


def _audience_id(runtime: Runtime, tmp_path: Path, shop: ShopSource) -> int:
    path = write_config(
        tmp_path, source_url=shop.url, audiences=[{**audience("Staging", "a"), "query": QUERY}]
    )
    apply_file(runtime, path)
    with runtime.sessions() as session:
        return int(session.scalar(text("select id from audiences")))


def _staged(runtime: Runtime, taken: TakenSnapshot) -> list[tuple[str, bool, str | None]]:
    stage = snapshot_repo.staged(taken.snapshot_id)
    with runtime.sessions() as session:
        rows = session.execute(
            select(stage.c.member_id, stage.c.is_anonymous, stage.c.email).order_by(
                stage.c.member_id
            )
        ).all()
        snapshot_repo.drop_staging(session, taken.snapshot_id)
        session.commit()
    return [(str(m), bool(a), e) for m, a, e in rows]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_copy_path_keeps_and_counts_what_the_streamed_path_does(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop.execute("create table raw_people (user_id text, anonymous_id text, email text)")
    with shop.engine.begin() as conn:
        conn.execute(
            text("insert into raw_people values (:u, :a, :e)"),
            [{"u": u, "a": a, "e": e} for u, a, e in TRICKY_ROWS],
        )
    audience_id = _audience_id(runtime, tmp_path, shop)
    ctx = _context(runtime)
    blocks: list[int] = []
    original = snapshot_repo.add_copy_block
    monkeypatch.setattr(
        snapshot_repo,
        "add_copy_block",
        lambda load, block: (blocks.append(len(block)), original(load, block)),
    )

    def take() -> TakenSnapshot:
        return take_snapshot(
            ctx, audience_id, source_name="shop", url_template=shop.url, query=QUERY, timeout=30
        )

    by_copy = take()
    assert sum(blocks) == len(TRICKY_ROWS)  # the COPY path read every row, in blocks
    assert max(blocks) == 3
    monkeypatch.setattr(snapshotting, "copy_statement", lambda *a, **k: None)
    streamed = take()
    assert (
        by_copy.skipped
        == streamed.skipped
        == {
            "null_id": 3,
            "id_too_long": 1,
            "padded_id": 1,
            "duplicate_id": 2,
        }
    )
    assert by_copy.members == streamed.members == 8
    staged = _staged(runtime, by_copy)
    assert staged == _staged(runtime, streamed)
    assert ("alice", False, "alice@example.com") in staged
    assert ("anon-1", True, "x@example.com") in staged
    assert ("dave", False, "dave@example.com") in staged
    assert ("bob", False, None) in staged and ("carol", False, None) in staged


def test_whitespace_is_what_str_strip_removes() -> None:
    assert "".join(c for c in map(chr, range(0x110000)) if c.isspace()) == snapshot_repo.WHITESPACE


@pytest.mark.parametrize("backend", ["postgresql"])
def test_copy_path_agrees_row_by_row_with_the_streamed_path(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tricky row alone among clean ones, and a clean duplicate: the COPY path's quick
    check must send every one of them through the rules (or the duplicate handling)."""
    shop.execute("create table raw_people (user_id text, anonymous_id text, email text)")
    audience_id = _audience_id(runtime, tmp_path, shop)
    ctx = _context(runtime)
    clean = [("zed", None, "zed@example.com"), ("yan", None, None)]
    cases = [[row] for row in TRICKY_ROWS[1:]] + [[("zed", None, "again@example.com")]]

    def take() -> TakenSnapshot:
        return take_snapshot(
            ctx, audience_id, source_name="shop", url_template=shop.url, query=QUERY, timeout=30
        )

    for case in cases:
        shop.execute("truncate raw_people")
        with shop.engine.begin() as conn:
            conn.execute(
                text("insert into raw_people values (:u, :a, :e)"),
                [{"u": u, "a": a, "e": e} for u, a, e in clean + case],
            )
        monkeypatch.undo()
        by_copy = take()
        monkeypatch.setattr(snapshotting, "copy_statement", lambda *a, **k: None)
        streamed = take()
        assert (by_copy.skipped, by_copy.members) == (streamed.skipped, streamed.members), case
        assert _staged(runtime, by_copy) == _staged(runtime, streamed), case


@pytest.mark.parametrize("backend", ["postgresql"])
def test_copy_path_is_not_taken_for_columns_whose_text_could_differ(
    tmp_path: Path, shop: ShopSource, runtime: Runtime
) -> None:
    from worker.sources import copy_statement

    def statement(query: str) -> str | None:
        return copy_statement(shop.url, query, timeout_seconds=5, source_name="shop")

    assert statement("select 1::bigint as user_id, 'e' as email") is not None
    assert statement("select 1.5::numeric as user_id") is None
    assert statement("select 'a'::char(3) as user_id") is None
    assert statement("select now() as user_id, 'x' as email") is None


def _sync(runtime: Runtime) -> tuple[str, int]:
    [pair] = runtime.service.select_pairs(audience_keys=[KEY])
    summary = runtime.service.sync_pair(pair, SyncRequest())
    return summary.status, summary.sent


def test_membership_follows_the_source_and_the_log_keeps_the_past(
    tmp_path: Path, shop: ShopSource, runtime: Runtime
) -> None:
    shop.add((f"u{i}", f"u{i}@example.com", int(i < 5), 0, 0) for i in range(8))
    path = write_config(tmp_path, source_url=shop.url, audiences=[audience("Staging Test", "a")])
    apply_file(runtime, path)
    assert _sync(runtime) == ("succeeded", 5)
    shop.set_flag("a", ["u0", "u1"], 0)
    shop.set_flag("a", ["u6"], 1)
    assert _sync(runtime) == ("succeeded", 3)
    shop.set_flag("a", ["u0"], 1)
    assert _sync(runtime) == ("succeeded", 1)
    with runtime.sessions() as session:
        [first, second, third] = session.scalars(select(Snapshot.id).order_by(Snapshot.id))
        audience_id = session.scalar(select(Snapshot.audience_id).limit(1))
        assert audience_id is not None
        members = session.scalars(select(AudienceMember.member_id).order_by("member_id"))
        assert list(members) == ["u0", "u2", "u3", "u4", "u6"]
        # Each kept run's membership, answered from the log.
        assert snapshot_repo.members_at(session, audience_id, first) == [f"u{i}" for i in range(5)]
        assert snapshot_repo.members_at(session, audience_id, second) == ["u2", "u3", "u4", "u6"]
        assert snapshot_repo.count_members_at(session, audience_id, third) == 5
        spans = snapshot_repo.membership_spans(session, audience_id, "u0")
        assert [(h.entered_snapshot_id, h.exited_snapshot_id) for h in spans] == [
            (first, second),
            (third, None),
        ]
        assert snapshot_repo.membership_spans(session, audience_id, "u7") == []
        history = snapshot_repo.member_history(session, audience_id, "u0")
        assert [is_member for _, is_member in history] == [True, False, True]
        assert [at for at, _ in history] == sorted(at for at, _ in history)
        latest = snapshot_repo.latest_membership(session, audience_id, "u1")
        assert latest is not None and latest[0] == third and latest[2] is False
        # Only the changes were written: two exits, in the log.
        assert session.scalar(select(func.count()).select_from(MembershipPeriod)) == 2
        # Retention: periods that ended before the cut-off go.
        assert snapshot_repo.prune_log(session, audience_id, before=utcnow()) == 2
        assert snapshot_repo.drop_stale_staging(session) == 0  # no staging table is left


def test_old_state_is_converted_and_the_next_run_sends_nothing(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, state_url: str
) -> None:
    shop.add((f"u{i}", f"u{i}@example.com", int(i < 6), 0, 0) for i in range(8))
    path = write_config(tmp_path, source_url=shop.url, audiences=[audience("Staging Test", "a")])
    apply_file(runtime, path)
    assert _sync(runtime) == ("succeeded", 6)
    shop.set_flag("a", ["u0"], 0)
    assert _sync(runtime) == ("succeeded", 1)
    runtime.close()

    # Back to the old schema: whole snapshots, the latest holding the membership.
    db.downgrade(state_url, "0003")
    engine = create_engine(state_url)
    with engine.begin() as conn:
        latest = conn.scalar(text("select max(id) from snapshots"))
        held = conn.scalars(
            text("select member_id from snapshot_members where snapshot_id = :s order by 1"),
            {"s": latest},
        ).all()
        assert held == ["u1", "u2", "u3", "u4", "u5"]
        # An older snapshot as the old schema kept it, with u0 still in.
        older = conn.scalar(text("select min(id) from snapshots"))
        conn.execute(
            text(
                "insert into snapshot_members select :s, member_id, is_anonymous, email "
                "from snapshot_members where snapshot_id = :l"
            ),
            {"s": older, "l": latest},
        )
        conn.execute(
            text("insert into snapshot_members values (:s, 'u0', false, 'u0@example.com')"),
            {"s": older},
        )
    engine.dispose()
    sent = len(read_calls(tmp_path / "identify.ndjson"))

    db.upgrade(state_url)
    engine = create_engine(state_url)
    with engine.connect() as conn:
        members = conn.scalars(text("select member_id from audience_members order by 1")).all()
        log = conn.execute(
            text("select member_id, entered_snapshot_id, exited_snapshot_id from membership_log")
        ).all()
    engine.dispose()
    assert members == ["u1", "u2", "u3", "u4", "u5"]
    assert [tuple(row) for row in log] == [("u0", older, latest)]

    from worker.runtime import build_runtime

    again = build_runtime(runtime.settings)
    try:
        [pair] = again.service.select_pairs(audience_keys=[KEY])
        summary = again.service.sync_pair(pair, SyncRequest())
        assert (summary.status, summary.sent) == ("succeeded", 0)
    finally:
        again.close()
    assert len(read_calls(tmp_path / "identify.ndjson")) == sent
