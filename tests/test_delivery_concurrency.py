"""Delivery with several pages in flight: the rate limit is reached against a slow
destination and never exceeded, a user is never in two requests at once, pages are recorded
in the order the destination answered them, and a SIGKILL during concurrent deliveries
leaves at most the pages in flight to re-send.
"""

import itertools
import random
import signal
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from models import SyncRun
from worker.context import utcnow
from worker.delivery import Delivery
from worker.destinations.ortto import OrttoDestination
from worker.domain import PreparedRun, SyncRequest
from worker.ratelimit import requests_in_flight, smoothed_latency
from worker.repositories.runs import INTERRUPTED
from worker.runtime import Runtime
from worker.service import SyncService
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, write_config
from worker.testing.fake_destinations import FakeDestinations, max_requests_in_window
from worker.testing.guarantees import (
    ORTTO_KEY_VARIABLE,
    cli_env,
    kill_when,
    ortto_destination,
    redundant_sends,
    start_cli,
    wrong_values,
)

KEY = "concurrent_test"
PAGE = OrttoDestination.max_batch_items
LATENCY = 0.15
RATE = 30
LOCK_TTL = 5


@pytest.mark.parametrize(
    ("rate", "latency", "most", "expected"),
    [
        (30, None, 16, 1),  # nothing measured yet: one
        (30, 0.0, 16, 1),
        (30, 0.002, 16, 1),  # a local destination: one is enough
        (30, 0.15, 16, 7),  # 30/s x 150 ms = 4.5, with headroom 6.75
        (30, 1.0, 16, 16),  # capped
        (1000, 0.01, 16, 15),
        (0.5, 2.0, 16, 2),
        (30, 0.15, 3, 3),
    ],
)
def test_requests_in_flight_follow_rate_times_latency(
    rate: float, latency: float | None, most: int, expected: int
) -> None:
    assert requests_in_flight(rate, latency, most=most) == expected


def test_smoothed_latency_starts_at_the_first_answer_and_moves_towards_new_ones() -> None:
    assert smoothed_latency(None, 0.15) == 0.15
    assert 0.15 < smoothed_latency(0.15, 0.5) < 0.5
    assert smoothed_latency(0.15, 0.15) == pytest.approx(0.15)


def _user(i: int) -> str:
    return f"u{i:05d}"


def _configure(tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations) -> int:
    path = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Concurrent Test", "a", destinations=["ortto"])],
        destinations={"ortto": ortto_destination(fake, rate_limit=f"{RATE}/s")},
    )
    apply_file(runtime, path)
    [pair] = runtime.service.select_pairs(audience_keys=[KEY])
    return pair


def _service(runtime: Runtime, *, later: bool = False, **settings: Any) -> SyncService:
    def clock() -> datetime:
        return utcnow() + timedelta(seconds=LOCK_TTL + 1 if later else 0)

    return SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings.model_copy(update=settings),
        destinations=runtime.destinations,
        clock=clock,
    )


def _overlapping(at: list[float], latency: float) -> int:
    """The most requests in flight at once, each taken to last `latency` from its arrival."""
    return max_requests_in_window(at, latency)


@pytest.mark.slow
def test_a_slow_destination_gets_requests_in_parallel_within_its_rate_limit(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    members = 30 * PAGE
    shop.add((_user(i), None, 1, 0, 0) for i in range(members))
    pair = _configure(tmp_path, shop, runtime, fake)
    fake.latency_seconds = LATENCY
    fake.max_requests_per_second = RATE

    summary = _service(runtime).sync_pair(pair, SyncRequest())

    assert summary.status == "succeeded" and summary.sent == members, summary
    arrivals = fake.arrivals("ortto")
    at = [a.at for a in arrivals if a.path == "/v1/identify"]
    assert all(a.status == 200 for a in arrivals), {a.status for a in arrivals}
    assert max_requests_in_window(at, 1.0) <= RATE
    # More than one request in flight at once (one at a time, none would start within
    # 150 ms of the one before).
    assert _overlapping(at, LATENCY) > 1
    assert wrong_values(fake.state("ortto")[KEY], shop.members("a")) == {}
    assert redundant_sends(fake.items("ortto"), KEY) == 0


@pytest.mark.slow
def test_pages_are_recorded_in_the_order_the_destination_answered(
    tmp_path: Path,
    shop: ShopSource,
    runtime: Runtime,
    fake: FakeDestinations,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    members = 6 * PAGE
    shop.add((_user(i), None, 1, 0, 0) for i in range(members))
    pair = _configure(tmp_path, shop, runtime, fake)
    recorded: list[tuple[str, str]] = []
    record_page = Delivery._record_page

    def spy(
        self: Delivery, session: Any, prepared: PreparedRun, page: Any, *a: Any, **k: Any
    ) -> None:
        record_page(self, session, prepared, page, *a, **k)
        recorded.append((page[0].member_id, page[-1].member_id))

    monkeypatch.setattr(Delivery, "_record_page", spy)

    class SlowSecondPage:
        """Once the first page (sent alone) is recorded, the next request is answered late;
        the two sent with it come back first."""

        def start(self, label: str, total: int) -> None: ...

        def advance(self, count: int) -> None:
            if len(recorded) == 1:
                fake.add_fault("slow", seconds=0.6)

        def stop(self) -> None: ...

    service = _service(runtime, delivery_in_flight=3)
    prepared = service.start_run(pair, SyncRequest())
    assert isinstance(prepared, PreparedRun)
    service.deliver_range(prepared, after=None, upto=None, progress=SlowSecondPage())
    assert service.finish_run(prepared).status == "succeeded"

    pages = sorted(recorded)
    assert len(pages) == 6
    # Disjoint ranges: no user was in two pages, so never in two requests at once.
    assert all(a[1] < b[0] for a, b in itertools.pairwise(pages))
    # The first page went alone; the late second one was recorded after the two sent with
    # it, answered sooner.
    assert recorded[0] == pages[0]
    assert recorded.index(pages[1]) > recorded.index(pages[2])
    assert recorded.index(pages[1]) > recorded.index(pages[3])
    assert redundant_sends(fake.items("ortto"), KEY) == 0
    assert wrong_values(fake.state("ortto")[KEY], shop.members("a")) == {}


def _runs(runtime: Runtime) -> dict[int, tuple[str, str | None]]:
    with runtime.sessions() as session:
        return {run.id: (run.status, run.error) for run in session.scalars(select(SyncRun))}


@pytest.mark.slow
def test_kill_during_concurrent_deliveries_then_rerun_converges(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, backend: str
) -> None:
    rng = random.Random(f"concurrent-kill-{backend}")
    in_flight = 4
    members = 40 * PAGE
    shop.add((_user(i), None, int(i < members), 0, 0) for i in range(members + 500))
    pair = _configure(tmp_path, shop, runtime, fake)
    fake.latency_seconds = LATENCY
    env = cli_env(
        runtime.settings.database_url,
        lock_ttl_seconds=str(LOCK_TTL),
        backoff_base_seconds="0.01",
        delivery_in_flight=str(in_flight),
    )
    env[ORTTO_KEY_VARIABLE] = fake.ortto_key
    delay = rng.uniform(0.0, 0.4)
    # Past the first page (sent alone), while several are in flight.
    returncode = kill_when(
        start_cli("sync", KEY, env=env),
        lambda: len(fake.arrivals("ortto")) >= 3,
        timeout=60,
        delay=delay,
    )
    where = f"killed {delay:.3f}s after the third request"
    assert returncode == -signal.SIGKILL, f"the run finished first ({where})"
    at = [a.at for a in fake.arrivals("ortto")]
    assert _overlapping(at, LATENCY) > 1, where
    sent = len(fake.items("ortto"))
    assert 0 < sent < members, f"{where}, {sent} contacts in"
    dead_run = max(_runs(runtime))

    summary = _service(runtime, later=True).sync_pair(pair, SyncRequest())
    assert summary.status == "succeeded", summary
    assert _runs(runtime)[dead_run] == ("failed", INTERRUPTED)
    assert wrong_values(fake.state("ortto")[KEY], shop.members("a")) == {}
    # Re-sent: at most the pages that were in flight when the process died.
    assert redundant_sends(fake.items("ortto"), KEY) <= in_flight * PAGE
