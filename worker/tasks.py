"""Celery tasks: thin wrappers that open the process's runtime, call the service and return.

Manual trigger from Python (the same as `audience-sync sync KEY --enqueue`)::

    from worker.tasks import sync_audience
    sync_audience.delay("order_completed_last_30days", full=True)

Task flow: beat runs `dispatch_due` every minute; it queues one `sync_pair` per due
(audience, destination) pair. `sync_pair` starts the run (lock, snapshot, diff); a run with
fewer changes than `chunk_size` is delivered inside it, a larger one fans out as a chord of
`deliver_chunk` tasks whose callback `finish_run` closes the run once all chunks are done.

Running twice: `dispatch_due`, `sync_pair`, `deliver_chunk`, `finish_run` and `abandon_run`
are safe to run again (the pair's lock, the diff that only holds undelivered changes, runs
closed once), so they are acknowledged late and handed to another worker when theirs dies.
`sync_audience` is not (a second copy would queue a second run): it is acknowledged early.
"""

import logging
import threading
from dataclasses import asdict
from typing import Any

import redis
from celery import Celery, Signature, Task, chord
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from worker import logs
from worker.celery import (
    CHUNK_SOFT_LIMIT_SECONDS,
    HARD_LIMIT_MARGIN_SECONDS,
    SHORT_SOFT_LIMIT_SECONDS,
    SYNC_SOFT_LIMIT_SECONDS,
    app,
)
from worker.db import StateDatabaseError, check_schema
from worker.domain import (
    FanOut,
    PreparedRun,
    RunStatus,
    RunSummary,
    SyncRequest,
    Trigger,
    summary_fields,
)
from worker.errors import ConfigError, DestinationError, TransientDestinationError
from worker.payloads import AudienceRef
from worker.pool import LimiterFactory
from worker.ratelimit import RateLimit, RateLimiter, RedisRateLimiter
from worker.runtime import Runtime, build_runtime
from worker.settings import get_settings

logger = logging.getLogger(__name__)

RATE_LIMIT_KEY = "audience_sync:rate_limit:{bucket}"
ABANDONED = "a delivery chunk failed unexpectedly; see the worker log for its error"

_runtime: Runtime | None = None
_redis: redis.Redis | None = None
_runtime_lock = threading.Lock()


def redis_limiter_factory(client: redis.Redis) -> LimiterFactory:
    """Limiters kept in Redis, one bucket per destination account or name (`rate_bucket`):
    every worker process on every host paces its requests together, and a 429 seen by one
    pauses them all."""

    def make(bucket: str, limit: RateLimit) -> RateLimiter:
        return RedisRateLimiter(client, RATE_LIMIT_KEY.format(bucket=bucket), limit)

    return make


def runtime() -> Runtime:
    """The runtime of this worker process, built on first use (after the fork)."""
    global _runtime, _redis
    with _runtime_lock:
        if _runtime is None:
            settings = get_settings()
            _redis = redis.Redis.from_url(settings.redis_url)
            _runtime = build_runtime(settings, limiter_factory=redis_limiter_factory(_redis))
        return _runtime


def close_runtime() -> None:
    """Close this process's runtime (database engine, HTTP clients, Redis connection)."""
    global _runtime, _redis
    with _runtime_lock:
        if _runtime is not None:
            _runtime.close()
        if _redis is not None:
            _redis.close()
        _runtime, _redis = None, None


@celeryd_after_setup.connect
def _refuse_an_unusable_state_database(**_: Any) -> None:
    # Once, in the main process, before the pool starts: a worker whose state database is
    # unreachable, not migrated or at another revision says so in one line and stops,
    # rather than taking tasks to fail each of them on it.
    try:
        check_schema(get_settings().database_url)
    except StateDatabaseError as exc:
        logger.error("the worker does not start: %s", exc)
        raise SystemExit(1) from None


@worker_process_init.connect
def _forget_inherited_runtime(**_: Any) -> None:
    # Connections must never cross a fork: a pool child builds its own runtime.
    global _runtime, _redis
    _runtime, _redis = None, None


@after_setup_logger.connect
@after_setup_task_logger.connect
def _structured_logs(logger: Any, **_: Any) -> None:
    # Celery sets up its own handlers; JSON replaces their format, text keeps Celery's.
    if get_settings().log_format == "json":
        logs.apply_format(logger, "json")


@worker_process_shutdown.connect
@worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    close_runtime()


# ----------------------------------------------------------------- plain values <-> Celery


def prepared_to_json(prepared: PreparedRun) -> dict[str, Any]:
    return asdict(prepared)


def prepared_from_json(data: dict[str, Any]) -> PreparedRun:
    return PreparedRun(**{**data, "audience": AudienceRef(**data["audience"])})


def retry_delay(settings_delay: float, retries: int, *, cap: float | None = None) -> float:
    """Seconds before attempt `retries + 1`: the delay doubled at each attempt, capped."""
    delay = settings_delay * float(2**retries)
    return delay if cap is None else min(delay, cap)


# ----------------------------------------------------------------- tasks


def _redeliverable(soft_limit_seconds: int) -> dict[str, Any]:
    """The options of a task that is safe to run twice: acknowledged late and handed to
    another worker when its own dies; stopped after `soft_limit_seconds`, killed a margin
    later."""
    return {
        "acks_late": True,
        "reject_on_worker_lost": True,
        "soft_time_limit": soft_limit_seconds,
        "time_limit": soft_limit_seconds + HARD_LIMIT_MARGIN_SECONDS,
    }


@app.task(
    name="audience_sync.dispatch_due",
    **_redeliverable(SHORT_SOFT_LIMIT_SECONDS),
)
def dispatch_due() -> list[int]:
    """Beat's task: queue a scheduled sync of every pair that is due; return their ids.
    Each tick is recorded (the console's health check reads it) and stale pairs alerted."""
    runtime().alerts.dispatcher_ticked()
    pair_ids = runtime().service.due_pairs()
    request = asdict(SyncRequest(trigger=Trigger.SCHEDULE))
    for pair_id in pair_ids:
        sync_pair.delay(pair_id, request)
    return pair_ids


@app.task(name="audience_sync.sync_audience", acks_late=False)
def sync_audience(
    key: str,
    *,
    destination: str | None = None,
    full: bool = False,
    dry_run: bool = False,
    allow_mass_exit: bool = False,
    retry_quarantined: bool = False,
) -> list[str]:
    """Manual trigger: queue a sync of the audience `key` to each of its destinations (or the
    one named); return the queued task ids."""
    request = SyncRequest(
        is_full=full,
        is_dry_run=dry_run,
        allow_mass_exit=allow_mass_exit,
        retry_quarantined=retry_quarantined,
        trigger=Trigger.MANUAL,
    )
    pair_ids = runtime().service.select_pairs(audience_keys=[key], destination_name=destination)
    if not pair_ids:
        raise ConfigError(f"audience {key!r} has no enabled destination to sync to")
    return [enqueue_sync(pair_id, request) for pair_id in pair_ids]


def enqueue_sync(pair_id: int, request: SyncRequest) -> str:
    """Queue one sync of one (audience, destination) pair; return the task id."""
    return str(sync_pair.delay(pair_id, asdict(request)).id)


@app.task(
    name="audience_sync.sync_pair",
    bind=True,
    **_redeliverable(SYNC_SOFT_LIMIT_SECONDS),
)
def sync_pair(self: Task[Any, Any], pair_id: int, request: dict[str, Any]) -> dict[str, Any]:
    """One sync of one pair: delivered here, or fanned out to `deliver_chunk` tasks."""
    wanted = SyncRequest(**request)
    service, settings = runtime().service, runtime().settings
    # Beat may queue a pair again while an earlier tick's task still waits in a busy queue;
    # that copy finds the pair no longer due and does nothing. Retries are not re-checked.
    if (
        wanted.trigger == Trigger.SCHEDULE
        and self.request.retries == 0
        and not service.is_due(pair_id)
    ):
        return {"pair_id": pair_id, "status": "not_due"}
    outcome = service.start_sync(pair_id, wanted)
    if isinstance(outcome, FanOut):
        fan_out_chord(app, outcome).apply_async()
        return {
            "run_id": outcome.prepared.run_id,
            "status": "running",
            "chunks": len(outcome.chunks),
        }
    if outcome.status == RunStatus.FAILED and self.request.retries < settings.task_retries:
        # A failed run is recorded; a new run is tried later (another destination's syncs
        # are other tasks and go on meanwhile).
        raise self.retry(
            countdown=retry_delay(settings.task_retry_delay_seconds, self.request.retries),
            max_retries=settings.task_retries,
        )
    return summary_fields(outcome)


def fan_out_chord(celery_app: Celery, outcome: FanOut) -> Signature[Any]:
    """The chord that delivers a fanned-out run: one `deliver_chunk` per chunk, then
    `finish_run` with their results. Should a chunk task crash instead of returning, the
    chord fails and its error callback `abandon_run` fails the run and frees the pair."""
    prepared = prepared_to_json(outcome.prepared)
    header = [
        celery_app.signature(
            "audience_sync.deliver_chunk", args=(prepared, chunk.after, chunk.upto)
        )
        for chunk in outcome.chunks
    ]
    body = celery_app.signature("audience_sync.finish_run", args=(prepared,))
    body.on_error(
        celery_app.signature("audience_sync.abandon_run", args=(prepared,), immutable=True)
    )
    return chord(header, body, app=celery_app)


@app.task(
    name="audience_sync.deliver_chunk",
    bind=True,
    **_redeliverable(CHUNK_SOFT_LIMIT_SECONDS),
)
def deliver_chunk(
    self: Task[Any, Any],
    prepared: dict[str, Any],
    after: str | None,
    upto: str | None,
) -> dict[str, Any]:
    """Deliver one chunk of a fanned-out run; return `{"error": None}` or why it failed."""
    service, settings = runtime().service, runtime().settings
    run = prepared_from_json(prepared)
    try:
        with logs.run_scope():
            logs.bind_run(run.run_id, run.audience.key, run.destination_name)
            service.deliver_range(run, after=after, upto=upto)
    except TransientDestinationError as exc:
        if self.request.retries < settings.task_retries:
            # Only what was not accepted is left in the chunk, so the retry resumes. The wait
            # stays well under the lock TTL: the run's lock is not extended meanwhile.
            raise self.retry(
                countdown=retry_delay(
                    settings.task_retry_delay_seconds,
                    self.request.retries,
                    cap=settings.lock_ttl_seconds / 3,
                ),
                max_retries=settings.task_retries,
            ) from exc
        return {"error": str(exc)}
    except (DestinationError, ConfigError) as exc:
        # A refused key, a lost lock, a broken setting: trying again would not help.
        return {"error": str(exc)}
    return {"error": None}


@app.task(
    name="audience_sync.finish_run",
    **_redeliverable(SHORT_SOFT_LIMIT_SECONDS),
)
def finish_run(results: list[dict[str, Any]], prepared: dict[str, Any]) -> dict[str, Any]:
    """Chord callback: close the run once every chunk is done (failed if any chunk failed)."""
    run = prepared_from_json(prepared)
    errors = sorted({str(r["error"]) for r in results if r.get("error")})
    service = runtime().service
    summary: RunSummary = (
        service.fail_run(run, "; ".join(errors)) if errors else service.finish_run(run)
    )
    return summary_fields(summary)


@app.task(
    name="audience_sync.abandon_run",
    **_redeliverable(SHORT_SOFT_LIMIT_SECONDS),
)
def abandon_run(prepared: dict[str, Any]) -> dict[str, Any]:
    """Chord error callback: fail the run and free its pair (a chunk task raised)."""
    return summary_fields(runtime().service.fail_run(prepared_from_json(prepared), ABANDONED))
