"""Upkeep after a run (PostgreSQL): a large table is vacuumed and analyzed when the rows
changed since its last VACUUM or ANALYZE make one due, and left alone otherwise."""

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from tests.repositories.conftest import Pair
from worker.db import make_engine, make_session_factory
from worker.repositories import maintenance
from worker.testing.guarantees import wait_until

# Statistics reach shared memory within a second or so of a transaction's end.
STATISTICS_DELAY = 15.0


def _counts(sessions: sessionmaker[Session], table: str) -> tuple[int, int, int]:
    """(dead rows, VACUUMs, ANALYZEs) of the table, as PostgreSQL's statistics say (read in
    a transaction of its own: statistics are cached for a transaction)."""
    with sessions() as reader:
        row = reader.execute(
            text(
                "SELECT n_dead_tup, vacuum_count, analyze_count FROM pg_stat_user_tables "
                "WHERE relname = :table"
            ),
            {"table": table},
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


def _commit(pair: Pair) -> None:
    """Commit, the writer's statistics reported at once rather than when it next idles."""
    pair.session.execute(text("SELECT pg_stat_force_next_flush()"))
    pair.session.commit()


def _leave(pair: Pair, first: int, last: int) -> None:
    pair.session.execute(
        text(
            "DELETE FROM audience_members WHERE member_id IN "
            "(SELECT 'u' || i FROM generate_series(CAST(:first AS int), CAST(:last AS int)) AS i)"
        ),
        {"first": first, "last": last},
    )


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_table_is_vacuumed_and_analyzed_only_once_enough_of_it_changed(
    pair: Pair, state_url: str
) -> None:
    session = pair.session
    snapshot_id = pair.snapshot()
    session.execute(
        text(
            "INSERT INTO audience_members (audience_id, member_id, entered_snapshot_id) "
            "SELECT :audience_id, 'u' || i, :snapshot_id FROM generate_series(1, 20000) AS i"
        ),
        {"audience_id": pair.audience_id, "snapshot_id": snapshot_id},
    )
    _commit(pair)
    sessions = make_session_factory(make_engine(state_url))

    def due() -> set[str]:
        with sessions() as reader:
            return {u.table for u in maintenance.upkeep_due(reader)}

    # 20,000 rows inserted into an empty table: due for both.
    wait_until(lambda: "audience_members" in due(), timeout=STATISTICS_DELAY)
    _, vacuums, analyzes = _counts(sessions, "audience_members")
    done = {u.table: u for u in maintenance.keep_up(sessions)}
    assert done["audience_members"].statement == "VACUUM (ANALYZE) audience_members"
    assert _counts(sessions, "audience_members")[1:] == (vacuums + 1, analyzes + 1)

    # 500 rows gone (2.5%, under 1,000 rows): nothing is due, and nothing runs.
    _leave(pair, 1, 500)
    _commit(pair)
    wait_until(lambda: _counts(sessions, "audience_members")[0] > 0, timeout=STATISTICS_DELAY)
    assert due() == set()
    assert maintenance.keep_up(sessions) == []
    assert _counts(sessions, "audience_members")[1:] == (vacuums + 1, analyzes + 1)

    # 2,000 more (over 1,000 rows and 5% of the table): VACUUM again.
    _leave(pair, 501, 2500)
    _commit(pair)
    wait_until(lambda: "audience_members" in due(), timeout=STATISTICS_DELAY)
    maintenance.keep_up(sessions)
    assert _counts(sessions, "audience_members")[1] == vacuums + 2
