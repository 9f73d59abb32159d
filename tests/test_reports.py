"""The read side on both state databases: audiences, history, one run and failing users,
returned as plain values."""

from pathlib import Path

import pytest

from worker.domain import SyncRequest
from worker.errors import NotFoundError
from worker.reports import (
    AudienceListing,
    FailingUser,
    ReportService,
    RunFailure,
    RunRecord,
)
from worker.runtime import Runtime
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, sync_all, write_config
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import sync_to_fake


@pytest.fixture
def reports(runtime: Runtime) -> ReportService:
    return ReportService(session_factory=runtime.sessions)


def _apply(runtime: Runtime, tmp_path: Path, shop: ShopSource, *flags: str) -> None:
    names = {"a": "Order Completed", "b": "High-Value Customers"}
    audiences = [audience(names[flag], flag, schedule="every 2h") for flag in flags]
    apply_file(runtime, write_config(tmp_path, source_url=shop.url, audiences=audiences))


def test_audiences_archived_ones_too(
    reports: ReportService, runtime: Runtime, shop: ShopSource, tmp_path: Path
) -> None:
    assert reports.audiences() == []
    _apply(runtime, tmp_path, shop, "a", "b")
    _apply(runtime, tmp_path, shop, "a")
    listed = reports.audiences()
    assert listed == [
        AudienceListing(
            "high_value_customers", "High-Value Customers", "shop", "every 2h", ("local",), True
        ),
        AudienceListing(
            "order_completed", "Order Completed", "shop", "every 2h", ("local",), False
        ),
    ]


def test_history_newest_first_filtered_and_limited(
    reports: ReportService, runtime: Runtime, shop: ShopSource, tmp_path: Path
) -> None:
    shop.add([("u1", "u1@example.com", 1, 1, 0), ("u2", None, 1, 0, 0), (None, None, 1, 0, 0)])
    _apply(runtime, tmp_path, shop, "a", "b")
    sync_all(runtime)
    sync_all(runtime, SyncRequest(is_full=True), audience_keys=["order_completed"])

    history = reports.history()
    assert [(r.id, r.audience, r.mode) for r in history] == [
        (3, "order_completed", "full"),
        (2, "order_completed", "initial"),
        (1, "high_value_customers", "initial"),
    ]
    first = history[-1]
    assert isinstance(first, RunRecord)
    assert (first.destination, first.trigger, first.status) == ("local", "manual", "succeeded")
    assert (first.members, first.entered, first.exited, first.sent, first.failed) == (1, 1, 0, 1, 0)
    assert first.finished_at is not None and first.finished_at >= first.started_at
    assert first.duration_seconds == (first.finished_at - first.started_at).total_seconds()
    assert first.error is None
    assert dict(history[1].skipped_rows) == {"null_id": 1}
    with pytest.raises(TypeError):  # a frozen record hands out no dict to change
        history[1].skipped_rows["null_id"] = 0  # type: ignore[index]

    assert [r.id for r in reports.history(limit=1)] == [3]
    assert [r.id for r in reports.history(audience_key="high_value_customers")] == [1]
    with pytest.raises(NotFoundError, match="no audience with key 'no_such_audience'"):
        reports.history(audience_key="no_such_audience")


def test_one_run_with_its_failures_and_failing_users(
    reports: ReportService,
    runtime: Runtime,
    shop: ShopSource,
    fake: FakeDestinations,
    tmp_path: Path,
) -> None:
    with pytest.raises(NotFoundError, match="no run 1"):
        reports.run(1)
    shop.add((f"u{i}", None, 1, 0, 0) for i in range(4))
    sync_to_fake(runtime, tmp_path, shop, fake, "Rejection Test")
    fake.reject_items(["u1", "u3"], status=400, message="invalid contact")
    [summary] = sync_all(runtime)

    detail = reports.run(summary.run_id)
    assert detail is not None
    assert (detail.run.status, detail.run.sent, detail.run.failed) == ("partial", 2, 2)
    assert detail.failures == (
        RunFailure("u1", True, 400, "invalid contact"),
        RunFailure("u3", True, 400, "invalid contact"),
    )
    assert (detail.failures_total, detail.failures_truncated) == (2, False)
    # Beyond the limit, the first failures and the count of them all.
    cut = reports.run(summary.run_id, failures_limit=1)
    assert cut.failures == (RunFailure("u1", True, 400, "invalid contact"),)
    assert (cut.failures_total, cut.failures_truncated) == (2, True)

    assert reports.failing_users() == []  # rejected once: not quarantined yet
    failing = reports.failing_users(only_quarantined=False)
    assert failing == [
        FailingUser(
            "rejection_test", "ortto", user, True, 1, False, 400, "invalid contact", summary.run_id
        )
        for user in ("u1", "u3")
    ]
    with pytest.raises(NotFoundError, match="no audience with key 'other'"):
        reports.failing_users(audience_key="other", only_quarantined=False)
    with pytest.raises(NotFoundError, match="no audience with key 'other'"):
        reports.history(audience_key="other")
