"""Taking a snapshot: load the audience's query result from its source into the snapshot's
staging table in the state database.

From a PostgreSQL source into a PostgreSQL state database the rows go COPY to COPY as raw
bytes and the bad-row rules run in SQL; otherwise they are streamed and cleaned in Python.
Both paths keep and count the same rows.
"""

import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from worker.audiences import RuleDefinition, compile_rules
from worker.config import resolve_source_url
from worker.context import ServiceContext
from worker.domain import Progress
from worker.repositories import runs as run_repo
from worker.repositories import snapshots as snapshot_repo
from worker.repositories.dialect import is_postgresql
from worker.sources import AudienceQuery, SourceRow, copy_rows, copy_statement, stream_source


@dataclass(frozen=True, slots=True)
class TakenSnapshot:
    snapshot_id: int
    members: int
    skipped: dict[str, int]  # reason -> rows left out, e.g. {"null_id": 3, "duplicate_id": 2}
    seconds: float


def take_snapshot(
    ctx: ServiceContext,
    audience_id: int,
    *,
    source_name: str,
    url_template: str,
    query: str | None,
    timeout: float,
    run_id: int | None = None,
    progress: Progress | None = None,
    rules: RuleDefinition | None = None,
    now: datetime | None = None,
) -> TakenSnapshot:
    """Load the source into a new snapshot's staging table, in one transaction: a source
    failure or a crash leaves no snapshot behind. The run (when given) is marked as the
    snapshot's reader in the same transaction, so its staging table is never taken for
    one a dead run left. `progress` advances by the rows of each block read. A rule
    audience (`rules`) is compiled first, for `now` (the run's start), and its SELECT
    loaded as a query is."""
    began = time.monotonic()
    url = resolve_source_url(source_name, url_template, ctx.env)
    statement: AudienceQuery = query or ""
    if rules is not None:
        statement = compile_rules(rules, url, now=now or ctx.clock())
    with ctx.unit_of_work() as session:
        copy = None
        if is_postgresql(session):
            copy = copy_statement(url, statement, timeout_seconds=timeout, source_name=source_name)
        if copy is not None:
            snapshot_id, members, skipped = _load_by_copy(
                ctx, session, audience_id, url, copy, source_name, timeout, progress
            )
        else:
            snapshot_id, members, skipped = _load_streamed(
                ctx, session, audience_id, url, statement, source_name, timeout, progress
            )
        if run_id is not None:
            run_repo.update_run(session, run_id, snapshot_id=snapshot_id)
    return TakenSnapshot(snapshot_id, members, skipped, time.monotonic() - began)


def _load_by_copy(
    ctx: ServiceContext,
    session: Session,
    audience_id: int,
    url: str,
    statement: str,
    source_name: str,
    timeout: float,
    progress: Progress | None,
) -> tuple[int, int, dict[str, int]]:
    snapshot_id = snapshot_repo.create_snapshot(
        session, audience_id, now=ctx.clock(), with_staging=False
    )
    load = snapshot_repo.CopyLoad(session, snapshot_id)
    blocks = copy_rows(
        url,
        statement,
        timeout_seconds=timeout,
        fetch_size=ctx.settings.source_fetch_size,
        source_name=source_name,
    )
    try:
        for block in blocks:
            ctx.crash_point("reading_source")
            snapshot_repo.add_copy_block(load, block)
            ctx.crash_point("writing_snapshot")
            if progress is not None:
                progress.advance(len(block))
    except BaseException:
        load.abort()
        raise
    ctx.crash_point("loading_staging")
    loaded = load.finish()
    snapshot_repo.set_member_count(session, snapshot_id, loaded.members)
    return snapshot_id, loaded.members, loaded.skipped


def _load_streamed(
    ctx: ServiceContext,
    session: Session,
    audience_id: int,
    url: str,
    query: AudienceQuery,
    source_name: str,
    timeout: float,
    progress: Progress | None,
) -> tuple[int, int, dict[str, int]]:
    skipped: dict[str, int] = {}
    received = 0
    snapshot_id = snapshot_repo.create_snapshot(session, audience_id, now=ctx.clock())
    chunks = stream_source(
        url,
        query,
        timeout_seconds=timeout,
        fetch_size=ctx.settings.source_fetch_size,
        source_name=source_name,
    )
    for chunk in chunks:
        ctx.crash_point("reading_source")
        rows: list[SourceRow] = []
        for row in chunk:
            if isinstance(row, str):
                skipped[row] = skipped.get(row, 0) + 1
            else:
                rows.append(row)
        received += len(rows)
        snapshot_repo.add_members(session, snapshot_id, rows)
        ctx.crash_point("writing_snapshot")
        if progress is not None:
            progress.advance(len(chunk))
    ctx.crash_point("loading_staging")
    members = snapshot_repo.finish_snapshot(session, snapshot_id)
    if received > members:
        skipped["duplicate_id"] = received - members
    return snapshot_id, members, skipped
