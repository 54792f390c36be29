"""Re-placing a balance call that failed on a trunk: once per call, across daemons and leaders.

No transactions (VICIdial's tables have none), so the order carries it, every statement fenced:
a ``vb_call_retries`` row in state 'placing' (its primary key, the failed call's caller code,
makes a call re-placed at most once whoever tries), the failed call's ``vicidial_auto_calls``
row taken over by the retry's caller code (the lead's one call in progress), the two dial logs,
then the Originate LAST, then the retry row 'placed'. A crash in between leaves a 'placing' row,
which the repair step (balancer/db/repair.py) confirms (Originate there) or undoes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import pymysql

from balancer.balance.fields import caller_code
from balancer.balance.model import ServerInfo
from balancer.carriers.routing import CarrierPick, PlacedCall
from balancer.db.calls import (
    CallResult,
    Dial,
    fenced_insert,
    insert_auto_call,
    insert_dial_logs,
    insert_originate,
)
from balancer.db.connection import Connection
from balancer.db.fence import FenceLost, LeaderFence, holds
from balancer.db.leads import read_lead
from balancer.db.rows import fit, one_row, text

log = logging.getLogger(__name__)

_ER_DUP_ENTRY = 1062


@dataclass(frozen=True)
class RetrySkipped:
    """A failed call was not re-placed, and why (nothing was written)."""

    reason: str


def _retry_refusal(conn: Connection, call: PlacedCall) -> str | None:
    """Why this failed call must not be re-placed, or None."""
    if call.retry_of is not None:
        return "the failed call was itself a retry"
    retried = "SELECT 1 FROM vb_call_retries WHERE retry_caller_code = %s"
    if one_row(conn, retried, call.caller_code):
        return "the failed call was itself a retry (vb_call_retries)"
    other = one_row(
        conn,
        "SELECT callerid FROM vicidial_auto_calls WHERE lead_id = %s AND callerid <> %s LIMIT 1",
        call.lead_id,
        call.caller_code,
    )
    if other is not None:
        return f"the lead has another call in progress ({text(other[0])})"
    # Its own hopper row may still be there, INCALL (deleted when its placement ends).
    back = one_row(
        conn,
        "SELECT 1 FROM vicidial_hopper WHERE lead_id = %s"
        " AND NOT (status = 'INCALL' AND user LIKE 'VB%%') LIMIT 1",
        call.lead_id,
    )
    if back:
        return "the lead is back in the hopper"
    return None


def replace_call(
    conn: Connection,
    fence: LeaderFence,
    call: PlacedCall,
    pick: CarrierPick,
    failed_carrier: str,
    cause: int,
    server: ServerInfo | None = None,
    host_server_ip: str = "",
) -> CallResult | RetrySkipped:
    """Re-place a balance call that failed on a trunk: same lead, ``pick``'s prefix, on
    ``server`` (default: the failed call's server).

    Nothing is written when the failed call was itself a retry, was already re-placed, the lead
    has another call in progress or is back in the hopper. The call counters are not touched:
    the number was never reached. FenceLost when the lease is not ours.
    """
    target = server or call.server
    skipped = _retry_refusal(conn, call)
    if skipped is not None:
        return RetrySkipped(skipped)
    lead = read_lead(conn, call.lead_id)
    if lead is None:
        return RetrySkipped(f"lead {call.lead_id} is no longer in vicidial_list")
    row = one_row(conn, "SELECT NOW()")
    now = row[0] if row is not None and isinstance(row[0], datetime) else call.placed_at
    now = now.replace(microsecond=0)
    code = caller_code(now, call.lead_id)
    if code == call.caller_code:  # failed within the second it was placed
        now += timedelta(seconds=1)
        code = caller_code(now, call.lead_id)
    try:
        fenced_insert(
            conn,
            fence,
            "vb_call_retries",
            (
                "caller_code",
                "retry_caller_code",
                "lead_id",
                "server_ip",
                "failed_carrier",
                "retry_carrier",
                "hangup_cause",
                "retried_at",
                "state",
            ),
            (
                call.caller_code,
                code,
                call.lead_id,
                target.server_ip,
                fit(failed_carrier, 15),
                fit(pick.carrier_id, 15),
                cause,
                now,
                "placing",
            ),
        )
    except pymysql.err.IntegrityError as exc:
        if exc.args[0] != _ER_DUP_ENTRY:
            raise
        return RetrySkipped("already re-placed once (vb_call_retries)")
    campaign = call.campaign
    dial_string = (
        pick.dial_prefix + ("" if campaign.omit_phone_code else lead.phone_code) + call.number
    )
    dial = Dial(
        target, campaign, lead, code, now, dial_string, call.number, call.alt_dial, host_server_ip
    )
    auto_call_id = _take_over_auto_call(conn, fence, call, dial)
    _, cid_type = insert_dial_logs(conn, fence, dial)
    man_id = insert_originate(conn, fence, dial, cid_type)
    # Not a new attempt at the lead (the number was never reached): the lead is not touched.
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE vb_call_retries SET state = 'placed' WHERE caller_code = %s",
            (call.caller_code,),
        )
    return CallResult(
        lead_id=call.lead_id,
        list_id=lead.list_id,
        caller_code=code,
        man_id=man_id,
        auto_call_id=auto_call_id,
        server_ip=target.server_ip,
        campaign_id=campaign.campaign_id,
        dial_string=dial_string,
        channel=dial.channel,
        cid_type=cid_type,
        phone_number=call.number,
        alt_dial=call.alt_dial,
        phone_code=lead.phone_code,
        carrier_id=pick.carrier_id,
        route=pick.route,
    )


def _take_over_auto_call(conn: Connection, fence: LeaderFence, call: PlacedCall, dial: Dial) -> int:
    """The failed call's vicidial_auto_calls row becomes the retry's (a new one if it is gone)."""
    with conn.cursor() as cur:
        moved = cur.execute(
            "UPDATE vicidial_auto_calls SET callerid = %s, server_ip = %s, status = 'SENT',"  # noqa: S608
            " call_time = %s, uniqueid = NULL, channel = NULL"
            f" WHERE callerid = %s AND lead_id = %s AND {fence.exists}",
            (
                dial.code,
                dial.server.server_ip,
                dial.now,
                call.caller_code,
                call.lead_id,
                *fence.params,
            ),
        )
        if moved:
            row = one_row(
                conn, "SELECT auto_call_id FROM vicidial_auto_calls WHERE callerid = %s", dial.code
            )
            return int(row[0]) if row is not None else 0
    if not holds(conn, fence):
        raise FenceLost(f"lease {fence.name!r}: epoch {fence.epoch} lost re-placing a call")
    return insert_auto_call(conn, fence, dial)


@dataclass(frozen=True)
class FoundCall:
    """A balance call's Originate as the database has it (for a leader that did not place it)."""

    caller_code: str
    server_ip: str
    campaign_id: str
    lead_id: int
    phone_code: str
    number: str
    alt_dial: str
    dial_string: str
    placed_at: datetime
    retry_of: str | None  # the failed call's caller code, when this call was its retry


def find_balance_call(conn: Connection, caller_code: str) -> FoundCall | None:
    """The OUTBALANCE Originate queued under this caller code, or None (not a balance call)."""
    row = one_row(
        conn,
        "SELECT m.server_ip, m.cmd_line_d, m.cmd_line_k, m.entry_date, r.caller_code"
        " FROM vicidial_manager AS m"
        " LEFT JOIN vb_call_retries AS r ON r.retry_caller_code = m.callerid"
        " WHERE m.callerid = %s AND m.action = 'Originate' ORDER BY m.man_id DESC LIMIT 1",
        caller_code,
    )
    if row is None or not isinstance(row[3], datetime):
        return None
    note = text(row[2]).removeprefix("VDACnote: ").split("|")
    channel = text(row[1]).removeprefix("Channel: ")
    if len(note) < 6 or note[4] != "OUTBALANCE" or not channel.startswith("Local/"):
        return None
    dial_string = channel.removeprefix("Local/").split("@", 1)[0]
    return FoundCall(
        caller_code=caller_code,
        server_ip=text(row[0]),
        campaign_id=note[0],
        lead_id=int(note[1]) if note[1].isdigit() else 0,
        phone_code=note[2],
        number=note[3],
        alt_dial=note[5],
        dial_string=dial_string,
        placed_at=row[3],
        retry_of=None if row[4] is None else text(row[4]),
    )
