"""The one orchestration service: apply configuration, run syncs, archive audiences.

The CLI and the Celery tasks both call this. Each step is its own unit of work, committed
here, so a crash between steps leaves the state database consistent: the synced state of
a user moves only in the same transaction that records the destination's acceptance.
"""

import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models import Audience, AudienceDestination, Destination, Source, SyncRun
from worker.config import Config, resolve_source_url
from worker.db import unit_of_work
from worker.destinations.base import DestinationClient
from worker.errors import (
    ConfigError,
    DestinationError,
    NotFoundError,
    SourceError,
)
from worker.payloads import AudienceRef, identify_call
from worker.pool import DestinationPool
from worker.repositories import audiences as audience_repo
from worker.repositories import changes as change_repo
from worker.repositories import runs as run_repo
from worker.repositories import snapshots as snapshot_repo
from worker.scheduling import next_due, parse_schedule
from worker.settings import Settings
from worker.sources import SourceRow, check_query, stream_source

logger = logging.getLogger("audience_sync")

MASS_EXIT_MINIMUM = 100  # the mass-exit guard ignores destinations holding fewer members


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class SyncRequest:
    is_full: bool = False
    is_dry_run: bool = False
    allow_mass_exit: bool = False
    retry_quarantined: bool = False
    trigger: str = "manual"


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: int
    audience_key: str
    destination: str
    mode: str
    status: str
    members: int
    entered: int
    exited: int
    sent: int
    failed: int
    error: str | None
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class PreparedRun:
    """A run that passed its guards and is ready to deliver (plain values: it crosses into
    Celery chunk tasks)."""

    run_id: int
    pair_id: int
    audience: AudienceRef
    destination_id: int
    destination_name: str
    snapshot_id: int
    is_full: bool
    lock_owner: str
    to_enter: int
    to_exit: int
    # Where the time went before delivery (logged, and read by the benchmark).
    snapshot_seconds: float = 0.0
    diff_seconds: float = 0.0
    # Whether the pair had failing users when the run started (their rows go on success).
    has_failing_members: bool = True

    @property
    def scope(self) -> change_repo.PairScope:
        return change_repo.PairScope(
            self.audience.id, self.destination_id, self.snapshot_id, self.is_full
        )


@dataclass(frozen=True, slots=True)
class ChunkRange:
    """One fan-out chunk: the run's changes with member_id in (after, upto]."""

    after: str | None
    upto: str | None


@dataclass(frozen=True, slots=True)
class FanOut:
    """A started run too large for one worker: deliver each chunk, then close the run."""

    prepared: PreparedRun
    chunks: list[ChunkRange]


def chunk_ranges(boundaries: Sequence[str]) -> list[ChunkRange]:
    """Cut a run's changes at their chunk boundaries: (None, b0], (b0, b1], ...,
    (b_last, None). The last chunk is open-ended, so every change lands in exactly one."""
    edges: list[str | None] = [None, *boundaries, None]
    return [ChunkRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


@dataclass(slots=True)
class ApplyReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PairStatus:
    pair_id: int
    audience_key: str
    destination: str
    schedule: str
    last_run_id: int | None
    last_status: str | None
    last_started_at: datetime | None
    next_due_at: datetime
    is_running: bool


class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...

    def stop(self) -> None: ...


class NoProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def stop(self) -> None:
        pass


_crash_counts: dict[str, int] = {}


def crash_point(settings: Settings, step: str) -> None:
    """Test hook: SIGKILL this process at a named step (`step` or `step@N` for the Nth time)."""
    if not settings.crash_at:
        return
    name, _, nth = settings.crash_at.partition("@")
    if name != step:
        return
    _crash_counts[step] = _crash_counts.get(step, 0) + 1
    if _crash_counts[step] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class LockHeartbeat:
    """Keeps a run's lock alive from a background thread while the run waits on something
    slow (a long source query, a destination's retries and 429 pauses), so a live run never
    looks dead to the next one. A killed process stops beating and its lock expires."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        pair_id: int,
        owner: str,
        *,
        ttl: timedelta,
        clock: Callable[[], datetime],
    ) -> None:
        self._sessions, self._pair_id, self._owner = sessions, pair_id, owner
        self._ttl, self._clock = ttl, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)

    def __enter__(self) -> "LockHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._ttl.total_seconds() / 3):
            try:
                with unit_of_work(self._sessions) as session:
                    audience_repo.extend_lock(
                        session, self._pair_id, self._owner, now=self._clock(), ttl=self._ttl
                    )
            except SQLAlchemyError as exc:  # the next beat tries again; the run goes on
                logger.warning("could not extend the lock of pair %s: %s", self._pair_id, exc)


class SyncService:
    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        settings: Settings,
        destinations: DestinationPool,
        clock: Callable[[], datetime] = utcnow,
        progress: Callable[[], Progress] = NoProgress,
    ) -> None:
        self._sessions = session_factory
        self._settings = settings
        self._destinations = destinations
        self._clock = clock
        self._progress = progress

    def _heartbeat(self, pair_id: int, owner: str) -> LockHeartbeat:
        ttl = timedelta(seconds=self._settings.lock_ttl_seconds)
        return LockHeartbeat(self._sessions, pair_id, owner, ttl=ttl, clock=self._clock)

    @contextmanager
    def _uow(self) -> Iterator[Session]:
        with unit_of_work(self._sessions) as session:
            yield session

    # ----------------------------------------------------------------- configuration

    def apply(self, config: Config, *, check_queries: bool = True) -> ApplyReport:
        """Create/update sources, destinations and audiences from a validated Config, in one
        transaction; audiences missing from it are archived."""
        if check_queries:
            self._check_queries(config)
        now = self._clock()
        report = ApplyReport()
        with self._uow() as session:
            sources = audience_repo.sources_by_name(session)
            for spec in config.sources:
                source = sources.get(spec.name) or Source(name=spec.name)
                source.url = spec.url
                source.statement_timeout_seconds = spec.statement_timeout_seconds
                session.add(source)
                sources[spec.name] = source
            destinations = audience_repo.destinations_by_name(session)
            for dspec in config.destinations:
                destination = destinations.get(dspec.name) or Destination(name=dspec.name)
                destination.type = dspec.type
                destination.settings = dspec.settings
                session.add(destination)
                destinations[dspec.name] = destination
            session.flush()
            existing = {a.key: a for a in audience_repo.all_audiences(session)}
            for aspec in config.audiences:
                audience = existing.pop(aspec.key, None)
                values = {
                    "name": aspec.name,
                    "source_id": sources[aspec.source].id,
                    "query": aspec.query,
                    "schedule": aspec.schedule,
                    "max_exit_fraction": aspec.max_exit_fraction,
                    "is_archived": False,
                }
                if audience is None:
                    audience = Audience(key=aspec.key, created_at=now, updated_at=now, **values)
                    session.add(audience)
                    session.flush()
                    report.created.append(aspec.key)
                elif any(getattr(audience, k) != v for k, v in values.items()):
                    for name, value in values.items():
                        setattr(audience, name, value)
                    audience.updated_at = now
                    report.updated.append(aspec.key)
                else:
                    report.unchanged.append(aspec.key)
                wanted = {destinations[name].id for name in aspec.destinations}
                links = {link.destination_id: link for link in audience.links}
                for destination_id in wanted - links.keys():
                    session.add(
                        AudienceDestination(
                            audience_id=audience.id, destination_id=destination_id, is_enabled=True
                        )
                    )
                for destination_id, link in links.items():
                    link.is_enabled = destination_id in wanted
            for audience in existing.values():
                if not audience.is_archived:
                    audience.is_archived = True
                    audience.updated_at = now
                    report.archived.append(audience.key)
        return report

    def _check_queries(self, config: Config) -> None:
        sources = {s.name: s for s in config.sources}
        for audience in config.audiences:
            source = sources[audience.source]
            try:
                check_query(
                    resolve_source_url(source.name, source.url, os.environ),
                    audience.query,
                    timeout_seconds=source.statement_timeout_seconds,
                    source_name=source.name,
                )
            except SourceError as exc:
                raise ConfigError(f"audience {audience.key!r}: {exc}") from None

    # ----------------------------------------------------------------- syncing

    def select_pairs(
        self,
        *,
        audience_keys: Sequence[str] = (),
        destination_name: str | None = None,
    ) -> list[int]:
        """Ids of the pairs to sync: the named audiences (all active ones when none named)."""
        with self._uow() as session:
            for key in audience_keys:
                audience = audience_repo.audience_by_key(session, key)
                if audience is None:
                    raise NotFoundError(
                        f"no audience with key {key!r}; `audience-sync audiences list` shows them"
                    )
                if audience.is_archived:
                    raise ConfigError(
                        f"audience {key!r} is archived; add it back to the file "
                        "and `apply` to sync it again"
                    )
            if destination_name and not audience_repo.destination_by_name(
                session, destination_name
            ):
                raise NotFoundError(f"no destination named {destination_name!r}")
            found = audience_repo.pairs(
                session,
                audience_keys=list(audience_keys) or None,
                destination_name=destination_name,
            )
            return [pair.id for pair in found]

    def sync_pair(self, pair_id: int, request: SyncRequest) -> RunSummary:
        """Run one sync of one (audience, destination) pair in this process."""
        prepared = self.start_run(pair_id, request)
        if isinstance(prepared, RunSummary):
            return prepared
        return self.deliver_run(prepared)

    def start_sync(self, pair_id: int, request: SyncRequest) -> RunSummary | FanOut:
        """Start a sync for the Celery workers. A run with fewer changes than one chunk is
        delivered and closed here; a larger one comes back with its chunks, for workers to
        deliver in parallel (`deliver_range` each) and to close once all are done."""
        prepared = self.start_run(pair_id, request)
        if isinstance(prepared, RunSummary):
            return prepared
        chunk_size = self._settings.chunk_size
        if prepared.to_enter + prepared.to_exit < chunk_size:
            return self.deliver_run(prepared)
        with self._uow() as session:
            boundaries = change_repo.chunk_boundaries(
                session, prepared.run_id, chunk_size=chunk_size
            )
        return FanOut(prepared, chunk_ranges(boundaries))

    def deliver_run(self, prepared: PreparedRun) -> RunSummary:
        """Deliver every change of a prepared run in this process, then close the run."""
        progress = self._progress()
        progress.start(
            f"{prepared.audience.key} -> {prepared.destination_name}",
            prepared.to_enter + prepared.to_exit,
        )
        try:
            self.deliver_range(prepared, after=None, upto=None, progress=progress)
        except DestinationError as exc:
            return self.fail_run(prepared, str(exc))
        finally:
            progress.stop()
        return self.finish_run(prepared)

    def start_run(self, pair_id: int, request: SyncRequest) -> PreparedRun | RunSummary:
        """Lock the pair, open the run, snapshot the source and check the guards.

        Returns a PreparedRun ready to deliver, or the summary of a run that ended here
        (skipped, failed, blocked or dry run).
        """
        started = time.monotonic()
        now = self._clock()
        token = uuid.uuid4().hex
        with self._uow() as session:
            pair = audience_repo.pair_by_id(session, pair_id)
            if pair is None:
                raise NotFoundError(f"no audience/destination pair {pair_id}")
            audience, destination = pair.audience, pair.destination
            skip = self._lock_or_skip(
                session, pair, token, mode="incremental", trigger=request.trigger, started=started
            )
            if skip is not None:
                return skip
            run_repo.close_interrupted_runs(session, audience.id, destination.id, now=now)
            if not request.is_dry_run:
                settle_stopped_runs(session, audience.id, destination.id, now=now)
            has_state = change_repo.has_synced_state(session, audience.id, destination.id)
            mode = (
                "dry_run"
                if request.is_dry_run
                else "full"
                if request.is_full
                else "incremental"
                if has_state
                else "initial"
            )
            run = run_repo.create_run(
                session,
                audience_id=audience.id,
                destination_id=destination.id,
                mode=mode,
                trigger=request.trigger,
                now=now,
            )
            owner = f"run:{run.id}"
            audience_repo.hand_over_lock(session, pair_id, token, owner)
            if request.retry_quarantined:
                run_repo.release_quarantine(session, audience.id, destination.id)
            source = audience.source
            ref = AudienceRef(audience.id, audience.key, audience.name, pair.external_field_id)
            run_id, destination_id, destination_name = run.id, destination.id, destination.name
            destination_settings = dict(destination.settings)
            source_url, source_timeout, source_name = (
                source.url,
                source.statement_timeout_seconds,
                source.name,
            )
            query, max_exit_fraction = audience.query, audience.max_exit_fraction
        crash_point(self._settings, "after_lock")

        def end(status: str, error: str | None) -> RunSummary:
            return self._end_run(run_id, pair_id, owner, status, error, started)

        snapshot_started = time.monotonic()
        try:
            with self._heartbeat(pair_id, owner):
                snapshot_id, members, skipped = self._take_snapshot(
                    run_id, ref.id, source_name, source_url, query, source_timeout
                )
        except (SourceError, ConfigError) as exc:
            return end(run_repo.FAILED, str(exc))
        diff_started = time.monotonic()

        with self._uow() as session:
            scope = change_repo.PairScope(ref.id, destination_id, snapshot_id, request.is_full)
            to_enter, to_exit = change_repo.plan_run_changes(session, scope, run_id)
            diff_finished = time.monotonic()
            has_failing = run_repo.has_failing_members(session, ref.id, destination_id)
            entered = (
                change_repo.count_newly_entered(session, scope) if request.is_full else to_enter
            )
            held = change_repo.count_synced_members(session, ref.id, destination_id)
            member_exits = to_exit
            if held and to_exit > max_exit_fraction * held:
                # Users in doubt after a failed run are re-sent `false` too; the guard is
                # about members the destination holds, so count only those.
                member_exits = change_repo.count_member_exits(session, scope)
            previous = snapshot_repo.previous_member_count(session, ref.id, snapshot_id)
            run_repo.update_run(
                session,
                run_id,
                snapshot_id=snapshot_id,
                members=members,
                entered=entered,
                exited=to_exit,
                skipped_rows=skipped,
            )
            block = (
                None
                if request.allow_mass_exit
                else mass_exit_reason(
                    members=members,
                    previous_members=previous,
                    held_members=held,
                    exits=member_exits,
                    max_exit_fraction=max_exit_fraction,
                )
            )
            if block or request.is_dry_run:
                change_repo.drop_changes(session, run_id)
                snapshot_repo.delete_snapshot(session, snapshot_id)
                run_repo.update_run(session, run_id, snapshot_id=None)
        if block:
            return end(run_repo.BLOCKED, block)
        if request.is_dry_run:
            return end(run_repo.SUCCEEDED, None)

        try:
            client = self._client(destination_name, destination_settings)
            field_id = client.prepare(ref)
        except (DestinationError, ConfigError) as exc:
            return end(run_repo.FAILED, str(exc))
        if field_id != ref.field_id:
            with self._uow() as session:
                audience_repo.set_field_id(session, pair_id, field_id)
            ref = AudienceRef(ref.id, ref.key, ref.name, field_id)
        crash_point(self._settings, "before_delivery")
        return PreparedRun(
            run_id=run_id,
            pair_id=pair_id,
            audience=ref,
            destination_id=destination_id,
            destination_name=destination_name,
            snapshot_id=snapshot_id,
            is_full=request.is_full,
            lock_owner=owner,
            to_enter=to_enter,
            to_exit=to_exit,
            snapshot_seconds=diff_started - snapshot_started,
            diff_seconds=diff_finished - diff_started,
            has_failing_members=has_failing,
        )

    def _lock_or_skip(
        self,
        session: Session,
        pair: AudienceDestination,
        token: str,
        *,
        mode: str,
        trigger: str,
        started: float,
    ) -> RunSummary | None:
        """Take the pair's lock for `token`; when another run holds it, record this run as
        `skipped`, naming the holder, and return its summary."""
        now = self._clock()
        ttl = timedelta(seconds=self._settings.lock_ttl_seconds)
        if audience_repo.try_lock_pair(session, pair.id, token, now=now, ttl=ttl):
            return None
        holder = run_repo.running_run_id(session, pair.audience_id, pair.destination_id)
        run = run_repo.create_run(
            session,
            audience_id=pair.audience_id,
            destination_id=pair.destination_id,
            mode=mode,
            trigger=trigger,
            now=now,
            status=run_repo.SKIPPED,
            error="another sync of this audience and destination is in progress"
            + (f" (run {holder})" if holder else ""),
        )
        return self._summary(run, pair.audience.key, pair.destination.name, started)

    def _take_snapshot(
        self,
        run_id: int,
        audience_id: int,
        source_name: str,
        url_template: str,
        query: str,
        timeout: float,
    ) -> tuple[int, int, dict[str, int]]:
        """Stream the source into a new snapshot, in one transaction: a source failure or a
        crash leaves no snapshot behind."""
        skipped: dict[str, int] = {}
        received = 0
        url = resolve_source_url(source_name, url_template, os.environ)
        with self._uow() as session:
            snapshot_id = snapshot_repo.create_snapshot(session, audience_id, now=self._clock())
            chunks = stream_source(
                url,
                query,
                timeout_seconds=timeout,
                fetch_size=self._settings.source_fetch_size,
                source_name=source_name,
            )
            for chunk in chunks:
                crash_point(self._settings, "reading_source")
                rows: list[SourceRow] = []
                for row in chunk:
                    if isinstance(row, str):
                        skipped[row] = skipped.get(row, 0) + 1
                    else:
                        rows.append(row)
                received += len(rows)
                snapshot_repo.add_members(session, snapshot_id, rows)
                crash_point(self._settings, "writing_snapshot")
            members = snapshot_repo.finish_snapshot(session, snapshot_id)
        if received > members:
            skipped["duplicate_id"] = received - members
        return snapshot_id, members, skipped

    def deliver_range(
        self,
        prepared: PreparedRun,
        *,
        after: str | None,
        upto: str | None,
        progress: Progress | None = None,
    ) -> None:
        """Deliver the run's changes with member_id in (after, upto], page by page. A page is
        marked in flight before it is sent; its results, the synced state they move and the
        page's removal from the run's changes are committed together."""
        client = self._client_for_run(prepared)
        page_size = client.max_batch_items
        ttl = timedelta(seconds=self._settings.lock_ttl_seconds)
        cursor = after
        while True:
            with self._uow() as session:
                # A run taken for dead (its lock expired and another run took it over) must
                # not send what it computed back then: the source may have moved on.
                if not audience_repo.holds_lock(session, prepared.pair_id, prepared.lock_owner):
                    raise DestinationError("the run lost its lock (it was idle past the lock TTL)")
                page = change_repo.page_of_changes(
                    session, prepared.run_id, after=cursor, upto=upto, limit=page_size
                )
                if page:
                    first, last = page[0].member_id, page[-1].member_id
                    change_repo.mark_in_flight(session, prepared.run_id, first, last)
            if not page:
                return
            now = self._clock()
            calls = [
                identify_call(prepared.audience, prepared.destination_id, change, now=now)
                for change in page
            ]
            with self._heartbeat(prepared.pair_id, prepared.lock_owner):
                rejections = client.deliver(prepared.audience, calls)
            crash_point(self._settings, "page_sent")
            rejected_at = {r.index: r for r in rejections}
            accepted = [c for i, c in enumerate(page) if i not in rejected_at]
            rejected = [
                (page[r.index], r.status, r.message) for r in rejections if 0 <= r.index < len(page)
            ]
            with self._uow() as session:
                run_repo.record_accepted(
                    session,
                    audience_id=prepared.audience.id,
                    destination_id=prepared.destination_id,
                    run_id=prepared.run_id,
                    changes=accepted,
                    now=now,
                    has_failing_members=prepared.has_failing_members,
                )
                run_repo.record_rejected(
                    session,
                    audience_id=prepared.audience.id,
                    destination_id=prepared.destination_id,
                    run_id=prepared.run_id,
                    rejected=rejected,
                    quarantine_after=self._settings.quarantine_after,
                    now=now,
                )
                change_repo.drop_changes(session, prepared.run_id, first, last)
                run_repo.add_to_counters(
                    session, prepared.run_id, sent=len(accepted), failed=len(rejected)
                )
                if not audience_repo.extend_lock(
                    session, prepared.pair_id, prepared.lock_owner, now=now, ttl=ttl
                ):
                    raise DestinationError("the run lost its lock (it was idle past the lock TTL)")
            crash_point(self._settings, "page_recorded")
            if progress is not None:
                progress.advance(len(page))
            cursor = last

    def finish_run(self, prepared: PreparedRun) -> RunSummary:
        """Close a run whose delivery is complete: succeeded, or partial with failures."""
        with self._uow() as session:
            run = run_repo.get_run(session, prepared.run_id)
            assert run is not None
            status = run_repo.PARTIAL if run.failed else run_repo.SUCCEEDED
            error = (
                f"{run.failed} user(s) rejected; see `audience-sync runs show {run.id}`"
                if run.failed
                else None
            )
            change_repo.forget_moot_failures(session, prepared.scope)
            if run.sent >= run_repo.ANALYZE_AFTER_SENT:
                run_repo.refresh_statistics(session)
            protect = {prepared.snapshot_id}
            snapshot_repo.prune_snapshots(
                session,
                prepared.audience.id,
                keep=self._settings.snapshots_kept,
                protect=protect | run_repo.snapshots_in_use(session, prepared.audience.id),
            )
        return self._end_run(
            prepared.run_id, prepared.pair_id, prepared.lock_owner, status, error, None
        )

    def fail_run(self, prepared: PreparedRun, error: str) -> RunSummary:
        return self._end_run(
            prepared.run_id, prepared.pair_id, prepared.lock_owner, run_repo.FAILED, error, None
        )

    def _end_run(
        self,
        run_id: int,
        pair_id: int,
        owner: str,
        status: str,
        error: str | None,
        started: float | None,
    ) -> RunSummary:
        now = self._clock()
        with self._uow() as session:
            current = run_repo.get_run(session, run_id)
            # A run is closed once: closing it again (a redelivered finish task, a run taken
            # over as interrupted) keeps the first outcome and touches no lock.
            is_closing = current is not None and current.status == run_repo.RUNNING
            if is_closing:
                # Changes a failed run leaves behind are settled by the pair's next run.
                run_repo.update_run(session, run_id, status=status, error=error, finished_at=now)
                audience_repo.release_lock(session, pair_id, owner)
            run = run_repo.get_run(session, run_id)
            pair = audience_repo.pair_by_id(session, pair_id)
            assert run is not None and pair is not None
            session.refresh(run)
            summary = self._summary(
                run,
                pair.audience.key,
                pair.destination.name,
                started,
            )
        if is_closing:
            logger.info("sync finished %s", json.dumps(summary_fields(summary), sort_keys=True))
        return summary

    def _summary(
        self, run: SyncRun, key: str, destination: str, started: float | None
    ) -> RunSummary:
        finished = run.finished_at or self._clock()
        duration = (
            time.monotonic() - started
            if started is not None
            else (finished - run.started_at).total_seconds()
        )
        return RunSummary(
            run_id=run.id,
            audience_key=key,
            destination=destination,
            mode=run.mode,
            status=run.status,
            members=run.members,
            entered=run.entered,
            exited=run.exited,
            sent=run.sent,
            failed=run.failed,
            error=run.error,
            duration_seconds=round(duration, 3),
        )

    def _client(self, name: str, template: dict[str, object]) -> DestinationClient:
        return self._destinations.get(name, template)

    def _client_for_run(self, prepared: PreparedRun) -> DestinationClient:
        with self._uow() as session:
            destination = session.get(Destination, prepared.destination_id)
            assert destination is not None
            name, template = destination.name, dict(destination.settings)
        return self._client(name, template)

    def check_destinations(self, name: str | None = None) -> list[tuple[str, bool, str]]:
        """(destination, ok, message) for each destination (or the named one)."""
        with self._uow() as session:
            found = audience_repo.destinations_by_name(session)
            if name is not None and name not in found:
                raise NotFoundError(f"no destination named {name!r}")
            targets = [
                (d.name, dict(d.settings)) for d in found.values() if name is None or d.name == name
            ]
        results = []
        for destination, template in targets:
            try:
                results.append((destination, True, self._client(destination, template).check()))
            except (DestinationError, ConfigError) as exc:
                results.append((destination, False, str(exc)))
        return results

    # ----------------------------------------------------------------- schedule

    def status(self) -> list[PairStatus]:
        """Every active pair: its last run, when it is next due, whether a run holds it."""
        now = self._clock()
        with self._uow() as session:
            started = run_repo.last_started(session)
            latest = run_repo.latest_runs(session)
            result = []
            for pair in audience_repo.pairs(session):
                key = (pair.audience_id, pair.destination_id)
                run = latest.get(key)
                result.append(
                    PairStatus(
                        pair_id=pair.id,
                        audience_key=pair.audience.key,
                        destination=pair.destination.name,
                        schedule=pair.audience.schedule,
                        last_run_id=run.id if run else None,
                        last_status=run.status if run else None,
                        last_started_at=run.started_at if run else None,
                        next_due_at=next_due(
                            parse_schedule(pair.audience.schedule), started.get(key), now=now
                        ),
                        is_running=pair.lock_owner is not None
                        and pair.lock_expires_at is not None
                        and pair.lock_expires_at > now,
                    )
                )
        return result

    def due_pairs(self) -> list[int]:
        """Pairs whose schedule says they should run now and that no run holds."""
        rows = self.status()
        # Read the clock after status(): a pair that never ran is due at status()'s own now.
        now = self._clock()
        return [p.pair_id for p in rows if p.next_due_at <= now and not p.is_running]

    def is_due(self, pair_id: int) -> bool:
        """Whether the pair's schedule says it should run now (held by a run or not)."""
        rows = self.status()
        now = self._clock()
        return any(p.pair_id == pair_id and p.next_due_at <= now for p in rows)

    # ----------------------------------------------------------------- archiving

    def archive(self, key: str, *, exit_members: bool, trigger: str = "manual") -> list[RunSummary]:
        """Archive an audience; with `exit_members`, first send `false` to every user each
        destination holds as a member. The audience stays active if any exit run fails."""
        with self._uow() as session:
            audience = audience_repo.audience_by_key(session, key)
            if audience is None:
                raise NotFoundError(f"no audience with key {key!r}")
            pair_ids = [
                p.id
                for p in audience_repo.pairs(session, audience_keys=[key], include_archived=True)
            ]
        summaries = (
            [self._exit_all(pair_id, trigger) for pair_id in pair_ids] if exit_members else []
        )
        if all(s.status == run_repo.SUCCEEDED for s in summaries):
            with self._uow() as session:
                audience = audience_repo.audience_by_key(session, key)
                assert audience is not None
                audience.is_archived = True
                audience.updated_at = self._clock()
        return summaries

    def _exit_all(self, pair_id: int, trigger: str) -> RunSummary:
        """A run against an empty snapshot: every held member gets `false`."""
        started = time.monotonic()
        now = self._clock()
        token = uuid.uuid4().hex
        with self._uow() as session:
            pair = audience_repo.pair_by_id(session, pair_id)
            assert pair is not None
            audience, destination = pair.audience, pair.destination
            skip = self._lock_or_skip(
                session, pair, token, mode="archive", trigger=trigger, started=started
            )
            if skip is not None:
                return skip
            run_repo.close_interrupted_runs(session, audience.id, destination.id, now=now)
            settle_stopped_runs(session, audience.id, destination.id, now=now)
            # Every user the destination may hold as a member gets `false`, quarantined or not.
            run_repo.release_quarantine(session, audience.id, destination.id)
            run = run_repo.create_run(
                session,
                audience_id=audience.id,
                destination_id=destination.id,
                mode="archive",
                trigger=trigger,
                now=now,
            )
            owner = f"run:{run.id}"
            audience_repo.hand_over_lock(session, pair_id, token, owner)
            snapshot_id = snapshot_repo.create_snapshot(session, audience.id, now=now)
            ref = AudienceRef(audience.id, audience.key, audience.name, pair.external_field_id)
            scope = change_repo.PairScope(audience.id, destination.id, snapshot_id)
            _, to_exit = change_repo.plan_run_changes(session, scope, run.id)
            run_repo.update_run(session, run.id, snapshot_id=snapshot_id, exited=to_exit)
            prepared = PreparedRun(
                run_id=run.id,
                pair_id=pair_id,
                audience=ref,
                destination_id=destination.id,
                destination_name=destination.name,
                snapshot_id=snapshot_id,
                is_full=False,
                lock_owner=owner,
                to_enter=0,
                to_exit=to_exit,
            )
        try:
            self.deliver_range(prepared, after=None, upto=None)
        except DestinationError as exc:
            return self.fail_run(prepared, str(exc))
        return self.finish_run(prepared)


def settle_stopped_runs(
    session: Session, audience_id: int, destination_id: int, *, now: datetime
) -> None:
    """Before a pair's next run: settle the runs that died with changes left (see
    `changes.settle_run`). Call with the pair lock held, after closing interrupted runs."""
    for run_id in change_repo.runs_with_changes(session, audience_id, destination_id):
        change_repo.settle_run(session, run_id, audience_id, destination_id, now=now)


def mass_exit_reason(
    *,
    members: int,
    previous_members: int | None,
    held_members: int,
    exits: int,
    max_exit_fraction: float,
) -> str | None:
    """Why a run must not send its exits (None when it may).

    A source that suddenly returns nothing is almost always broken, and so is one that
    would remove more than `max_exit_fraction` of the members a destination holds.
    """
    if members == 0 and ((previous_members or 0) > 0 or held_members > 0):
        had = max(previous_members or 0, held_members)
        return (
            f"blocked: the source returned no rows where the audience had {had} members; "
            "check the source, or rerun with --allow-mass-exit if it is really empty"
        )
    if held_members >= MASS_EXIT_MINIMUM and exits > max_exit_fraction * held_members:
        return (
            f"blocked: {exits} of {held_members} members ({exits / held_members:.0%}) would "
            f"exit, over the limit of {max_exit_fraction:.0%}; rerun with --allow-mass-exit "
            "if this is intended"
        )
    return None


def summary_fields(summary: RunSummary) -> dict[str, object]:
    return {
        "run_id": summary.run_id,
        "audience": summary.audience_key,
        "destination": summary.destination,
        "mode": summary.mode,
        "status": summary.status,
        "members": summary.members,
        "entered": summary.entered,
        "exited": summary.exited,
        "sent": summary.sent,
        "failed": summary.failed,
        "error": summary.error,
        "duration_seconds": summary.duration_seconds,
    }
