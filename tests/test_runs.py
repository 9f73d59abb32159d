"""The run lifecycle (`worker.runs`, `worker.delivery`) through the service, with an
in-process destination client that records what it is sent and answers as told."""

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from worker.context import utcnow
from worker.destinations.base import DestinationClient, Rejection
from worker.destinations.registry import HttpOptions
from worker.domain import PreparedRun, RunStatus, SyncRequest
from worker.errors import TransientDestinationError
from worker.payloads import AudienceRef
from worker.pool import DestinationPool
from worker.reports import ReportService
from worker.repositories.runs import INTERRUPTED
from worker.runtime import Runtime
from worker.service import SyncService
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, write_config

KEY = "run_test"


class FakeClient(DestinationClient):
    """Accepts every call except those of `rejecting` (member id -> message); raises
    `failure` instead when set. `before_deliver` runs first (a test's hook)."""

    type = "fake"
    max_batch_items = 2

    def __init__(self) -> None:
        super().__init__("fake")
        self.calls: list[dict[str, Any]] = []
        self.rejecting: dict[str, str] = {}
        self.failure: Exception | None = None
        self.before_deliver: Callable[[], None] = lambda: None

    def deliver(self, audience: AudienceRef, calls: Sequence[dict[str, Any]]) -> list[Rejection]:
        self.before_deliver()
        if self.failure is not None:
            raise self.failure
        self.calls.extend(calls)
        return [
            Rejection(i, 400, self.rejecting[call["userId"]])
            for i, call in enumerate(calls)
            if call["userId"] in self.rejecting
        ]

    def told(self) -> dict[str, bool]:
        """Each user's last value, as the destination holds it."""
        return {call["userId"]: call["traits"][KEY] for call in self.calls}

    def sent_to(self) -> list[str]:
        return [call["userId"] for call in self.calls]


class FakePool(DestinationPool):
    def __init__(self, client: FakeClient) -> None:
        super().__init__(http=HttpOptions())
        self.client = client
        self.lookups = 0

    def get(self, name: str, template: Mapping[str, Any]) -> DestinationClient:
        self.lookups += 1
        return self.client


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


def _service(
    runtime: Runtime, client: FakeClient, clock: Callable[[], datetime] = utcnow
) -> SyncService:
    return SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings,
        destinations=FakePool(client),
        clock=clock,
    )


@pytest.fixture
def service(runtime: Runtime, client: FakeClient) -> SyncService:
    return _service(runtime, client)


@pytest.fixture
def pair(tmp_path: Path, shop: ShopSource, runtime: Runtime) -> Iterator[int]:
    shop.add((f"u{i}", None, 1, 0, 0) for i in range(5))
    config = write_config(tmp_path, source_url=shop.url, audiences=[audience("Run Test", "a")])
    apply_file(runtime, config)
    [pair_id] = runtime.service.select_pairs()
    yield pair_id


def test_a_run_sends_each_change_once_and_the_next_only_what_changed(
    service: SyncService, client: FakeClient, shop: ShopSource, pair: int
) -> None:
    first = service.sync_pair(pair, SyncRequest())
    assert (first.status, first.mode, first.members, first.sent, first.failed) == (
        RunStatus.SUCCEEDED,
        "initial",
        5,
        5,
        0,
    )
    assert sorted(client.sent_to()) == [f"u{i}" for i in range(5)]

    shop.set_flag("a", ["u0"], 0)
    shop.add([("u9", None, 1, 0, 0)])
    second = service.sync_pair(pair, SyncRequest())
    assert (second.status, second.mode, second.entered, second.exited) == (
        "succeeded",
        "incremental",
        1,
        1,
    )
    assert client.sent_to()[5:] == ["u0", "u9"]
    assert client.told() == {**dict.fromkeys(shop.members("a"), True), "u0": False}


def test_a_run_looks_its_client_up_once_per_delivered_range(
    runtime: Runtime, client: FakeClient, pair: int
) -> None:
    pool = FakePool(client)
    service = SyncService(
        session_factory=runtime.sessions, settings=runtime.settings, destinations=pool
    )
    prepared = service.start_run(pair, SyncRequest())
    assert isinstance(prepared, PreparedRun)
    looked_up = pool.lookups
    service.deliver_range(prepared, after=None, upto=None)  # three pages of two
    assert pool.lookups == looked_up + 1
    assert service.finish_run(prepared).sent == 5


def test_rejected_users_make_a_partial_run_and_are_sent_again(
    runtime: Runtime, service: SyncService, client: FakeClient, pair: int
) -> None:
    reports = ReportService(session_factory=runtime.sessions)
    client.rejecting = {"u3": "invalid email"}
    partial = service.sync_pair(pair, SyncRequest())
    assert (partial.status, partial.sent, partial.failed) == (RunStatus.PARTIAL, 4, 1)
    assert partial.error is not None and f"runs show {partial.run_id}" in partial.error
    detail = reports.run(partial.run_id)
    assert detail is not None
    assert [(f.user, f.status, f.message) for f in detail.failures] == [
        ("u3", 400, "invalid email")
    ]

    client.rejecting = {}
    retried = service.sync_pair(pair, SyncRequest())
    assert (retried.status, retried.sent) == (RunStatus.SUCCEEDED, 1)
    assert client.sent_to()[-1] == "u3"
    assert reports.failing_users(only_quarantined=False) == []


def test_a_destination_that_stays_down_fails_the_run_and_frees_the_pair(
    service: SyncService, client: FakeClient, pair: int
) -> None:
    client.failure = TransientDestinationError("fake: 503 after 3 attempts")
    failed = service.sync_pair(pair, SyncRequest())
    assert (failed.status, failed.sent, failed.error) == (
        RunStatus.FAILED,
        0,
        "fake: 503 after 3 attempts",
    )

    client.failure = None
    recovered = service.sync_pair(pair, SyncRequest())  # not skipped: the lock was freed
    assert (recovered.status, recovered.sent) == (RunStatus.SUCCEEDED, 5)


def test_a_source_emptied_at_once_blocks_the_run(
    service: SyncService, client: FakeClient, shop: ShopSource, pair: int
) -> None:
    service.sync_pair(pair, SyncRequest())
    shop.set_flag("a", [f"u{i}" for i in range(5)], 0)
    blocked = service.sync_pair(pair, SyncRequest())
    assert blocked.status == RunStatus.BLOCKED
    assert blocked.error is not None and "--allow-mass-exit" in blocked.error
    assert len(client.calls) == 5

    allowed = service.sync_pair(pair, SyncRequest(allow_mass_exit=True))
    assert (allowed.status, allowed.sent) == (RunStatus.SUCCEEDED, 5)
    assert set(client.told().values()) == {False}


def test_a_second_run_of_a_held_pair_is_skipped(
    service: SyncService, client: FakeClient, pair: int
) -> None:
    holder = service.start_run(pair, SyncRequest())
    assert isinstance(holder, PreparedRun)
    skipped = service.sync_pair(pair, SyncRequest(trigger="schedule"))
    assert skipped.status == RunStatus.SKIPPED
    assert skipped.error is not None and f"(run {holder.run_id})" in skipped.error
    assert client.calls == []
    assert service.deliver_run(holder).status == RunStatus.SUCCEEDED


def test_a_run_that_lost_its_lock_stops_before_its_next_page(
    runtime: Runtime, service: SyncService, client: FakeClient, pair: int
) -> None:
    """Taken for dead mid-delivery (another run took the pair over), a run sends nothing
    after the page in hand and records none of it; the run that took over did the job."""
    later = _service(
        runtime,
        client,
        clock=lambda: utcnow() + timedelta(seconds=runtime.settings.lock_ttl_seconds + 1),
    )
    stalled = service.start_run(pair, SyncRequest())
    assert isinstance(stalled, PreparedRun)
    taken_over: list[str] = []

    def take_over_during_first_page() -> None:
        if not taken_over:
            client.before_deliver = lambda: None
            taken_over.append(later.sync_pair(pair, SyncRequest()).status)

    client.before_deliver = take_over_during_first_page
    woken = service.deliver_run(stalled)
    assert taken_over == [RunStatus.SUCCEEDED]
    assert len(client.calls) == 5 + client.max_batch_items  # the stalled run's page in hand
    assert (woken.status, woken.error) == (RunStatus.FAILED, INTERRUPTED)
    assert sorted(client.told()) == [f"u{i}" for i in range(5)]
    assert set(client.told().values()) == {True}
