"""Keeping the state database small and its statistics fresh on PostgreSQL: VACUUM and
ANALYZE outside any transaction, when a table has changed enough to need them.

Runs delete what they planned once it is delivered, and move a few rows of the large
tables each time. Each table is vacuumed once the rows changed since its last VACUUM
reach a twentieth of it (autovacuum waits for a fifth, or may be off), so the state stays
near its live size; and analyzed once they reach a tenth, so the next diff is planned on
the right sizes. A run at 1% churn therefore pays for neither; about one run in five
does, instead of every run rescanning ten-million-row tables and their indexes. A drained
`run_changes` is handed back to the file system at once.
"""

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

LARGE_TABLES = ("synced_members", "audience_members", "membership_log", "failing_members")
# Rows changed since the last VACUUM (dead or inserted) / since the last ANALYZE, as a
# share of the table's live rows, that make one due; never below MIN_CHANGED_ROWS.
VACUUM_FRACTION, ANALYZE_FRACTION, MIN_CHANGED_ROWS = 0.05, 0.10, 1_000


@dataclass(frozen=True, slots=True)
class TableUpkeep:
    table: str
    is_vacuum_due: bool
    is_analyze_due: bool

    @property
    def statement(self) -> str:
        if self.is_vacuum_due and self.is_analyze_due:
            return f"VACUUM (ANALYZE) {self.table}"
        return f"VACUUM {self.table}" if self.is_vacuum_due else f"ANALYZE {self.table}"


def keep_up(sessions: sessionmaker[Session]) -> list[TableUpkeep]:
    """After a run (PostgreSQL only; SQLite reuses pages itself): empty a drained
    `run_changes`, then VACUUM and ANALYZE the large tables that are due. Returns what was
    due."""
    with sessions() as session:
        if session.get_bind().dialect.name != "postgresql":
            return []
        _truncate_drained_changes(session)
        due = upkeep_due(session)
        session.commit()  # VACUUM runs outside any transaction
        connection = session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        for upkeep in due:
            connection.execute(text(upkeep.statement))
        return due


def upkeep_due(session: Session) -> list[TableUpkeep]:
    """The large tables whose changes since their last VACUUM or ANALYZE (as PostgreSQL's
    statistics count them) make one due."""
    rows = session.execute(
        text(
            "SELECT relname, "
            "n_dead_tup + n_ins_since_vacuum >= greatest(:least, :vacuum * n_live_tup), "
            "n_mod_since_analyze >= greatest(:least, :analyze * n_live_tup) "
            "FROM pg_stat_user_tables "
            "WHERE schemaname = current_schema() AND relname = ANY(:tables) ORDER BY relname"
        ),
        {
            "least": MIN_CHANGED_ROWS,
            "vacuum": VACUUM_FRACTION,
            "analyze": ANALYZE_FRACTION,
            "tables": list(LARGE_TABLES),
        },
    ).all()
    return [TableUpkeep(str(r[0]), bool(r[1]), bool(r[2])) for r in rows if r[1] or r[2]]


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
