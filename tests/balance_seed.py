"""Seeding a VICIdial cluster for the snapshot, call-writer and executor tests (real MariaDB)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from conftest import execute, fetchall

from balancer.balance.executor import ExecutionReport, Executor
from balancer.balance.model import CampaignPlan, DbSnapshot, Placement, Plan
from balancer.carriers.routing import CallRouter
from balancer.config import BalanceConfig
from balancer.db import fence as lease
from balancer.db.calls import CallResult
from balancer.db.connection import Connection
from balancer.db.fence import LeaderFence
from balancer.db.snapshot import read_snapshot

T = TypeVar("T")

# The instant of VICIDIAL.md's example: MMDDhhmmss 0122135456 -> caller code V122135456...
EXAMPLE_NOW = datetime(2024, 1, 22, 13, 54, 56)


def insert(db: Connection, table: str, **columns: Any) -> int:
    """INSERT one row; returns LAST_INSERT_ID() (0 for tables without AUTO_INCREMENT)."""
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    execute(db, f"INSERT INTO {table} ({names}) VALUES ({marks})", *columns.values())
    return int(str(fetchall(db, "SELECT LAST_INSERT_ID() AS id")[0]["id"]))


def server(db: Connection, server_ip: str = "10.10.0.1", **columns: Any) -> None:
    """A balance-active Asterisk 13 server (VICIDIAL.md's example values)."""
    row: dict[str, Any] = {
        "server_id": "S" + server_ip.rsplit(".", 1)[-1],
        "server_ip": server_ip,
        "active": "Y",
        "asterisk_version": "13.38.3-vici",
        "vicidial_balance_active": "Y",
    }
    row.update(columns)
    insert(db, "servers", **row)


def campaign(db: Connection, campaign_id: str = "CAMP1", **columns: Any) -> None:
    """An active campaign with VICIdial's defaults."""
    row: dict[str, Any] = {"campaign_id": campaign_id, "campaign_name": campaign_id, "active": "Y"}
    row.update(columns)
    insert(db, "vicidial_campaigns", **row)


def lead_list(db: Connection, list_id: int = 101, campaign_id: str = "CAMP1", **cols: Any) -> None:
    """A vicidial_lists row."""
    insert(db, "vicidial_lists", list_id=list_id, campaign_id=campaign_id, active="Y", **cols)


def lead(
    db: Connection,
    lead_id: int = 100001,
    list_id: int = 101,
    phone_number: str = "3125550001",
    **columns: Any,
) -> None:
    """A vicidial_list row (phone_code 1, gmt -5, never called)."""
    row: dict[str, Any] = {
        "lead_id": lead_id,
        "list_id": list_id,
        "status": "NEW",
        "phone_code": "1",
        "phone_number": phone_number,
        "gmt_offset_now": "-5.00",
        "called_since_last_reset": "N",
        "called_count": 0,
        "state": "IL",
    }
    row.update(columns)
    insert(db, "vicidial_list", **row)


def hopper(
    db: Connection, lead_id: int = 100001, campaign_id: str = "CAMP1", **columns: Any
) -> int:
    """A READY hopper row; returns its hopper_id."""
    row: dict[str, Any] = {
        "lead_id": lead_id,
        "campaign_id": campaign_id,
        "status": "READY",
        "list_id": 101,
        "alt_dial": "NONE",
        "priority": 0,
    }
    row.update(columns)
    return insert(db, "vicidial_hopper", **row)


def example(db: Connection) -> None:
    """VICIDIAL.md's example: server 10.10.0.1 on Asterisk 13, CAMP1, lead 100001 in the hopper."""
    server(db, "10.10.0.1")
    campaign(db, "CAMP1")
    lead_list(db, 101, "CAMP1")
    lead(db, 100001, 101, "3125550001")
    hopper(db, 100001, "CAMP1")


def leads(db: Connection, count: int, campaign_id: str = "CAMP1", first: int = 1) -> list[int]:
    """``count`` leads of list 101 with READY hopper rows; returns their lead_ids."""
    ids = list(range(first, first + count))
    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO vicidial_list (lead_id, list_id, status, phone_code, phone_number,"
            " gmt_offset_now, called_since_last_reset, called_count, state)"
            " VALUES (%s, 101, 'NEW', '1', %s, -5.00, 'N', 0, 'IL')",
            [(i, f"312555{i:04d}") for i in ids],
        )
        cur.executemany(
            "INSERT INTO vicidial_hopper (lead_id, campaign_id, status, list_id, alt_dial,"
            " priority) VALUES (%s, %s, 'READY', 101, 'NONE', 0)",
            [(i, campaign_id) for i in ids],
        )
    return ids


def snapshot(db: Connection, config: BalanceConfig | None = None) -> DbSnapshot:
    """read_snapshot with the default balance settings."""
    return read_snapshot(db, config or BalanceConfig())


def count(db: Connection, table: str, where: str = "1", *params: object) -> int:
    """Rows of a table matching a condition."""
    rows = fetchall(db, f"SELECT COUNT(*) AS n FROM {table} WHERE {where}", *params)
    return int(str(rows[0]["n"]))


def one(db: Connection, sql: str, *params: object) -> dict[str, Any]:
    """Exactly one row as a dict."""
    rows = fetchall(db, sql, *params)
    assert len(rows) == 1, rows
    return rows[0]


# Tables place_call writes (besides vicidial_hopper and vicidial_list).
CALL_TABLES = (
    "vicidial_manager",
    "vicidial_auto_calls",
    "vicidial_dial_log",
    "vicidial_dial_cid_log",
    "vicidial_lead_24hour_calls",
    "vicidial_lead_call_daily_counts",
    "vicidial_phone_number_call_daily_counts",
)


# --------------------------------------------------------------------------- placing calls


class InlineDb:
    """The executor's DbRunner on one test connection, run inline (no worker thread)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def run(self, fn: Callable[[Connection], T], idempotent: bool = True) -> T:
        return fn(self.conn)


def take_lease(db: Connection, holder: str = "test-leader", ttl_s: float = 3600) -> LeaderFence:
    """Take (or keep) the balance lease for ``holder``; the fence its writes carry."""
    epoch = lease.take(db, holder, ttl_s)
    assert epoch is not None, "the lease is held by someone else"
    return LeaderFence(lease.BALANCE_LEASE, epoch)


async def _no_sleep(_seconds: float) -> None:
    return None


def one_placement(campaign_id: str, server_ip: str, calls: int = 1) -> Plan:
    """A plan of one placement, built by hand (no planner)."""
    placement = Placement(campaign_id, server_ip, calls, f"fill {calls} on {server_ip}")
    campaign = CampaignPlan(
        campaign_id=campaign_id,
        demand=calls,
        already_filling=0,
        needed=calls,
        may_dial=True,
        placements=(placement,),
        skips=(),
    )
    return Plan("live", False, campaigns=(campaign,), pace_ms=0.0, sequence=(placement,))


async def run_plan(
    db: Connection,
    plan: Plan,
    *,
    now: datetime = EXAMPLE_NOW,
    dst: bool = False,
    router: CallRouter | None = None,
    fence: LeaderFence | None = None,
    transactional: bool | None = None,
    host_server_ip: str = "",
) -> ExecutionReport:
    """Run the real executor on ``plan`` against the test connection, under a lease."""
    held = fence or take_lease(db)
    snap = dataclasses.replace(snapshot(db), taken_at=now)
    executor = Executor(
        InlineDb(db),
        fence=lambda: held,
        sleep=_no_sleep,
        dst=lambda _now: dst,
        router=router,
        transactional=transactional,
        host_server_ip=host_server_ip,
    )
    return await executor.execute(plan, snap, "c1")


def execute_plan(db: Connection, plan: Plan, **kwargs: Any) -> ExecutionReport:
    """`run_plan` from synchronous code."""
    return asyncio.run(run_plan(db, plan, **kwargs))


def place(
    db: Connection,
    *,
    server_ip: str = "10.10.0.1",
    campaign_id: str = "CAMP1",
    **kwargs: Any,
) -> CallResult | None:
    """One balance call through the real executor; None when none was placed."""
    report = execute_plan(db, one_placement(campaign_id, server_ip), **kwargs)
    assert not report.errors, report.errors
    return report.results[0] if report.results else None
