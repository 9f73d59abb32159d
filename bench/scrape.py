"""Benchmark: how long one Prometheus scrape and the console's overview take with 100
audiences and 10,000 runs in the state database (SQLite and the local PostgreSQL).

`python -m bench.scrape [--audiences 100] [--runs 10000]` prints the median and the
slowest of 20 scrapes for each backend. The figures go in the README; this is not a test.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from models import (
    Audience,
    AudienceDestination,
    Destination,
    FailingMember,
    Source,
    SyncRun,
)
from worker.db import make_engine, make_session_factory
from worker.metrics import exposition, registry_for
from worker.reports import ReportService
from worker.testing.databases import state_database

STATUSES = ("succeeded", "succeeded", "succeeded", "partial", "failed", "blocked", "skipped")


def fill(url: str, *, audiences: int, runs: int) -> None:
    """`audiences` audiences with one destination each, `runs` runs spread over them, and
    a few failing users per pair."""
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with sessions.begin() as session:
        source = Source(name="shop", url="sqlite:///shop.db", statement_timeout_seconds=30)
        destination = Destination(name="ortto", type="file", settings={"path": "x.ndjson"})
        session.add_all([source, destination])
        session.flush()
        for index in range(audiences):
            audience = Audience(
                key=f"audience_{index:03d}",
                name=f"Audience {index}",
                source_id=source.id,
                query="select 1 as user_id",
                schedule="every 1h",
                max_exit_fraction=0.5,
                is_archived=False,
                created_at=start,
                updated_at=start,
            )
            session.add(audience)
            session.flush()
            session.add(AudienceDestination(audience_id=audience.id, destination_id=destination.id))
            session.add_all(
                FailingMember(
                    audience_id=audience.id,
                    destination_id=destination.id,
                    member_id=f"user-{n}",
                    consecutive_failures=n,
                    is_quarantined=n >= 5,
                    last_value=True,
                    last_status=400,
                    last_message="invalid contact",
                    last_run_id=1,
                    updated_at=start,
                    resends_owed=1,
                )
                for n in range(1, 8)
            )
        session.flush()
        per_audience = runs // audiences
        for number in range(per_audience):
            at = start + timedelta(hours=number)
            session.add_all(
                SyncRun(
                    audience_id=audience_id,
                    destination_id=destination.id,
                    mode="incremental",
                    trigger="schedule",
                    status=STATUSES[(number + audience_id) % len(STATUSES)],
                    started_at=at,
                    finished_at=at + timedelta(seconds=30),
                    members=1000 + number,
                    entered=10,
                    exited=5,
                    sent=15,
                    failed=1,
                    skipped_rows={},
                )
                for audience_id in range(1, audiences + 1)
            )
    # Fresh planner statistics, as autovacuum keeps them on a live PostgreSQL database.
    with engine.begin() as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()


def timed(action: Callable[[], object], *, repeat: int = 20) -> tuple[float, float]:
    """Median and slowest of `repeat` calls, in milliseconds (after one warm-up call)."""
    action()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        action()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), max(times)


@contextmanager
def database(backend: str) -> Iterator[str]:
    with (
        tempfile.TemporaryDirectory() as directory,
        state_database(backend, Path(directory)) as url,
    ):
        yield url


def measure(backend: str, *, audiences: int, runs: int) -> str:
    with database(backend) as url:
        fill(url, audiences=audiences, runs=runs)
        engine = make_engine(url)
        reports = ReportService(session_factory=make_session_factory(engine))
        registry = registry_for(reports)
        scrape = timed(lambda: exposition(registry))
        now = datetime.now(UTC)
        overview = timed(lambda: reports.overview(now=now))
        engine.dispose()
    return (
        f"{backend}: {audiences} audiences, {runs} runs: "
        f"scrape median {scrape[0]:.1f} ms (slowest {scrape[1]:.1f} ms); "
        f"overview median {overview[0]:.1f} ms (slowest {overview[1]:.1f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--audiences", type=int, default=100)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--backend", action="append", choices=["sqlite", "postgresql"])
    options = parser.parse_args()
    for backend in options.backend or ["sqlite", "postgresql"]:
        print(measure(backend, audiences=options.audiences, runs=options.runs))


if __name__ == "__main__":
    main()
