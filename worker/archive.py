"""Archiving an audience: optionally first a run against an empty membership on each of its
destinations (every member the destination holds is told `false`), through the same start
path as any run."""

from worker.context import ServiceContext
from worker.delivery import Delivery
from worker.domain import (
    NoProgress,
    PairScope,
    RunStatus,
    RunSummary,
    SyncRequest,
    Trigger,
)
from worker.errors import NotFoundError
from worker.repositories import audiences as audience_repo
from worker.repositories import changes as change_repo
from worker.repositories import runs as run_repo
from worker.repositories import snapshots as snapshot_repo
from worker.runs import RunLifecycle


class Archiver:
    def __init__(self, ctx: ServiceContext, runs: RunLifecycle, delivery: Delivery) -> None:
        self._ctx = ctx
        self._runs = runs
        self._delivery = delivery

    def archive(
        self, key: str, *, exit_members: bool, trigger: Trigger = Trigger.MANUAL
    ) -> list[RunSummary]:
        """Archive an audience; with `exit_members`, first send `false` to every user each
        destination holds as a member. The audience stays active if any exit run fails."""
        with self._ctx.unit_of_work() as session:
            audience = audience_repo.audience_by_key(session, key)
            if audience is None:
                raise NotFoundError(f"no audience with key {key!r}")
            pair_ids = [
                p.id
                for p in audience_repo.pairs(session, audience_keys=[key], include_archived=True)
            ]
        summaries = (
            [self._exit_all(pair_id, Trigger(trigger)) for pair_id in pair_ids]
            if exit_members
            else []
        )
        if all(s.status == RunStatus.SUCCEEDED for s in summaries):
            with self._ctx.unit_of_work() as session:
                audience = audience_repo.audience_by_key(session, key)
                assert audience is not None
                audience_repo.archive_audience(session, audience, now=self._ctx.clock())
        return summaries

    def _exit_all(self, pair_id: int, trigger: Trigger) -> RunSummary:
        """A run against an empty snapshot: every held member gets `false`."""
        opened = self._runs.open_run(pair_id, SyncRequest(trigger=trigger), is_archive=True)
        if isinstance(opened, RunSummary):
            return opened
        audience_id, destination_id = opened.audience.id, opened.destination_id
        with self._ctx.unit_of_work() as session:
            snapshot_id = snapshot_repo.create_snapshot(session, audience_id, now=self._ctx.clock())
            scope = PairScope(audience_id, destination_id, snapshot_id)
            to_exit = change_repo.plan_run_changes(session, scope, opened.run_id).to_exit
            run_repo.update_run(session, opened.run_id, snapshot_id=snapshot_id, exited=to_exit)
            snapshot_repo.apply_snapshot(session, audience_id, snapshot_id, now=self._ctx.clock())
            snapshot_repo.drop_staging(session, snapshot_id)
        prepared = opened.prepared(
            opened.audience, snapshot_id, is_full=False, to_enter=0, to_exit=to_exit
        )
        return self._delivery.deliver_run(prepared, NoProgress())
