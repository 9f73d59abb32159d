"""Benchmark: how long each console page takes with 1,000,000 synced users, on the local
PostgreSQL (the production state database).

`python -m bench.console [--users 1000000]` fills a state database with 100 audiences and
10,000 runs (as `bench.scrape`), then one audience holding `--users` synced members, 5,000
failing users and a run with 20,000 rejections, and times every page through the
console's app (rendering included): median and slowest of 10 requests each. The figures
go in the README; this is not a test.
"""

import argparse
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from starlette.testclient import TestClient

from bench.scrape import fill, timed
from worker.console.app import create_app
from worker.console.readonly import read_only_engine, read_only_sessions
from worker.db import make_engine
from worker.metrics import registry_for
from worker.reports import ReportService
from worker.testing.databases import state_database

FAILING = 5_000
REJECTIONS = 20_000


def add_synced(url: str, *, users: int) -> int:
    """`users` synced members of audience 1 at its destination, failing users and a run
    full of rejections; returns that run's id."""
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "insert into synced_members (audience_id, destination_id, member_id, "
                "is_anonymous, is_member, email, run_id) "
                "select 1, 1, 'user-' || lpad(n::text, 8, '0'), false, true, null, 1 "
                "from generate_series(1, :users) as n"
            ),
            {"users": users},
        )
        connection.execute(
            text(
                "insert into failing_members (audience_id, destination_id, member_id, "
                "consecutive_failures, is_quarantined, last_value, last_status, last_message, "
                "last_run_id, updated_at, resends_owed) "
                "select 1, 1, 'user-' || lpad(n::text, 8, '0'), 1 + n % 7, n % 7 >= 4, true, "
                "400, 'invalid contact', 1, now(), 1 from generate_series(100, 99 + :n) as n "
                "on conflict do nothing"
            ),
            {"n": FAILING},
        )
        run_id = int(connection.execute(text("select max(id) from sync_runs")).scalar_one())
        connection.execute(
            text(
                "insert into delivery_failures (run_id, member_id, value, status, message) "
                "select :run, 'user-' || lpad(n::text, 8, '0'), true, 400, 'invalid contact' "
                "from generate_series(1, :n) as n"
            ),
            {"run": run_id, "n": REJECTIONS},
        )
        connection.execute(
            text("update sync_runs set failed = :n where id = :run"),
            {
                "n": REJECTIONS,
                "run": run_id,
            },
        )
        connection.execute(text("ANALYZE"))
    engine.dispose()
    return run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    options = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as directory,
        state_database("postgresql", Path(directory)) as url,
    ):
        fill(url, audiences=100, runs=10_000)
        run_id = add_synced(url, users=options.users)
        engine = read_only_engine(url)
        reports = ReportService(session_factory=read_only_sessions(engine))
        app = create_app(reports, registry=registry_for(reports), clock=lambda: datetime.now(UTC))
        pages = [
            "/",
            "/?status=failed",
            "/audiences/audience_000",
            f"/runs/{run_id}",
            f"/runs/{run_id}?page=400",
            "/failures",
            "/failures?page=11",
            "/users?id=user-00000200",
            "/healthz",
            "/metrics",
        ]
        with TestClient(app) as client:
            for page in pages:
                median, slowest = timed(lambda page=page: client.get(page), repeat=10)
                print(f"{page}: median {median:.0f} ms, slowest {slowest:.0f} ms")
        engine.dispose()


if __name__ == "__main__":
    main()
