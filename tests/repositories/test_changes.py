"""The diff statements of `repositories.changes`, run directly on each backend."""

from functools import partial
from typing import Any

import pytest
from sqlalchemy import select, update

from models import AudienceMember, FailingMember, MembershipPeriod, RunChange
from tests.repositories.conftest import NOW, Pair
from worker.payloads import Change
from worker.repositories import changes as change_repo
from worker.repositories import failures as failure_repo
from worker.repositories import snapshots as snapshot_repo
from worker.repositories import synced as synced_repo
from worker.runs import settle_stopped_runs


def _rejected(pair: Pair, run_id: int, member_id: str, value: bool, *, times: int = 1) -> None:
    for _ in range(times):
        failure_repo.record_rejected(
            pair.session,
            audience_id=pair.audience_id,
            destination_id=pair.destination_id,
            run_id=run_id,
            rejected=[(Change(member_id, False, None, value, None), 400, "bad email")],
            quarantine_after=2,
            now=NOW,
        )


def test_a_first_run_enters_every_member(pair: Pair) -> None:
    snapshot = pair.snapshot("a", "b")
    assert pair.plan(pair.new_run(), snapshot) == {"a": True, "b": True}


def test_only_users_who_entered_are_sent_true(pair: Pair) -> None:
    pair.told(pair.new_run(), {"a": True, "gone": False})
    snapshot = pair.snapshot("a", "b", "gone")
    assert pair.plan(pair.new_run(), snapshot) == {"b": True, "gone": True}


def test_members_who_left_are_sent_false_once(pair: Pair) -> None:
    pair.told(pair.new_run(), {"a": True, "c": True, "left_before": False})
    snapshot = pair.snapshot("a")
    assert pair.plan(pair.new_run(), snapshot) == {"c": False}
    scope = pair.scope(snapshot)
    assert change_repo.count_member_exits(pair.session, scope) == 1
    assert synced_repo.count_members(pair.session, pair.audience_id, pair.destination_id) == 2


def test_quarantined_users_get_nothing(pair: Pair) -> None:
    first = pair.new_run()
    pair.told(first, {"held": True})
    _rejected(pair, first, "new", True, times=2)  # quarantined after two rejections
    _rejected(pair, first, "held", False, times=2)
    snapshot = pair.snapshot("new", "other")
    assert pair.plan(pair.new_run(), snapshot) == {"other": True}
    assert change_repo.count_newly_entered(pair.session, pair.scope(snapshot)) == 1

    failure_repo.release_quarantine(pair.session, pair.audience_id, pair.destination_id)
    assert pair.plan(pair.new_run(), snapshot) == {"new": True, "other": True, "held": False}


def test_users_in_doubt_get_their_current_value_whatever_the_synced_state_says(
    pair: Pair,
) -> None:
    """A run died with a page in flight: its users may have been told something unrecorded,
    so each gets its current value, even when the synced state already agrees with it."""
    pair.told(pair.new_run(), {"stays": True, "left": True, "calm": True})
    dead = pair.new_run()
    before = pair.snapshot("stays", "calm", "new")
    assert pair.plan(dead, before) == {"new": True, "left": False}
    change_repo.mark_in_flight(pair.session, dead, "left", "new")  # the page it died in
    settle_stopped_runs(pair.session, pair.audience_id, pair.destination_id, now=NOW)

    # The dead run's changes are gone; its users are in doubt, and "new", told `true` for
    # the first time, is held as `false` so that an exit would reach it.
    assert change_repo.runs_with_changes(pair.session, pair.audience_id, pair.destination_id) == []
    assert sorted(pair.session.scalars(select(FailingMember.member_id))) == ["left", "new"]
    snapshot = pair.snapshot("stays", "calm", "left")
    assert pair.plan(pair.new_run(), snapshot) == {"left": True, "new": False}


def test_a_full_run_sends_every_member_and_counts_only_new_ones_as_entered(pair: Pair) -> None:
    pair.told(pair.new_run(), {"a": True, "c": True})
    snapshot = pair.snapshot("a", "b")
    assert pair.plan(pair.new_run(), snapshot, is_full=True) == {
        "a": True,
        "b": True,
        "c": False,
    }
    assert change_repo.count_newly_entered(pair.session, pair.scope(snapshot, is_full=True)) == 1


def test_pages_and_chunks_follow_member_order(pair: Pair) -> None:
    run = pair.new_run()
    members = [f"u{i:02d}" for i in range(10)]
    pair.plan(run, pair.snapshot(*members))
    page = change_repo.page_of_changes(pair.session, run, after="u03", upto="u07", limit=3)
    assert [c.member_id for c in page] == ["u04", "u05", "u06"]
    assert change_repo.chunk_boundaries(pair.session, run, chunk_size=4) == ["u03", "u07"]
    change_repo.drop_changes(pair.session, run, "u00", "u04")
    rest = change_repo.page_of_changes(pair.session, run, after=None, upto=None, limit=100)
    assert [c.member_id for c in rest] == members[5:]


def test_moot_failures_are_forgotten(pair: Pair) -> None:
    """A rejected user who left before the destination ever accepted a value is owed
    nothing; one the destination holds still is."""
    first = pair.new_run()
    pair.told(first, {"held": True})
    _rejected(pair, first, "never_told", True)
    _rejected(pair, first, "held", False)
    failure_repo.forget_moot(pair.session, pair.scope(pair.snapshot()))
    assert pair.session.scalars(select(FailingMember.member_id)).all() == ["held"]
    # Quarantine needs the rows; a released user starts afresh.
    pair.session.execute(update(FailingMember).values(is_quarantined=True))
    assert failure_repo.release_quarantine(pair.session, pair.audience_id, pair.destination_id) == 1


def _rows(pair: Pair, query: Any) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in pair.session.execute(query).all()]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_one_pass_plan_writes_the_rows_the_selects_write(pair: Pair) -> None:
    """PostgreSQL plans an incremental run in one full join; every column of every change
    must be what the general selects write."""
    first = pair.new_run()
    pair.told(first, {"stays": True, "leaves": True, "was_out": False, "back": False})
    snapshot, run = pair.snapshot("stays", "back", "new"), pair.new_run()
    scope = pair.scope(snapshot)
    changes = select(*RunChange.__table__.c).where(RunChange.run_id == run)
    written = []
    by_selects = partial(change_repo._plan_by_selects, has_failing=False)
    for plan in (change_repo._plan_in_one_pass, by_selects):
        savepoint = pair.session.begin_nested()
        plan(pair.session, scope, run)
        written.append(sorted(_rows(pair, changes)))
        savepoint.rollback()
    assert written[0] == written[1]
    assert [(r[1], r[4], r[5]) for r in written[0]] == [
        ("back", True, first),
        ("leaves", False, first),
        ("new", True, None),
    ]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_the_one_pass_apply_leaves_what_the_anti_joins_leave(pair: Pair) -> None:
    earlier = pair.snapshot("stays", "leaves", "left_before")
    snapshot_repo.apply_snapshot(pair.session, pair.audience_id, earlier, now=NOW)
    snapshot_repo.apply_snapshot(
        pair.session, pair.audience_id, pair.snapshot("stays", "leaves"), now=NOW
    )
    later = pair.snapshot("stays", "new")
    state = [
        select(*AudienceMember.__table__.c).order_by(AudienceMember.member_id),
        select(*MembershipPeriod.__table__.c).order_by(MembershipPeriod.member_id),
    ]
    left = []
    for apply in (snapshot_repo._apply_in_one_pass, snapshot_repo._apply_by_anti_joins):
        savepoint = pair.session.begin_nested()
        apply(pair.session, pair.audience_id, later, now=NOW)
        left.append([_rows(pair, query) for query in state])
        savepoint.rollback()
    assert left[0] == left[1]
    members, log = left[0]
    assert [m[1] for m in members] == ["new", "stays"]
    assert [(p[1], p[2] == later) for p in log] == [("leaves", True), ("left_before", False)]
