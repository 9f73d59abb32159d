"""Rejections, quarantine and users in doubt in `repositories.failures`, on each backend."""

from sqlalchemy import select

from models import DeliveryFailure, FailingMember
from tests.repositories.conftest import NOW, Pair
from worker.payloads import Change
from worker.repositories import changes as change_repo
from worker.repositories import failures as failure_repo
from worker.runs import settle_stopped_runs


def _accept(pair: Pair, run_id: int, values: dict[str, bool]) -> None:
    """What recording an accepted page does to the pair's tables."""
    pair.told(run_id, values)
    failure_repo.settle_accepted(pair.session, pair.audience_id, pair.destination_id, [*values])
    change_repo.drop_changes(pair.session, run_id)


def test_a_user_in_doubt_is_resent_on_the_next_two_runs_and_not_the_third(pair: Pair) -> None:
    """The dead run's request may still be applied late, after the first re-send: the
    second re-send puts the destination right again."""
    pair.told(pair.new_run(), {"u": True, "calm": True})
    dead = pair.new_run()
    snapshot = pair.snapshot("calm", "x")
    assert pair.plan(dead, snapshot) == {"u": False, "x": True}
    change_repo.mark_in_flight(pair.session, dead, "u", "u")
    settle_stopped_runs(pair.session, pair.audience_id, pair.destination_id, now=NOW)

    snapshot = pair.snapshot("calm", "u", "x")  # the source changed its mind meanwhile
    first = pair.new_run()
    assert pair.plan(first, snapshot) == {"u": True, "x": True}
    _accept(pair, first, {"u": True, "x": True})

    second = pair.new_run()
    assert pair.plan(second, snapshot) == {"u": True}
    _accept(pair, second, {"u": True})

    third = pair.new_run()
    assert pair.plan(third, snapshot) == {}
    assert pair.session.scalars(select(FailingMember)).all() == []


def test_doubt_again_after_one_resend_owes_two_again(pair: Pair) -> None:
    """A run that dies with the user in flight after its first re-send puts the user back
    in doubt for two more runs."""
    pair.told(pair.new_run(), {"u": True})
    snapshot = pair.snapshot("u")
    for _ in range(2):
        dead = pair.new_run()
        pair.plan(dead, pair.snapshot())
        change_repo.mark_in_flight(pair.session, dead, "u", "u")
        settle_stopped_runs(pair.session, pair.audience_id, pair.destination_id, now=NOW)
        pair.session.expire_all()
        [row] = pair.session.scalars(select(FailingMember)).all()
        assert (row.member_id, row.resends_owed) == ("u", 2)
        resend = pair.new_run()
        assert pair.plan(resend, snapshot) == {"u": True}
        _accept(pair, resend, {"u": True})
        pair.session.refresh(row)
        assert row.resends_owed == 1
    # The source drops "u" again: the last owed re-send is its current value, `false`.
    assert pair.plan(pair.new_run(), pair.snapshot()) == {"u": False}


def test_a_rejected_user_is_owed_one_accepted_delivery(pair: Pair) -> None:
    run = pair.new_run()
    change = Change("u", False, None, True, None)
    failure_repo.record_rejected(
        pair.session,
        audience_id=pair.audience_id,
        destination_id=pair.destination_id,
        run_id=run,
        rejected=[(change, 400, "x" * (failure_repo.MESSAGE_MAX_CHARS + 50))],
        quarantine_after=3,
        now=NOW,
    )
    [stored] = pair.session.scalars(select(DeliveryFailure)).all()
    assert len(stored.message) == failure_repo.MESSAGE_MAX_CHARS
    [row] = pair.session.scalars(select(FailingMember)).all()
    assert (row.consecutive_failures, row.is_quarantined, row.resends_owed) == (1, False, 1)
    assert failure_repo.has_failing_members(pair.session, pair.audience_id, pair.destination_id)

    _accept(pair, pair.new_run(), {"u": True})
    assert pair.session.scalars(select(FailingMember)).all() == []


def test_rejections_in_a_row_quarantine_the_user(pair: Pair) -> None:
    run = pair.new_run()
    change = Change("u", False, None, True, None)
    for _ in range(3):
        failure_repo.record_rejected(
            pair.session,
            audience_id=pair.audience_id,
            destination_id=pair.destination_id,
            run_id=run,
            rejected=[(change, 400, "bad")],
            quarantine_after=3,
            now=NOW,
        )
    [(row, key, name)] = failure_repo.failing_members(pair.session)
    assert (row.consecutive_failures, row.is_quarantined, key, name) == (3, True, "buyers", "ortto")
    assert len(failure_repo.failures_of_run(pair.session, run)) == 3
