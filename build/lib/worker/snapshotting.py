"""Taking a snapshot: stream the audience's query from its source into the state database."""

import time
from dataclasses import dataclass

from worker.config import resolve_source_url
from worker.context import ServiceContext
from worker.domain import Progress
from worker.repositories import snapshots as snapshot_repo
from worker.sources import SourceRow, stream_source


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
    query: str,
    timeout: float,
    progress: Progress | None = None,
) -> TakenSnapshot:
    """Stream the source into a new snapshot, in one transaction: a source failure or a
    crash leaves no snapshot behind. `progress` advances by each chunk's rows."""
    began = time.monotonic()
    skipped: dict[str, int] = {}
    received = 0
    url = resolve_source_url(source_name, url_template, ctx.env)
    with ctx.unit_of_work() as session:
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
        members = snapshot_repo.finish_snapshot(session, snapshot_id)
    if received > members:
        skipped["duplicate_id"] = received - members
    return TakenSnapshot(snapshot_id, members, skipped, time.monotonic() - began)
