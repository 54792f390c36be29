"""The repair step: finish or undo what a crash, an error or a lost lease left between two writes.

VICIdial's tables have no transactions, so a balance call is written in a fixed order
(balancer/db/calls.py) and its claimed hopper row, whose ``user`` is our claim marker, is the
journal of how far it got. Run by the leader at start-up and before every cycle; idempotent
(each step is one fenced statement, and the hopper row changes state last):

* hopper row INCALL (the lead was updated): delete the row.
* hopper row QUEUE and an Originate exists for the marker's caller code (the call was placed,
  the lead not updated): update the lead and mark the row INCALL in one statement, then delete.
* hopper row QUEUE and no Originate (nothing will be dialed): delete the call's
  vicidial_auto_calls row, its 24-hour-calls row and its two dial-log rows, then put the row back
  READY. The two daily-count tables may keep the +1 of a call that was never dialed (they are
  counters; a crash there errs on the side of calling a lead less, never more).
* vb_call_retries rows still 'placing': the retry's Originate exists -> 'placed'; else its
  records are undone the same way and the row becomes 'undone' (the failed call stays failed).

Rows of other dialers (VICIdial's VDAD_/VDFC_ markers) are never touched: only markers matching
`balancer.balance.fields.CLAIM_MARKER` are ours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from balancer.balance.fields import CLAIM_MARKER, marker_caller_code
from balancer.balance.model import ServerInfo
from balancer.db.calls import update_lead
from balancer.db.connection import Connection
from balancer.db.fence import LeaderFence
from balancer.db.leads import HopperRow, delete_dialed, read_lead
from balancer.db.rows import all_rows, one_row, text

log = logging.getLogger(__name__)


@dataclass
class RepairReport:
    """What one repair pass found and did (lead_ids)."""

    finished: list[int] = field(default_factory=list)  # placed calls whose lead it updated
    undone: list[int] = field(default_factory=list)  # leads put back READY, records removed
    cleared: list[int] = field(default_factory=list)  # INCALL rows deleted
    retries_undone: list[str] = field(default_factory=list)  # retry caller codes
    retries_confirmed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(
            self.finished
            or self.undone
            or self.cleared
            or self.retries_undone
            or self.retries_confirmed
        )


def _exec(conn: Connection, sql: str, *params: object) -> int:
    with conn.cursor() as cur:
        return int(cur.execute(sql, params))


def _undo_records(conn: Connection, fence: LeaderFence, code: str, lead_id: int) -> None:
    """Remove what a call that was never dialed recorded (keyed by its caller code)."""
    logged = one_row(conn, "SELECT call_date FROM vicidial_dial_log WHERE caller_code = %s", code)
    _exec(
        conn,
        f"DELETE FROM vicidial_auto_calls WHERE callerid = %s AND lead_id = %s AND {fence.exists}",  # noqa: S608
        code,
        lead_id,
        *fence.params,
    )
    if logged is not None and isinstance(logged[0], datetime):
        _exec(
            conn,
            "DELETE FROM vicidial_lead_24hour_calls WHERE lead_id = %s AND call_date = %s"  # noqa: S608
            f" AND call_type = 'AUTO' AND {fence.exists} LIMIT 1",
            lead_id,
            logged[0],
            *fence.params,
        )
    for table in ("vicidial_dial_cid_log", "vicidial_dial_log"):  # the dial log last: the witness
        _exec(
            conn,
            f"DELETE FROM {table} WHERE caller_code = %s AND {fence.exists}",  # noqa: S608
            code,
            *fence.params,
        )


def repair(
    conn: Connection,
    fence: LeaderFence,
    servers: Mapping[str, ServerInfo],
    dst: Callable[[datetime], bool],
    *,
    skip_markers: Collection[str] = (),
) -> RepairReport:
    """One pass over our claimed hopper rows and unfinished retries; see the module docstring.

    ``servers`` gives each server's local_gmt for a lead update; ``skip_markers`` are claims in
    flight in this process (never repaired under its own feet).
    """
    report = RepairReport()
    rows = all_rows(
        conn,
        "SELECT hopper_id, lead_id, status, user FROM vicidial_hopper"
        " WHERE user LIKE 'VB%%' AND status IN ('QUEUE', 'INCALL')",
    )
    dialed: list[HopperRow] = []
    for hopper_id, lead_id_value, status_value, user_value in rows:
        marker, status, lead_id = text(user_value), text(status_value), int(lead_id_value)
        if CLAIM_MARKER.match(marker) is None or marker in skip_markers:
            continue
        hopper = HopperRow(int(hopper_id), lead_id, "", marker)
        if status == "INCALL":
            dialed.append(hopper)
            report.cleared.append(lead_id)
            continue
        code = marker_caller_code(marker, lead_id)
        assert code is not None  # the marker matched
        originate = one_row(
            conn,
            "SELECT server_ip, entry_date FROM vicidial_manager WHERE callerid = %s"
            " AND action = 'Originate' ORDER BY man_id DESC LIMIT 1",
            code,
        )
        if originate is not None:
            lead = read_lead(conn, lead_id)
            server = servers.get(text(originate[0]))
            when = originate[1] if isinstance(originate[1], datetime) else None
            if lead is not None and server is not None and when is not None:
                update_lead(conn, fence, hopper, lead, server, when, dst(when))
                dialed.append(hopper)
                report.finished.append(lead_id)
                log.warning(
                    "repair: call %s was placed but lead %d not updated; lead updated",
                    code,
                    lead_id,
                )
            else:
                log.error(
                    "repair: call %s was placed but lead %d or server %s is unknown; left as is",
                    code,
                    lead_id,
                    text(originate[0]),
                )
            continue
        _undo_records(conn, fence, code, lead_id)
        _exec(
            conn,
            "UPDATE vicidial_hopper SET status = 'READY', user = '' WHERE hopper_id = %s"  # noqa: S608
            f" AND user = %s AND status = 'QUEUE' AND {fence.exists}",
            hopper.hopper_id,
            marker,
            *fence.params,
        )
        report.undone.append(lead_id)
        log.warning(
            "repair: lead %d was claimed (%s) but never dialed; back to READY", lead_id, marker
        )
    delete_dialed(conn, fence, dialed)
    _repair_retries(conn, fence, report)
    return report


def _repair_retries(conn: Connection, fence: LeaderFence, report: RepairReport) -> None:
    for code_value, lead_id_value in all_rows(
        conn,
        "SELECT retry_caller_code, lead_id FROM vb_call_retries WHERE state = 'placing'",
    ):
        code, lead_id = text(code_value), int(lead_id_value)
        placed = one_row(
            conn,
            "SELECT 1 FROM vicidial_manager WHERE callerid = %s AND action = 'Originate' LIMIT 1",
            code,
        )
        if placed is None:
            _undo_records(conn, fence, code, lead_id)
            report.retries_undone.append(code)
            log.warning("repair: retry %s of lead %d was never dialed; undone", code, lead_id)
        else:
            report.retries_confirmed.append(code)
        _exec(
            conn,
            "UPDATE vb_call_retries SET state = %s WHERE retry_caller_code = %s"  # noqa: S608
            f" AND state = 'placing' AND {fence.exists}",
            "undone" if placed is None else "placed",
            code,
            *fence.params,
        )
