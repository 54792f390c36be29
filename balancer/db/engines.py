"""Which storage engines the tables a balance call writes have, and so which write path runs.

VICIdial creates its tables MyISAM and MEMORY (no transactions); some sites convert them to
InnoDB. The ordered, fenced writes and the repair step are used on every engine; when EVERY
table a call writes is transactional, each call also runs in one transaction (an error then
undoes it at once). A mix counts as non-transactional: a rollback would undo only part of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from balancer.db.connection import Connection
from balancer.db.rows import all_rows, placeholders, text

# Every table `write_call` writes (balancer/db/calls.py).
CALL_TABLES: tuple[str, ...] = (
    "vicidial_hopper",
    "vicidial_list",
    "vicidial_auto_calls",
    "vicidial_manager",
    "vicidial_dial_log",
    "vicidial_dial_cid_log",
    "vicidial_lead_24hour_calls",
    "vicidial_lead_call_daily_counts",
    "vicidial_phone_number_call_daily_counts",
)
TRANSACTIONAL_ENGINES = frozenset({"InnoDB", "XtraDB"})
# The fence table must lock for a whole statement (see balancer/db/fence.py).
FENCE_TABLE = "vb_leader"
# Engines whose statements hold a table lock from start to end (see balancer/db/fence.py).
LOCKING_ENGINES = frozenset({"MyISAM", "Aria"})


@dataclass(frozen=True)
class WritePath:
    """The engines found and what follows from them."""

    engines: dict[str, str]  # table -> engine ('' when the table is missing)

    @property
    def transactional(self) -> bool:
        return all(self.engines.get(t, "") in TRANSACTIONAL_ENGINES for t in CALL_TABLES)

    @property
    def description(self) -> str:
        if self.transactional:
            return "ordered fenced writes + repair, and one transaction per call (all InnoDB)"
        return "ordered fenced writes + repair, no transactions (MyISAM/MEMORY tables)"


def table_engines(conn: Connection, tables: tuple[str, ...]) -> dict[str, str]:
    """table -> ENGINE in the current database ('' for a table that is not there)."""
    rows = all_rows(
        conn,
        "SELECT table_name, engine FROM information_schema.tables"  # noqa: S608
        f" WHERE table_schema = DATABASE() AND table_name IN ({placeholders(len(tables))})",
        *tables,
    )
    found = {text(name): text(engine) for name, engine in rows}
    return {table: found.get(table, "") for table in tables}


def write_path(conn: Connection) -> WritePath:
    """The engines of the call tables and of the fence table."""
    return WritePath(table_engines(conn, (*CALL_TABLES, FENCE_TABLE)))
