"""After a cycle: balance_trunk_fill and the call dates, and the decision log (vb_decision_log)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from balancer.db.connection import Connection
from balancer.db.rows import fit, rollback

log = logging.getLogger(__name__)

_SMALLINT_MAX = 65535


@dataclass(frozen=True)
class Decision:
    """One `vb_decision_log` row."""

    decided_at: datetime
    cycle_id: str
    kind: str  # balance, assign_phone, login_flag, failover, drain
    campaign_id: str = ""
    lead_id: int | None = None
    server_ip: str = ""
    carrier_id: str = ""
    outcome: str = ""
    reason: str = ""
    details: str | None = None  # JSON text


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


def finish_cycle(
    conn: Connection,
    fills: Mapping[str, int],
    reset_all: bool,
    lists_used: Iterable[int],
    campaigns_used: Iterable[str],
    now: datetime,
    before_commit: Callable[[], bool] = lambda: True,
) -> bool:
    """Store balance_trunk_fill, list_lastcalldate and campaign_calldate in one transaction.

    ``reset_all`` first sets every campaign's fill to 0 (VICIdial step 2); ``fills`` are then
    written (inserting missing vicidial_campaign_stats rows). False when ``before_commit``
    refused and nothing was written.
    """
    lists = sorted(set(lists_used))
    campaigns = sorted(set(campaigns_used))
    stamp = now.replace(microsecond=0)
    conn.begin()
    try:
        with conn.cursor() as cur:
            if reset_all:
                cur.execute(
                    "UPDATE vicidial_campaign_stats SET balance_trunk_fill = 0"
                    " WHERE balance_trunk_fill <> 0"
                )
            if fills:
                cur.executemany(
                    "INSERT INTO vicidial_campaign_stats (campaign_id, balance_trunk_fill)"
                    " VALUES (%s, %s)"
                    " ON DUPLICATE KEY UPDATE balance_trunk_fill = VALUES(balance_trunk_fill)",
                    [
                        (campaign_id, min(max(fill, 0), _SMALLINT_MAX))
                        for campaign_id, fill in sorted(fills.items())
                    ],
                )
            if lists:
                cur.execute(  # only "%s" placeholders are formatted in
                    "UPDATE vicidial_lists SET list_lastcalldate = %s"  # noqa: S608
                    f" WHERE list_id IN ({_placeholders(len(lists))})",
                    (stamp, *lists),
                )
            if campaigns:
                cur.execute(
                    "UPDATE vicidial_campaigns SET campaign_calldate = %s"  # noqa: S608
                    f" WHERE campaign_id IN ({_placeholders(len(campaigns))})",
                    (stamp, *campaigns),
                )
        if not before_commit():
            rollback(conn)
            log.warning("fencing check failed before commit: cycle bookkeeping rolled back")
            return False
        conn.commit()
    except BaseException:
        rollback(conn)
        raise
    return True


_DECISION_INSERT = (
    "INSERT INTO vb_decision_log (decided_at, cycle_id, kind, campaign_id, lead_id, server_ip,"
    " carrier_id, outcome, reason, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


def log_decisions(conn: Connection, rows: Sequence[Decision]) -> int:
    """Insert decision rows in batched multi-row INSERTs (one transaction); returns the count."""
    if not rows:
        return 0
    values = [
        (
            d.decided_at,
            fit(d.cycle_id, 40),
            fit(d.kind, 20),
            fit(d.campaign_id, 20),
            d.lead_id,
            fit(d.server_ip, 15),
            fit(d.carrier_id, 15),
            fit(d.outcome, 20),
            fit(d.reason, 255),
            d.details,
        )
        for d in rows
    ]
    conn.begin()
    try:
        with conn.cursor() as cur:
            cur.executemany(_DECISION_INSERT, values)
        conn.commit()
    except BaseException:
        rollback(conn)
        raise
    return len(values)


def details(**fields: object) -> str:
    """A decision's details as compact JSON."""
    return json.dumps(fields, separators=(",", ":"), sort_keys=True, default=str)
