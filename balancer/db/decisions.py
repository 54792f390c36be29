"""Reading `vb_decision_log` back: the latest decisions and their reasons, for the dashboard."""

from __future__ import annotations

import datetime as dt
from typing import Any

from balancer.db.connection import Connection

# Newest first by when it was decided (rows of one cycle are inserted after its calls, so ids
# do not follow time); the decided_at index read backwards stops after `limit` rows however
# large the table has grown.
_RECENT = (
    "SELECT id, decided_at, cycle_id, kind, campaign_id, lead_id, server_ip, carrier_id,"
    " outcome, reason FROM vb_decision_log ORDER BY decided_at DESC, id DESC LIMIT %s"
)


def recent_decisions(conn: Connection, limit: int = 50) -> list[dict[str, Any]]:
    """The ``limit`` newest decisions, newest first, as JSON-ready dicts (times as epoch s)."""
    with conn.cursor() as cur:
        cur.execute(_RECENT, (limit,))
        rows = cur.fetchall()
    out: list[dict[str, Any]] = []
    for row in rows:
        (row_id, decided_at, cycle_id, kind, campaign, lead, server, carrier, outcome, reason) = row
        out.append(
            {
                "id": int(row_id),
                "decided_at": _epoch(decided_at),
                "cycle_id": cycle_id,
                "kind": kind,
                "campaign_id": campaign,
                "lead_id": None if lead is None else int(lead),
                "server_ip": server,
                "carrier_id": carrier,
                "outcome": outcome,
                "reason": reason,
            }
        )
    return out


def _epoch(value: Any) -> float | None:
    """A DATETIME (the server's local time, as VICIdial keeps it) as epoch seconds."""
    if isinstance(value, dt.datetime):
        return round(value.timestamp(), 3)
    return None
