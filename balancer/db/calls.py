"""One balance call: the lead claimed, the number routed, VICIdial's rows written, one transaction.

`place_call` writes exactly what VICIdial's balance process writes for one call (VICIDIAL.md,
"Placing one balance call"), but inside ONE transaction on an autocommit connection: the hopper
claim, the Originate queued in ``vicidial_manager``, ``vicidial_auto_calls``, the dial log, the
four call-count tables, the lead update and the hopper delete commit together or not at all, and
the leader fencing check runs right before the commit.

A call costs 16 statements (BEGIN and COMMIT included): claim read, claim lock, QUEUE, INCALL,
lead (with its list's settings), the seven inserts, the lead update and the hopper delete.

Carrier routing (balancer/carriers/routing.py) plugs in as a chooser asked inside the transaction
once the number is known: the dial string then starts with the chosen carrier's prefix instead of
the list's or campaign's. A lead no carrier can take is put back (READY, its user) in the same
transaction and stays in the hopper. `balancer/db/retries.py` re-places a call that failed on a
trunk; `balancer/db/cycle_log.py` writes the cycle's bookkeeping and decision log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

import pymysql

from balancer.balance.fields import (
    caller_code,
    caller_id,
    dial_prefix,
    lead_local_time,
    next_called_since_last_reset,
    originate_exten,
    timeout_ms,
)
from balancer.balance.model import OUTBALANCE, CampaignInfo, ServerInfo
from balancer.carriers.routing import CarrierPick, NoCarrier
from balancer.db.connection import Connection
from balancer.db.leads import HopperRow, Lead, claim_lead, dialed_number, unclaim
from balancer.db.rows import fit, rollback, write

log = logging.getLogger(__name__)

# A deadlocked call transaction was rolled back whole by InnoDB: retrying it is safe.
DEADLOCK_ATTEMPTS = 3
ER_LOCK_DEADLOCK = 1213
# Leads without a carrier one call may pass over before it gives up for this cycle.
_UNROUTED_SCAN = 5
SMALLINT_MAX = 65535


@dataclass(frozen=True)
class CycleContext:
    """What every call of one cycle shares: its single timestamp, DST state and id."""

    now: datetime  # the cycle's start (the snapshot's NOW()): caller code, entry_date, call_time
    dst: bool  # daylight saving time in effect (adds an hour to the lead's local-time offset)
    cycle_id: str


@dataclass(frozen=True)
class CallResult:
    """One call placed and committed."""

    lead_id: int
    list_id: int
    caller_code: str
    man_id: int
    auto_call_id: int
    server_ip: str
    campaign_id: str
    dial_string: str  # prefix + phone code + number, as dialed through Local/
    channel: str  # Local/<dial string>@<ext_context>
    cid_type: str  # LIST_CID, CUSTOM_CID or CAMPAIGN_CID
    orphans_deleted: tuple[int, ...] = ()  # lead_ids of hopper rows whose lead was gone
    phone_number: str = ""  # the number dialed (alt_phone / address3 for alt dials)
    alt_dial: str = "NONE"
    phone_code: str = ""
    carrier_id: str = ""  # the carrier routing chose ('' when not routed)
    route: str = ""
    unrouted: tuple[UnroutedLead, ...] = ()  # leads passed over first: no carrier could take them


@dataclass(frozen=True)
class UnroutedLead:
    """A lead no carrier of its route could take this cycle; it stayed in the hopper."""

    lead_id: int
    hopper_id: int
    route: str
    reason: str


@dataclass(frozen=True)
class Unrouted:
    """No call placed: every lead tried had no carrier (``exhausted``: the hopper ran out)."""

    leads: tuple[UnroutedLead, ...]
    exhausted: bool
    orphans_deleted: tuple[int, ...] = ()


# The carrier chooser place_call asks once the number is known: (server_ip, phone_code, number)
# -> a carrier, no carrier (with why), or None: not routed, keep the campaign's dial prefix.
Chooser = Callable[[str, str, str], CarrierPick | NoCarrier | None]


def _route_call(
    route: Chooser | None,
    server: ServerInfo,
    alternates: Sequence[ServerInfo],
    phone_code: str,
    number: str,
) -> tuple[ServerInfo, CarrierPick | None, NoCarrier | None]:
    """(server, carrier) for one number: the planned server first, then the alternates.

    No carrier anywhere gives a NoCarrier naming each server's problem. A number the routes do
    not cover (or routing bypassed) is not routed: the planned server, the campaign's prefix.
    """
    if route is None:
        return server, None, None
    problems: list[str] = []
    route_name = ""
    for candidate in (server, *alternates):
        decision = route(candidate.server_ip, phone_code, number)
        if decision is None:
            return server, None, None
        if isinstance(decision, CarrierPick):
            return candidate, decision, None
        route_name = decision.route
        problems.append(
            f"{candidate.server_ip}: {decision.reason}" if alternates else decision.reason
        )
    return server, None, NoCarrier(route_name, " | ".join(problems))


@dataclass(frozen=True)
class Originate:
    """What queue_originate wrote."""

    man_id: int
    auto_call_id: int
    channel: str
    cid_number: str
    cid_type: str


def queue_originate(
    conn: Connection,
    *,
    server: ServerInfo,
    campaign: CampaignInfo,
    lead: Lead,
    code: str,
    now: datetime,
    dial_string: str,
    number: str,
    alt_dial: str,
) -> Originate:
    """The Originate in vicidial_manager, its vicidial_auto_calls row and its two dial logs."""
    server_ip, campaign_id = server.server_ip, campaign.campaign_id
    context = server.ext_context
    channel = f"Local/{dial_string}@{context}"
    cid_number, cid_type, cid_value = caller_id(
        code, lead.list_cid_override, campaign, lead.security_phrase
    )
    exten = originate_exten(server, campaign)
    timeout = timeout_ms(campaign.dial_timeout)
    note = "|".join(
        (
            campaign_id,
            str(lead.lead_id),
            lead.phone_code,
            number,
            OUTBALANCE,
            alt_dial,
            str(campaign.queue_priority),
            server_ip,
            cid_type,
        )
    )
    man_id = write(
        conn,
        "INSERT INTO vicidial_manager (uniqueid, entry_date, status, response, server_ip,"
        " channel, action, callerid, cmd_line_b, cmd_line_c, cmd_line_d, cmd_line_e,"
        " cmd_line_f, cmd_line_g, cmd_line_h, cmd_line_i, cmd_line_j, cmd_line_k)"
        " VALUES ('', %s, 'NEW', 'N', %s, '', 'Originate', %s, %s, %s, %s, 'Priority: 1',"
        " %s, %s, '', '', '', %s)",
        now,
        server_ip,
        code,
        fit(f"Exten: {exten}", 100),
        fit(f"Context: {context}", 100),
        fit(f"Channel: {channel}", 200),
        fit(f"Callerid: {cid_value}", 100),
        f"Timeout: {timeout}",
        fit(f"VDACnote: {note}", 100),
    )
    auto_call_id = write(
        conn,
        "INSERT INTO vicidial_auto_calls (server_ip, campaign_id, status, lead_id, callerid,"
        " phone_code, phone_number, call_time, call_type, alt_dial, queue_priority)"
        " VALUES (%s, %s, 'SENT', %s, %s, %s, %s, %s, 'OUTBALANCE', %s, %s)",
        server_ip,
        campaign_id,
        lead.lead_id,
        code,
        fit(lead.phone_code, 10),
        fit(number, 18),
        now,
        fit(alt_dial, 6),
        campaign.queue_priority,
    )
    write(
        conn,
        "INSERT INTO vicidial_dial_log (caller_code, lead_id, server_ip, call_date, extension,"
        " channel, context, timeout, outbound_cid) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        code,
        lead.lead_id,
        server_ip,
        now,
        fit(exten, 100),
        fit(channel, 100),
        fit(context, 100),
        timeout,
        fit(cid_value, 100),
    )
    write(
        conn,
        "INSERT INTO vicidial_dial_cid_log (caller_code, call_date, call_type, call_alt,"
        " outbound_cid, outbound_cid_type) VALUES (%s, %s, 'OUTBALANCE', %s, %s, %s)",
        code,
        now,
        fit(alt_dial, 10),
        fit(cid_number, 20),
        cid_type,
    )
    return Originate(man_id, auto_call_id, channel, cid_number, cid_type)


def _place_once(
    conn: Connection,
    server: ServerInfo,
    campaign: CampaignInfo,
    cycle: CycleContext,
    before_commit: Callable[[], bool],
    route: Chooser | None = None,
    alternates: Sequence[ServerInfo] = (),
    skip: Collection[int] = (),
) -> CallResult | Unrouted | None:
    now = cycle.now.replace(microsecond=0)
    campaign_id = campaign.campaign_id
    conn.begin()
    try:
        orphans: list[int] = []
        unrouted: list[UnroutedLead] = []
        skipped = set(skip)
        claimed: tuple[HopperRow, Lead] | None = None
        exhausted = False
        while len(unrouted) < _UNROUTED_SCAN:
            claimed = claim_lead(conn, campaign_id, server.server_ip, orphans, skipped)
            if claimed is None:
                exhausted = True
                break
            hopper, lead = claimed
            number = dialed_number(lead, hopper.alt_dial or "MAIN", campaign.auto_alt_dial)
            target, pick, refusal = _route_call(route, server, alternates, lead.phone_code, number)
            if refusal is None:
                break
            # No carrier can take this number: the lead stays in the hopper, the next is tried.
            unclaim(conn, hopper)
            skipped.add(hopper.hopper_id)
            unrouted.append(
                UnroutedLead(lead.lead_id, hopper.hopper_id, refusal.route, refusal.reason)
            )
            claimed = None
        if claimed is None:
            if orphans and before_commit():
                conn.commit()  # keep the orphan deletes (and the unclaimed rows stay READY)
            else:
                rollback(conn)
            if unrouted:
                return Unrouted(tuple(unrouted), exhausted, tuple(orphans))
            return None
        alt_dial = hopper.alt_dial or "MAIN"
        prefix = (
            pick.dial_prefix
            if pick is not None
            else dial_prefix(lead.list_dial_prefix, campaign.dial_prefix)
        )
        dial_string = prefix + ("" if campaign.omit_phone_code else lead.phone_code) + number
        code = caller_code(now, lead.lead_id)
        queued = queue_originate(
            conn,
            server=target,
            campaign=campaign,
            lead=lead,
            code=code,
            now=now,
            dial_string=dial_string,
            number=number,
            alt_dial=alt_dial,
        )
        write(
            conn,
            "INSERT INTO vicidial_lead_24hour_calls (lead_id, list_id, call_date, phone_number,"
            " phone_code, state, call_type) VALUES (%s, %s, %s, %s, %s, %s, 'AUTO')",
            lead.lead_id,
            lead.list_id,
            now,
            fit(number, 18),
            fit(lead.phone_code, 10),
            fit(lead.state, 2),
        )
        write(
            conn,
            "INSERT INTO vicidial_lead_call_daily_counts (lead_id, list_id, called_count_total,"
            " called_count_auto, called_count_manual, modify_date) VALUES (%s, %s, 1, 1, 0, %s)"
            " ON DUPLICATE KEY UPDATE"
            " called_count_total = LEAST(COALESCE(called_count_total, 0) + 1, 65535),"
            " called_count_auto = LEAST(COALESCE(called_count_auto, 0) + 1, 65535),"
            " list_id = VALUES(list_id), modify_date = VALUES(modify_date)",
            lead.lead_id,
            lead.list_id,
            now,
        )
        write(
            conn,
            "INSERT INTO vicidial_phone_number_call_daily_counts (phone_number, called_count,"
            " modify_date) VALUES (%s, 1, %s) ON DUPLICATE KEY UPDATE"
            " called_count = LEAST(COALESCE(called_count, 0) + 1, 65535),"
            " modify_date = VALUES(modify_date)",
            fit(number, 18),
            now,
        )
        write(
            conn,
            "UPDATE vicidial_list SET status = 'INCALL', user = 'VDAD', called_count = %s,"
            " called_since_last_reset = %s, last_local_call_time = %s WHERE lead_id = %s",
            min(lead.called_count + 1, SMALLINT_MAX),
            next_called_since_last_reset(lead.called_since_last_reset),
            lead_local_time(now, target.local_gmt, lead.gmt_offset_now, cycle.dst),
            lead.lead_id,
        )
        write(conn, "DELETE FROM vicidial_hopper WHERE hopper_id = %s", hopper.hopper_id)
        if not before_commit():
            rollback(conn)
            log.warning(
                "campaign %s: fencing check failed before commit (leadership lost);"
                " call to lead %d on %s rolled back",
                campaign_id,
                lead.lead_id,
                target.server_ip,
            )
            return None
        conn.commit()
    except BaseException:
        rollback(conn)
        raise
    return CallResult(
        lead_id=lead.lead_id,
        list_id=lead.list_id,
        caller_code=code,
        man_id=queued.man_id,
        auto_call_id=queued.auto_call_id,
        server_ip=target.server_ip,
        campaign_id=campaign_id,
        dial_string=dial_string,
        channel=queued.channel,
        cid_type=queued.cid_type,
        orphans_deleted=tuple(orphans),
        phone_number=number,
        alt_dial=alt_dial,
        phone_code=lead.phone_code,
        carrier_id=pick.carrier_id if pick is not None else "",
        route=pick.route if pick is not None else "",
        unrouted=tuple(unrouted),
    )


def place_call(
    conn: Connection,
    server: ServerInfo,
    campaign: CampaignInfo,
    cycle: CycleContext,
    before_commit: Callable[[], bool] = lambda: True,
    *,
    route: Chooser | None = None,
    alternates: Sequence[ServerInfo] = (),
    skip: Collection[int] = (),
) -> CallResult | Unrouted | None:
    """Claim one READY lead of the campaign and queue its balance call on the server, atomically.

    None when the campaign's hopper has no READY row left, or when ``before_commit`` (the
    leader fencing check) returned False: then nothing was written. Any error rolls the whole
    call back (the hopper row is READY again) and is raised; a deadlock is retried first.

    With ``route`` (the carrier chooser, called inside the transaction once the number is
    known) the call goes out with the chosen carrier's dial prefix instead of the campaign's.
    When no carrier can take the number on ``server``, each of ``alternates`` (other servers
    the plan allows) is asked in turn; when none can, the lead stays in the hopper and the next
    READY lead is tried (hopper rows in ``skip`` are passed over). Unrouted: every lead tried
    (at most a few per call) had no carrier; ``exhausted`` when the hopper ran out of leads.
    """
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            return _place_once(
                conn, server, campaign, cycle, before_commit, route, alternates, skip
            )
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != ER_LOCK_DEADLOCK or attempt == DEADLOCK_ATTEMPTS:
                raise
            log.warning(
                "campaign %s: deadlock placing a call (attempt %d); retrying",
                campaign.campaign_id,
                attempt,
            )
    raise AssertionError("unreachable")
