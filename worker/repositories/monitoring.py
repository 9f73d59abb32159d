"""Read-only aggregates over the runs, failing users and heartbeats, for the metrics and
the console: a few grouped statements each, whatever the number of runs (the
`ix_sync_runs_pair_status` index serves the grouping by pair and status)."""

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import (
    Audience,
    AudienceDestination,
    DeliveryFailure,
    Destination,
    FailingMember,
    SyncRun,
)
from worker.domain import RunMode, RunStatus

Pair = tuple[int, int]  # (audience_id, destination_id)
DELIVERED = (RunStatus.SUCCEEDED, RunStatus.PARTIAL)


def active_pairs(session: Session) -> list[tuple[int, int, str, str, str]]:
    """(audience_id, destination_id, audience key, destination name, schedule) of every
    enabled pair of an active audience, by key and name."""
    rows = session.execute(
        select(Audience.id, Destination.id, Audience.key, Destination.name, Audience.schedule)
        .select_from(AudienceDestination)
        .join(Audience, Audience.id == AudienceDestination.audience_id)
        .join(Destination, Destination.id == AudienceDestination.destination_id)
        .where(AudienceDestination.is_enabled.is_(True), Audience.is_archived.is_(False))
        .order_by(Audience.key, Destination.name)
    ).all()
    return [(a, d, key, name, schedule) for a, d, key, name, schedule in rows]


def run_counts(session: Session) -> dict[tuple[int, int, str], tuple[int, int, int]]:
    """(runs, calls sent, calls rejected) per pair and run status."""
    rows = session.execute(
        select(
            SyncRun.audience_id,
            SyncRun.destination_id,
            SyncRun.status,
            func.count(),
            func.coalesce(func.sum(SyncRun.sent), 0),
            func.coalesce(func.sum(SyncRun.failed), 0),
        ).group_by(SyncRun.audience_id, SyncRun.destination_id, SyncRun.status)
    ).all()
    return {(a, d, status): (int(n), int(s), int(f)) for a, d, status, n, s, f in rows}


def last_delivered(session: Session) -> dict[Pair, datetime]:
    """When each pair's last succeeded or partial run (not a dry run) ended."""
    rows = session.execute(
        select(SyncRun.audience_id, SyncRun.destination_id, func.max(SyncRun.finished_at))
        .where(SyncRun.status.in_(DELIVERED), SyncRun.mode != RunMode.DRY_RUN)
        .group_by(SyncRun.audience_id, SyncRun.destination_id)
    ).all()
    return {(a, d): at for a, d, at in rows if at is not None}


def latest_runs(session: Session, *, exclude_skipped: bool = True) -> dict[Pair, SyncRun]:
    """Each pair's latest run (skipped ones left out: they say nothing of the pair)."""
    latest = select(func.max(SyncRun.id)).group_by(SyncRun.audience_id, SyncRun.destination_id)
    if exclude_skipped:
        latest = latest.where(SyncRun.status != RunStatus.SKIPPED)
    return {
        (run.audience_id, run.destination_id): run
        for run in session.scalars(select(SyncRun).where(SyncRun.id.in_(latest.scalar_subquery())))
    }


def members_by_audience(session: Session) -> dict[int, int]:
    """Members of each audience at its latest delivered run (any destination)."""
    latest = (
        select(func.max(SyncRun.id))
        .where(SyncRun.status.in_(DELIVERED), SyncRun.mode != RunMode.DRY_RUN)
        .group_by(SyncRun.audience_id)
        .scalar_subquery()
    )
    rows = session.execute(
        select(SyncRun.audience_id, SyncRun.members).where(SyncRun.id.in_(latest))
    ).all()
    return {a: int(members) for a, members in rows}


def failing_counts(session: Session) -> dict[tuple[int, int, bool], int]:
    """Failing users per pair, split by whether they are quarantined."""
    rows = session.execute(
        select(
            FailingMember.audience_id,
            FailingMember.destination_id,
            FailingMember.is_quarantined,
            func.count(),
        ).group_by(
            FailingMember.audience_id, FailingMember.destination_id, FailingMember.is_quarantined
        )
    ).all()
    return {(a, d, bool(q)): int(n) for a, d, q, n in rows}


def runs_of_audience(
    session: Session, audience_id: int, *, limit: int
) -> Sequence[tuple[SyncRun, str]]:
    """The audience's latest runs (skipped ones left out) with their destination's name,
    newest first."""
    return [
        (run, name)
        for run, name in session.execute(
            select(SyncRun, Destination.name)
            .join(Destination, Destination.id == SyncRun.destination_id)
            .where(SyncRun.audience_id == audience_id, SyncRun.status != RunStatus.SKIPPED)
            .order_by(SyncRun.id.desc())
            .limit(limit)
        ).all()
    ]


def member_series(session: Session, *, per_pair: int) -> dict[Pair, list[int]]:
    """Members at each pair's latest `per_pair` delivered runs, oldest first."""
    ranked = (
        select(
            SyncRun.audience_id,
            SyncRun.destination_id,
            SyncRun.id,
            SyncRun.members,
            func.row_number()
            .over(
                partition_by=(SyncRun.audience_id, SyncRun.destination_id),
                order_by=SyncRun.id.desc(),
            )
            .label("rank"),
        )
        .where(SyncRun.status.in_(DELIVERED), SyncRun.mode != RunMode.DRY_RUN)
        .subquery()
    )
    rows = session.execute(
        select(ranked.c.audience_id, ranked.c.destination_id, ranked.c.members)
        .where(ranked.c.rank <= per_pair)
        .order_by(ranked.c.audience_id, ranked.c.destination_id, ranked.c.id)
    ).all()
    series: dict[Pair, list[int]] = {}
    for a, d, members in rows:
        series.setdefault((a, d), []).append(int(members))
    return series


def failures_page(
    session: Session, run_id: int, *, offset: int, limit: int
) -> tuple[Sequence[DeliveryFailure], int]:
    """One page of a run's per-user failures, and how many there are in all."""
    total = session.scalar(
        select(func.count()).select_from(DeliveryFailure).where(DeliveryFailure.run_id == run_id)
    )
    page = session.scalars(
        select(DeliveryFailure)
        .where(DeliveryFailure.run_id == run_id)
        .order_by(DeliveryFailure.id)
        .offset(offset)
        .limit(limit)
    ).all()
    return page, int(total or 0)


def failing_page(
    session: Session, *, offset: int, limit: int
) -> tuple[Sequence[tuple[FailingMember, str, str]], int]:
    """One page of the failing users (by audience key, destination, user) with their
    audience key and destination name, and how many there are in all."""
    total = session.scalar(select(func.count()).select_from(FailingMember))
    rows = session.execute(
        select(FailingMember, Audience.key, Destination.name)
        .join(Audience, Audience.id == FailingMember.audience_id)
        .join(Destination, Destination.id == FailingMember.destination_id)
        .order_by(Audience.key, Destination.name, FailingMember.member_id)
        .offset(offset)
        .limit(limit)
    ).all()
    return [(member, key, name) for member, key, name in rows], int(total or 0)


def ping(session: Session) -> None:
    """One round trip to the state database."""
    session.execute(select(1))
