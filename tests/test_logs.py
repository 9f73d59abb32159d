"""Structured logs: with AUDIENCE_SYNC_LOG_FORMAT=json, one JSON object per line, and every
line of a run names its run id, audience and destination."""

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import logs
from worker.domain import SyncRequest
from worker.runtime import Runtime
from worker.service import SyncService
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, write_config
from worker.testing.guarantees import cli_env, run_cli

step_logger = logging.getLogger("audience_sync.test_steps")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    logs.apply_format(root, "json")
    previous = root.level
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def test_every_line_of_a_run_carries_the_run(
    runtime: Runtime, shop: ShopSource, tmp_path: Path, captured: io.StringIO
) -> None:
    shop.add([("u1", "u1@example.com", 1, 1, 0), ("u2", None, 1, 0, 0)])
    apply_file(
        runtime,
        write_config(
            tmp_path, source_url=shop.url, audiences=[audience("A", "a"), audience("B", "b")]
        ),
    )
    # The crash hook is called at each step of a run: log a line there.
    service = SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings,
        destinations=runtime.destinations,
        crash_point=lambda step: step_logger.warning("reached %s", step),
    )
    summaries = [service.sync_pair(p, SyncRequest()) for p in service.select_pairs()]
    step_logger.warning("between runs")
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    by_run: dict[int, list[dict[str, object]]] = {}
    for line in lines[:-1]:
        assert {"time", "level", "logger", "message"} <= set(line)
        by_run.setdefault(int(line["run_id"]), []).append(line)  # type: ignore[call-overload]
    assert set(by_run) == {s.run_id for s in summaries}
    for summary in summaries:
        mine = by_run[summary.run_id]
        assert {(m["audience"], m["destination"]) for m in mine} == {
            (summary.audience_key, "local")
        }
        messages = [str(m["message"]) for m in mine]
        assert "reached page_recorded" in messages
        assert messages[-1].startswith("sync finished ")
    assert lines[-1]["run_id"] is None and lines[-1]["message"] == "between runs"


def test_text_format_names_the_run() -> None:
    record = logging.LogRecord("audience_sync", logging.WARNING, __file__, 1, "hello", (), None)
    logs.bind_run(7, "vips", "ortto")
    try:
        assert logs.TextFormatter().format(record) == (
            "WARNING audience_sync hello [run 7 vips -> ortto]"
        )
    finally:
        logs.unbind_run()
    assert logs.TextFormatter().format(record) == "WARNING audience_sync hello"


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.slow
def test_cli_logs_json_lines_with_the_run(
    runtime: Runtime, shop: ShopSource, tmp_path: Path
) -> None:
    shop.add([("u1", None, 1, 0, 0)])
    path = write_config(tmp_path, source_url=shop.url, audiences=[audience("A", "a")])
    # An alert to a port nobody listens on: its ERROR line comes after the run, from the
    # thread that posts it, and still names the run.
    path.write_text(path.read_text() + "alerts:\n- name: dead\n  url: http://127.0.0.1:9/x\n")
    apply_file(runtime, path)
    shop.execute("alter table people rename to gone")
    result = run_cli(
        "sync", "a", env=cli_env(runtime.settings.database_url, log_format="json"), timeout=60
    )
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [alert] = [line for line in lines if line["logger"] == "audience_sync.alerts"]
    assert alert["level"] == "ERROR"
    assert "not delivered after 3 attempt(s)" in alert["message"]
    assert (alert["run_id"], alert["audience"], alert["destination"]) == (1, "a", "local")
    # Every other line of the run names it too (a failed run's own line among them).
    assert all(line["run_id"] == 1 for line in lines)
    assert all(line.startswith("{") for line in result.stderr.splitlines() if line.strip())
