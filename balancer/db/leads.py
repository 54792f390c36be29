"""The hopper and the lead: claiming READY hopper rows atomically, reading their leads, putting
back the ones not dialed, the number dialed.

VICIdial's hopper is a MEMORY table with no row locks, and VICIdial's own dialer
(AST_VDauto_dial.pl) claims from it at the same time with one conditional UPDATE. So a claim here
is ONE conditional statement as well: ``UPDATE vicidial_hopper SET status='QUEUE', user=<marker>
WHERE hopper_id IN (...) AND status='READY' AND <fence>``, then the rows are read back by that
marker (with their leads and lists, in one statement). A row another dialer took first is no
longer READY and is simply not ours; no row is ever claimed twice. The candidates are the READY
rows of the cycle's snapshot in VICIdial's order (priority DESC, hopper_id), so the claim is a
primary-key lookup instead of a scan of the whole hopper (VICIdial's hopper is indexed on
lead_id only). The marker (`balancer.balance.fields.claim_marker`) names the claim and the
caller code its calls get, which the repair step (balancer/db/repair.py) relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from balancer.balance.fields import NON_DIGITS
from balancer.db.connection import Connection
from balancer.db.fence import FenceLost, LeaderFence, holds
from balancer.db.rows import all_rows, placeholders, text


@dataclass(frozen=True)
class Lead:
    """The vicidial_list row of a claimed lead, with its list's dial settings."""

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
class HopperRow:
    """A claimed vicidial_hopper row."""

    hopper_id: int
    lead_id: int
    alt_dial: str
    marker: str  # the vicidial_hopper.user the claim wrote


@dataclass(frozen=True)
class Claimed:
    """What one claim got: rows with their leads, and rows whose lead is missing (orphans)."""

    leads: list[tuple[HopperRow, Lead]]
    orphans: list[HopperRow]
    taken: list[int]  # candidate hopper_ids another dialer had claimed first


def dialed_number(lead: Lead, alt_dial: str, auto_alt_dial: str) -> str:
    """phone_number; alt_phone's or address3's digits (as VICIdial keeps them) for an alt dial
    the campaign enables."""
    if alt_dial == "ALT" and "ALT" in auto_alt_dial:
        return NON_DIGITS.sub("", lead.alt_phone)
    if alt_dial == "ADDR3" and "ADDR3" in auto_alt_dial:
        return NON_DIGITS.sub("", lead.address3)
    return lead.phone_number


_READ_BACK = (
    "SELECT h.hopper_id, h.lead_id, h.alt_dial, l.lead_id, l.list_id, l.gmt_offset_now,"
    " l.called_since_last_reset, l.phone_code, l.phone_number, l.alt_phone, l.address3,"
    " l.security_phrase, l.called_count, l.state, s.dial_prefix, s.campaign_cid_override"
    " FROM vicidial_hopper AS h"
    " LEFT JOIN vicidial_list AS l ON l.lead_id = h.lead_id"
    " LEFT JOIN vicidial_lists AS s ON s.list_id = l.list_id"
    " WHERE h.hopper_id IN ({ids}) AND h.user = %s AND h.status = 'QUEUE'"
)


def _lead(row: Sequence[object]) -> Lead:
    gmt = row[5]
    return Lead(
        lead_id=int(str(row[3])),
        list_id=int(str(row[4] or 0)),
        gmt_offset_now=float(gmt) if isinstance(gmt, Decimal | int | float) else 0.0,
        called_since_last_reset=text(row[6]),
        phone_code=text(row[7]),
        phone_number=text(row[8]),
        alt_phone=text(row[9]),
        address3=text(row[10]),
        security_phrase=text(row[11]),
        called_count=int(str(row[12] or 0)),
        state=text(row[13]),
        list_dial_prefix=text(row[14]),
        list_cid_override=text(row[15]),
    )


def claim(
    conn: Connection, fence: LeaderFence, campaign_id: str, candidates: Sequence[int], marker: str
) -> Claimed:
    """Claim the candidate hopper rows still READY, in one statement; read them back by marker.

    Raises FenceLost when nothing was claimed because another leader's epoch is in vb_leader.
    """
    if not candidates:
        return Claimed([], [], [])
    ids = list(dict.fromkeys(candidates))
    with conn.cursor() as cur:
        claimed = cur.execute(
            "UPDATE vicidial_hopper SET status = 'QUEUE', user = %s"  # noqa: S608
            f" WHERE hopper_id IN ({placeholders(len(ids))}) AND status = 'READY'"
            f" AND campaign_id = %s AND {fence.exists}",
            (marker, *ids, campaign_id, *fence.params),
        )
    if not claimed:
        if not holds(conn, fence):
            raise FenceLost(f"lease {fence.name!r}: epoch {fence.epoch} is no longer ours")
        return Claimed([], [], ids)
    rows = all_rows(conn, _READ_BACK.format(ids=placeholders(len(ids))), *ids, marker)
    order = {hopper_id: i for i, hopper_id in enumerate(ids)}
    rows.sort(key=lambda row: order[int(str(row[0]))])
    got: list[tuple[HopperRow, Lead]] = []
    orphans: list[HopperRow] = []
    for row in rows:
        hopper = HopperRow(int(str(row[0])), int(str(row[1])), text(row[2]), marker)
        if row[3] is None:
            orphans.append(hopper)
        else:
            got.append((hopper, _lead(row)))
    mine = {hopper.hopper_id for hopper, _ in got} | {hopper.hopper_id for hopper in orphans}
    return Claimed(got, orphans, [i for i in ids if i not in mine])


def unclaim(conn: Connection, fence: LeaderFence, rows: Sequence[HopperRow]) -> int:
    """Put claimed rows not dialed back to READY (user '', as VICIdial's hopper writes them)."""
    return _by_marker(
        conn,
        fence,
        rows,
        "UPDATE vicidial_hopper SET status = 'READY', user = ''",
        "QUEUE",
    )


def delete_claimed(conn: Connection, fence: LeaderFence, rows: Sequence[HopperRow]) -> int:
    """Delete claimed rows: orphans (their lead is gone) while QUEUE."""
    return _by_marker(conn, fence, rows, "DELETE FROM vicidial_hopper", "QUEUE")


def delete_dialed(conn: Connection, fence: LeaderFence, rows: Sequence[HopperRow]) -> int:
    """Delete the rows whose calls were written (INCALL): the last step of each call."""
    return _by_marker(conn, fence, rows, "DELETE FROM vicidial_hopper", "INCALL")


def _by_marker(
    conn: Connection, fence: LeaderFence, rows: Sequence[HopperRow], head: str, status: str
) -> int:
    """One fenced statement over our own rows (by hopper_id AND marker AND status)."""
    if not rows:
        return 0
    done = 0
    by_marker: dict[str, list[int]] = {}
    for row in rows:
        by_marker.setdefault(row.marker, []).append(row.hopper_id)
    with conn.cursor() as cur:
        for marker, ids in by_marker.items():
            done += cur.execute(
                f"{head} WHERE hopper_id IN ({placeholders(len(ids))})"
                f" AND user = %s AND status = %s AND {fence.exists}",
                (*ids, marker, status, *fence.params),
            )
    return done


def read_lead(conn: Connection, lead_id: int) -> Lead | None:
    """One lead with its list's dial settings (for a retry, which has no hopper row)."""
    rows = all_rows(
        conn,
        "SELECT 0, 0, '', l.lead_id, l.list_id, l.gmt_offset_now, l.called_since_last_reset,"
        " l.phone_code, l.phone_number, l.alt_phone, l.address3, l.security_phrase,"
        " l.called_count, l.state, s.dial_prefix, s.campaign_cid_override"
        " FROM vicidial_list AS l LEFT JOIN vicidial_lists AS s ON s.list_id = l.list_id"
        " WHERE l.lead_id = %s",
        lead_id,
    )
    return _lead(rows[0]) if rows else None
