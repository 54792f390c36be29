"""A failure at every write of a balance call, on VICIdial's stock engines and on InnoDB: after
the repair step no Originate lacks its records or lead update, no lead stays claimed, and no
lead is ever dialed twice.

The fault is real: right before the k-th write statement of a cycle, the writer's connection is
KILLed from another connection, or the table that statement writes is renamed away (error 1146,
as when a table goes missing for a cycle). The repair step then runs as the next cycle would.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import balance_seed as seed
import pymysql
import pymysql.cursors
import pytest
from conftest import both_engines, fetchall

from balancer.db.connection import Connection, connect
from balancer.db.fence import LeaderFence
from balancer.db.repair import repair
from balancer.db.url import DatabaseUrl

_WRITE = re.compile(r"^\s*(INSERT INTO|UPDATE|DELETE FROM)\s+(\w+)", re.IGNORECASE)
# The writes of one cycle placing one call: claim, the six records, the Originate, the lead
# update (with its hopper row), then the placement's hopper delete.
WRITES = (
    "claim",
    "vicidial_auto_calls",
    "vicidial_dial_log",
    "vicidial_dial_cid_log",
    "vicidial_lead_24hour_calls",
    "vicidial_lead_call_daily_counts",
    "vicidial_phone_number_call_daily_counts",
    "vicidial_manager",
    "lead update",
    "hopper delete",
)


@pytest.fixture(params=["stock", "innodb"])
def database_url(request: pytest.FixtureRequest) -> DatabaseUrl:
    return both_engines(request)


class Fault:
    """Breaks the k-th write statement of a connection, once."""

    def __init__(self, side: Connection, k: int, mode: str) -> None:
        self.side, self.k, self.mode = side, k, mode
        self.writes: list[str] = []
        self.renamed: str | None = None

    def before(self, conn: Connection, sql: str) -> None:
        match = _WRITE.match(sql)
        if match is None:
            return
        self.writes.append(match.group(2))
        if len(self.writes) != self.k:
            return
        if self.mode == "kill":
            with self.side.cursor() as cur:
                cur.execute(f"KILL {int(conn.thread_id())}")
        else:
            self.renamed = match.group(2)
            with self.side.cursor() as cur:
                cur.execute(f"RENAME TABLE `{self.renamed}` TO `{self.renamed}_gone`")

    def restore(self) -> None:
        if self.renamed is not None:
            with self.side.cursor() as cur:
                cur.execute(f"RENAME TABLE `{self.renamed}_gone` TO `{self.renamed}`")
            self.renamed = None


class FaultyCursor(pymysql.cursors.Cursor):
    """A cursor that lets the connection's Fault act before each statement."""

    faults: ClassVar[dict[int, Fault]] = {}

    def execute(self, query: str, args: Any = None) -> int:
        conn = self.connection
        fault = self.faults.get(id(conn))
        if fault is not None:
            fault.before(conn, query)
        return int(super().execute(query, args))


@pytest.fixture
def side(database_url: DatabaseUrl) -> Iterator[Connection]:
    conn = connect(database_url)
    yield conn
    conn.close()


def check_after_repair(db: Connection, leads: int) -> None:
    """The invariants, then every lead still READY placed: each lead is dialed exactly once."""
    manager = fetchall(db, "SELECT callerid FROM vicidial_manager")
    codes = {str(r["callerid"]) for r in manager}
    assert len(codes) == len(manager)
    calls = {str(r["callerid"]) for r in fetchall(db, "SELECT callerid FROM vicidial_auto_calls")}
    assert calls == codes, "an Originate without its vicidial_auto_calls row, or the reverse"
    logged = {
        str(r["caller_code"]) for r in fetchall(db, "SELECT caller_code FROM vicidial_dial_log")
    }
    assert logged == codes
    for code in codes:
        lead = seed.one(
            db,
            "SELECT status, user, called_count FROM vicidial_list WHERE lead_id = %s",
            int(code[-10:]),
        )
        assert (lead["status"], lead["user"], lead["called_count"]) == ("NEW", "VDAD", 1)
    claimed = fetchall(
        db, "SELECT lead_id, status, user FROM vicidial_hopper WHERE status <> 'READY'"
    )
    assert claimed == [], f"leads left claimed: {claimed}"
    ready = {int(str(r["lead_id"])) for r in fetchall(db, "SELECT lead_id FROM vicidial_hopper")}
    dialed = {int(code[-10:]) for code in codes}
    assert dialed.isdisjoint(ready) and dialed | ready == set(range(1, leads + 1))
    # and nothing is dialed twice when the rest is placed
    report = seed.execute_plan(db, seed.one_placement("CAMP1", "10.10.0.1", leads))
    assert not report.errors
    manager = fetchall(db, "SELECT callerid FROM vicidial_manager")
    per_lead = [str(r["callerid"])[-10:] for r in manager]
    assert sorted(int(x) for x in per_lead) == list(range(1, leads + 1))
    assert seed.count(db, "vicidial_hopper") == 0


@pytest.mark.parametrize("mode", ["kill", "rename"])
@pytest.mark.parametrize("k", range(1, len(WRITES) + 1), ids=WRITES)
def test_a_fault_at_every_write_is_repaired(
    db: Connection, side: Connection, database_url: DatabaseUrl, k: int, mode: str
) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.lead_list(db)
    seed.leads(db, 3)
    fence: LeaderFence = seed.take_lease(db)
    writer = connect(database_url)
    writer.cursorclass = FaultyCursor
    fault = Fault(side, k, mode)
    FaultyCursor.faults[id(writer)] = fault
    try:
        report = seed.execute_plan(writer, seed.one_placement("CAMP1", "10.10.0.1"), fence=fence)
    finally:
        FaultyCursor.faults.pop(id(writer), None)
        fault.restore()
        with contextlib.suppress(pymysql.err.Error):  # killed
            writer.close()
    assert len(fault.writes) >= k, fault.writes  # the fault did hit write k
    assert report.errors, "the fault went unnoticed"
    # the next cycle's repair step, on a fresh connection
    snap = seed.snapshot(db)
    repair(db, fence, snap.servers, lambda _now: False)
    check_after_repair(db, 3)


def test_the_writes_counted_are_the_calls_writes(
    db: Connection, side: Connection, database_url: DatabaseUrl
) -> None:
    """WRITES above names what one placed call writes, in order (so k really walks them)."""
    seed.server(db)
    seed.campaign(db)
    seed.lead_list(db)
    seed.leads(db, 3)
    fence = seed.take_lease(db)
    writer = connect(database_url)
    writer.cursorclass = FaultyCursor
    fault = Fault(side, 0, "none")
    FaultyCursor.faults[id(writer)] = fault
    try:
        report = seed.execute_plan(writer, seed.one_placement("CAMP1", "10.10.0.1"), fence=fence)
    finally:
        FaultyCursor.faults.pop(id(writer), None)
        writer.close()
    assert report.total_placed == 1
    assert fault.writes == [
        "vicidial_hopper",
        *WRITES[1:8],
        "vicidial_list",
        "vicidial_hopper",
        # then the cycle's own bookkeeping
        "vicidial_campaign_stats",
        "vicidial_lists",
        "vicidial_campaigns",
        "vb_decision_log",
    ]
