"""Property: whatever the sequence of membership changes, per-user rejections, failed
requests and crashes, re-runs bring the destination to the source's truth.

Each example drives the real service (SQLite state and source databases) against a scripted
in-memory destination that applies calls as a server would and fails on cue: a request
refused whole before anything was applied, a request applied whose answer was lost (a read
timeout), or the process dying right after the destination applied a page (the run is left
`running` and its lock must expire). After the script, clean runs (the first one retrying
quarantined users) must leave every member `true`, every other user the destination knows
`false`, no user in doubt, and a further run must send nothing.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from models import FailingMember, SyncedMember, SyncRun
from worker import db
from worker.config import load_config
from worker.destinations.base import DestinationClient, Rejection
from worker.destinations.registry import HttpOptions
from worker.domain import RunSummary, SyncRequest
from worker.errors import TransientDestinationError
from worker.payloads import AudienceRef
from worker.pool import DestinationPool
from worker.repositories.runs import INTERRUPTED
from worker.service import SyncService
from worker.settings import Settings
from worker.testing.databases import ShopSource
from worker.testing.factories import audience, write_config
from worker.testing.guarantees import wrong_values

USERS = [f"u{i:02d}" for i in range(12)]
KEY = "property_audience"
LOCK_TTL = 60


class ProcessDied(BaseException):
    """The process running the sync stops here: nothing after this line runs."""


@dataclass(frozen=True)
class Fault:
    kind: str  # "refused": nothing applied; "lost_answer": applied, then a timeout;
    # "crash": applied, then the process dies
    at_request: int  # the request of the run it hits (1-based)


@dataclass(frozen=True)
class Step:
    members: frozenset[str]
    rejected: frozenset[str]
    fault: Fault | None
    retry_quarantined: bool


class ScriptedDestination(DestinationClient):
    """Holds the destination's per-user values and fails as the current step says."""

    type = "scripted"
    max_batch_items = 4

    def __init__(self) -> None:
        super().__init__("scripted")
        self.state: dict[str, bool] = {}
        self.redundant = 0  # calls that told a user the value it already held
        self.rejected: frozenset[str] = frozenset()
        self.fault: Fault | None = None
        self.requests = 0

    def script(self, rejected: frozenset[str], fault: Fault | None) -> None:
        self.rejected, self.fault, self.requests = rejected, fault, 0

    def deliver(self, audience: AudienceRef, calls: Sequence[dict[str, Any]]) -> list[Rejection]:
        self.requests += 1
        fault = self.fault if self.fault and self.fault.at_request == self.requests else None
        if fault is not None and fault.kind == "refused":
            raise TransientDestinationError("destination scripted: 503 after every attempt")
        rejections = []
        for index, call in enumerate(calls):
            user = call["userId"]
            if user in self.rejected:
                rejections.append(Rejection(index, 400, "invalid contact"))
                continue
            value = call["traits"][audience.key]
            self.redundant += self.state.get(user) is value
            self.state[user] = value
        if fault is not None and fault.kind == "lost_answer":
            raise TransientDestinationError("destination scripted: read timeout")
        if fault is not None:
            raise ProcessDied()
        return rejections


class ScriptedPool(DestinationPool):
    def __init__(self, destination: ScriptedDestination) -> None:
        super().__init__(http=HttpOptions())
        self.destination = destination

    def get(self, name: str, template: Mapping[str, Any]) -> DestinationClient:
        return self.destination


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture(scope="module")
def migrated_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "state.db"
    db.upgrade(f"sqlite:///{path}")
    return path


faults = st.one_of(
    st.none(),
    st.builds(
        Fault,
        kind=st.sampled_from(["refused", "lost_answer", "crash"]),
        at_request=st.integers(1, 3),
    ),
)
user_sets = st.frozensets(st.sampled_from(USERS))
steps = st.builds(
    Step,
    members=user_sets,
    rejected=st.frozensets(st.sampled_from(USERS), max_size=3),
    fault=faults,
    retry_quarantined=st.booleans(),
)


class World:
    """One example's databases, destination and service."""

    def __init__(self, directory: Path, template: Path) -> None:
        shutil.copy(template, directory / "state.db")
        self.shop = ShopSource(f"sqlite:///{directory / 'shop.db'}")
        self.shop.add((user, None, 0, 0, 0) for user in USERS)
        self.destination = ScriptedDestination()
        self.clock = Clock()
        self.settings = Settings(
            database_url=f"sqlite:///{directory / 'state.db'}",
            quarantine_after=2,
            lock_ttl_seconds=LOCK_TTL,
        )
        self.engine = db.make_engine(self.settings.database_url)
        self.sessions = db.make_session_factory(self.engine)
        self.service = SyncService(
            session_factory=self.sessions,
            settings=self.settings,
            destinations=ScriptedPool(self.destination),
            clock=self.clock,
        )
        config = write_config(
            directory,
            source_url=self.shop.url,
            audiences=[audience("Property Audience", "a", destinations=["scripted"])],
            destinations={"scripted": {"type": "file", "path": str(directory / "unused")}},
        )
        self.service.apply(load_config(config))
        [self.pair] = self.service.select_pairs()

    def close(self) -> None:
        self.engine.dispose()
        self.shop.engine.dispose()

    def set_members(self, members: frozenset[str]) -> None:
        listed = ", ".join(f"'{user}'" for user in sorted(members)) or "NULL"
        self.shop.execute(
            f"update people set a = CASE WHEN user_id IN ({listed}) THEN 1 ELSE 0 END"
        )

    def sync(self, *, retry_quarantined: bool = False) -> RunSummary | None:
        """One run; None when the process died in it (its lock then has to expire)."""
        request = SyncRequest(allow_mass_exit=True, retry_quarantined=retry_quarantined)
        try:
            return self.service.sync_pair(self.pair, request)
        except ProcessDied:
            self.clock.now += timedelta(seconds=LOCK_TTL + 1)
            return None

    def count(self, model: Any) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(model)) or 0

    def synced(self) -> dict[str, bool]:
        with self.sessions() as session:
            rows = session.execute(select(SyncedMember.member_id, SyncedMember.is_member)).all()
        return {member: is_member for member, is_member in rows}


@pytest.fixture
def world_factory(migrated_state: Path) -> Iterator[Any]:
    def make() -> Any:
        return _world(migrated_state)

    yield make


@contextlib.contextmanager
def _world(template: Path) -> Iterator[World]:
    with tempfile.TemporaryDirectory() as directory:
        world = World(Path(directory), template)
        try:
            yield world
        finally:
            world.close()


@settings(
    # 30 in the suite; `AUDIENCE_SYNC_PROPERTY_EXAMPLES=200` for a longer search.
    max_examples=int(os.environ.get("AUDIENCE_SYNC_PROPERTY_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=st.lists(steps, min_size=1, max_size=6))
def test_reruns_converge_to_the_source(world_factory: Any, script: list[Step]) -> None:
    with world_factory() as world:
        budget = 0  # re-sends the faults and rejections may cause
        crashes = 0
        for step in script:
            world.set_members(step.members)
            world.destination.script(step.rejected, step.fault)
            summary = world.sync(retry_quarantined=step.retry_quarantined)
            with world.sessions() as session:
                run = session.scalar(select(SyncRun).order_by(SyncRun.id.desc()).limit(1))
                assert run is not None
                changes, failed = run.entered + run.exited, run.failed
            crashes += summary is None
            if summary is None or summary.status == "failed":
                # Users in doubt are re-sent their value on the next two delivering runs.
                budget += 2 * changes
            budget += failed
            if summary is not None and step.fault is None:
                assert summary.status in ("succeeded", "partial")
                assert (summary.status == "partial") == (summary.failed > 0)

        final = script[-1].members
        world.destination.script(frozenset(), None)
        first = world.sync(retry_quarantined=True)
        assert first is not None and first.status == "succeeded", first
        assert wrong_values(world.destination.state, final) == {}
        # The state database believes what the destination holds.
        assert world.synced() == world.destination.state
        # Users still in doubt get their value once more; then nothing is in doubt.
        second = world.sync()
        assert second is not None and second.status == "succeeded", second
        assert wrong_values(world.destination.state, final) == {}
        assert world.synced() == world.destination.state
        assert world.count(FailingMember) == 0
        with world.sessions() as session:
            statuses = set(session.scalars(select(SyncRun.status)))
            interrupted = session.scalar(
                select(func.count()).select_from(SyncRun).where(SyncRun.error == INTERRUPTED)
            )
        assert "running" not in statuses
        assert interrupted == crashes
        assert world.destination.redundant <= budget

        again = world.sync()
        assert again is not None and (again.status, again.sent) == ("succeeded", 0)
