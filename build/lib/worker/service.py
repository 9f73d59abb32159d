"""The one door to the sync service: the CLI, the Celery tasks, the demo and the benchmark
call `SyncService`, which hands each call to the part that owns it (see `worker`'s module
map). Each step is its own unit of work, committed there, so a crash between steps leaves
the state database consistent: the synced state of a user moves only in the same
transaction that records the destination's acceptance.
"""

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from worker.archive import Archiver
from worker.catalog import Catalog
from worker.config import Config
from worker.context import RunEndHook, ServiceContext, ignore_run_end, utcnow
from worker.crashpoints import CrashPoint, no_crash
from worker.delivery import Delivery
from worker.domain import (
    ApplyReport,
    FanOut,
    NoProgress,
    PairStatus,
    PreparedRun,
    Progress,
    RunSummary,
    SyncRequest,
    Trigger,
)
from worker.payloads import Change
from worker.plan import Plan
from worker.pool import DestinationPool
from worker.runs import RunLifecycle
from worker.settings import Settings


class SyncService:
    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        settings: Settings,
        destinations: DestinationPool,
        clock: Callable[[], datetime] = utcnow,
        progress: Callable[[], Progress] = NoProgress,
        env: Mapping[str, str] | None = None,
        crash_point: CrashPoint = no_crash,
        run_ended: RunEndHook = ignore_run_end,
    ) -> None:
        """`env` resolves `${VAR}` in source URLs (none: no variables); `crash_point` is
        called at each named step of a run (the guarantee tests kill the process there);
        `run_ended` is told of each run once it is recorded as ended (alerts)."""
        self._ctx = ServiceContext(
            sessions=session_factory,
            settings=settings,
            destinations=destinations,
            clock=clock,
            progress=progress,
            env={} if env is None else env,
            crash_point=crash_point,
            run_ended=run_ended,
        )
        self._catalog = Catalog(self._ctx)
        self._runs = RunLifecycle(self._ctx)
        self._delivery = Delivery(self._ctx, self._runs)
        self._archiver = Archiver(self._ctx, self._runs, self._delivery)

    # ----------------------------------------------------------------- catalog

    def apply(
        self,
        config: Config,
        *,
        check_queries: bool = True,
        allow_archive_all: bool = False,
        allowed_new_keys: Collection[str] = (),
    ) -> ApplyReport:
        return self._catalog.apply(
            config,
            check_queries=check_queries,
            allow_archive_all=allow_archive_all,
            allowed_new_keys=allowed_new_keys,
        )

    def plan(
        self,
        config: Config,
        *,
        check_queries: bool = False,
        allow_archive_all: bool = False,
        allowed_new_keys: Collection[str] = (),
    ) -> Plan:
        return self._catalog.plan(
            config,
            check_queries=check_queries,
            allow_archive_all=allow_archive_all,
            allowed_new_keys=allowed_new_keys,
        )

    def select_pairs(
        self, *, audience_keys: Sequence[str] = (), destination_name: str | None = None
    ) -> list[int]:
        return self._catalog.select_pairs(
            audience_keys=audience_keys, destination_name=destination_name
        )

    def check_destinations(self, name: str | None = None) -> list[tuple[str, bool, str]]:
        return self._catalog.check_destinations(name)

    def status(self) -> list[PairStatus]:
        return self._catalog.status()

    def due_pairs(self) -> list[int]:
        return self._catalog.due_pairs()

    def is_due(self, pair_id: int) -> bool:
        return self._catalog.is_due(pair_id)

    # ----------------------------------------------------------------- runs

    def sync_pair(self, pair_id: int, request: SyncRequest) -> RunSummary:
        """Run one sync of one (audience, destination) pair in this process."""
        return self._delivery.sync_pair(pair_id, request)

    def start_sync(self, pair_id: int, request: SyncRequest) -> RunSummary | FanOut:
        """Start a sync for the Celery workers: delivered here, or fanned out in chunks."""
        return self._delivery.start_sync(pair_id, request)

    def start_run(self, pair_id: int, request: SyncRequest) -> PreparedRun | RunSummary:
        return self._runs.start_run(pair_id, request)

    def dry_run(
        self, pair_id: int, request: SyncRequest, on_change: Callable[[Change], None]
    ) -> RunSummary:
        """A dry run that hands each change it would send to `on_change` (user id order)."""
        outcome = self._runs.start_run(
            pair_id, replace(request, is_dry_run=True), on_dry_change=on_change
        )
        assert isinstance(outcome, RunSummary)  # a dry run never delivers
        return outcome

    def pair_names(self, pair_id: int) -> tuple[str, str]:
        return self._runs.pair_names(pair_id)

    def cancel_run(self, run_id: int, *, force: bool = False) -> str:
        """Ask a running run to stop at its next page (`force`: close a dead run at once)."""
        return self._runs.request_cancel(run_id, force=force)

    def deliver_run(self, prepared: PreparedRun) -> RunSummary:
        return self._delivery.deliver_run(prepared)

    def deliver_range(
        self,
        prepared: PreparedRun,
        *,
        after: str | None,
        upto: str | None,
        progress: Progress | None = None,
    ) -> None:
        self._delivery.deliver_range(prepared, after=after, upto=upto, progress=progress)

    def finish_run(self, prepared: PreparedRun) -> RunSummary:
        return self._runs.finish_run(prepared)

    def fail_run(self, prepared: PreparedRun, error: str) -> RunSummary:
        return self._runs.fail_run(prepared, error)

    # ----------------------------------------------------------------- archiving

    def archive(
        self, key: str, *, exit_members: bool, trigger: Trigger | str = Trigger.MANUAL
    ) -> list[RunSummary]:
        return self._archiver.archive(key, exit_members=exit_members, trigger=Trigger(trigger))
