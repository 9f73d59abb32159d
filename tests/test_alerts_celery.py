"""Alerts and structured logs from real `celery worker` processes: beat's tick records the
dispatcher's heartbeat, and a worker that ends a failed run posts its alert within
seconds, its log lines JSON naming the run."""

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests import worker_fixtures
from worker.config import load_config
from worker.repositories import alerts as alert_repo
from worker.runtime import Runtime, build_runtime
from worker.settings import Settings
from worker.testing.celery_worker import celery_worker
from worker.testing.databases import ShopSource
from worker.testing.factories import audience, write_config
from worker.testing.webhooks import WebhookReceiver

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

HOOK_VARIABLE = "TEST_ALERT_WEBHOOK_URL"


# PostgreSQL state and source databases, shared by the worker processes.
state_url, shop = worker_fixtures.state_url, worker_fixtures.shop


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


@pytest.fixture
def runtime(state_url: str, receiver: WebhookReceiver) -> Iterator[Runtime]:
    rt = build_runtime(Settings(database_url=state_url), env={HOOK_VARIABLE: receiver.url})
    try:
        yield rt
    finally:
        rt.close()


def test_a_worker_posts_the_alert_of_the_run_it_ends(
    tmp_path: Path,
    state_url: str,
    shop: ShopSource,
    runtime: Runtime,
    receiver: WebhookReceiver,
) -> None:
    shop.add([("u1", None, 1, 0, 0), ("u2", None, 1, 0, 0)])
    config = write_config(tmp_path, source_url=shop.url, audiences=[audience("Due Now", "a")])
    document = yaml.safe_load(config.read_text())
    document["alerts"] = [{"name": "team", "url": "${" + HOOK_VARIABLE + "}"}]
    config.write_text(yaml.safe_dump(document))
    runtime.service.apply(load_config(config, {HOOK_VARIABLE: receiver.url}))
    shop.execute("alter table people rename to gone")
    before = datetime.now(UTC)
    env = {
        HOOK_VARIABLE: receiver.url,
        "AUDIENCE_SYNC_TASK_RETRIES": "0",
        "AUDIENCE_SYNC_LOG_FORMAT": "json",
    }
    log_path = tmp_path / "worker.log"
    with celery_worker(database_url=state_url, log_path=log_path, concurrency=1, env=env) as worker:
        [pair] = worker.send("audience_sync.dispatch_due").get(timeout=30)
        posts = receiver.wait_for(1, timeout=30)
        with runtime.sessions() as session:
            ticked = alert_repo.last_beat(session, alert_repo.DISPATCHER)
        log = worker.log()
    assert ticked is not None and before - timedelta(seconds=1) <= ticked
    assert [p["audience_sync"]["event"] for p in posts] == ["failed"]
    assert posts[0]["audience_sync"]["audience"] == "due_now"
    run_id = posts[0]["audience_sync"]["run_id"]
    assert pair == runtime.service.select_pairs()[0]
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    finished = [r for r in records if str(r["message"]).startswith("sync finished")]
    assert [(r["run_id"], r["audience"], r["destination"]) for r in finished] == [
        (run_id, "due_now", "local")
    ]
