"""The Celery app (`celery -A worker worker|beat|flower`): broker, limits and the beat entry."""

from typing import Any

from celery import Celery

from worker.scheduling import DISPATCH_TICK
from worker.settings import Settings

# Beat only wakes the dispatcher; which pairs are due is read from the state database on each
# tick, so `apply` changes the schedule without restarting beat.
DISPATCH_EVERY_SECONDS = DISPATCH_TICK.total_seconds()

# The soft limit raises inside the task, which then fails like on any error (a failed chunk
# fails its run; a sync stopped mid-way leaves its lock to expire); the hard limit, a minute
# later, kills a process that did not stop.
SYNC_SOFT_LIMIT_SECONDS = 3600  # snapshot of the source plus a delivery under one chunk
CHUNK_SOFT_LIMIT_SECONDS = 1800  # one chunk of changes, paced by the destination's rate limit
SHORT_SOFT_LIMIT_SECONDS = 300  # dispatching, closing a run
HARD_LIMIT_MARGIN_SECONDS = 60

# Redis hands an unacknowledged task to another worker after this long, so it must exceed the
# longest task plus the longest retry delay; otherwise a slow task would run twice.
VISIBILITY_TIMEOUT_SECONDS = 4 * 3600


def broker_url(settings: Settings) -> str:
    """The Celery broker: AUDIENCE_SYNC_BROKER_URL (RabbitMQ's `amqp://`, or Redis), else the
    Redis URL."""
    return settings.broker_url or settings.redis_url


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for these settings (plain values, no connection made)."""
    broker = broker_url(settings)
    return {
        "broker_url": broker,
        # Results stay in Redis (where the rate buckets are) whatever the broker is.
        "result_backend": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        # Redis only (RabbitMQ redelivers a dead worker's task when its connection drops, and
        # ends a consumer that holds a task unacknowledged past its `consumer_timeout`).
        "broker_transport_options": (
            {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS}
            if broker.startswith(("redis://", "rediss://"))
            else {}
        ),
        "result_backend_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
        "task_default_queue": settings.celery_queue,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": 24 * 3600,
        "timezone": "UTC",
        "enable_utc": True,
        # Acknowledging late (and handing the task of a dead worker to another) is decided per
        # task in worker.tasks: only tasks that are safe to run twice do it.
        # Syncs are long: a worker takes one task at a time instead of hoarding a queue.
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "task_soft_time_limit": SYNC_SOFT_LIMIT_SECONDS,
        "task_time_limit": SYNC_SOFT_LIMIT_SECONDS + HARD_LIMIT_MARGIN_SECONDS,
        "beat_schedule": {
            "dispatch-due-syncs": {
                "task": "audience_sync.dispatch_due",
                "schedule": DISPATCH_EVERY_SECONDS,
                # A tick nobody picked up before the next one is worthless: drop it.
                "options": {"expires": DISPATCH_EVERY_SECONDS - 5},
            }
        },
    }


def make_app(settings: Settings) -> Celery:
    """A Celery app configured for `settings`; the tasks register on the module's `app`."""
    celery_app = Celery("audience_sync", include=["worker.tasks"])
    celery_app.conf.update(celery_config(settings))
    return celery_app


# Settings() rather than the cached get_settings(): importing the app (from the CLI, from
# tests) leaves that cache alone.
app = make_app(Settings())
