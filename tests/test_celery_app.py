"""The Celery app and task definitions: configuration, beat entry, task options, plain values
crossing the queue, and the Redis-backed limiters (no worker process here; see
test_celery_worker.py for those)."""

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery.app.utils import find_app

from worker.celery import (
    DISPATCH_EVERY_SECONDS,
    VISIBILITY_TIMEOUT_SECONDS,
    app,
    celery_config,
    make_app,
)
from worker.domain import FanOut, PreparedRun, chunk_ranges
from worker.payloads import AudienceRef
from worker.ratelimit import RateLimit, RedisRateLimiter
from worker.settings import Settings
from worker.tasks import (
    RATE_LIMIT_KEY,
    fan_out_chord,
    prepared_from_json,
    prepared_to_json,
    redis_limiter_factory,
    retry_delay,
)
from worker.testing.celery_worker import CELERY_REDIS_URL, check_redis

TASKS = {
    "audience_sync.dispatch_due",
    "audience_sync.sync_audience",
    "audience_sync.sync_pair",
    "audience_sync.deliver_chunk",
    "audience_sync.finish_run",
    "audience_sync.abandon_run",
}


def test_celery_finds_the_app_in_the_package() -> None:
    # What `celery -A worker worker` does: the package has no app, so its `celery` module.
    assert find_app("worker") is app


def test_config_comes_from_settings() -> None:
    settings = Settings(redis_url="redis://cache.internal:6380/3", celery_queue="audiences_eu")
    config = celery_config(settings)
    assert config["broker_url"] == config["result_backend"] == "redis://cache.internal:6380/3"
    assert config["task_default_queue"] == "audiences_eu"
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["accept_content"] == ["json"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["timezone"] == "UTC" and config["enable_utc"] is True
    assert config["task_time_limit"] > config["task_soft_time_limit"]
    # Redis must not hand a running task to a second worker.
    assert config["broker_transport_options"]["visibility_timeout"] == VISIBILITY_TIMEOUT_SECONDS
    assert config["task_time_limit"] < VISIBILITY_TIMEOUT_SECONDS


def test_make_app_builds_an_independent_app() -> None:
    other = make_app(Settings(redis_url="redis://elsewhere:6379/1", celery_queue="q2"))
    assert other is not app
    assert other.conf.broker_url == "redis://elsewhere:6379/1"
    assert other.conf.task_default_queue == "q2"


def test_beat_runs_the_dispatcher_every_minute() -> None:
    (entry,) = celery_config(Settings())["beat_schedule"].values()
    assert entry["task"] == "audience_sync.dispatch_due"
    assert entry["schedule"] == DISPATCH_EVERY_SECONDS == 60
    # A tick not picked up before the next one is dropped rather than piling up.
    assert 0 < entry["options"]["expires"] < DISPATCH_EVERY_SECONDS


def test_tasks_are_registered_with_dotted_names() -> None:
    assert set(app.tasks) >= TASKS


@pytest.mark.parametrize(
    ("name", "is_late"),
    [
        ("audience_sync.dispatch_due", True),
        ("audience_sync.sync_pair", True),
        ("audience_sync.deliver_chunk", True),
        ("audience_sync.finish_run", True),
        ("audience_sync.abandon_run", True),
        # Queues new syncs: a second copy would queue them twice.
        ("audience_sync.sync_audience", False),
    ],
)
def test_only_tasks_safe_to_repeat_are_acknowledged_late(name: str, is_late: bool) -> None:
    task = app.tasks[name]
    assert task.acks_late is is_late
    if is_late:
        assert task.reject_on_worker_lost is True


@pytest.mark.parametrize("name", sorted(TASKS - {"audience_sync.sync_audience"}))
def test_long_tasks_have_time_limits(name: str) -> None:
    task = app.tasks[name]
    assert task.soft_time_limit is not None and task.time_limit is not None
    assert task.time_limit > task.soft_time_limit


def test_prepared_run_survives_the_json_round_trip() -> None:
    prepared = PreparedRun(
        run_id=7,
        pair_id=3,
        audience=AudienceRef(5, "vip_users", "VIP users", "field-1"),
        destination_id=2,
        destination_name="ortto",
        snapshot_id=11,
        is_full=True,
        lock_owner="run:7",
        to_enter=40_000,
        to_exit=12,
    )
    assert prepared_from_json(json.loads(json.dumps(prepared_to_json(prepared)))) == prepared


@pytest.mark.parametrize(
    ("delay", "retries", "cap", "expected"),
    [
        (60.0, 0, None, 60.0),
        (60.0, 1, None, 120.0),
        (60.0, 3, None, 480.0),
        (10.0, 2, 30.0, 30.0),
        (10.0, 1, 30.0, 20.0),
        (0.0, 5, None, 0.0),
    ],
)
def test_retry_delay_doubles_up_to_the_cap(
    delay: float, retries: int, cap: float | None, expected: float
) -> None:
    assert retry_delay(delay, retries, cap=cap) == expected


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    check_redis()  # fails, never skips, when Redis is not there
    client = redis.Redis.from_url(CELERY_REDIS_URL)
    yield client
    client.close()


@pytest.mark.redis
def test_limiters_of_one_destination_share_one_bucket(redis_client: redis.Redis) -> None:
    name = f"test_{uuid.uuid4().hex[:8]}"
    make = redis_limiter_factory(redis_client)
    # Two processes' limiters for the same destination, another destination's alongside.
    first, second = make(name, RateLimit(20)), make(name, RateLimit(20))
    other = make(f"{name}_other", RateLimit(20))
    assert isinstance(first, RedisRateLimiter)
    try:
        first.pause(0.5)
        started = time.monotonic()
        other.acquire()
        assert time.monotonic() - started < 0.1  # another destination is not paused
        second.acquire()
        assert time.monotonic() - started >= 0.45  # the same destination is
        assert redis_client.exists(RATE_LIMIT_KEY.format(bucket=name))
    finally:
        redis_client.delete(
            RATE_LIMIT_KEY.format(bucket=name), RATE_LIMIT_KEY.format(bucket=f"{name}_other")
        )


def test_fan_out_chord_delivers_each_chunk_then_finishes_or_abandons() -> None:
    prepared = PreparedRun(
        run_id=7,
        pair_id=3,
        audience=AudienceRef(5, "vip_users", "VIP users"),
        destination_id=2,
        destination_name="ortto",
        snapshot_id=11,
        is_full=False,
        lock_owner="run:7",
        to_enter=250,
        to_exit=0,
    )
    chunks = chunk_ranges(["u100", "u200"])
    signature = fan_out_chord(app, FanOut(prepared, chunks))
    data = prepared_to_json(prepared)

    assert [(s.task, tuple(s.args)) for s in signature.tasks] == [
        ("audience_sync.deliver_chunk", (data, None, "u100")),
        ("audience_sync.deliver_chunk", (data, "u100", "u200")),
        ("audience_sync.deliver_chunk", (data, "u200", None)),
    ]
    body = signature.body
    assert (body.task, tuple(body.args)) == ("audience_sync.finish_run", (data,))
    (errback,) = body.options["link_error"]
    assert (errback["task"], tuple(errback["args"]), errback["immutable"]) == (
        "audience_sync.abandon_run",
        (data,),
        True,
    )
