"""The benchmark's measurements: one audience size end to end (real `audience-sync sync`
processes next to the same work done raw inside PostgreSQL), and delivery through a slow,
rate-limited destination.

Every sync is a separate process, timed from its start to its exit, its peak RSS read from
the kernel's accounting of that child. The raw baseline runs in the source database on the
same data at the same step: the audience query materialised into a table, then NOT EXISTS
both ways against the previous membership, the changes written to a table. Each timed
step starts after a CHECKPOINT, so none inherits the dirty buffers of the step before.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from worker import db
from worker.config import load_config
from worker.domain import PreparedRun, SyncRequest
from worker.runtime import build_runtime
from worker.settings import Settings
from worker.testing.fake_destinations import (
    DEFAULT_ORTTO_API_KEY,
    FakeDestinationsClient,
    max_requests_in_window,
)

STATE_DB, SOURCE_DB = "audience_sync_bench_state", "audience_sync_bench_source"
AUDIENCE_KEY = "bench_members"
AUDIENCE_QUERY = "select user_id, email from people where is_member"
# Syncs at 1% churn after the initial one; the state's size is read after the last.
CHURN_RUNS = 10
# The slow destination: Ortto's REST API at its Business plan's pace, far away.
RATE_PER_SECOND, PEOPLE_PER_REQUEST, LATENCY_SECONDS = 30, 100, 0.15


# ----------------------------------------------------------------------------- databases


def database_url(base: str, database: str) -> str:
    return make_url(base).set(database=database).render_as_string(hide_password=False)


def recreate(base: str, *names: str) -> None:
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for name in names:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()


def _fill_source(url: str, size: int) -> None:
    """`size` members plus 1% non-members who can enter later."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "create table people (user_id text primary key, email text, "
                "is_member boolean not null)"
            )
        )
        conn.execute(
            text(
                "insert into people select 'u' || lpad(i::text, 9, '0'), "
                "'user' || i || '@example.com', i <= :size "
                "from generate_series(1, :size + :size / 100) as i"
            ),
            {"size": size},
        )
        conn.execute(text("analyze people"))
    engine.dispose()


def _churn(url: str, step: int) -> int:
    """1% churn: the members whose number is `step` modulo 200 (0.5%) leave, and as many
    non-members enter (among them those who left at earlier steps). Returns the changes."""
    engine = create_engine(url)
    with engine.begin() as conn:
        left = conn.execute(
            text(
                "update people set is_member = false where is_member "
                "and substr(user_id, 2)::int % 200 = :k"
            ),
            {"k": step},
        ).rowcount
        joined = conn.execute(
            text(
                "update people set is_member = true where user_id in (select user_id from "
                "people where not is_member and substr(user_id, 2)::int % 200 <> :k "
                "order by user_id limit :n)"
            ),
            {"k": step, "n": left},
        ).rowcount
    engine.dispose()
    return int(joined) + int(left)


def _remember_membership(url: str) -> None:
    """The audience's membership as of now, the raw baseline's previous membership."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("drop table if exists bench_previous"))
        conn.execute(text(f"create table bench_previous as {AUDIENCE_QUERY}"))
        conn.execute(text("analyze bench_previous"))
    engine.dispose()


def _raw_baseline(url: str) -> dict[str, float]:
    """The incremental sync's work done raw in PostgreSQL: materialise the audience query,
    then NOT EXISTS both ways against the previous membership, the changes written to a
    table. Timed by part; the new membership becomes the previous one afterwards."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("drop table if exists bench_current"))
        conn.execute(text("drop table if exists bench_changes"))
        conn.execute(text("create table bench_changes (user_id text, email text, value boolean)"))
    with engine.begin() as conn:
        started = time.perf_counter()
        conn.execute(text(f"create table bench_current as {AUDIENCE_QUERY}"))
        conn.execute(text("analyze bench_current"))
        materialised = time.perf_counter()
        conn.execute(
            text(
                "insert into bench_changes select c.user_id, c.email, true from bench_current c "
                "where not exists (select 1 from bench_previous p where p.user_id = c.user_id)"
            )
        )
        conn.execute(
            text(
                "insert into bench_changes select p.user_id, p.email, false from "
                "bench_previous p where not exists "
                "(select 1 from bench_current c where c.user_id = p.user_id)"
            )
        )
        finished = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("drop table bench_previous"))
        conn.execute(text("alter table bench_current rename to bench_previous"))
    engine.dispose()
    return {
        "materialise_seconds": materialised - started,
        "anti_join_seconds": finished - materialised,
        "raw_seconds": finished - started,
    }


def _state_bytes(url: str) -> int:
    """Every table of the state database with its indexes and TOAST."""
    engine = create_engine(url)
    with engine.connect() as conn:
        total = conn.scalar(
            text(
                "select coalesce(sum(pg_total_relation_size(c.oid)), 0) from pg_class c "
                "join pg_namespace n on n.oid = c.relnamespace "
                "where n.nspname = 'public' and c.relkind in ('r', 'p', 'm')"
            )
        )
    engine.dispose()
    return int(total or 0)


def _runs(url: str) -> list[tuple[str, int, int, int, int]]:
    """(status, members, entered, exited, sent) of every run, oldest first."""
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("select status, members, entered, exited, sent from sync_runs order by id")
        ).all()
    engine.dispose()
    return [(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]


def settle(url: str) -> None:
    """CHECKPOINT the server before a timed step, so that no step pays for writing out the
    buffers the step before it dirtied (the raw baseline writes two tables the size of the
    audience just before the first incremental sync). Skipped where the role may not."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("CHECKPOINT"))
    except DBAPIError as exc:
        print(f"CHECKPOINT refused ({exc.orig}); timed steps may inherit dirty buffers")
    finally:
        engine.dispose()


def _count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            count += chunk.count(b"\n")
    return count


@contextmanager
def _configured(
    base: str, directory: Path, destination: dict[str, Any], size: int
) -> Iterator[tuple[str, str]]:
    """Fresh state and source databases, the audience applied; yields (state, source)."""
    recreate(base, STATE_DB, SOURCE_DB)
    state, source = database_url(base, STATE_DB), database_url(base, SOURCE_DB)
    db.upgrade(state)
    _fill_source(source, size)
    config = directory / "audiences.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": {"shop": {"url": source}},
                "destinations": {"out": destination},
                "audiences": [
                    {
                        "name": "Bench Members",
                        "source": "shop",
                        "query": AUDIENCE_QUERY,
                        "destinations": ["out"],
                    }
                ],
            }
        )
    )
    runtime = build_runtime(Settings(database_url=state))
    try:
        runtime.service.apply(load_config(config))
    finally:
        runtime.close()
    yield state, source


# ----------------------------------------------------------------------------- processes


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("audience-sync")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]


def cli_sync(state_url: str, log: Path) -> dict[str, float]:
    """`audience-sync sync` in a process of its own: seconds from its start to its exit,
    and its peak RSS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCE_SYNC_")}
    env["AUDIENCE_SYNC_DATABASE_URL"] = state_url
    with log.open("ab") as output:
        started = time.perf_counter()
        process = subprocess.Popen(
            [*_cli(), "sync", AUDIENCE_KEY], env=env, stdout=output, stderr=output
        )
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"audience-sync sync exited with {process.returncode}: see {log}")
    return {"seconds": elapsed, "peak_rss_mb": usage.ru_maxrss / 1024}


def run_child(args: list[str]) -> dict[str, Any]:
    """A step of the benchmark in a Python process of its own; its last line is JSON."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", *args], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"benchmark step {' '.join(args)} failed")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def child_phases(state_url: str) -> dict[str, Any]:
    """One incremental sync in this process, timed by phase: the source read into the state
    database (ingest) and the diff statement."""
    runtime = build_runtime(Settings(database_url=state_url))
    try:
        [pair_id] = runtime.service.select_pairs()
        prepared = runtime.service.start_run(pair_id, SyncRequest())
        assert isinstance(prepared, PreparedRun), prepared
        runtime.service.deliver_range(prepared, after=None, upto=None)
        summary = runtime.service.finish_run(prepared)
        assert summary.status == "succeeded", summary
    finally:
        runtime.close()
    return {
        "members": summary.members,
        "snapshot_seconds": prepared.snapshot_seconds,
        "diff_seconds": prepared.diff_seconds,
    }


# ----------------------------------------------------------------------------- one size


def measure_size(base: str, size: int, say: Any) -> dict[str, Any]:
    """Initial sync, then CHURN_RUNS syncs at 1% churn, each a real process, on one data
    set; the raw baseline and the phase timings on the same steps."""
    with tempfile.TemporaryDirectory() as directory:
        out, log = Path(directory) / "identify.ndjson", Path(directory) / "sync.log"
        destination = {"type": "file", "path": str(out)}
        with _configured(base, Path(directory), destination, size) as (state, source):
            say(f"  {size:,}: initial sync")
            settle(source)
            initial = cli_sync(state, log)
            say(f"  {size:,}: initial sync {initial['seconds']:.1f} s")
            _remember_membership(source)
            incremental: list[float] = []
            rss = [initial["peak_rss_mb"]]
            raw: dict[str, float] = {}
            phases: dict[str, Any] = {}
            diff_baseline = 0.0
            changes = 0
            for step in range(1, CHURN_RUNS + 1):
                say(f"  {size:,}: sync {step + 1} of {CHURN_RUNS + 1} (1% churn)")
                changes += _churn(source, step)
                if step == 1:
                    settle(source)
                    raw = _raw_baseline(source)
                    say(f"  {size:,}: raw baseline {raw['raw_seconds']:.2f} s")
                if step == 2:
                    settle(source)
                    diff_baseline = _raw_baseline(source)["anti_join_seconds"]
                    settle(source)
                    phases = run_child(["--child", "phases", "--state-url", state])
                    continue
                settle(source)
                run = cli_sync(state, log)
                say(f"  {size:,}: {run['seconds']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB")
                incremental.append(run["seconds"])
                rss.append(run["peak_rss_mb"])
            state_bytes = _state_bytes(state)
            runs = _runs(state)
            lines = _count_lines(out)
    members = runs[-1][1]
    is_exactly_once = (
        all(status == "succeeded" for status, *_ in runs)
        and all(sent == entered + exited for _, _, entered, exited, sent in runs)
        and sum(sent for *_, sent in runs) == size + changes
        and lines == size + changes
    )
    return {
        "size": size,
        "initial_sync_seconds": initial["seconds"],
        "initial_calls_per_second": size / initial["seconds"],
        "incremental_sync_seconds": incremental[0],
        "incremental_sync_median_seconds": sorted(incremental)[len(incremental) // 2],
        "incremental_changes": changes // CHURN_RUNS,
        "raw_baseline_seconds": raw["raw_seconds"],
        "raw_materialise_seconds": raw["materialise_seconds"],
        "raw_anti_join_seconds": raw["anti_join_seconds"],
        "end_to_end_ratio": incremental[0] / raw["raw_seconds"],
        "diff_seconds": phases["diff_seconds"],
        "anti_join_seconds": diff_baseline,
        "diff_ratio": phases["diff_seconds"] / diff_baseline,
        "ingest_rows_per_second": phases["members"] / phases["snapshot_seconds"],
        "state_bytes": state_bytes,
        "state_bytes_per_member": state_bytes / members,
        "peak_rss_mb": max(rss),
        "calls_sent": sum(sent for *_, sent in runs),
        "calls_in_file": lines,
        "changes_made": size + changes,
        "exactly_once": is_exactly_once,
    }


# ----------------------------------------------------------------------------- delivery


def child_delivery(base: str, fake_url: str, people: int) -> dict[str, Any]:
    """An initial sync of `people` to the Ortto REST API emulation answering in
    LATENCY_SECONDS, limited (and configured) to RATE_PER_SECOND requests a second."""
    fake = FakeDestinationsClient(fake_url)
    fake.reset()
    fake.configure(max_requests_per_second=RATE_PER_SECOND, latency_seconds=LATENCY_SECONDS)
    os.environ["BENCH_ORTTO_KEY"] = DEFAULT_ORTTO_API_KEY
    destination = {
        "type": "ortto-api",
        "api_key": "${BENCH_ORTTO_KEY}",
        "endpoint": fake_url,
        "rate_limit": f"{RATE_PER_SECOND}/s",
    }
    try:
        with (
            tempfile.TemporaryDirectory() as directory,
            _configured(base, Path(directory), destination, people) as (state, _source),
        ):
            runtime = build_runtime(Settings(database_url=state))
            try:
                [pair_id] = runtime.service.select_pairs()
                prepared = runtime.service.start_run(pair_id, SyncRequest())
                assert isinstance(prepared, PreparedRun), prepared
                started = time.perf_counter()
                runtime.service.deliver_range(prepared, after=None, upto=None)
                seconds = time.perf_counter() - started
                summary = runtime.service.finish_run(prepared)
            finally:
                runtime.close()
        log = fake.log("ortto-api")
        stored = len(fake.state()["state"]["ortto-api"].get(AUDIENCE_KEY, {}))
    finally:
        fake.configure(max_requests_per_second=None, latency_seconds=0)
        fake.close()
    # Every request counts towards the limit: the field lookup before the first page too.
    arrivals = log["arrivals"]
    answered = [a["at"] for a in arrivals if a["status"] != 429]
    per_second = len(answered) / seconds
    return {
        "people": people,
        "latency_seconds": LATENCY_SECONDS,
        "limit_per_second": RATE_PER_SECOND,
        "delivery_seconds": seconds,
        "requests_per_second": per_second,
        "share_of_limit": per_second / RATE_PER_SECOND,
        "most_in_one_second": max_requests_in_window(answered, 1.0),
        "responses_429": sum(1 for a in arrivals if a["status"] == 429),
        "exactly_once": summary.status == "succeeded"
        and summary.sent == people
        and stored == people,
    }
