"""Pruning our own tables that grow: vb_decision_log (by age and by row count) and vb_call_retries
(by age). Small batches, each one short statement on an index, so VICIdial's processes sharing
the database never wait behind a long delete. VICIdial's own tables are never touched."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from balancer.db.connection import Connection
from balancer.db.rows import one_row


@dataclass(frozen=True)
class PruneTarget:
    """One table of ours, its time column (indexed) and its primary key column."""

    table: str
    time_column: str


DECISIONS = PruneTarget("vb_decision_log", "decided_at")
RETRIES = PruneTarget("vb_call_retries", "retried_at")


def database_now(conn: Connection) -> datetime:
    """The database's clock (every cutoff is taken from it, like the lease's expiry)."""
    row = one_row(conn, "SELECT NOW()")
    assert row is not None and isinstance(row[0], datetime)
    return row[0]


def prune_older(conn: Connection, target: PruneTarget, cutoff: datetime, batch_rows: int) -> int:
    """Delete at most ``batch_rows`` rows older than ``cutoff``; the count deleted."""
    with conn.cursor() as cur:
        return int(
            cur.execute(
                f"DELETE FROM {target.table} WHERE {target.time_column} < %s"  # noqa: S608
                " LIMIT %s",
                (cutoff, batch_rows),
            )
        )


def decision_rows(conn: Connection) -> tuple[int, int]:
    """(lowest id, highest id) of vb_decision_log, (0, 0) when empty: its row count without a
    scan (ids grow by one per row and rows only ever leave from the old end)."""
    row = one_row(conn, "SELECT MIN(id), MAX(id) FROM vb_decision_log")
    if row is None or row[0] is None:
        return 0, 0
    return int(row[0]), int(row[1])


def prune_beyond(conn: Connection, max_rows: int, batch_rows: int) -> int:
    """Delete at most ``batch_rows`` of the oldest decision rows past the newest ``max_rows``."""
    low, high = decision_rows(conn)
    cutoff = high - max_rows
    if high == 0 or cutoff < low:
        return 0
    with conn.cursor() as cur:
        return int(
            cur.execute(
                "DELETE FROM vb_decision_log WHERE id <= %s ORDER BY id LIMIT %s",
                (cutoff, batch_rows),
            )
        )
