"""One balance call: VICIdial's rows for a claimed lead, written in an order that is safe without
transactions, every statement fenced by the leader's epoch.

`write_call` writes exactly what VICIdial's balance process writes for one call (VICIDIAL.md,
"Placing one balance call") for a hopper row already claimed (balancer/db/leads.py). VICIdial's
tables are MyISAM and MEMORY: a statement is atomic, a sequence of them is not. So the order is:

1. ``vicidial_auto_calls`` (the call in progress), the dial log, the caller-ID log and the three
   call-count tables: records of a call that nothing dials yet;
2. the ``vicidial_manager`` Originate row: the one VICIdial's sender turns into a dialed call,
   written LAST of the records;
3. one multi-table UPDATE that updates the lead AND marks its hopper row INCALL together.

A crash or error before 2 leaves a claimed hopper row (QUEUE) and no Originate: the repair step
undoes the records and puts the lead back to READY. After 2 and before 3: an Originate and a
QUEUE row: the repair step updates the lead. After 3: an INCALL row, deleted by the executor (or
the repair step). The hopper row's marker names the caller code, so repair needs nothing else.
Every statement carries the leader fence (balancer/db/fence.py): a leader that lost the lease
writes nothing more, and the new leader's repair finishes or undoes what it left.

Where every table written is InnoDB, the same statements also run in one transaction
(``transactional=True``), so an error undoes them at once; the claim commits on its own.
A call costs 8 statements here (9 + BEGIN/COMMIT on InnoDB), plus its share of its placement's
claim, read-back and hopper delete.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from balancer.balance.fields import (
    caller_code,
    caller_id,
    lead_local_time,
    next_called_since_last_reset,
    originate_exten,
    timeout_ms,
)
from balancer.balance.model import OUTBALANCE, CampaignInfo, ServerInfo
from balancer.db.connection import Connection
from balancer.db.fence import FenceLost, LeaderFence, holds
from balancer.db.leads import HopperRow, Lead
from balancer.db.rows import fit, placeholders, rollback

log = logging.getLogger(__name__)

SMALLINT_MAX = 65535


@dataclass(frozen=True)
class CycleContext:
    """What every call of one cycle shares: its single timestamp, DST state and id."""

    now: datetime  # the cycle's start (the snapshot's NOW()): caller code, entry_date, call_time
    dst: bool  # daylight saving time in effect (adds an hour to the lead's local-time offset)
    cycle_id: str
    # VDACnote's host field: the balancing host's own server_ip ('' -> the target server's)
    host_server_ip: str = ""
    limit_24hour: bool = False  # system_settings.call_limit_24hour: record the lead's state


@dataclass(frozen=True)
class CallResult:
    """One call written: its Originate is in vicidial_manager."""

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
    phone_number: str = ""  # the number dialed (alt_phone / address3 for alt dials)
    alt_dial: str = "NONE"
    phone_code: str = ""
    carrier_id: str = ""  # the carrier routing chose ('' when not routed)
    route: str = ""
    lead_updated: bool = True  # False: the lease was lost after the Originate; repair updates it


@dataclass(frozen=True)
class Dial:
    """What one Originate dials, computed before anything is written."""

    server: ServerInfo
    campaign: CampaignInfo
    lead: Lead
    code: str
    now: datetime
    dial_string: str
    number: str
    alt_dial: str
    host_server_ip: str = ""  # VDACnote's host field ('' -> the target server's server_ip)
    limit_24hour: bool = False

    @property
    def channel(self) -> str:
        return f"Local/{self.dial_string}@{self.server.ext_context}"


def fenced_insert(
    conn: Connection,
    fence: LeaderFence,
    table: str,
    columns: Sequence[str],
    values: Sequence[object],
    on_duplicate: str = "",
) -> int:
    """``INSERT INTO table (columns) SELECT values FROM vb_leader WHERE <our epoch>``.

    Returns the new AUTO_INCREMENT id (0 when none); FenceLost when the epoch is not ours.
    """
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)})"
        f" SELECT {placeholders(len(values))} {fence.source}"
        + (f" ON DUPLICATE KEY UPDATE {on_duplicate}" if on_duplicate else "")
    )
    with conn.cursor() as cur:
        if not cur.execute(sql, (*values, *fence.params)):
            raise FenceLost(f"lease {fence.name!r}: epoch {fence.epoch} lost writing {table}")
        return int(cur.lastrowid or 0)


def insert_dial_logs(conn: Connection, fence: LeaderFence, dial: Dial) -> tuple[str, str]:
    """vicidial_dial_log and vicidial_dial_cid_log; returns (CID number, CID type)."""
    server, campaign, lead = dial.server, dial.campaign, dial.lead
    cid_number, cid_type, cid_value = caller_id(
        dial.code, lead.list_cid_override, campaign, lead.security_phrase
    )
    fenced_insert(
        conn,
        fence,
        "vicidial_dial_log",
        (
            "caller_code",
            "lead_id",
            "server_ip",
            "call_date",
            "extension",
            "channel",
            "context",
            "timeout",
            "outbound_cid",
        ),
        (
            dial.code,
            lead.lead_id,
            server.server_ip,
            dial.now,
            fit(originate_exten(server, campaign), 100),
            fit(dial.channel, 100),
            fit(server.ext_context, 100),
            timeout_ms(campaign.dial_timeout),
            fit(cid_value, 100) if cid_type else "",  # no qualifying CID: VICIdial writes ''
        ),
    )
    fenced_insert(
        conn,
        fence,
        "vicidial_dial_cid_log",
        ("caller_code", "call_date", "call_type", "call_alt", "outbound_cid", "outbound_cid_type"),
        (dial.code, dial.now, OUTBALANCE, fit(dial.alt_dial, 10), fit(cid_number, 20), cid_type),
    )
    return cid_number, cid_type


def insert_originate(conn: Connection, fence: LeaderFence, dial: Dial, cid_type: str) -> int:
    """The vicidial_manager Originate row (what makes Asterisk dial); returns its man_id."""
    server, campaign, lead = dial.server, dial.campaign, dial.lead
    _, _, cid_value = caller_id(dial.code, lead.list_cid_override, campaign, lead.security_phrase)
    note = "|".join(
        (
            campaign.campaign_id,
            str(lead.lead_id),
            lead.phone_code,
            dial.number,
            OUTBALANCE,
            dial.alt_dial,
            str(campaign.queue_priority),
            dial.host_server_ip or server.server_ip,
            cid_type,
        )
    )
    return fenced_insert(
        conn,
        fence,
        "vicidial_manager",
        (
            "uniqueid",
            "entry_date",
            "status",
            "response",
            "server_ip",
            "channel",
            "action",
            "callerid",
            "cmd_line_b",
            "cmd_line_c",
            "cmd_line_d",
            "cmd_line_e",
            "cmd_line_f",
            "cmd_line_g",
            "cmd_line_h",
            "cmd_line_i",
            "cmd_line_j",
            "cmd_line_k",
        ),
        (
            "",
            dial.now,
            "NEW",
            "N",
            server.server_ip,
            "",
            "Originate",
            dial.code,
            fit(f"Exten: {originate_exten(server, campaign)}", 100),
            fit(f"Context: {server.ext_context}", 100),
            fit(f"Channel: {dial.channel}", 200),
            "Priority: 1",
            fit(f"Callerid: {cid_value}", 100),
            f"Timeout: {timeout_ms(campaign.dial_timeout)}",
            "",
            "",
            "",
            fit(f"VDACnote: {note}", 100),
        ),
    )


def insert_auto_call(conn: Connection, fence: LeaderFence, dial: Dial) -> int:
    """The call's vicidial_auto_calls row (status SENT, call_type OUTBALANCE)."""
    return fenced_insert(
        conn,
        fence,
        "vicidial_auto_calls",
        (
            "server_ip",
            "campaign_id",
            "status",
            "lead_id",
            "callerid",
            "phone_code",
            "phone_number",
            "call_time",
            "call_type",
            "alt_dial",
            "queue_priority",
        ),
        (
            dial.server.server_ip,
            dial.campaign.campaign_id,
            "SENT",
            dial.lead.lead_id,
            dial.code,
            fit(dial.lead.phone_code, 10),
            fit(dial.number, 18),
            dial.now,
            OUTBALANCE,
            fit(dial.alt_dial, 6),
            dial.campaign.queue_priority,
        ),
    )


def _insert_counts(conn: Connection, fence: LeaderFence, dial: Dial) -> None:
    """The three call-count tables (24-hour calls, per-lead and per-number daily counts)."""
    lead, now = dial.lead, dial.now
    fenced_insert(
        conn,
        fence,
        "vicidial_lead_24hour_calls",
        ("lead_id", "list_id", "call_date", "phone_number", "phone_code", "state", "call_type"),
        (
            lead.lead_id,
            lead.list_id,
            now,
            fit(dial.number, 18),
            fit(lead.phone_code, 10),
            fit(lead.state, 2) if dial.limit_24hour else "",  # VICIdial: '' unless limits are on
            "AUTO",
        ),
    )
    fenced_insert(
        conn,
        fence,
        "vicidial_lead_call_daily_counts",
        (
            "lead_id",
            "list_id",
            "called_count_total",
            "called_count_auto",
            "called_count_manual",
            "modify_date",
        ),
        (lead.lead_id, lead.list_id, 1, 1, 0, now),
        "called_count_total = LEAST(COALESCE(called_count_total, 0) + 1, 65535),"
        " called_count_auto = LEAST(COALESCE(called_count_auto, 0) + 1, 65535),"
        " list_id = VALUES(list_id), modify_date = VALUES(modify_date)",
    )
    fenced_insert(
        conn,
        fence,
        "vicidial_phone_number_call_daily_counts",
        ("phone_number", "called_count", "modify_date"),
        (fit(dial.number, 18), 1, now),
        "called_count = LEAST(COALESCE(called_count, 0) + 1, 65535),"
        " modify_date = VALUES(modify_date)",
    )


def update_lead(
    conn: Connection,
    fence: LeaderFence,
    hopper: HopperRow,
    lead: Lead,
    server: ServerInfo,
    now: datetime,
    dst: bool,
) -> bool:
    """The lead's update and its hopper row's QUEUE -> INCALL, in ONE statement (exactly once).

    False when the hopper row is no longer our QUEUE row (then nothing was written).
    FenceLost when the epoch is not ours.
    """
    values = (
        next_called_since_last_reset(lead.called_since_last_reset),
        lead_local_time(now, server.local_gmt, lead.gmt_offset_now, dst),
    )
    with conn.cursor() as cur:
        changed = cur.execute(
            "UPDATE vicidial_list AS l"
            " JOIN vicidial_hopper AS h ON h.hopper_id = %s AND h.user = %s AND h.status = 'QUEUE'"
            " JOIN vb_leader AS f ON f.name = %s AND f.epoch = %s"
            " SET l.user = 'VDAD',"
            " l.called_count = LEAST(COALESCE(l.called_count, 0) + 1, 65535),"
            " l.called_since_last_reset = %s, l.last_local_call_time = %s, h.status = 'INCALL'"
            " WHERE l.lead_id = %s",
            (hopper.hopper_id, hopper.marker, *fence.params, *values, lead.lead_id),
        )
    if changed:
        return True
    if not holds(conn, fence):
        raise FenceLost(f"lease {fence.name!r}: epoch {fence.epoch} lost updating the lead")
    return False


def write_call(
    conn: Connection,
    fence: LeaderFence,
    *,
    hopper: HopperRow,
    lead: Lead,
    server: ServerInfo,
    campaign: CampaignInfo,
    cycle: CycleContext,
    dial_string: str,
    number: str,
    transactional: bool = False,
    carrier_id: str = "",
    route: str = "",
) -> CallResult:
    """Write one claimed lead's call on ``server``: records, then the Originate, then the lead.

    Raises FenceLost when the epoch moved on before the Originate (nothing will be dialed; the
    new leader's repair undoes the records), and any database error as it came (the executor
    runs the repair step). A lease lost after the Originate returns ``lead_updated=False``.
    """
    now = cycle.now.replace(microsecond=0)
    alt_dial = hopper.alt_dial or "MAIN"
    dial = Dial(
        server,
        campaign,
        lead,
        caller_code(now, lead.lead_id),
        now,
        dial_string,
        number,
        alt_dial,
        cycle.host_server_ip,
        cycle.limit_24hour,
    )
    if transactional:
        conn.begin()
    try:
        auto_call_id = insert_auto_call(conn, fence, dial)
        _, cid_type = insert_dial_logs(conn, fence, dial)
        _insert_counts(conn, fence, dial)
        man_id = insert_originate(conn, fence, dial, cid_type)
        try:
            updated = update_lead(conn, fence, hopper, lead, server, now, cycle.dst)
        except FenceLost:
            if transactional:
                raise  # rolled back below: the Originate goes with it
            updated = False
            log.warning(
                "lead %d: leadership lost after its Originate (%s); the new leader's repair"
                " step updates the lead",
                lead.lead_id,
                dial.code,
            )
        else:
            if not updated:
                # Someone else removed our hopper row meanwhile: the lead alone, still fenced.
                updated = _update_lead_only(conn, fence, lead, server, now, cycle.dst)
        if transactional:
            conn.commit()
    except BaseException:
        if transactional:
            rollback(conn)
        raise
    return CallResult(
        lead_id=lead.lead_id,
        list_id=lead.list_id,
        caller_code=dial.code,
        man_id=man_id,
        auto_call_id=auto_call_id,
        server_ip=server.server_ip,
        campaign_id=campaign.campaign_id,
        dial_string=dial_string,
        channel=dial.channel,
        cid_type=cid_type,
        phone_number=number,
        alt_dial=alt_dial,
        phone_code=lead.phone_code,
        carrier_id=carrier_id,
        route=route,
        lead_updated=updated,
    )


def _update_lead_only(
    conn: Connection, fence: LeaderFence, lead: Lead, server: ServerInfo, now: datetime, dst: bool
) -> bool:
    log.warning("lead %d: its hopper row was removed by another process mid-call", lead.lead_id)
    with conn.cursor() as cur:
        return bool(
            cur.execute(
                "UPDATE vicidial_list SET user = 'VDAD',"  # noqa: S608
                " called_count = LEAST(COALESCE(called_count, 0) + 1, 65535),"
                " called_since_last_reset = %s, last_local_call_time = %s"
                f" WHERE lead_id = %s AND {fence.exists}",
                (
                    next_called_since_last_reset(lead.called_since_last_reset),
                    lead_local_time(now, server.local_gmt, lead.gmt_offset_now, dst),
                    lead.lead_id,
                    *fence.params,
                ),
            )
        )
