"""Real `celery worker` processes for the worker tests, each on a queue of its own.

Every worker runs in its own process group on a dedicated Redis database, consuming a queue
named for the test, so parallel test runs on one Redis never take each other's tasks. The
test talks to it through a private Celery app (`send`), reads the state database for the
outcome, and the worker's log for what happened inside. `stop()` always ends the whole
process group: a warm shutdown first, then SIGKILL.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from celery import Celery
from celery.beat import PersistentScheduler
from celery.result import AsyncResult
from kombu import Exchange, Queue

from worker.celery import make_app
from worker.settings import Settings
from worker.testing.databases import REDIS_URL, redis_client

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


# Database 14 is kept for the worker tests (the other Redis tests use their own keys).
CELERY_REDIS_URL = os.environ.get("AUDIENCE_SYNC_TEST_CELERY_REDIS_URL") or _with_db(REDIS_URL, 14)


def check_redis() -> None:
    redis_client(CELERY_REDIS_URL).close()


def wait_for(
    probe: Callable[[], T | None], *, timeout: float, interval: float = 0.1, what: str = ""
) -> T:
    """Poll `probe` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}")
        time.sleep(interval)


class CeleryWorker:
    """One `celery -A worker worker` process group and the app the test sends with."""

    def __init__(
        self,
        *,
        database_url: str,
        log_path: Path,
        concurrency: int = 3,
        env: Mapping[str, str] | None = None,
        broker_url: str | None = None,
    ) -> None:
        """`broker_url`: a broker other than Redis (RabbitMQ); results stay in Redis."""
        self.queue = f"audience_sync_test_{uuid.uuid4().hex[:12]}"
        self.broker_url = broker_url
        self.log_path = log_path
        self.concurrency = concurrency
        self.env = {
            **os.environ,
            "AUDIENCE_SYNC_DATABASE_URL": database_url,
            "AUDIENCE_SYNC_REDIS_URL": CELERY_REDIS_URL,
            "AUDIENCE_SYNC_CELERY_QUEUE": self.queue,
            "PYTHONPATH": str(ROOT),
            **({"AUDIENCE_SYNC_BROKER_URL": broker_url} if broker_url else {}),
            **(env or {}),
        }
        # The test process sends with an app of its own: same configuration, same queue.
        self.app: Celery = make_app(
            Settings(
                database_url=database_url,
                redis_url=CELERY_REDIS_URL,
                broker_url=broker_url,
                celery_queue=self.queue,
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "CeleryWorker":
        check_redis()
        log = self.log_path.open("wb")
        try:
            self.process = _start_celery(
                "worker",
                "--pool=prefork",
                f"--concurrency={self.concurrency}",
                "--without-gossip",
                "--without-mingle",
                f"--hostname={self.queue}@%h",
                env=self.env,
                log=log,
            )
        finally:
            log.close()
        wait_for(self._is_ready, timeout=30, what="the worker to be ready")
        return self

    def _is_ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the worker exited at start:\n{self.log()}")
        return " ready." in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send(self, name: str, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Queue the task `name` (e.g. `audience_sync.sync_pair`) for this worker."""
        return self.app.send_task(name, args=args, kwargs=kwargs, queue=self.queue)

    def finished_lines(self) -> list[str]:
        """The service's end-of-run log lines, as the worker wrote them."""
        return [line for line in self.log().splitlines() if "sync finished {" in line]

    def processes_that_ran(self, task_name: str) -> set[str]:
        """Names of the pool processes that logged `task_name` as succeeded."""
        pattern = re.compile(r"/(\S+?)\] Task " + re.escape(task_name) + r"\[[^\]]+\] succeeded")
        return {m.group(1) for m in pattern.finditer(self.log())}

    def kill(self) -> None:
        """SIGKILL the worker and its pool at once, as when its host dies: nothing is cleaned
        up and its unacknowledged task stays with Redis."""
        assert self.process is not None
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """End the worker's process group (warm shutdown, then SIGKILL) and drop its queue."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            # The main process alone: it ends its pool children itself (a warm shutdown).
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process is not None:
            # Pool children outlive a parent that was killed: end whatever is left.
            _signal_group(process.pid, signal.SIGKILL)
        try:
            self.app.control.purge()
            if self.broker_url is None:
                self._forget_unacknowledged()
            else:
                self._delete_queue()
        finally:
            self.app.close()

    def _delete_queue(self) -> None:
        """Drop this worker's queue and its exchange from a RabbitMQ broker (they are
        durable: they would outlive the test)."""
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            Queue(self.queue, channel=channel).delete()
            Exchange(self.queue, channel=channel).delete()

    def _forget_unacknowledged(self) -> None:
        """Drop what a killed worker left unacknowledged on this queue (Redis would put it
        back on the queue hours later), and the queue's binding."""
        client = redis.Redis.from_url(CELERY_REDIS_URL)
        try:
            for tag, raw in client.hgetall("unacked").items():
                _message, _exchange, routing_key = json.loads(raw)
                if routing_key == self.queue:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
            client.delete(f"_kombu.binding.{self.queue}", f"_kombu.binding_permanent.{self.queue}")
        finally:
            client.close()


@contextmanager
def celery_beat(worker: CeleryWorker, *, schedule_path: Path, log_path: Path) -> Iterator[None]:
    """`celery -A worker beat` with the worker's settings, its schedule file seeded so the
    dispatcher entry is due at once (beat would otherwise wait out its first minute)."""
    scheduler = PersistentScheduler(app=worker.app, schedule_filename=str(schedule_path))
    try:
        for entry in scheduler.schedule.values():
            entry.last_run_at = datetime.now(UTC) - timedelta(minutes=5)
        scheduler.sync()
    finally:
        scheduler.close()
    with log_path.open("wb") as log:
        process = _start_celery("beat", f"--schedule={schedule_path}", env=worker.env, log=log)
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        finally:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _start_celery(*args: str, env: Mapping[str, str], log: IO[bytes]) -> "subprocess.Popen[bytes]":
    """`celery -A worker ARGS...` logging to `log`, in a process group of its own so a stop
    reaches its pool children too."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", *args, "--loglevel=INFO"],
        cwd=ROOT,
        env=dict(env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError):  # the group is gone already
        os.killpg(pgid, signum)


@contextmanager
def celery_worker(
    *,
    database_url: str,
    log_path: Path,
    concurrency: int = 3,
    env: Mapping[str, str] | None = None,
    broker_url: str | None = None,
) -> Iterator[CeleryWorker]:
    """A started worker, always stopped at the end."""
    worker = CeleryWorker(
        database_url=database_url,
        log_path=log_path,
        concurrency=concurrency,
        env=env,
        broker_url=broker_url,
    )
    try:
        yield worker.start()
    finally:
        worker.stop()
