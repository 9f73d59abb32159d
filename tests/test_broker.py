"""RabbitMQ as the Celery broker: AUDIENCE_SYNC_BROKER_URL moves the task queue to it, while
results and the shared rate buckets stay in Redis. The worker test runs a real worker on the
local RabbitMQ (AUDIENCE_SYNC_TEST_RABBITMQ_URL) and fails, never skips, without it."""

import os
import time
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import select

from models import SyncRun
from tests import worker_fixtures
from tests.worker_fixtures import ORTTO_KEY_VAR
from worker.celery import VISIBILITY_TIMEOUT_SECONDS, celery_config
from worker.runtime import Runtime
from worker.settings import Settings
from worker.tasks import RATE_LIMIT_KEY
from worker.testing.celery_worker import CELERY_REDIS_URL, celery_worker, wait_for
from worker.testing.databases import (
    ShopSource,
    redis_client,
    state_database,
)
from worker.testing.factories import apply_file, audience, write_config
from worker.testing.fake_destinations import DEFAULT_ORTTO_KEY, FakeDestinations
from worker.testing.guarantees import cli_env, run_cli

# PostgreSQL state and source databases, whatever the backend parameter says (they
# override the conftest fixtures of these names).
state_url, shop, runtime = worker_fixtures.state_url, worker_fixtures.shop, worker_fixtures.runtime

RABBITMQ_URL = os.environ.get(
    "AUDIENCE_SYNC_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//"
)


def test_the_broker_defaults_to_redis() -> None:
    config = celery_config(Settings(redis_url="redis://cache:6379/2", broker_url=None))
    assert config["broker_url"] == config["result_backend"] == "redis://cache:6379/2"
    assert config["broker_transport_options"] == {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS}


def test_a_rabbitmq_broker_keeps_results_in_redis() -> None:
    config = celery_config(
        Settings(redis_url="redis://cache:6379/2", broker_url="amqp://app:pw@mq:5672//")
    )
    assert config["broker_url"] == "amqp://app:pw@mq:5672//"
    assert config["result_backend"] == "redis://cache:6379/2"
    # The visibility timeout is a Redis transport option; RabbitMQ has none.
    assert config["broker_transport_options"] == {}


def test_the_broker_url_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIENCE_SYNC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    assert celery_config(Settings())["broker_url"] == "amqp://guest:guest@127.0.0.1:5672//"


def test_enqueue_to_an_unreachable_rabbitmq_is_one_line(tmp_path: Path) -> None:
    # A process of its own: the Celery app reads the broker URL when it is imported.
    with state_database("sqlite", tmp_path) as url:
        source = ShopSource(f"sqlite:///{tmp_path / 'shop.db'}")
        config = write_config(tmp_path, source_url=source.url, audiences=[audience("A", "a")])
        source.engine.dispose()
        assert run_cli("apply", str(config), env=cli_env(url)).returncode == 0
        # Nothing listens on port 1: refused at once.
        env = cli_env(url, broker_url="amqp://guest:secret@127.0.0.1:1//")
        started = time.monotonic()
        result = run_cli("sync", "a", "--enqueue", env=env)
        elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the broker at amqp://guest:**@127.0.0.1:1//")
    assert "AUDIENCE_SYNC_BROKER_URL" in line and "secret" not in line
    assert elapsed < 10  # the process's start included


def check_rabbitmq() -> None:
    """Fail the test (never skip it) when RabbitMQ does not answer."""
    connection = Connection(RABBITMQ_URL, connect_timeout=3)
    try:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=3)
    except Exception as exc:
        raise AssertionError(
            f"RabbitMQ is not reachable at {connection.as_uri()} ({exc}): start it "
            "(`rabbitmq-server -detached`) or set AUDIENCE_SYNC_TEST_RABBITMQ_URL"
        ) from exc
    finally:
        connection.release()


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_a_worker_on_rabbitmq_syncs_with_its_rate_buckets_in_redis(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    check_rabbitmq()
    shop.add((f"u{i:03d}", None, 1, 0, 0) for i in range(120))
    destination = {
        "type": "ortto",
        "api_key": f"${{{ORTTO_KEY_VAR}}}",
        "endpoint": fake.url,
        "rate_limit": "50/s",
    }
    config = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Rabbit", "a", destinations=["rabbit_ortto"])],
        destinations={"rabbit_ortto": destination},
    )
    apply_file(runtime, config)
    (pair,) = runtime.service.select_pairs()
    bucket = RATE_LIMIT_KEY.format(bucket="destination:rabbit_ortto")
    redis = redis_client(CELERY_REDIS_URL)
    redis.delete(bucket)
    try:
        with celery_worker(
            database_url=state_url,
            log_path=tmp_path / "worker.log",
            concurrency=2,
            env={ORTTO_KEY_VAR: DEFAULT_ORTTO_KEY, "AUDIENCE_SYNC_CHUNK_SIZE": "50"},
            broker_url=RABBITMQ_URL,
        ) as worker:
            assert worker.app.conf.broker_url == RABBITMQ_URL
            started = worker.send("audience_sync.sync_pair", pair, {"trigger": "manual"})
            # The result comes back through Redis, the task went through RabbitMQ.
            assert started.get(timeout=60)["status"] == "running"  # fanned out in 3 chunks

            def closed() -> SyncRun | None:
                with runtime.sessions() as session:
                    run = session.scalars(select(SyncRun)).one_or_none()
                    return run if run is not None and run.status != "running" else None

            run = wait_for(closed, timeout=60, what="the run to close")
            log = worker.log()
            # The limiter that paced the requests lives in Redis, shared by both processes.
            assert redis.exists(bucket)
    finally:
        redis.delete(bucket)
        redis.close()
    assert (run.status, run.entered, run.sent) == ("succeeded", 120, 120)
    assert {item["user_id"] for item in fake.items("ortto")} == {f"u{i:03d}" for i in range(120)}
    assert "amqp://guest:**@127.0.0.1:5672//" in log  # the worker's banner names its broker
