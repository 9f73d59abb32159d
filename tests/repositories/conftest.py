"""A state database on each backend with one audience/destination pair, and small helpers
that set up snapshots and synced state for the repository tests."""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import Audience, AudienceDestination, Destination, RunChange, Source
from worker.db import make_engine, make_session_factory
from worker.domain import PairScope, RunMode, Trigger
from worker.payloads import Change
from worker.repositories import changes as change_repo
from worker.repositories import runs as run_repo
from worker.repositories import snapshots as snapshot_repo
from worker.repositories import synced as synced_repo
from worker.sources import SourceRow

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@dataclass
class Pair:
    """One audience and one destination in a state database, and what a run does to them."""

    session: Session
    audience_id: int
    destination_id: int

    def snapshot(self, *member_ids: str) -> int:
        snapshot_id = snapshot_repo.create_snapshot(self.session, self.audience_id, now=NOW)
        rows = [SourceRow(m, False, f"{m}@example.com") for m in member_ids]
        snapshot_repo.add_members(self.session, snapshot_id, rows)
        snapshot_repo.finish_snapshot(self.session, snapshot_id)
        return snapshot_id

    def new_run(self) -> int:
        run = run_repo.create_run(
            self.session,
            audience_id=self.audience_id,
            destination_id=self.destination_id,
            mode=RunMode.INCREMENTAL,
            trigger=Trigger.MANUAL,
            now=NOW,
        )
        return run.id

    def told(self, run_id: int, values: dict[str, bool]) -> None:
        """Record that the destination accepted these values."""
        changes = [Change(m, False, f"{m}@example.com", v, None) for m, v in values.items()]
        synced_repo.record_accepted(
            self.session,
            audience_id=self.audience_id,
            destination_id=self.destination_id,
            run_id=run_id,
            changes=changes,
            now=NOW,
        )

    def plan(self, run_id: int, snapshot_id: int, *, is_full: bool = False) -> dict[str, bool]:
        """Plan the run's changes; return them as member -> value."""
        scope = PairScope(self.audience_id, self.destination_id, snapshot_id, is_full)
        held_before = synced_repo.count_members(self.session, self.audience_id, self.destination_id)
        members = self.session.scalar(
            select(func.count()).select_from(snapshot_repo.staged(snapshot_id))
        )
        to_enter, to_exit, held = change_repo.plan_run_changes(
            self.session, scope, run_id, members=members
        )
        assert held == held_before  # counted, or worked out from the plan's counts
        planned = dict(
            self.session.execute(
                select(RunChange.member_id, RunChange.value).where(RunChange.run_id == run_id)
            ).all()
        )
        assert (to_enter, to_exit) == (
            sum(planned.values()),
            len(planned) - sum(planned.values()),
        )
        return {member: bool(value) for member, value in planned.items()}

    def scope(self, snapshot_id: int, *, is_full: bool = False) -> PairScope:
        return PairScope(self.audience_id, self.destination_id, snapshot_id, is_full)


@pytest.fixture
def pair(state_url: str) -> Iterator[Pair]:
    engine = make_engine(state_url)
    sessions = make_session_factory(engine)
    with sessions() as session:
        source = Source(name="shop", url="sqlite://", statement_timeout_seconds=30)
        destination = Destination(name="ortto", type="file", settings={})
        session.add_all([source, destination])
        session.flush()
        audience = Audience(
            key="buyers",
            name="Buyers",
            source_id=source.id,
            query="select 1",
            schedule="every 1h",
            max_exit_fraction=0.5,
            is_archived=False,
            created_at=NOW,
            updated_at=NOW,
        )
        session.add(audience)
        session.flush()
        session.add(AudienceDestination(audience_id=audience.id, destination_id=destination.id))
        session.flush()
        yield Pair(session, audience.id, destination.id)
        session.rollback()
    engine.dispose()
