"""Prometheus metrics, parsed as Prometheus would, equal the run history after known runs;
`metrics serve` answers over HTTP."""

import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from models import FailingMember, SyncRun
from worker.domain import RunStatus, SyncRequest
from worker.metrics import exposition, registry_for
from worker.reports import ReportService
from worker.runtime import Runtime
from worker.settings import Settings
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, sync_all, write_config
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import cli_env, start_cli, sync_to_fake

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(runtime: Runtime) -> Samples:
    text = exposition(registry_for(ReportService(session_factory=runtime.sessions))).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def pair(audience: str, destination: str, **more: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"audience": audience, "destination": destination, **more}.items()))


def test_metrics_equal_the_history(
    runtime: Runtime, shop: ShopSource, tmp_path: Path, fake: FakeDestinations
) -> None:
    shop.add([(f"u{i}", None, 1, int(i < 3), 0) for i in range(10)])
    sync_to_fake(runtime, tmp_path, shop, fake, "Loyal", "Few")
    fake.reject_items(["u1"])
    sync_all(runtime)  # few: 2 sent, 1 rejected (partial); loyal: 9 sent, 1 rejected
    shop.set_flag("a", ["u9"], 0)
    sync_all(runtime, audience_keys=["loyal"])  # u9 exits; u1 rejected again
    shop.execute("alter table people rename to gone")
    sync_all(runtime, audience_keys=["few"])  # failed
    samples = scrape(runtime)

    with runtime.sessions() as session:
        runs = session.scalars(select(SyncRun).order_by(SyncRun.id)).all()
        owed = session.scalar(select(func.count()).select_from(FailingMember))
    assert [r.status for r in runs] == ["partial", "partial", "partial", "failed"]
    loyal, few = pair("loyal", "ortto"), pair("few", "ortto")
    assert samples[("audience_sync_runs_total", pair("loyal", "ortto", status="partial"))] == 2
    assert samples[("audience_sync_runs_total", pair("few", "ortto", status="partial"))] == 1
    assert samples[("audience_sync_runs_total", pair("few", "ortto", status="failed"))] == 1
    assert samples[("audience_sync_calls_sent_total", loyal)] == runs[1].sent + runs[2].sent == 10
    assert samples[("audience_sync_calls_failed_total", loyal)] == 2
    assert samples[("audience_sync_calls_sent_total", few)] == runs[0].sent == 2
    assert samples[("audience_sync_members", (("audience", "loyal"),))] == 9
    assert samples[("audience_sync_members", (("audience", "few"),))] == 3
    assert samples[("audience_sync_last_run_status", pair("few", "ortto", status="failed"))] == 1
    assert samples[("audience_sync_last_run_status", pair("few", "ortto", status="partial"))] == 0
    assert samples[("audience_sync_last_run_status", pair("loyal", "ortto", status="partial"))] == 1
    assert samples[("audience_sync_last_success_timestamp_seconds", few)] == pytest.approx(
        runs[0].finished_at.timestamp()  # type: ignore[union-attr]
    )
    assert samples[("audience_sync_last_success_timestamp_seconds", loyal)] == pytest.approx(
        runs[2].finished_at.timestamp()  # type: ignore[union-attr]
    )
    # u1 failed in both audiences: owed to each, quarantined in neither (yet).
    assert owed == 2
    assert samples[("audience_sync_owed_changes", loyal)] == 1
    assert samples[("audience_sync_quarantined_users", loyal)] == 0
    # The failed run never read its source: no phase series, only its total.
    for phase in ("snapshot", "diff", "delivery"):
        assert ("audience_sync_run_duration_seconds", pair("few", "ortto", phase=phase)) not in (
            samples
        )
    assert samples[
        ("audience_sync_run_duration_seconds", pair("loyal", "ortto", phase="snapshot"))
    ] == pytest.approx(runs[2].snapshot_seconds)
    duration = samples[("audience_sync_run_duration_seconds", pair("few", "ortto", phase="total"))]
    assert duration == pytest.approx(
        (runs[3].finished_at - runs[3].started_at).total_seconds()  # type: ignore[operator]
    )


def test_quarantined_users_are_counted(
    runtime: Runtime, shop: ShopSource, tmp_path: Path, fake: FakeDestinations
) -> None:
    shop.add([("u1", None, 1, 0, 0), ("u2", None, 1, 0, 0)])
    sync_to_fake(runtime, tmp_path, shop, fake, "Loyal")
    fake.reject_items(["u1"])
    for _ in range(runtime.settings.quarantine_after):
        sync_all(runtime, SyncRequest())
    samples = scrape(runtime)
    assert samples[("audience_sync_quarantined_users", pair("loyal", "ortto"))] == 1
    assert samples[("audience_sync_owed_changes", pair("loyal", "ortto"))] == 0


def test_no_pairs_no_series(runtime: Runtime) -> None:
    assert scrape(runtime) == {}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.slow
def test_metrics_serve(
    runtime: Runtime, settings: Settings, shop: ShopSource, tmp_path: Path
) -> None:
    shop.add([("u1", None, 1, 0, 0)])
    apply_file(runtime, write_config(tmp_path, source_url=shop.url, audiences=[audience("A", "a")]))
    assert [s.status for s in sync_all(runtime)] == [RunStatus.SUCCEEDED]
    port = _free_port()
    process = start_cli("metrics", "serve", "--port", str(port), env=cli_env(settings.database_url))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
                time.sleep(0.1)
        assert answer.status_code == 200
        assert 'audience_sync_members{audience="a"} 1.0' in answer.text
    finally:
        process.terminate()
        process.wait(10)
