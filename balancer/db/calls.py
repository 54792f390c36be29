"""The balance engine's writes: one call per transaction, the end-of-cycle bookkeeping, the log.

`place_call` writes exactly what VICIdial's balance process writes for one call (VICIDIAL.md,
"Placing one balance call"), but inside ONE transaction on an autocommit connection: the hopper
claim, the Originate queued in ``vicidial_manager``, ``vicidial_auto_calls``, the dial log, the
four call-count tables, the lead update and the hopper delete commit together or not at all, and
the leader fencing check runs right before the commit.

Claiming a lead is two statements on purpose: a plain read lists the campaign's READY rows in
VICIdial's order, then each candidate is locked by primary key with ``FOR UPDATE SKIP LOCKED``.
A single ``ORDER BY priority DESC, hopper_id ... FOR UPDATE SKIP LOCKED`` sorts in a filesort, so
InnoDB locks EVERY READY row of the campaign, and a second balancer would find the hopper empty.

A call costs 16 statements (BEGIN and COMMIT included): claim read, claim lock, QUEUE, INCALL,
lead (with its list's settings), the seven inserts, the lead update and the hopper delete.

Carrier routing (balancer/routing.py) plugs in as a chooser asked inside the transaction once
the number is known: the dial string then starts with the chosen carrier's prefix instead of
the list's or campaign's. A lead no carrier can take is put back (READY, its user) in the same
transaction and stays in the hopper. `replace_call` re-places a call that failed on a trunk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pymysql

from balancer.db.connection import Connection
from balancer.db.rows import text
from balancer.routing import CarrierPick, NoCarrier, PlacedCall
from balancer.snapshot import OUTBALANCE, CampaignInfo, ServerInfo
from balancer.vicidial_fields import (
    NON_DIGITS,
    caller_code,
    caller_id,
    dial_prefix,
    lead_local_time,
    next_called_since_last_reset,
    originate_exten,
    timeout_ms,
)

log = logging.getLogger(__name__)

# Candidates read per claim round; a round only comes back when all of them were taken.
_CLAIM_BATCH = 8
# A deadlocked call transaction was rolled back whole by InnoDB: retrying it is safe.
_DEADLOCK_ATTEMPTS = 3
_ER_LOCK_DEADLOCK = 1213
_ER_DUP_ENTRY = 1062
# Leads without a carrier one call may pass over before it gives up for this cycle.
_UNROUTED_SCAN = 5
_SMALLINT_MAX = 65535


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


@dataclass(frozen=True)
class _Lead:
    lead_id: int
    list_id: int
    gmt_offset_now: float
    called_since_last_reset: str
    phone_code: str
    phone_number: str
    alt_phone: str
    address3: str
    security_phrase: str
    called_count: int
    state: str
    list_dial_prefix: str  # vicidial_lists.dial_prefix of the lead's list ('' when none)
    list_cid_override: str  # vicidial_lists.campaign_cid_override


@dataclass(frozen=True)
class _Hopper:
    hopper_id: int
    lead_id: int
    alt_dial: str
    user: str | None = None  # before the claim, to put back when the lead stays


# --------------------------------------------------------------------------- the number dialed


def dialed_number(lead: _Lead, alt_dial: str, auto_alt_dial: str) -> str:
    """phone_number; alt_phone or address3's digits for an alt dial the campaign enables."""
    if alt_dial == "ALT" and "ALT" in auto_alt_dial:
        return lead.alt_phone
    if alt_dial == "ADDR3" and "ADDR3" in auto_alt_dial:
        return NON_DIGITS.sub("", lead.address3)
    return lead.phone_number


def _fit(text: str, width: int) -> str:
    """Cut to a column's width: strict mode rejects a longer value (and the whole call with it)."""
    return text[:width]


# --------------------------------------------------------------------------- SQL helpers


def _one(conn: Connection, sql: str, *params: object) -> tuple[Any, ...] | None:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        row: tuple[Any, ...] | None = cur.fetchone()
        return row


def _all(conn: Connection, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def _write(conn: Connection, sql: str, *params: object) -> int:
    """Run one write; returns the new AUTO_INCREMENT id (0 when none)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return int(cur.lastrowid or 0)


def _rollback(conn: Connection) -> None:
    try:
        conn.rollback()
    except pymysql.err.Error as exc:  # a broken connection: the server rolls back on its own
        log.warning("rollback failed (%s); the server discards the transaction", exc)


# --------------------------------------------------------------------------- placing one call


def _claim(
    conn: Connection, campaign_id: str, server_ip: str, skip: Collection[int] = ()
) -> _Hopper | None:
    """Lock and mark one READY hopper row (priority DESC, hopper_id); None when none is left.

    Rows in ``skip`` (hopper_ids) are passed over: leads no carrier could take this cycle.
    """
    tried: set[int] = set(skip)
    while True:
        limit = len(tried) + _CLAIM_BATCH
        ids = [
            int(row[0])
            for row in _all(
                conn,
                "SELECT hopper_id FROM vicidial_hopper WHERE campaign_id = %s AND status = 'READY'"
                " ORDER BY priority DESC, hopper_id LIMIT %s",
                campaign_id,
                limit,
            )
        ]
        for hopper_id in ids:
            if hopper_id in tried:
                continue
            tried.add(hopper_id)
            row = _one(
                conn,
                "SELECT hopper_id, lead_id, alt_dial, user FROM vicidial_hopper"
                " WHERE hopper_id = %s AND status = 'READY' FOR UPDATE SKIP LOCKED",
                hopper_id,
            )
            if row is None:  # taken by another balancer meanwhile (locked, gone or not READY)
                continue
            _write(
                conn,
                "UPDATE vicidial_hopper SET status = 'QUEUE', user = %s WHERE hopper_id = %s",
                _fit(f"VDFC_{server_ip}", 20),
                hopper_id,
            )
            _write(
                conn, "UPDATE vicidial_hopper SET status = 'INCALL' WHERE hopper_id = %s", hopper_id
            )
            return _Hopper(
                int(row[0]), int(row[1]), text(row[2]), None if row[3] is None else text(row[3])
            )
        if len(ids) < limit:
            return None


def _unclaim(conn: Connection, hopper: _Hopper) -> None:
    """Put a claimed row back as it was (READY, its user): the lead stays in the hopper."""
    _write(
        conn,
        "UPDATE vicidial_hopper SET status = 'READY', user = %s WHERE hopper_id = %s",
        hopper.user,
        hopper.hopper_id,
    )


def _read_lead(conn: Connection, lead_id: int) -> _Lead | None:
    row = _one(
        conn,
        "SELECT lead_id, list_id, gmt_offset_now, called_since_last_reset, phone_code,"
        " phone_number, alt_phone, address3, security_phrase, called_count, state,"
        # The list's settings ride along: a subquery without its own locking clause is a plain
        # read, so only the lead row is locked and concurrent calls of one list do not queue.
        " (SELECT dial_prefix FROM vicidial_lists AS s WHERE s.list_id = l.list_id),"
        " (SELECT campaign_cid_override FROM vicidial_lists AS s WHERE s.list_id = l.list_id)"
        " FROM vicidial_list AS l WHERE lead_id = %s FOR UPDATE",
        lead_id,
    )
    if row is None:
        return None
    gmt = row[2]
    return _Lead(
        lead_id=int(row[0]),
        list_id=int(row[1] or 0),
        gmt_offset_now=float(gmt) if isinstance(gmt, Decimal | int | float) else 0.0,
        called_since_last_reset=text(row[3]),
        phone_code=text(row[4]),
        phone_number=text(row[5]),
        alt_phone=text(row[6]),
        address3=text(row[7]),
        security_phrase=text(row[8]),
        called_count=int(row[9] or 0),
        state=text(row[10]),
        list_dial_prefix=text(row[11]),
        list_cid_override=text(row[12]),
    )


def _claim_lead(
    conn: Connection,
    campaign_id: str,
    server_ip: str,
    orphans: list[int],
    skip: Collection[int] = (),
) -> tuple[_Hopper, _Lead] | None:
    """Claim a hopper row whose lead exists; rows naming a missing lead are deleted (rule 8)."""
    while True:
        hopper = _claim(conn, campaign_id, server_ip, skip)
        if hopper is None:
            return None
        lead = _read_lead(conn, hopper.lead_id)
        if lead is not None:
            return hopper, lead
        # VICIdial leaves such a row INCALL and loses a call on it; we drop it and claim again.
        _write(conn, "DELETE FROM vicidial_hopper WHERE hopper_id = %s", hopper.hopper_id)
        orphans.append(hopper.lead_id)
        log.warning(
            "campaign %s: hopper row %d names lead %d, which is not in vicidial_list;"
            " row deleted, claiming another lead",
            campaign_id,
            hopper.hopper_id,
            hopper.lead_id,
        )


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
class _Originate:
    """What _queue_originate wrote."""

    man_id: int
    auto_call_id: int
    channel: str
    cid_number: str
    cid_type: str


def _queue_originate(
    conn: Connection,
    *,
    server: ServerInfo,
    campaign: CampaignInfo,
    lead: _Lead,
    code: str,
    now: datetime,
    dial_string: str,
    number: str,
    alt_dial: str,
) -> _Originate:
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
    man_id = _write(
        conn,
        "INSERT INTO vicidial_manager (uniqueid, entry_date, status, response, server_ip,"
        " channel, action, callerid, cmd_line_b, cmd_line_c, cmd_line_d, cmd_line_e,"
        " cmd_line_f, cmd_line_g, cmd_line_h, cmd_line_i, cmd_line_j, cmd_line_k)"
        " VALUES ('', %s, 'NEW', 'N', %s, '', 'Originate', %s, %s, %s, %s, 'Priority: 1',"
        " %s, %s, '', '', '', %s)",
        now,
        server_ip,
        code,
        _fit(f"Exten: {exten}", 100),
        _fit(f"Context: {context}", 100),
        _fit(f"Channel: {channel}", 200),
        _fit(f"Callerid: {cid_value}", 100),
        f"Timeout: {timeout}",
        _fit(f"VDACnote: {note}", 100),
    )
    auto_call_id = _write(
        conn,
        "INSERT INTO vicidial_auto_calls (server_ip, campaign_id, status, lead_id, callerid,"
        " phone_code, phone_number, call_time, call_type, alt_dial, queue_priority)"
        " VALUES (%s, %s, 'SENT', %s, %s, %s, %s, %s, 'OUTBALANCE', %s, %s)",
        server_ip,
        campaign_id,
        lead.lead_id,
        code,
        _fit(lead.phone_code, 10),
        _fit(number, 18),
        now,
        _fit(alt_dial, 6),
        campaign.queue_priority,
    )
    _write(
        conn,
        "INSERT INTO vicidial_dial_log (caller_code, lead_id, server_ip, call_date, extension,"
        " channel, context, timeout, outbound_cid) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        code,
        lead.lead_id,
        server_ip,
        now,
        _fit(exten, 100),
        _fit(channel, 100),
        _fit(context, 100),
        timeout,
        _fit(cid_value, 100),
    )
    _write(
        conn,
        "INSERT INTO vicidial_dial_cid_log (caller_code, call_date, call_type, call_alt,"
        " outbound_cid, outbound_cid_type) VALUES (%s, %s, 'OUTBALANCE', %s, %s, %s)",
        code,
        now,
        _fit(alt_dial, 10),
        _fit(cid_number, 20),
        cid_type,
    )
    return _Originate(man_id, auto_call_id, channel, cid_number, cid_type)


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
        claimed: tuple[_Hopper, _Lead] | None = None
        exhausted = False
        while len(unrouted) < _UNROUTED_SCAN:
            claimed = _claim_lead(conn, campaign_id, server.server_ip, orphans, skipped)
            if claimed is None:
                exhausted = True
                break
            hopper, lead = claimed
            number = dialed_number(lead, hopper.alt_dial or "MAIN", campaign.auto_alt_dial)
            target, pick, refusal = _route_call(route, server, alternates, lead.phone_code, number)
            if refusal is None:
                break
            # No carrier can take this number: the lead stays in the hopper, the next is tried.
            _unclaim(conn, hopper)
            skipped.add(hopper.hopper_id)
            unrouted.append(
                UnroutedLead(lead.lead_id, hopper.hopper_id, refusal.route, refusal.reason)
            )
            claimed = None
        if claimed is None:
            if orphans and before_commit():
                conn.commit()  # keep the orphan deletes (and the unclaimed rows stay READY)
            else:
                _rollback(conn)
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
        queued = _queue_originate(
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
        _write(
            conn,
            "INSERT INTO vicidial_lead_24hour_calls (lead_id, list_id, call_date, phone_number,"
            " phone_code, state, call_type) VALUES (%s, %s, %s, %s, %s, %s, 'AUTO')",
            lead.lead_id,
            lead.list_id,
            now,
            _fit(number, 18),
            _fit(lead.phone_code, 10),
            _fit(lead.state, 2),
        )
        _write(
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
        _write(
            conn,
            "INSERT INTO vicidial_phone_number_call_daily_counts (phone_number, called_count,"
            " modify_date) VALUES (%s, 1, %s) ON DUPLICATE KEY UPDATE"
            " called_count = LEAST(COALESCE(called_count, 0) + 1, 65535),"
            " modify_date = VALUES(modify_date)",
            _fit(number, 18),
            now,
        )
        _write(
            conn,
            "UPDATE vicidial_list SET status = 'INCALL', user = 'VDAD', called_count = %s,"
            " called_since_last_reset = %s, last_local_call_time = %s WHERE lead_id = %s",
            min(lead.called_count + 1, _SMALLINT_MAX),
            next_called_since_last_reset(lead.called_since_last_reset),
            lead_local_time(now, target.local_gmt, lead.gmt_offset_now, cycle.dst),
            lead.lead_id,
        )
        _write(conn, "DELETE FROM vicidial_hopper WHERE hopper_id = %s", hopper.hopper_id)
        if not before_commit():
            _rollback(conn)
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
        _rollback(conn)
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
    for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
        try:
            return _place_once(
                conn, server, campaign, cycle, before_commit, route, alternates, skip
            )
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != _ER_LOCK_DEADLOCK or attempt == _DEADLOCK_ATTEMPTS:
                raise
            log.warning(
                "campaign %s: deadlock placing a call (attempt %d); retrying",
                campaign.campaign_id,
                attempt,
            )
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- re-placing a call


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
            _rollback(conn)
            return RetrySkipped(skipped)
        lead = _read_lead(conn, call.lead_id)
        if lead is None:
            _rollback(conn)
            return RetrySkipped(f"lead {call.lead_id} is no longer in vicidial_list")
        row = _one(conn, "SELECT NOW()")
        now = row[0] if row is not None and isinstance(row[0], datetime) else call.placed_at
        now = now.replace(microsecond=0)
        code = caller_code(now, call.lead_id)
        if code == call.caller_code:  # failed within the second it was placed
            now += timedelta(seconds=1)
            code = caller_code(now, call.lead_id)
        try:
            _write(
                conn,
                "INSERT INTO vb_call_retries (caller_code, retry_caller_code, lead_id,"
                " server_ip, failed_carrier, retry_carrier, hangup_cause, retried_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                call.caller_code,
                code,
                call.lead_id,
                call.server_ip,
                _fit(failed_carrier, 15),
                _fit(pick.carrier_id, 15),
                cause,
                now,
            )
        except pymysql.err.IntegrityError as exc:
            if exc.args[0] != _ER_DUP_ENTRY:
                raise
            _rollback(conn)
            return RetrySkipped("already re-placed once (vb_call_retries)")
        # The failed call's row goes: the lead's one call in progress is now the retry.
        _write(
            conn,
            "DELETE FROM vicidial_auto_calls WHERE callerid = %s AND lead_id = %s",
            call.caller_code,
            call.lead_id,
        )
        campaign = call.campaign
        dial_string = (
            pick.dial_prefix + ("" if campaign.omit_phone_code else lead.phone_code) + call.number
        )
        queued = _queue_originate(
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
        _write(
            conn,
            "UPDATE vicidial_list SET status = 'INCALL', user = 'VDAD' WHERE lead_id = %s",
            call.lead_id,
        )
        if not before_commit():
            _rollback(conn)
            return RetrySkipped("lost leadership: fencing check failed before commit")
        conn.commit()
    except BaseException:
        _rollback(conn)
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
    if _one(conn, "SELECT 1 FROM vb_call_retries WHERE retry_caller_code = %s", call.caller_code):
        return "the failed call was itself a retry (vb_call_retries)"
    other = _one(
        conn,
        "SELECT callerid FROM vicidial_auto_calls WHERE lead_id = %s AND callerid <> %s LIMIT 1",
        call.lead_id,
        call.caller_code,
    )
    if other is not None:
        return f"the lead has another call in progress ({text(other[0])})"
    if _one(conn, "SELECT 1 FROM vicidial_hopper WHERE lead_id = %s LIMIT 1", call.lead_id):
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
    for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
        try:
            return _replace_once(conn, call, pick, failed_carrier, cause, before_commit)
        except pymysql.err.OperationalError as exc:
            if exc.args[0] != _ER_LOCK_DEADLOCK or attempt == _DEADLOCK_ATTEMPTS:
                raise
            log.warning("lead %d: deadlock re-placing a call (attempt %d)", call.lead_id, attempt)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- after the cycle


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
            _rollback(conn)
            log.warning("fencing check failed before commit: cycle bookkeeping rolled back")
            return False
        conn.commit()
    except BaseException:
        _rollback(conn)
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
            _fit(d.cycle_id, 40),
            _fit(d.kind, 20),
            _fit(d.campaign_id, 20),
            d.lead_id,
            _fit(d.server_ip, 15),
            _fit(d.carrier_id, 15),
            _fit(d.outcome, 20),
            _fit(d.reason, 255),
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
        _rollback(conn)
        raise
    return len(values)


def details(**fields: object) -> str:
    """A decision's details as compact JSON."""
    return json.dumps(fields, separators=(",", ":"), sort_keys=True, default=str)
