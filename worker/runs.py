"""The run lifecycle: open a run under the pair's lock, snapshot the source, plan the
changes and check the guards; then close it (succeeded, partial or failed) exactly once.

Each step is its own unit of work, so a crash between steps leaves the state database
consistent. Delivering the planned changes is `worker.delivery`.
"""

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from models import AudienceDestination, SyncRun
from worker import logs
from worker.audiences import RuleDefinition, rule_definition
from worker.context import ServiceContext
from worker.domain import (
    PairScope,
    PreparedRun,
    RunMode,
    RunStatus,
    RunSummary,
    SyncRequest,
    Trigger,
    mass_exit_reason,
    summary_fields,
)
from worker.errors import ConfigError, DestinationError, NotFoundError, SourceError
from worker.locking import (
    CANCELLED_BY_OPERATOR,
    LockHolder,
    heartbeat,
    is_process_alive,
    lock_or_skip,
    run_state,
    where_this_runs,
)
from worker.payloads import AudienceRef, Change, SendAs
from worker.reports import run_outcome_fields
from worker.repositories import audiences as audience_repo
from worker.repositories import changes as change_repo
from worker.repositories import failures as failure_repo
from worker.repositories import maintenance as maintenance_repo
from worker.repositories import runs as run_repo
from worker.repositories import snapshots as snapshot_repo
from worker.repositories import synced as synced_repo
from worker.snapshotting import TakenSnapshot, take_snapshot

logger = logging.getLogger("audience_sync")
# The level of a run's closing line: what an operator must look at stands out in the log.
RUN_LOG_LEVELS = {
    RunStatus.FAILED: logging.ERROR,
    RunStatus.BLOCKED: logging.WARNING,
    RunStatus.PARTIAL: logging.WARNING,
}


@dataclass(frozen=True, slots=True)
class OpenedRun:
    """A run that holds its pair's lock, with what its next steps read (plain values)."""

    run_id: int
    pair_id: int
    owner: str
    audience: AudienceRef
    destination_id: int
    destination_name: str
    destination_settings: dict[str, Any]
    source_name: str
    source_url: str
    source_timeout: float
    query: str | None
    max_exit_fraction: float
    started: float  # time.monotonic() when the run was asked for
    # A full run: asked for, or owed by a full run of the pair that did not finish.
    is_full: bool = False
    rules: RuleDefinition | None = None  # a rule audience: compiled when snapshotted
    started_at: datetime | None = None  # the run's start: a rule audience's "now"

    def prepared(
        self,
        audience: AudienceRef,
        snapshot_id: int,
        *,
        is_full: bool,
        to_enter: int,
        to_exit: int,
        snapshot_seconds: float = 0.0,
        diff_seconds: float = 0.0,
        has_failing_members: bool = True,
    ) -> PreparedRun:
        """The run, ready to deliver its planned changes."""
        return PreparedRun(
            self.run_id,
            self.pair_id,
            audience,
            self.destination_id,
            self.destination_name,
            snapshot_id,
            is_full,
            self.owner,
            to_enter,
            to_exit,
            snapshot_seconds,
            diff_seconds,
            has_failing_members,
        )


@dataclass(frozen=True, slots=True)
class Plan:
    to_enter: int
    to_exit: int
    has_failing_members: bool
    block: str | None
    seconds: float


def run_mode(request: SyncRequest, *, has_state: bool, is_archive: bool) -> RunMode:
    """What a run does, from what was asked and whether the destination was told before."""
    if is_archive:
        return RunMode.ARCHIVE
    if request.is_dry_run:
        return RunMode.DRY_RUN
    if request.is_full or request.trigger == Trigger.FULL_OWED:
        return RunMode.FULL
    return RunMode.INCREMENTAL if has_state else RunMode.INITIAL


class RunLifecycle:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def start_run(
        self,
        pair_id: int,
        request: SyncRequest,
        *,
        on_dry_change: Callable[[Change], None] | None = None,
    ) -> PreparedRun | RunSummary:
        """Lock the pair, open the run, snapshot the source and check the guards.

        Returns a PreparedRun ready to deliver, or the summary of a run that ended here
        (skipped, failed, blocked or dry run). A dry run hands each change it would send to
        `on_dry_change`, in user id order, before forgetting them.
        """
        opened = self.open_run(pair_id, request)
        if isinstance(opened, RunSummary):
            return opened
        self._ctx.crash_point("after_lock")
        if opened.is_full and not request.is_full:
            # The pair owes a full sync: this run is one, whatever was asked.
            request = replace(request, is_full=True, trigger=Trigger.FULL_OWED)
        audience = opened.audience
        if audience.field_id is not None and not request.is_dry_run:
            # Before planning, check the destination still has what the pair's id names: one
            # that lost it (an Ortto audience deleted) gets a new, empty one, and the pair
            # then owes a full sync, starting with this run.
            try:
                audience = self._prepare_destination(opened)
            except (DestinationError, ConfigError) as exc:
                return self._end(opened, RunStatus.FAILED, str(exc))
            if is_destination_reset(opened.audience, audience) and not request.is_full:
                request = replace(request, is_full=True)
                with self._ctx.unit_of_work() as session:
                    run_repo.update_run(session, opened.run_id, mode=RunMode.FULL)
        name = f"{opened.audience.key} -> {opened.destination_name}"
        shown = self._ctx.progress()
        shown.start(f"{name}: reading the source into a snapshot", 0)
        try:
            with heartbeat(self._ctx, pair_id, opened.owner):
                snapshot = take_snapshot(
                    self._ctx,
                    opened.audience.id,
                    source_name=opened.source_name,
                    url_template=opened.source_url,
                    query=opened.query,
                    timeout=opened.source_timeout,
                    run_id=opened.run_id,
                    progress=shown,
                    rules=opened.rules,
                    now=opened.started_at,
                )
        except (SourceError, ConfigError) as exc:
            return self._end(opened, RunStatus.FAILED, str(exc))
        finally:
            shown.stop()
        rows = snapshot.members + sum(snapshot.skipped.values())
        logger.info(
            "run %s (%s): read %d source rows into snapshot %s (%d members) in %.2f s (%s rows/s)",
            opened.run_id,
            name,
            rows,
            snapshot.snapshot_id,
            snapshot.members,
            snapshot.seconds,
            rate(rows, snapshot.seconds),
        )
        shown = self._ctx.progress()
        shown.start(f"{name}: computing the changes", 0)
        try:
            plan = self._plan(opened, snapshot, request, on_dry_change=on_dry_change)
        finally:
            shown.stop()
        logger.info(
            "run %s (%s): diff of %d members: %d to enter, %d to exit, in %.2f s",
            opened.run_id,
            name,
            snapshot.members,
            plan.to_enter,
            plan.to_exit,
            plan.seconds,
        )
        if plan.block:
            return self._end(opened, RunStatus.BLOCKED, plan.block)
        if request.is_dry_run:
            return self._end(opened, RunStatus.SUCCEEDED, None)
        if audience.field_id is None:
            try:
                audience = self._prepare_destination(opened)
            except (DestinationError, ConfigError) as exc:
                return self._end(opened, RunStatus.FAILED, str(exc))
        self._ctx.crash_point("before_delivery")
        return opened.prepared(
            audience,
            snapshot.snapshot_id,
            is_full=request.is_full,
            to_enter=plan.to_enter,
            to_exit=plan.to_exit,
            snapshot_seconds=snapshot.seconds,
            diff_seconds=plan.seconds,
            has_failing_members=plan.has_failing_members,
        )

    def open_run(
        self, pair_id: int, request: SyncRequest, *, is_archive: bool = False
    ) -> OpenedRun | RunSummary:
        """Take the pair's lock (or record a skipped run), close what dead runs left behind
        and open the run. An archive run owes `false` to every member the destination may
        hold, quarantined or not."""
        started = time.monotonic()
        now = self._ctx.clock()
        token = uuid.uuid4().hex
        with self._ctx.unit_of_work() as session:
            pair = audience_repo.pair_by_id(session, pair_id)
            if pair is None:
                raise NotFoundError(f"no audience/destination pair {pair_id}")
            audience, destination, source = pair.audience, pair.destination, pair.audience.source
            skip_mode = RunMode.ARCHIVE if is_archive else RunMode.INCREMENTAL
            skipped = lock_or_skip(
                self._ctx, session, pair, token, mode=skip_mode, trigger=request.trigger
            )
            if skipped is not None:
                return self.summarize(skipped, audience.key, destination.name, started)
            run_repo.close_interrupted_runs(session, audience.id, destination.id, now=now)
            snapshot_repo.drop_stale_staging(session)
            if is_archive or not request.is_dry_run:
                settle_stopped_runs(session, audience.id, destination.id, now=now)
            has_state = synced_repo.has_state(session, audience.id, destination.id)
            is_real = not (is_archive or request.is_dry_run)
            if is_real and pair.is_full_sync_owed and not request.is_full:
                request = replace(request, trigger=Trigger.FULL_OWED)
            is_full = is_real and (request.is_full or request.trigger == Trigger.FULL_OWED)
            if is_full:
                # Cleared only when a full run finishes: one that dies or is stopped leaves
                # the pair owing a full sync, and its next run is full.
                audience_repo.set_full_sync_owed(session, pair_id, is_owed=True)
            host, pid, task_id = where_this_runs()
            run = run_repo.create_run(
                session,
                audience_id=audience.id,
                destination_id=destination.id,
                mode=run_mode(request, has_state=has_state, is_archive=is_archive),
                trigger=request.trigger,
                now=now,
                host=host,
                pid=pid,
                task_id=task_id,
            )
            owner = f"run:{run.id}"
            audience_repo.hand_over_lock(session, pair_id, token, owner)
            if is_archive or request.retry_quarantined:
                failure_repo.release_quarantine(session, audience.id, destination.id)
            logs.bind_run(run.id, audience.key, destination.name)
            return OpenedRun(
                run_id=run.id,
                pair_id=pair_id,
                owner=owner,
                audience=replace(
                    AudienceRef(audience.id, audience.key, audience.name, pair.external_field_id),
                    space_id=audience.space_id,
                    send_as=SendAs(pair.send_as),
                    external_name=pair.ortto_audience_name,
                ),
                destination_id=destination.id,
                destination_name=destination.name,
                destination_settings=dict(destination.settings),
                source_name=source.name,
                source_url=source.url,
                source_timeout=source.statement_timeout_seconds,
                query=audience.query,
                max_exit_fraction=audience.max_exit_fraction,
                started=started,
                is_full=is_full,
                rules=rule_definition(audience, audience_repo.all_audiences(session))
                if audience.rules is not None
                else None,
                started_at=now,
            )

    def _plan(
        self,
        opened: OpenedRun,
        snapshot: TakenSnapshot,
        request: SyncRequest,
        *,
        on_dry_change: Callable[[Change], None] | None = None,
    ) -> Plan:
        """Write the run's change set and check the mass-exit guard; a blocked run and a
        dry run keep neither their changes nor their snapshot."""
        began = time.monotonic()
        audience_id, destination_id = opened.audience.id, opened.destination_id
        with self._ctx.unit_of_work() as session:
            scope = PairScope(audience_id, destination_id, snapshot.snapshot_id, request.is_full)
            to_enter, to_exit, held = change_repo.plan_run_changes(
                session, scope, opened.run_id, members=snapshot.members
            )
            seconds = time.monotonic() - began
            has_failing = failure_repo.has_failing_members(session, audience_id, destination_id)
            entered = (
                change_repo.count_newly_entered(session, scope) if request.is_full else to_enter
            )
            member_exits = to_exit
            if held and to_exit > opened.max_exit_fraction * held:
                # Users in doubt after a failed run are re-sent `false` too; the guard is
                # about members the destination holds, so count only those.
                member_exits = change_repo.count_member_exits(session, scope)
            previous = snapshot_repo.previous_member_count(
                session, audience_id, snapshot.snapshot_id
            )
            run_repo.update_run(
                session,
                opened.run_id,
                snapshot_id=snapshot.snapshot_id,
                members=snapshot.members,
                entered=entered,
                exited=to_exit,
                skipped_rows=snapshot.skipped,
                snapshot_seconds=snapshot.seconds,
                diff_seconds=seconds,
            )
            block = (
                None
                if request.allow_mass_exit
                else mass_exit_reason(
                    members=snapshot.members,
                    previous_members=previous,
                    held_members=held,
                    exits=member_exits,
                    max_exit_fraction=opened.max_exit_fraction,
                )
            )
            if request.is_dry_run and on_dry_change is not None:
                _hand_over_changes(session, opened.run_id, on_dry_change)
            if block or request.is_dry_run:
                change_repo.drop_changes(session, opened.run_id)
                snapshot_repo.delete_snapshot(session, snapshot.snapshot_id)
                run_repo.update_run(session, opened.run_id, snapshot_id=None)
            else:
                # Only the difference from the current membership is written; the staging
                # table stays until the run ends (see end_run).
                now = self._ctx.clock()
                snapshot_repo.apply_snapshot(session, audience_id, snapshot.snapshot_id, now=now)
                # Delivery (the destination's preparation included) is timed from here to
                # the run's end, by whichever process ends it.
                run_repo.update_run(session, opened.run_id, delivery_started_at=now)
                self._ctx.crash_point("writing_change_log")
        return Plan(to_enter, to_exit, has_failing, block, seconds)

    def _prepare_destination(self, opened: OpenedRun) -> AudienceRef:
        """Let the destination set up what the audience needs (a field, a list) and keep
        the id it answers with."""
        client = self._ctx.destinations.get(opened.destination_name, opened.destination_settings)
        field_id = client.prepare(opened.audience)
        if field_id == opened.audience.field_id:
            return opened.audience
        prepared = replace(opened.audience, field_id=field_id)
        with self._ctx.unit_of_work() as session:
            audience_repo.set_field_id(session, opened.pair_id, field_id)
            if is_destination_reset(opened.audience, prepared):
                # What the old id held is gone: the pair owes a full sync until one
                # finishes, whatever becomes of this run (blocked, failed, killed).
                audience_repo.set_full_sync_owed(session, opened.pair_id, is_owed=True)
        return prepared

    def finish_run(self, prepared: PreparedRun) -> RunSummary:
        """Close a run whose delivery is complete: succeeded, or partial with failures."""
        with self._ctx.unit_of_work() as session:
            run = run_repo.get_run(session, prepared.run_id)
            assert run is not None
            status = RunStatus.PARTIAL if run.failed else RunStatus.SUCCEEDED
            error = (
                f"{run.failed} user(s) rejected; see `audience-sync runs show {run.id}`"
                if run.failed
                else None
            )
            failure_repo.forget_moot(session, prepared.scope)
            if prepared.is_full:
                audience_repo.set_full_sync_owed(session, prepared.pair_id, is_owed=False)
            in_use = run_repo.snapshots_in_use(session, prepared.audience.id)
            snapshot_repo.prune_snapshots(
                session,
                prepared.audience.id,
                keep=self._ctx.settings.snapshots_kept,
                protect={prepared.snapshot_id} | in_use,
            )
            retention = timedelta(days=self._ctx.settings.membership_log_retention_days)
            snapshot_repo.prune_log(
                session, prepared.audience.id, before=self._ctx.clock() - retention
            )
        maintenance_repo.keep_up(self._ctx.sessions)
        return self.end_run(prepared.run_id, prepared.pair_id, prepared.lock_owner, status, error)

    def fail_run(self, prepared: PreparedRun, error: str) -> RunSummary:
        """Close a run whose delivery failed; one an operator asked to stop (its chunks
        stopped at their page boundaries) is cancelled."""
        with self._ctx.unit_of_work() as session:
            is_cancelled = run_repo.is_cancel_requested(session, prepared.run_id)
        if is_cancelled:
            return self.cancel_run(prepared, CANCELLED_BY_OPERATOR)
        return self.end_run(
            prepared.run_id, prepared.pair_id, prepared.lock_owner, RunStatus.FAILED, error
        )

    def cancel_run(self, prepared: PreparedRun, reason: str) -> RunSummary:
        """Close a run stopped at a page boundary: what it delivered stays recorded, the
        users of a page in flight become in doubt, the rest of its changes is owed to the
        pair's next run (which computes its own), and the pair is free at once."""
        now = self._ctx.clock()
        audience_id, destination_id = prepared.audience.id, prepared.destination_id
        with self._ctx.unit_of_work() as session:
            settle_run(session, prepared.run_id, audience_id, destination_id, now=now)
        return self.end_run(
            prepared.run_id,
            prepared.pair_id,
            prepared.lock_owner,
            RunStatus.CANCELLED,
            f"{reason}; what was not sent is owed to the next run",
        )

    def pair_names(self, pair_id: int) -> tuple[str, str]:
        """(audience key, destination name) of a pair."""
        with self._ctx.unit_of_work() as session:
            pair = audience_repo.pair_by_id(session, pair_id)
            if pair is None:
                raise NotFoundError(f"no audience/destination pair {pair_id}")
            return pair.audience.key, pair.destination.name

    def request_cancel(self, run_id: int, *, force: bool = False) -> str:
        """Ask a running run to stop at its next page boundary; with `force`, close a dead
        run at once (cancelled, its page in flight in doubt, its pair's lock freed).
        Returns what was done, in one line."""
        now = self._ctx.clock()
        with self._ctx.unit_of_work() as session:
            run = run_repo.get_run(session, run_id)
            if run is None:
                raise NotFoundError(f"no run {run_id}; `audience-sync history` shows them")
            if run.status != RunStatus.RUNNING:
                raise ConfigError(f"run {run_id} is not running (it is {run.status})")
            is_here = run.host == where_this_runs()[0] and run.pid is not None
            is_alive = is_here and run.pid is not None and is_process_alive(run.pid)
            if not force:
                if is_here and not is_alive:
                    raise ConfigError(
                        f"run {run_id}'s process (pid {run.pid}) is gone: "
                        f"`audience-sync runs cancel {run_id} --force` closes it"
                    )
                run_repo.request_cancel(session, run_id, now=now)
                return f"asked run {run_id} to stop at its next page boundary"
            if is_alive:
                raise ConfigError(
                    f"run {run_id} is alive (pid {run.pid} on this host): "
                    f"`audience-sync runs cancel {run_id}` stops it at its next page"
                )
            pair = audience_repo.pair_of(session, run.audience_id, run.destination_id)
            assert pair is not None
            settle_run(session, run_id, run.audience_id, run.destination_id, now=now)
            run_repo.update_run(
                session,
                run_id,
                status=RunStatus.CANCELLED,
                error="cancelled with `audience-sync runs cancel --force`: its process was "
                "gone; what was not sent is owed to the next run",
                finished_at=now,
                cancel_requested_at=now,
            )
            audience_repo.release_lock(session, pair.id, f"run:{run_id}")
        return f"closed run {run_id} as cancelled and freed its lock"

    def _end(self, opened: OpenedRun, status: RunStatus, error: str | None) -> RunSummary:
        return self.end_run(
            opened.run_id, opened.pair_id, opened.owner, status, error, started=opened.started
        )

    def end_run(
        self,
        run_id: int,
        pair_id: int,
        owner: str,
        status: RunStatus,
        error: str | None,
        *,
        started: float | None = None,
    ) -> RunSummary:
        """Record the run's outcome and free its pair, once: closing it again (a redelivered
        finish task, a run taken over as interrupted) keeps the first outcome and touches
        no lock."""
        now = self._ctx.clock()
        with self._ctx.unit_of_work() as session:
            # Changes a failed run leaves behind are settled by the pair's next run.
            is_closing = run_repo.close_run(
                session, run_id, status=status, error=error, finished_at=now
            )
            if is_closing:
                audience_repo.release_lock(session, pair_id, owner)
                run_repo.record_delivery_seconds(session, run_id, finished_at=now)
            # Read once, after the close: the outcome as stored, this one or the first.
            run = run_repo.get_run(session, run_id)
            pair = audience_repo.pair_by_id(session, pair_id)
            assert run is not None and pair is not None
            if is_closing and run.snapshot_id is not None:
                snapshot_repo.drop_staging(session, run.snapshot_id)
            summary = self.summarize(run, pair.audience.key, pair.destination.name, started)
        if is_closing:
            logger.log(
                RUN_LOG_LEVELS.get(status, logging.INFO),
                "sync finished %s",
                json.dumps(summary_fields(summary), sort_keys=True),
            )
            self._ctx.run_ended(summary)
            logs.unbind_run()
        return summary

    def summarize(
        self, run: SyncRun, key: str, destination: str, started: float | None
    ) -> RunSummary:
        finished = run.finished_at or self._ctx.clock()
        duration = (
            time.monotonic() - started
            if started is not None
            else (finished - run.started_at).total_seconds()
        )
        return RunSummary(
            run_id=run.id,
            audience_key=key,
            destination=destination,
            duration_seconds=round(duration, 3),
            **run_outcome_fields(run),
        )


def is_destination_reset(before: AudienceRef, after: AudienceRef) -> bool:
    """Whether preparing the destination replaced a destination-side id it had before: what
    the old one held is gone, so the synced state says nothing about the new one."""
    return before.field_id is not None and after.field_id != before.field_id


def rate(count: int, seconds: float) -> str:
    """Rows per second, for a log line (`-` when too quick to tell)."""
    return f"{count / seconds:.0f}" if seconds > 0 else "-"


DRY_RUN_PAGE = 5000  # changes read at a time when a dry run shows them


def _hand_over_changes(session: Session, run_id: int, sink: Callable[[Change], None]) -> None:
    cursor = None
    while page := change_repo.page_of_changes(
        session, run_id, after=cursor, upto=None, limit=DRY_RUN_PAGE
    ):
        for change in page:
            sink(change)
        cursor = page[-1].member_id


def settle_stopped_runs(
    session: Session, audience_id: int, destination_id: int, *, now: datetime
) -> None:
    """Before a pair's next run: close the books of the runs that died with changes left.
    Their pages in flight may have reached the destination unrecorded, so those users
    become in doubt; then the dead run's changes are forgotten (the next run computes its
    own). Call with the pair lock held, after closing interrupted runs."""
    for run_id in change_repo.runs_with_changes(session, audience_id, destination_id):
        settle_run(session, run_id, audience_id, destination_id, now=now)


def settle_run(
    session: Session, run_id: int, audience_id: int, destination_id: int, *, now: datetime
) -> None:
    """Close the books of one stopped run: the users of its page in flight become in doubt
    (and a first `true` it may have sent gets a synced `false`), its changes are dropped."""
    failure_repo.mark_in_doubt(session, run_id, audience_id, destination_id, now=now)
    synced_repo.add_unrecorded_entrants(session, run_id, audience_id, destination_id, now=now)
    change_repo.drop_changes(session, run_id)


def pair_run_state(
    session: Session, pair: AudienceDestination, *, now: datetime, ttl: timedelta
) -> str | None:
    """How `status` describes who holds the pair: `running`, `stale (...)`, `running
    elsewhere (...)`, or None when nobody does."""
    if pair.lock_owner is None or pair.lock_expires_at is None:
        return None
    _, _, number = pair.lock_owner.partition("run:")
    run = run_repo.get_run(session, int(number)) if number.isdigit() else None
    if run is not None and run.status != RunStatus.RUNNING:
        return None  # the run ended; its lock stays behind only until the next run
    holder = LockHolder(
        run_id=run.id if run else None,
        host=run.host if run else None,
        pid=run.pid if run else None,
        lock_expires_at=pair.lock_expires_at,
    )
    return run_state(
        holder, now=now, ttl=ttl, this_host=where_this_runs()[0], is_alive=is_process_alive
    )
