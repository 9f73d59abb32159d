"""Keeping the state database small on PostgreSQL: VACUUM outside any transaction.

Runs delete what they planned once it is delivered, and move only a few rows of the large
tables each time; VACUUM makes that space reusable at once (and hands a drained
`run_changes` back to the file system), so the state stays near its live size instead of
waiting for autovacuum's 20% threshold.
"""

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

# Worth it once a run moved this many rows of the large tables.
LARGE_TABLES = ("synced_members", "audience_members", "membership_log", "failing_members")
VACUUM_AFTER_CHANGES = 1_000


def reclaim_space(sessions: sessionmaker[Session], *, changes: int) -> None:
    """VACUUM what a finished run left dead (PostgreSQL only; SQLite reuses pages itself)."""
    with sessions() as session:
        if session.get_bind().dialect.name != "postgresql":
            return
        _truncate_drained_changes(session)
        if changes < VACUUM_AFTER_CHANGES:
            return
        connection = session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        connection.execute(text(f"VACUUM {', '.join(LARGE_TABLES)}"))


def _truncate_drained_changes(session: Session) -> None:
    """Empty `run_changes` for good (heap and index) when no run has changes in it. The
    lock is only tried briefly: another run planning or delivering keeps it, and then the
    table stays as it is until a later run finds it drained."""
    try:
        session.execute(text("SET LOCAL lock_timeout = '100ms'"))
        session.execute(text("LOCK TABLE run_changes IN ACCESS EXCLUSIVE MODE"))
        if session.scalar(text("SELECT NOT EXISTS (SELECT 1 FROM run_changes)")):
            session.execute(text("TRUNCATE run_changes"))
        session.commit()
    except OperationalError:
        session.rollback()
