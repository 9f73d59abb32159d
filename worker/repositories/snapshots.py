"""Snapshots: the staging table a run's source result lands in, its bad-row rules in SQL,
and applying it to the audience's membership (current members once, exits as a log).

Each snapshot has its own staging table, `staged_members_<snapshot id>` (UNLOGGED on
PostgreSQL: it is rebuilt from the source whenever it is lost). It lives from the source
read until its run ends; when the run's changes are planned the run applies it to
`audience_members` and `membership_log`, writing only what changed. A snapshot of a
blocked run or a dry run is dropped unapplied; a dead run's staging table is dropped by a
later run.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.copy import QueuedLibpqWriter
from sqlalchemy import (
    Boolean,
    Column,
    MetaData,
    String,
    Table,
    and_,
    delete,
    exists,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from models import Audience, AudienceMember, MembershipPeriod, Snapshot, SyncRun
from worker.repositories.dialect import insert_for, is_postgresql, tune_for_whole_audience
from worker.sources import MAX_EMAIL_LENGTH, MAX_ID_LENGTH, PADDED_ID, CopyBlock, SourceRow

# Snapshots this large refresh the planner's statistics before they are diffed.
ANALYZE_THRESHOLD = 10_000
STAGING_PREFIX = "staged_members_"
# What Python's str.strip() removes (every character whose str.isspace() is true, written out:
# working it out costs a tenth of a second at every start): the bad-row rules in SQL trim
# exactly as the streamed path does, so both paths keep and count the same rows.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_STAGING_NAME = re.compile(rf"^{STAGING_PREFIX}(\d+)$")
_RUNNING = "running"  # worker.domain.RunStatus.RUNNING (the domain layer is not imported here)


@dataclass(frozen=True, slots=True)
class LoadedStaging:
    """What the bad-row rules left in a staging table loaded by COPY."""

    members: int
    skipped: dict[str, int]  # reason -> rows, as the streamed path counts them


@dataclass(frozen=True, slots=True)
class MembershipSpan:
    """One period of a user's membership: entered in one snapshot, exited in another (None:
    still a member)."""

    entered_snapshot_id: int
    exited_snapshot_id: int | None
    exited_at: datetime | None


def staging_name(snapshot_id: int) -> str:
    return f"{STAGING_PREFIX}{int(snapshot_id)}"


def staged(snapshot_id: int) -> Table:
    """The staging table of a snapshot, as a selectable: member_id, is_anonymous, email, and
    the anonymous_id that travels with a user id."""
    return Table(
        staging_name(snapshot_id),
        MetaData(),
        Column("member_id", String(MAX_ID_LENGTH), primary_key=True),
        Column("is_anonymous", Boolean),
        Column("email", String(MAX_EMAIL_LENGTH)),
        Column("anonymous_id", String(MAX_ID_LENGTH)),
    )


def _create_staging(session: Session, snapshot_id: int) -> None:
    # anonymous_id is text, as in every staging table: in the usual audience it is NULL in
    # every row, its statistics then give it no width, and the planner falls back on the
    # declared type's: 516 bytes a row for varchar(255), against 32 for text, which made
    # it plan the diff's hash join in batches spilled to disk.
    unlogged = "UNLOGGED " if is_postgresql(session) else ""
    session.execute(
        text(
            f"CREATE {unlogged}TABLE {staging_name(snapshot_id)} "
            f"(member_id varchar({MAX_ID_LENGTH}) PRIMARY KEY, is_anonymous boolean NOT NULL, "
            f"email varchar({MAX_EMAIL_LENGTH}), anonymous_id text)"
        )
    )


def create_snapshot(
    session: Session, audience_id: int, *, now: datetime, with_staging: bool = True
) -> int:
    """A new snapshot and its (empty) staging table, for rows given to `add_members`.
    Without staging the caller loads it with `load_by_copy`."""
    snapshot = Snapshot(audience_id=audience_id, created_at=now, member_count=0)
    session.add(snapshot)
    session.flush()
    if with_staging:
        _create_staging(session, snapshot.id)
    return snapshot.id


def add_members(session: Session, snapshot_id: int, rows: Sequence[SourceRow]) -> None:
    """Insert one chunk of cleaned members into the staging table; a duplicate id within
    the result is kept once (the first one read).

    PostgreSQL gets the chunk through COPY into a temporary table and one INSERT ... SELECT;
    other backends through one multi-row INSERT per chunk.
    """
    if not rows:
        return
    name = staging_name(snapshot_id)
    if is_postgresql(session):
        _copy_members(session, name, rows)
        return
    statement = insert_for(session, staged(snapshot_id)).on_conflict_do_nothing()
    session.execute(
        statement,
        [
            {
                "member_id": row.member_id,
                "is_anonymous": row.is_anonymous,
                "email": row.email,
                "anonymous_id": row.anonymous_id,
            }
            for row in rows
        ],
    )


def _copy_members(session: Session, name: str, rows: Sequence[SourceRow]) -> None:
    driver: Any = session.connection().connection.driver_connection
    with driver.cursor() as cursor:
        # Lives until the snapshot's transaction ends; duplicates are dropped on the way in.
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS snapshot_stage "
            "(member_id text, is_anonymous boolean, email text, anonymous_id text) ON COMMIT DROP"
        )
        with cursor.copy(
            "COPY snapshot_stage (member_id, is_anonymous, email, anonymous_id) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row((row.member_id, row.is_anonymous, row.email, row.anonymous_id))
        cursor.execute(
            f"INSERT INTO {name} (member_id, is_anonymous, email, anonymous_id) "
            "SELECT member_id, is_anonymous, email, anonymous_id FROM snapshot_stage "
            "ON CONFLICT DO NOTHING"
        )
        cursor.execute("TRUNCATE snapshot_stage")


class CopyLoad:
    """Raw source rows streamed by COPY into a snapshot's raw staging table (PostgreSQL).

    The bytes go through untouched (COPY text format, columns user_id, anonymous_id,
    email): rows never become Python objects. `finish` then applies the bad-row rules in
    SQL and leaves the cleaned staging table.
    """

    def __init__(self, session: Session, snapshot_id: int) -> None:
        self._session = session
        self._snapshot_id = snapshot_id
        self._raw = f"{staging_name(snapshot_id)}_raw"
        driver: Any = session.connection().connection.driver_connection
        self._cursor = driver.cursor()
        tune_for_whole_audience(session)
        self._cursor.execute(
            f"CREATE UNLOGGED TABLE {self._raw} (user_id text, anonymous_id text, email text)"
        )
        # The driver sends to the state database from a thread of its own, while this one
        # reads the source: the two databases work at the same time. FREEZE (the table is
        # new in this transaction) writes the rows frozen and all-visible, so the later
        # scans of the staging table do not each rewrite every page to set hint bits.
        self._copy_context = self._cursor.copy(
            f"COPY {self._raw} (user_id, anonymous_id, email) FROM STDIN (FREEZE)",
            writer=QueuedLibpqWriter(self._cursor),
        )
        self._copy = self._copy_context.__enter__()

    def write(self, block: CopyBlock) -> None:
        """Write a block of COPY text rows as its source sent them."""
        self._copy.write(block.data)

    def abort(self) -> None:
        """The source failed: stop the COPY (the transaction is rolled back by the caller)."""
        try:
            self._copy_context.__exit__(RuntimeError, RuntimeError("source failed"), None)
        finally:
            self._cursor.close()

    def finish(self) -> LoadedStaging:
        """End the COPY, apply the bad-row rules, and leave the cleaned staging table."""
        self._copy_context.__exit__(None, None, None)
        cursor, raw = self._cursor, self._raw
        name = staging_name(self._snapshot_id)
        # The usual case first: one scan says whether any row needs a rule at all (ids and
        # emails present, short enough and unpadded; no anonymous id), then distinct ids are
        # counted. Only a source with bad rows pays for the rules' per-row work below.
        # Two statements: the check runs in parallel, and each alone is faster than both
        # in one scan.
        cursor.execute(
            f"SELECT count(*) FILTER (WHERE {_UNTOUCHED} IS NOT TRUE), count(*) FROM {raw}",
            {"ws": WHITESPACE},
        )
        needing_rules, rows = cursor.fetchone()
        if not needing_rules:
            distinct_ids = _count_distinct_ids(cursor, raw, rows)
            null_ids, too_long, padded, valid, members, changed = 0, 0, 0, rows, distinct_ids, 0
        else:
            null_ids, too_long, padded, valid, members, changed = self._apply_rules(cursor, raw)
        if not changed and members == valid:
            # Every row is kept as it came (the usual case): the raw table becomes the
            # staging table by renames, which touch no row.
            cursor.execute(f"ALTER TABLE {raw} RENAME TO {name}")
            cursor.execute(f"ALTER TABLE {name} RENAME COLUMN user_id TO member_id")
            # No row has an anonymous id travelling with its user id (see `changed`).
            cursor.execute(f"ALTER TABLE {name} DROP COLUMN anonymous_id")
            cursor.execute(f"ALTER TABLE {name} ADD COLUMN anonymous_id text")
            cursor.execute(
                f"ALTER TABLE {name} ADD COLUMN is_anonymous boolean NOT NULL DEFAULT false"
            )
        else:
            # Duplicates keep the first row read (COPY appends in order, so physical order
            # is read order), as the streamed path's ON CONFLICT DO NOTHING does.
            distinct = "DISTINCT ON (member_id) " if members < valid else ""
            order = " ORDER BY member_id, ord" if members < valid else ""
            rules = _clean_select(raw)
            cursor.execute(
                f"CREATE UNLOGGED TABLE {name} AS SELECT {distinct}"
                f"member_id::varchar({MAX_ID_LENGTH}) AS member_id, is_anonymous, "
                f"email::varchar({MAX_EMAIL_LENGTH}) AS email, "
                "anonymous_id::text AS anonymous_id "
                f"FROM ({rules}) AS r WHERE reason IS NULL{order}",
                {"ws": WHITESPACE},
            )
            cursor.execute(f"DROP TABLE {raw}")
        cursor.close()
        skipped = {
            "null_id": null_ids,
            "id_too_long": too_long,
            PADDED_ID: padded,
            "duplicate_id": valid - members,
        }
        return LoadedStaging(members, {k: v for k, v in skipped.items() if v})

    @staticmethod
    def _apply_rules(cursor: Any, raw: str) -> tuple[int, int, int, int, int, int]:
        """Counts of the bad-row rules over the raw table: ids NULL and too long, ids
        padded, rows kept, distinct ids kept, and rows the rules change."""
        rules = _clean_select(raw)
        cursor.execute(
            "SELECT count(*) FILTER (WHERE reason = 'null_id'), "
            "count(*) FILTER (WHERE reason = 'id_too_long'), "
            "count(*) FILTER (WHERE reason IS NULL AND padded), "
            "count(*) FILTER (WHERE reason IS NULL), "
            'count(DISTINCT member_id COLLATE "C") FILTER (WHERE reason IS NULL), '
            "count(*) FILTER (WHERE reason IS NOT NULL OR is_anonymous "
            "OR email IS DISTINCT FROM raw_email OR anonymous_id IS NOT NULL) "
            f"FROM ({rules}) AS r",
            {"ws": WHITESPACE},
        )
        counts: tuple[int, int, int, int, int, int] = cursor.fetchone()
        return counts


def _count_distinct_ids(cursor: Any, raw: str, rows: int) -> int:
    """Distinct ids among the raw table's `rows` rows. Ids are hashed to 64 bits first:
    sorting the hashes is three times faster than sorting the ids, and as many distinct
    hashes as rows proves every id distinct. Fewer (duplicates, or a collision) and the
    ids themselves are counted."""
    cursor.execute(f"SELECT count(DISTINCT hashtextextended(user_id, 0)) FROM {raw}")
    [distinct_hashes] = cursor.fetchone()
    if distinct_hashes == rows:
        return rows
    cursor.execute(f'SELECT count(DISTINCT user_id COLLATE "C") FROM {raw}')
    [distinct_ids] = cursor.fetchone()
    return int(distinct_ids)


def add_copy_block(load: CopyLoad, block: CopyBlock) -> None:
    """Write one block of raw COPY rows to a snapshot being loaded by COPY."""
    load.write(block)


def _padded(column: str) -> str:
    """SQL: the text starts or ends with whitespace (two one-character lookups; cheaper than
    trimming every value)."""
    return (
        f"({column} <> '' AND (strpos(%(ws)s, left({column}, 1)) > 0 "
        f"OR strpos(%(ws)s, right({column}, 1)) > 0))"
    )


def _has_id(column: str) -> str:
    """SQL: the text is an id (not NULL, not empty, not only whitespace); trimmed only when
    it starts with whitespace."""
    return (
        f"({column} IS NOT NULL AND {column} <> '' AND (strpos(%(ws)s, left({column}, 1)) = 0 "
        f"OR btrim({column}, %(ws)s) <> ''))"
    )


# SQL over a raw staging table: the rules keep the row exactly as it came (its id present,
# short enough and unpadded, no anonymous id beside it, its email absent or short enough and
# unpadded). NULL when the id is NULL.
_UNTOUCHED = (
    f"(user_id <> '' AND char_length(user_id) <= {MAX_ID_LENGTH} AND NOT {_padded('user_id')} "
    f"AND anonymous_id IS NULL AND (email IS NULL OR (email <> '' "
    f"AND char_length(email) <= {MAX_EMAIL_LENGTH} AND NOT {_padded('email')})))"
)


def _clean_select(raw: str) -> str:
    """The bad-row rules of `worker.sources.clean_row`, as SQL over the raw staging table:
    per row the member id, anonymity, email, whether the id is padded, and the reason the
    row is skipped (NULL: kept). PostgreSQL text holds no NUL, so `invalid_id` cannot occur."""
    user_ok, anon_ok = _has_id("user_id"), _has_id("anonymous_id")
    email = f"CASE WHEN {_padded('email')} THEN btrim(email, %(ws)s) ELSE email END"
    return (
        "SELECT member_id, is_anonymous, anonymous_id, ord, raw_email, "
        f"{_padded('member_id')} AS padded, "
        "CASE WHEN member_id IS NULL THEN 'null_id' "
        f"WHEN char_length(member_id) > {MAX_ID_LENGTH} THEN 'id_too_long' END AS reason, "
        f"CASE WHEN char_length(e) BETWEEN 1 AND {MAX_EMAIL_LENGTH} THEN e END AS email "
        "FROM (SELECT ctid AS ord, email AS raw_email, "
        f"CASE WHEN {user_ok} THEN user_id WHEN {anon_ok} THEN anonymous_id END AS member_id, "
        f"NOT {user_ok} AS is_anonymous, {email} AS e, "
        # The anonymous id travelling with a user id, kept when it could be an id.
        f"CASE WHEN {user_ok} AND {anon_ok} AND char_length(anonymous_id) <= {MAX_ID_LENGTH} "
        f"THEN anonymous_id END AS anonymous_id FROM {raw} "
        # OFFSET 0 keeps the subquery from being flattened: each row's id is worked out
        # once, not again in every expression that uses it (three times faster).
        "OFFSET 0) AS c"
    )


def finish_snapshot(session: Session, snapshot_id: int) -> int:
    """Store and return the member count of a fully written snapshot."""
    count = session.scalar(select(func.count()).select_from(staged(snapshot_id))) or 0
    set_member_count(session, snapshot_id, count)
    return count


def set_member_count(session: Session, snapshot_id: int, count: int) -> None:
    session.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(member_count=count))
    if count >= ANALYZE_THRESHOLD and is_postgresql(session):
        # Fresh statistics, so the diff that follows is planned as hash joins of the right
        # size. It needs only the row count, the widths and that ids are unique, which a
        # sample of 3,000 rows gives as well as the default 30,000, ten times sooner.
        session.execute(text("SET LOCAL default_statistics_target = 10"))
        session.execute(text(f"ANALYZE {staging_name(snapshot_id)}"))
        session.execute(text("SET LOCAL default_statistics_target TO DEFAULT"))


def previous_member_count(session: Session, audience_id: int, before_id: int) -> int | None:
    """Member count of the audience's latest snapshot before `before_id` (None: first)."""
    return session.scalar(
        select(Snapshot.member_count)
        .where(Snapshot.audience_id == audience_id, Snapshot.id < before_id)
        .order_by(Snapshot.id.desc())
        .limit(1)
    )


def apply_snapshot(session: Session, audience_id: int, snapshot_id: int, *, now: datetime) -> None:
    """Make the snapshot the audience's current membership, writing only the difference:
    members gone get their period closed in the log, new members a row. Runs of the
    audience's other destinations apply one at a time (the audience row is locked until
    the transaction ends)."""
    session.execute(select(Audience.id).where(Audience.id == audience_id).with_for_update())
    if is_postgresql(session):
        _apply_in_one_pass(session, audience_id, snapshot_id, now=now)
    else:
        _apply_by_anti_joins(session, audience_id, snapshot_id, now=now)


def _apply_by_anti_joins(
    session: Session, audience_id: int, snapshot_id: int, *, now: datetime
) -> None:
    """Any backend: members gone are logged, then deleted; new members inserted."""
    stage = staged(snapshot_id)
    member = AudienceMember
    mine = member.audience_id == audience_id
    gone = and_(mine, ~exists().where(stage.c.member_id == member.member_id))
    log_columns = [
        "audience_id",
        "member_id",
        "entered_snapshot_id",
        "exited_snapshot_id",
        "exited_at",
    ]
    exited_at = literal(now, MembershipPeriod.exited_at.type)
    log = select(
        member.audience_id,
        member.member_id,
        member.entered_snapshot_id,
        literal(snapshot_id),
        exited_at,
    ).where(gone)
    session.execute(
        insert_for(session, MembershipPeriod.__table__)  # type: ignore[arg-type]
        .from_select(log_columns, log)
        .on_conflict_do_nothing()
    )
    session.execute(delete(member).where(gone).execution_options(synchronize_session=False))
    session.execute(
        insert_for(session, member.__table__)  # type: ignore[arg-type]
        .from_select(
            ["audience_id", "member_id", "entered_snapshot_id"],
            select(literal(audience_id), stage.c.member_id, literal(snapshot_id)).where(
                ~exists().where(mine, member.member_id == stage.c.member_id)
            ),
        )
        .on_conflict_do_nothing()
    )


def _apply_in_one_pass(
    session: Session, audience_id: int, snapshot_id: int, *, now: datetime
) -> None:
    """PostgreSQL: one full join of the staging table with the current members finds who
    entered and who left (a single pass over both, where two anti-joins would take two);
    the few rows that changed are then inserted, deleted and logged in the same statement."""
    session.execute(
        text(
            "WITH diff AS MATERIALIZED ("
            "SELECT s.member_id AS entering, m.member_id AS leaving "
            f"FROM {staging_name(snapshot_id)} AS s FULL JOIN "
            "(SELECT member_id FROM audience_members WHERE audience_id = :audience_id) AS m "
            "ON m.member_id = s.member_id WHERE s.member_id IS NULL OR m.member_id IS NULL), "
            "entered AS (INSERT INTO audience_members (audience_id, member_id, "
            "entered_snapshot_id) SELECT :audience_id, entering, :snapshot_id FROM diff "
            "WHERE entering IS NOT NULL ON CONFLICT DO NOTHING), "
            # The leavers as an array: looked up by key, not by another scan of the members.
            "removed AS (DELETE FROM audience_members WHERE audience_id = :audience_id "
            "AND member_id = ANY(ARRAY(SELECT leaving FROM diff WHERE leaving IS NOT NULL)) "
            "RETURNING member_id, entered_snapshot_id) "
            "INSERT INTO membership_log (audience_id, member_id, entered_snapshot_id, "
            "exited_snapshot_id, exited_at) SELECT :audience_id, member_id, "
            "entered_snapshot_id, :snapshot_id, :now FROM removed ON CONFLICT DO NOTHING"
        ),
        {"audience_id": audience_id, "snapshot_id": snapshot_id, "now": now},
    )


def drop_staging(session: Session, snapshot_id: int) -> None:
    session.execute(text(f"DROP TABLE IF EXISTS {staging_name(snapshot_id)}"))


def _staging_tables(session: Session) -> dict[int, str]:
    if is_postgresql(session):
        names = session.scalars(
            text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        )
    else:
        names = session.scalars(text("SELECT name FROM sqlite_master WHERE type = 'table'"))
    found = {}
    for name in names:
        match = _STAGING_NAME.match(str(name))
        if match:
            found[int(match.group(1))] = str(name)
    return found


def drop_stale_staging(session: Session) -> int:
    """Drop the staging tables that runs which stopped left behind (those of running runs
    stay). Returns how many were dropped."""
    tables = _staging_tables(session)
    if not tables:
        return 0
    running = set(
        session.scalars(
            select(SyncRun.snapshot_id).where(
                SyncRun.status == _RUNNING, SyncRun.snapshot_id.is_not(None)
            )
        )
    )
    stale = [snapshot_id for snapshot_id in tables if snapshot_id not in running]
    for snapshot_id in stale:
        drop_staging(session, snapshot_id)
    return len(stale)


def delete_snapshot(session: Session, snapshot_id: int) -> None:
    """Forget an unapplied snapshot (a blocked run's, a dry run's) and its staging."""
    drop_staging(session, snapshot_id)
    session.execute(delete(Snapshot).where(Snapshot.id == snapshot_id))


def prune_snapshots(session: Session, audience_id: int, *, keep: int, protect: set[int]) -> int:
    """Delete all but the newest `keep` snapshot rows of the audience (never those in
    `protect`, which running syncs still read). Returns how many were deleted. Membership
    history stays in the log, pruned by `prune_log`."""
    keep_ids = session.scalars(
        select(Snapshot.id)
        .where(Snapshot.audience_id == audience_id)
        .order_by(Snapshot.id.desc())
        .limit(keep)
    ).all()
    doomed = session.scalars(
        select(Snapshot.id).where(
            Snapshot.audience_id == audience_id,
            Snapshot.id.not_in(set(keep_ids) | protect),
        )
    ).all()
    if doomed:
        session.execute(delete(Snapshot).where(Snapshot.id.in_(doomed)))
    return len(doomed)


def prune_log(session: Session, audience_id: int, *, before: datetime) -> int:
    """Forget membership periods of the audience that ended before `before` (retention)."""
    result = session.execute(
        delete(MembershipPeriod).where(
            MembershipPeriod.audience_id == audience_id, MembershipPeriod.exited_at < before
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def current_member_count(session: Session, audience_id: int) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(AudienceMember)
            .where(AudienceMember.audience_id == audience_id)
        )
        or 0
    )


def _members_at_select(audience_id: int, snapshot_id: int) -> Any:
    current = select(AudienceMember.member_id).where(
        AudienceMember.audience_id == audience_id,
        AudienceMember.entered_snapshot_id <= snapshot_id,
    )
    past = select(MembershipPeriod.member_id).where(
        MembershipPeriod.audience_id == audience_id,
        MembershipPeriod.entered_snapshot_id <= snapshot_id,
        MembershipPeriod.exited_snapshot_id > snapshot_id,
    )
    return current.union_all(past)


def members_at(session: Session, audience_id: int, snapshot_id: int) -> list[str]:
    """The audience's members as of an applied snapshot, from the current membership and the
    log (complete for snapshots newer than the log's retention), in member_id order."""
    query = _members_at_select(audience_id, snapshot_id).subquery()
    return list(session.scalars(select(query.c.member_id).order_by(query.c.member_id)))


def count_members_at(session: Session, audience_id: int, snapshot_id: int) -> int:
    query = _members_at_select(audience_id, snapshot_id).subquery()
    return session.scalar(select(func.count()).select_from(query)) or 0


def membership_spans(session: Session, audience_id: int, member_id: str) -> list[MembershipSpan]:
    """A user's membership periods in the audience, oldest first (as far back as the log's
    retention reaches)."""
    past = session.execute(
        select(
            MembershipPeriod.entered_snapshot_id,
            MembershipPeriod.exited_snapshot_id,
            MembershipPeriod.exited_at,
        )
        .where(MembershipPeriod.audience_id == audience_id, MembershipPeriod.member_id == member_id)
        .order_by(MembershipPeriod.exited_snapshot_id)
    ).all()
    spans = [MembershipSpan(int(e), int(x), at) for e, x, at in past]
    entered = session.scalar(
        select(AudienceMember.entered_snapshot_id).where(
            AudienceMember.audience_id == audience_id, AudienceMember.member_id == member_id
        )
    )
    if entered is not None:
        spans.append(MembershipSpan(int(entered), None, None))
    return spans


def _snapshot_times(session: Session, snapshot_ids: set[int]) -> dict[int, datetime]:
    """When each snapshot was taken: its row while kept, else the start of the run that took
    it (runs are kept longer than snapshot rows)."""
    if not snapshot_ids:
        return {}
    times: dict[int, datetime] = {
        int(i): at
        for i, at in session.execute(
            select(SyncRun.snapshot_id, SyncRun.started_at).where(
                SyncRun.snapshot_id.in_(snapshot_ids)
            )
        )
        if i is not None
    }
    times.update(
        (int(i), at)
        for i, at in session.execute(
            select(Snapshot.id, Snapshot.created_at).where(Snapshot.id.in_(snapshot_ids))
        )
    )
    return times


def member_history(
    session: Session, audience_id: int, member_id: str
) -> list[tuple[datetime, bool]]:
    """When the user entered (True) or exited (False) the audience, oldest first, read from
    the membership log (as far back as its retention reaches)."""
    spans = membership_spans(session, audience_id, member_id)
    times = _snapshot_times(session, {span.entered_snapshot_id for span in spans})
    events: list[tuple[datetime, bool]] = []
    for span in spans:
        entered_at = times.get(span.entered_snapshot_id)
        if entered_at is not None:
            events.append((entered_at, True))
        if span.exited_at is not None:
            events.append((span.exited_at, False))
    return events


def latest_membership(
    session: Session, audience_id: int, member_id: str
) -> tuple[int, datetime, bool] | None:
    """(snapshot id, taken at, whether the user is a member) of the audience's latest
    snapshot; None before its first. Membership is the current one, kept once."""
    latest = session.execute(
        select(Snapshot.id, Snapshot.created_at)
        .where(Snapshot.audience_id == audience_id)
        .order_by(Snapshot.id.desc())
        .limit(1)
    ).first()
    if latest is None:
        return None
    return int(latest[0]), latest[1], is_member(session, audience_id, member_id)


def is_member(session: Session, audience_id: int, member_id: str) -> bool:
    """Whether the user is a member as of the audience's latest applied snapshot."""
    return (
        session.scalar(
            select(literal(1)).where(
                AudienceMember.audience_id == audience_id,
                AudienceMember.member_id == member_id,
            )
        )
        is not None
    )


def latest_snapshots(
    session: Session, audience_ids: Sequence[int]
) -> dict[int, tuple[int, datetime]]:
    """Each audience's latest snapshot, (id, taken at), in one statement; an audience
    without a snapshot is absent. Reads ix_snapshots_audience_created."""
    if not audience_ids:
        return {}
    latest = (
        select(func.max(Snapshot.id))
        .where(Snapshot.audience_id.in_(audience_ids))
        .group_by(Snapshot.audience_id)
    )
    return {
        int(audience_id): (int(snapshot_id), created_at)
        for audience_id, snapshot_id, created_at in session.execute(
            select(Snapshot.audience_id, Snapshot.id, Snapshot.created_at).where(
                Snapshot.id.in_(latest)
            )
        )
    }


def current_entries(
    session: Session, audience_ids: Sequence[int], member_id: str
) -> dict[int, int]:
    """The snapshot each audience the user is currently a member of took them in, in one
    statement (the audience_members key is audience_id, member_id)."""
    if not audience_ids:
        return {}
    return {
        int(audience_id): int(entered)
        for audience_id, entered in session.execute(
            select(AudienceMember.audience_id, AudienceMember.entered_snapshot_id).where(
                AudienceMember.audience_id.in_(audience_ids),
                AudienceMember.member_id == member_id,
            )
        )
    }


def member_histories(
    session: Session,
    audience_ids: Sequence[int],
    member_id: str,
    current: dict[int, int],
) -> dict[int, list[tuple[datetime, bool]]]:
    """`member_history` of several audiences at once: the user's entries (True) and exits
    (False) per audience, oldest first, in a fixed number of statements. `current` is what
    `current_entries` returned for the same audiences and user."""
    if not audience_ids:
        return {}
    spans: dict[int, list[MembershipSpan]] = {}
    for audience_id, entered, exited, exited_at in session.execute(
        select(
            MembershipPeriod.audience_id,
            MembershipPeriod.entered_snapshot_id,
            MembershipPeriod.exited_snapshot_id,
            MembershipPeriod.exited_at,
        )
        .where(
            MembershipPeriod.audience_id.in_(audience_ids),
            MembershipPeriod.member_id == member_id,
        )
        .order_by(MembershipPeriod.audience_id, MembershipPeriod.exited_snapshot_id)
    ):
        spans.setdefault(int(audience_id), []).append(
            MembershipSpan(int(entered), int(exited), exited_at)
        )
    for audience_id, entered in current.items():
        spans.setdefault(audience_id, []).append(MembershipSpan(entered, None, None))
    times = _entry_times(
        session,
        audience_ids,
        {span.entered_snapshot_id for found in spans.values() for span in found},
    )
    histories: dict[int, list[tuple[datetime, bool]]] = {}
    for audience_id, found in spans.items():
        events = histories.setdefault(audience_id, [])
        for span in found:
            entered_at = times.get(span.entered_snapshot_id)
            if entered_at is not None:
                events.append((entered_at, True))
            if span.exited_at is not None:
                events.append((span.exited_at, False))
    return histories


def _entry_times(
    session: Session, audience_ids: Sequence[int], snapshot_ids: set[int]
) -> dict[int, datetime]:
    """`_snapshot_times` for snapshots of the given audiences: the snapshot row while kept,
    else the start of the run that took it. The runs are read only for snapshots no longer
    kept, narrowed by audience so ix_sync_runs_pair_started serves (sync_runs.snapshot_id
    has no index of its own)."""
    if not snapshot_ids:
        return {}
    times: dict[int, datetime] = {
        int(i): at
        for i, at in session.execute(
            select(Snapshot.id, Snapshot.created_at).where(Snapshot.id.in_(snapshot_ids))
        )
    }
    missing = snapshot_ids - times.keys()
    if missing:
        times.update(
            (int(i), at)
            for i, at in session.execute(
                select(SyncRun.snapshot_id, SyncRun.started_at).where(
                    SyncRun.audience_id.in_(audience_ids), SyncRun.snapshot_id.in_(missing)
                )
            )
            if i is not None
        )
    return times
