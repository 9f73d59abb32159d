"""Log levels on real runs against the fake destination server: a run's closing line is
ERROR when it failed, WARNING when it was blocked or partly rejected, INFO when it
succeeded; each HTTP request is one DEBUG line (and httpx's own INFO lines are quiet)."""

import json
import logging
from pathlib import Path

import pytest

from worker.domain import RunStatus, RunSummary, SyncRequest, summary_fields
from worker.runtime import Runtime
from worker.testing.databases import ShopSource
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import sync_to_fake


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the levels do not depend on the state database


def _sync_and_read_log(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> tuple[RunStatus, logging.LogRecord]:
    caplog.clear()
    (pair,) = runtime.service.select_pairs()
    summary = runtime.service.sync_pair(pair, SyncRequest())
    (closing,) = [r for r in caplog.records if r.getMessage().startswith("sync finished ")]
    assert json.loads(closing.getMessage().removeprefix("sync finished "))["status"] == (
        summary.status
    )
    return RunStatus(summary.status), closing


def test_each_outcome_logs_at_its_level(
    tmp_path: Path,
    shop: ShopSource,
    runtime: Runtime,
    fake: FakeDestinations,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    shop.add((f"u{i}", None, 1, 0, 0) for i in range(4))
    sync_to_fake(runtime, tmp_path, shop, fake, "Logged")

    status, closing = _sync_and_read_log(runtime, caplog)
    assert (status, closing.levelno) == (RunStatus.SUCCEEDED, logging.INFO)
    requests = [r for r in caplog.records if r.name == "worker.destinations.http"]
    assert requests and all(r.levelno == logging.DEBUG for r in requests)
    assert "destination ortto: POST" in requests[0].getMessage()
    assert "answered 200" in requests[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("httpx")]

    shop.set_flag("a", ["u1"], 0)
    fake.reject_items(["u1"])
    status, closing = _sync_and_read_log(runtime, caplog)
    assert (status, closing.levelno) == (RunStatus.PARTIAL, logging.WARNING)

    shop.set_flag("a", ["u0", "u2", "u3"], 0)  # the source now returns nothing
    status, closing = _sync_and_read_log(runtime, caplog)
    assert (status, closing.levelno) == (RunStatus.BLOCKED, logging.WARNING)

    shop.set_flag("a", ["u0", "u2", "u3"], 1)
    shop.add([("u9", None, 1, 0, 0)])
    fake.add_fault("server_error", count=100)  # down for longer than every attempt
    status, closing = _sync_and_read_log(runtime, caplog)
    assert (status, closing.levelno) == (RunStatus.FAILED, logging.ERROR)


def test_the_closing_line_carries_every_summary_field_as_documented() -> None:
    summary = RunSummary(7, "vips", "local", "incremental", "partial", 10, 3, 1, 4, 2, "x", 1.5)
    assert summary_fields(summary) == {
        "run_id": 7, "audience": "vips", "destination": "local", "mode": "incremental",
        "status": "partial", "members": 10, "entered": 3, "exited": 1, "sent": 4, "failed": 2,
        "error": "x", "duration_seconds": 1.5,
    }  # fmt: skip
