"""Delivering a started run: in this process or fanned out in chunks; its planned changes
go page by page, each page's answer recorded with the synced state it moves."""

import queue
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
from worker.payloads import Change, RejectedCall, change_rejections, delivery_calls
from worker.ratelimit import requests_in_flight
from worker.repositories import audiences as audience_repo
from worker.repositories import changes as change_repo
from worker.repositories import failures as failure_repo
from worker.repositories import runs as run_repo
from worker.repositories import synced as synced_repo
from worker.runs import RunLifecycle


@dataclass(frozen=True, slots=True)
class _AnsweredPage:
    """A sent page and its outcome: the destination's rejections, or what the send raised."""

    page: list[Change]
    now: datetime
    outcome: list[Rejection] | BaseException


def _send_page(
    client: DestinationClient,
    prepared: PreparedRun,
    page: list[Change],
    calls: list[dict[str, Any]],
    now: datetime,
    answers: "queue.Queue[_AnsweredPage]",
) -> None:
    """Send one page from a delivery thread; its outcome goes to `answers`, whatever it is,
    for the delivering thread to record (the only one that touches the state database)."""
    outcome: list[Rejection] | BaseException
    try:
        outcome = client.deliver(prepared.audience, calls)
    except BaseException as exc:  # handed to the delivering thread, which decides
        outcome = exc
    answers.put(_AnsweredPage(page, now, outcome))


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
        """Deliver the run's changes with member_id in (after, upto], page by page, up to
        `_in_flight` pages at once. A page is marked in flight before it is sent (so a crash
        leaves at most the pages in flight in doubt); each answered page's results, the synced
        state they move and the page's removal from the run's changes are committed together,
        in the order the destination answered. Pages cover disjoint member ranges, so a user
        is never in two requests at once. After a destination error no page is taken, the
        pages in flight are answered and recorded, then the error is raised; so it is when the
        run is asked to stop (RunStopped, checked before each page is taken)."""
        client = self._client(prepared)
        answers: queue.Queue[_AnsweredPage] = queue.Queue()
        cursor = after
        in_flight = 0
        is_drained = is_answered = False
        failure: DestinationError | None = None
        with (
            ThreadPoolExecutor(
                max_workers=self._most_in_flight(), thread_name_prefix="deliver"
            ) as senders,
            heartbeat(self._ctx, prepared.pair_id, prepared.lock_owner),
        ):
            while True:
                # Page boundary: take pages while there is room in flight.
                while failure is None and not is_drained:
                    if in_flight >= (self._in_flight(client) if is_answered else 1):
                        break
                    try:
                        page = self._take_page(prepared, client, after=cursor, upto=upto)
                    except DestinationError as exc:
                        failure = exc
                        break
                    if not page:
                        is_drained = True
                        break
                    now = self._ctx.clock()
                    # One or two calls per change (send_as); a change counts as accepted only
                    # when every one of its calls was.
                    calls = delivery_calls(
                        prepared.audience, prepared.destination_id, page, now=now
                    )
                    senders.submit(_send_page, client, prepared, page, calls, now, answers)
                    in_flight += 1
                    cursor = page[-1].member_id
                if in_flight == 0:
                    break
                result = answers.get()
                in_flight -= 1
                # The first page goes alone: the destination gets ready for the audience
                # once (a field found or created) and its answer gives a first latency.
                is_answered = True
                if isinstance(result.outcome, DestinationError):
                    failure = failure or result.outcome
                    continue
                if isinstance(result.outcome, BaseException):
                    raise result.outcome
                rejections = change_rejections(result.outcome, prepared.audience.send_as)
                self._ctx.crash_point("page_sent")
                try:
                    with self._ctx.unit_of_work() as session:
                        self._record_page(
                            session, prepared, result.page, rejections, now=result.now
                        )
                except DestinationError as exc:
                    failure = failure or exc
                    continue
                self._ctx.crash_point("page_recorded")
                if progress is not None:
                    progress.advance(len(result.page))
        if failure is not None:
            raise failure

    def _take_page(
        self,
        prepared: PreparedRun,
        client: DestinationClient,
        *,
        after: str | None,
        upto: str | None,
    ) -> list[Change]:
        """The next page of the range, marked in flight (committed before it is sent)."""
        with self._ctx.unit_of_work() as session:
            if not still_held(session, prepared.pair_id, prepared.lock_owner):
                raise DestinationError(LOST_LOCK)
            check_stop(session, prepared.run_id)  # a signal or `runs cancel`: stop here
            page = change_repo.page_of_changes(
                session, prepared.run_id, after=after, upto=upto, limit=client.max_batch_items
            )
            if page:
                change_repo.mark_in_flight(
                    session, prepared.run_id, page[0].member_id, page[-1].member_id
                )
        return page

    def _most_in_flight(self) -> int:
        settings = self._ctx.settings
        return settings.delivery_in_flight or settings.delivery_max_in_flight

    def _in_flight(self, client: DestinationClient) -> int:
        """Pages to keep in flight now: the setting, else as many as the destination's rate
        limit and measured latency call for (one until a latency is measured)."""
        if self._ctx.settings.delivery_in_flight is not None:
            return self._ctx.settings.delivery_in_flight
        pacing = client.pacing()
        if pacing is None:
            return 1
        return requests_in_flight(
            pacing.requests_per_second,
            pacing.latency_seconds,
            most=self._ctx.settings.delivery_max_in_flight,
        )

    def _record_page(
        self,
        session: Session,
        prepared: PreparedRun,
        page: Sequence[Change],
        rejections: Sequence[RejectedCall],
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
