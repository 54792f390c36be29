"""After a cycle: balance_trunk_fill and the call dates, and the decision log (vb_decision_log).

The cycle's writes carry the leader fence like the calls' (balancer/db/fence.py): a leader that
lost the lease stores no fill and logs no decision under its old epoch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from balancer.db.connection import Connection
from balancer.db.fence import FenceLost, LeaderFence
from balancer.db.rows import fit, placeholders

log = logging.getLogger(__name__)

_SMALLINT_MAX = 65535
_ROWS_PER_INSERT = 200  # decision rows per INSERT statement


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


def finish_cycle(
    conn: Connection,
    fence: LeaderFence,
    fills: Mapping[str, int],
    reset_all: bool,
    lists_used: Iterable[int],
    campaigns_used: Iterable[str],
    now: datetime,
) -> None:
    """Store balance_trunk_fill, list_lastcalldate and campaign_calldate (each one statement).

    ``reset_all`` first sets every campaign's fill to 0 (VICIdial step 2); ``fills`` then
    UPDATE the campaigns' existing vicidial_campaign_stats rows (VICIdial inserts none).
    Every statement is fenced: after a takeover none of them changes anything.
    """
    lists = sorted(set(lists_used))
    campaigns = sorted(set(campaigns_used))
    stamp = now.replace(microsecond=0)
    with conn.cursor() as cur:
        if reset_all:
            cur.execute(
                "UPDATE vicidial_campaign_stats SET balance_trunk_fill = 0"  # noqa: S608
                f" WHERE balance_trunk_fill <> 0 AND {fence.exists}",
                fence.params,
            )
        if fills:
            ordered = sorted(fills.items())
            cases = " ".join(["WHEN %s THEN %s"] * len(ordered))
            cur.execute(
                f"UPDATE vicidial_campaign_stats SET balance_trunk_fill = CASE campaign_id {cases}"  # noqa: S608
                f" END WHERE campaign_id IN ({placeholders(len(ordered))}) AND {fence.exists}",
                (
                    *(v for c, fill in ordered for v in (c, min(max(fill, 0), _SMALLINT_MAX))),
                    *(c for c, _ in ordered),
                    *fence.params,
                ),
            )
        if lists:
            cur.execute(
                "UPDATE vicidial_lists SET list_lastcalldate = %s"  # noqa: S608
                f" WHERE list_id IN ({placeholders(len(lists))}) AND {fence.exists}",
                (stamp, *lists, *fence.params),
            )
        if campaigns:
            cur.execute(
                "UPDATE vicidial_campaigns SET campaign_calldate = %s"  # noqa: S608
                f" WHERE campaign_id IN ({placeholders(len(campaigns))}) AND {fence.exists}",
                (stamp, *campaigns, *fence.params),
            )


_COLUMNS = (
    "decided_at, cycle_id, kind, campaign_id, lead_id, server_ip, carrier_id, outcome, reason,"
    " details, epoch"
)


def _values(d: Decision, epoch: int | None) -> tuple[object, ...]:
    return (
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
        epoch,
    )


def log_decisions(
    conn: Connection, rows: Sequence[Decision], fence: LeaderFence | None = None
) -> int:
    """Insert decision rows in multi-row INSERTs; returns the count.

    With ``fence`` (a leader's decisions) the rows carry its epoch and are inserted only while
    it holds the lease (FenceLost otherwise); without, they are an operator's or a keeper's.
    """
    if not rows:
        return 0
    epoch = fence.epoch if fence is not None else None
    values = [_values(d, epoch) for d in rows]
    with conn.cursor() as cur:
        if fence is None:
            cur.executemany(
                f"INSERT INTO vb_decision_log ({_COLUMNS})"  # noqa: S608
                f" VALUES ({placeholders(11)})",
                values,
            )
            return len(values)
        for start in range(0, len(values), _ROWS_PER_INSERT):
            chunk = values[start : start + _ROWS_PER_INSERT]
            first = ", ".join(f"%s AS c{i}" for i in range(11))
            rest = " UNION ALL SELECT " + placeholders(11)
            union = f"SELECT {first}" + rest * (len(chunk) - 1)
            inserted = cur.execute(
                f"INSERT INTO vb_decision_log ({_COLUMNS})"  # noqa: S608
                f" SELECT u.* FROM ({union}) AS u WHERE {fence.exists}",
                (*(v for row in chunk for v in row), *fence.params),
            )
            if not inserted:
                raise FenceLost(f"lease {fence.name!r}: epoch {fence.epoch} lost logging decisions")
    return len(values)


def details(**fields: object) -> str:
    """A decision's details as compact JSON."""
    return json.dumps(fields, separators=(",", ":"), sort_keys=True, default=str)
