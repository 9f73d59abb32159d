"""Delivering a started run: in this process or fanned out in chunks; its planned changes
go page by page, each page's answer recorded with the synced state it moves."""

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session

from worker.context import ServiceContext
from worker.destinations.base import DestinationClient, Rejection
from worker.domain import (
    FanOut,
    PreparedRun,
    Progress,
    RunSummary,
    SyncRequest,
    chunk_ranges,
)
from worker.errors import DestinationError
from worker.locking import LOST_LOCK, RunStopped, check_stop, heartbeat, still_held
from worker.payloads import Change, identify_call
from worker.repositories import audiences as audience_repo
from worker.repositories import changes as change_repo
from worker.repositories import failures as failure_repo
from worker.repositories import runs as run_repo
from worker.repositories import synced as synced_repo
from worker.runs import RunLifecycle


class Delivery:
    def __init__(self, ctx: ServiceContext, runs: RunLifecycle) -> None:
        self._ctx = ctx
        self._runs = runs

    def sync_pair(self, pair_id: int, request: SyncRequest) -> RunSummary:
        """Start a run and deliver it in this process."""
        prepared = self._runs.start_run(pair_id, request)
        if isinstance(prepared, RunSummary):
            return prepared
        return self.deliver_run(prepared)

    def start_sync(self, pair_id: int, request: SyncRequest) -> RunSummary | FanOut:
        """Start a run for the Celery workers. A run with fewer changes than one chunk is
        delivered and closed here; a larger one comes back with its chunks, for workers to
        deliver in parallel (`deliver_range` each) and to close once all are done."""
        prepared = self._runs.start_run(pair_id, request)
        if isinstance(prepared, RunSummary):
            return prepared
        chunk_size = self._ctx.settings.chunk_size
        if prepared.to_enter + prepared.to_exit < chunk_size:
            return self.deliver_run(prepared)
        with self._ctx.unit_of_work() as session:
            boundaries = change_repo.chunk_boundaries(
                session, prepared.run_id, chunk_size=chunk_size
            )
        return FanOut(prepared, chunk_ranges(boundaries))

    def deliver_run(self, prepared: PreparedRun, progress: Progress | None = None) -> RunSummary:
        """Deliver every change of a prepared run in this process, then close the run."""
        shown = self._ctx.progress() if progress is None else progress
        shown.start(
            f"{prepared.audience.key} -> {prepared.destination_name}",
            prepared.to_enter + prepared.to_exit,
        )
        try:
            self.deliver_range(prepared, after=None, upto=None, progress=shown)
        except RunStopped as exc:
            return self._runs.cancel_run(prepared, str(exc))
        except DestinationError as exc:
            return self._runs.fail_run(prepared, str(exc))
        finally:
            shown.stop()
        return self._runs.finish_run(prepared)

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
        client = self._client(prepared)
        cursor = after
        while True:
            with self._ctx.unit_of_work() as session:
                if not still_held(session, prepared.pair_id, prepared.lock_owner):
                    raise DestinationError(LOST_LOCK)
                check_stop(session, prepared.run_id)  # a signal or `runs cancel`: stop here
                page = change_repo.page_of_changes(
                    session, prepared.run_id, after=cursor, upto=upto, limit=client.max_batch_items
                )
                if page:
                    first, last = page[0].member_id, page[-1].member_id
                    change_repo.mark_in_flight(session, prepared.run_id, first, last)
            if not page:
                return
            now = self._ctx.clock()
            calls = [
                identify_call(prepared.audience, prepared.destination_id, change, now=now)
                for change in page
            ]
            with heartbeat(self._ctx, prepared.pair_id, prepared.lock_owner):
                rejections = client.deliver(prepared.audience, calls)
            self._ctx.crash_point("page_sent")
            with self._ctx.unit_of_work() as session:
                self._record_page(session, prepared, page, rejections, now=now)
            self._ctx.crash_point("page_recorded")
            if progress is not None:
                progress.advance(len(page))
            cursor = last

    def _record_page(
        self,
        session: Session,
        prepared: PreparedRun,
        page: Sequence[Change],
        rejections: Sequence[Rejection],
        *,
        now: datetime,
    ) -> None:
        """The destination's answer to one page: accepted users move their synced state,
        rejected ones count towards quarantine, and the page leaves the run's changes."""
        audience_id, destination_id = prepared.audience.id, prepared.destination_id
        rejected_at = {r.index for r in rejections}
        accepted = [c for i, c in enumerate(page) if i not in rejected_at]
        rejected = [
            (page[r.index], r.status, r.message) for r in rejections if 0 <= r.index < len(page)
        ]
        synced_repo.record_accepted(
            session,
            audience_id=audience_id,
            destination_id=destination_id,
            run_id=prepared.run_id,
            changes=accepted,
            now=now,
        )
        if prepared.has_failing_members:
            failure_repo.settle_accepted(
                session, audience_id, destination_id, [c.member_id for c in accepted]
            )
        failure_repo.record_rejected(
            session,
            audience_id=audience_id,
            destination_id=destination_id,
            run_id=prepared.run_id,
            rejected=rejected,
            quarantine_after=self._ctx.settings.quarantine_after,
            now=now,
        )
        change_repo.drop_changes(session, prepared.run_id, page[0].member_id, page[-1].member_id)
        run_repo.add_to_counters(session, prepared.run_id, sent=len(accepted), failed=len(rejected))
        if not audience_repo.extend_lock(
            session, prepared.pair_id, prepared.lock_owner, now=now, ttl=self._ctx.lock_ttl
        ):
            raise DestinationError(LOST_LOCK)

    def _client(self, prepared: PreparedRun) -> DestinationClient:
        """The run's destination client, looked up once for the whole range."""
        with self._ctx.unit_of_work() as session:
            name, template = audience_repo.destination_settings(session, prepared.destination_id)
        return self._ctx.destinations.get(name, template)
