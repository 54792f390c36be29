"""Re-placing a balance call that failed on a trunk: once per call, across daemons."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import pymysql

from balancer.balance.fields import caller_code
from balancer.carriers.routing import CarrierPick, PlacedCall
from balancer.db.calls import (
    DEADLOCK_ATTEMPTS,
    ER_LOCK_DEADLOCK,
    CallResult,
    queue_originate,
)
from balancer.db.connection import Connection
from balancer.db.leads import read_lead
from balancer.db.rows import fit, one_row, rollback, text, write

log = logging.getLogger(__name__)

_ER_DUP_ENTRY = 1062


@dataclass(frozen=True)
class RetrySkipped:
    """A failed call was not re-placed, and why (nothing was written)."""

    reason: str


def _replace_once(
    conn: Connection,
    call: PlacedCall,
    pick: CarrierPick,
    failed_carrier: str,
    cause: int,
    before_commit: Callable[[], bool],
) -> CallResult | RetrySkipped:
    conn.begin()
    try:
        skipped = _retry_refusal(conn, call)
        if skipped is not None:
            rollback(conn)
            return RetrySkipped(skipped)
        lead = read_lead(conn, call.lead_id)
        if lead is None:
            rollback(conn)
            return RetrySkipped(f"lead {call.lead_id} is no longer in vicidial_list")
        row = one_row(conn, "SELECT NOW()")
        now = row[0] if row is not None and isinstance(row[0], datetime) else call.placed_at
        now = now.replace(microsecond=0)
        code = caller_code(now, call.lead_id)
        if code == call.caller_code:  # failed within the second it was placed
            now += timedelta(seconds=1)
            code = caller_code(now, call.lead_id)
        try:
            write(
                conn,
                "INSERT INTO vb_call_retries (caller_code, retry_caller_code, lead_id,"
                " server_ip, failed_carrier, retry_carrier, hangup_cause, retried_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                call.caller_code,
                code,
                call.lead_id,
                call.server_ip,
                fit(failed_carrier, 15),
                fit(pick.carrier_id, 15),
                cause,
                now,
            )
        except pymysql.err.IntegrityError as exc:
            if exc.args[0] != _ER_DUP_ENTRY:
                raise
            rollback(conn)
            return RetrySkipped("already re-placed once (vb_call_retries)")
        # The failed call's row goes: the lead's one call in progress is now the retry.
        write(
            conn,
            "DELETE FROM vicidial_auto_calls WHERE callerid = %s AND lead_id = %s",
            call.caller_code,
            call.lead_id,
        )
        campaign = call.campaign
        dial_string = (
            pick.dial_prefix + ("" if campaign.omit_phone_code else lead.phone_code) + call.number
        )
        queued = queue_originate(
            conn,
            server=call.server,
            campaign=campaign,
            lead=lead,
            code=code,
            now=now,
            dial_string=dial_string,
            number=call.number,
            alt_dial=call.alt_dial,
        )
        # Not a new attempt at the lead (the number was never reached): no call counts.
        write(
            conn,
            "UPDATE vicidial_list SET status = 'INCALL', user = 'VDAD' WHERE lead_id = %s",
            call.lead_id,
        )
        if not before_commit():
            rollback(conn)
            return RetrySkipped("lost leadership: fencing check failed before commit")
        conn.commit()
    except BaseException:
        rollback(conn)
        raise
    return CallResult(
        lead_id=call.lead_id,
        list_id=lead.list_id,
        caller_code=code,
        man_id=queued.man_id,
        auto_call_id=queued.auto_call_id,
        server_ip=call.server_ip,
        campaign_id=campaign.campaign_id,
        dial_string=dial_string,
        channel=queued.channel,
        cid_type=queued.cid_type,
        phone_number=call.number,
        alt_dial=call.alt_dial,
        phone_code=lead.phone_code,
        carrier_id=pick.carrier_id,
        route=pick.route,
    )


def _retry_refusal(conn: Connection, call: PlacedCall) -> str | None:
    """Why this failed call must not be re-placed, or None."""
    if call.retry_of is not None:
        return "the failed call was itself a retry"
    if one_row(
        conn, "SELECT 1 FROM vb_call_retries WHERE retry_caller_code = %s", call.caller_code
    ):
        return "the failed call was itself a retry (vb_call_retries)"
    other = one_row(
        conn,
        "SELECT callerid FROM vicidial_auto_calls WHERE lead_id = %s AND callerid <> %s LIMIT 1",
        call.lead_id,
        call.caller_code,
    )
    if other is not None:
        return f"the lead has another call in progress ({text(other[0])})"
    if one_row(conn, "SELECT 1 FROM vicidial_hopper WHERE lead_id = %s LIMIT 1", call.lead_id):
        return "the lead is back in the hopper"
    return None


def replace_call(
    conn: Connection,
    call: PlacedCall,
    pick: CarrierPick,
    failed_carrier: str,
    cause: int,
    before_commit: Callable[[], bool] = lambda: True,
) -> CallResult | RetrySkipped:
    """Re-place a balance call that failed on a trunk: same lead, same server, ``pick``'s prefix.

    One transaction, without the hopper (the lead left it with the failed call): a row in
    vb_call_retries keyed by the failed call's caller code (so a call is re-placed at most once,
    whichever daemon tries), the failed call's vicidial_auto_calls row replaced by the new one,
    a new Originate with a new caller code, its dial logs; the lead stays INCALL. The call
    counters are not touched: the number was never reached. Nothing is written when the failed
    call was itself a retry, was already re-placed, the lead has another call in progress or
    is back in the hopper, or ``before_commit`` (the leader fence) refuses.
    """
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            return _replace_once(conn, call, pick, failed_carrier, cause, before_commit)
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != ER_LOCK_DEADLOCK or attempt == DEADLOCK_ATTEMPTS:
                raise
            log.warning("lead %d: deadlock re-placing a call (attempt %d)", call.lead_id, attempt)
    raise AssertionError("unreachable")
