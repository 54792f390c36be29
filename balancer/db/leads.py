"""The hopper and the lead: claiming a READY hopper row, reading its lead, the number dialed.

Claiming a lead is two statements on purpose: a plain read lists the campaign's READY rows in
VICIdial's order, then each candidate is locked by primary key with ``FOR UPDATE SKIP LOCKED``.
A single ``ORDER BY priority DESC, hopper_id ... FOR UPDATE SKIP LOCKED`` sorts in a filesort, so
InnoDB locks EVERY READY row of the campaign, and a second balancer would find the hopper empty.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal

from balancer.balance.fields import NON_DIGITS
from balancer.db.connection import Connection
from balancer.db.rows import all_rows, fit, one_row, text, write

log = logging.getLogger(__name__)

# Candidates read per claim round; a round only comes back when all of them were taken.
_CLAIM_BATCH = 8


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
    user: str | None = None  # before the claim, to put back when the lead stays


def dialed_number(lead: Lead, alt_dial: str, auto_alt_dial: str) -> str:
    """phone_number; alt_phone or address3's digits for an alt dial the campaign enables."""
    if alt_dial == "ALT" and "ALT" in auto_alt_dial:
        return lead.alt_phone
    if alt_dial == "ADDR3" and "ADDR3" in auto_alt_dial:
        return NON_DIGITS.sub("", lead.address3)
    return lead.phone_number


def claim_row(
    conn: Connection, campaign_id: str, server_ip: str, skip: Collection[int] = ()
) -> HopperRow | None:
    """Lock and mark one READY hopper row (priority DESC, hopper_id); None when none is left.

    Rows in ``skip`` (hopper_ids) are passed over: leads no carrier could take this cycle.
    """
    tried: set[int] = set(skip)
    while True:
        limit = len(tried) + _CLAIM_BATCH
        ids = [
            int(row[0])
            for row in all_rows(
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
            row = one_row(
                conn,
                "SELECT hopper_id, lead_id, alt_dial, user FROM vicidial_hopper"
                " WHERE hopper_id = %s AND status = 'READY' FOR UPDATE SKIP LOCKED",
                hopper_id,
            )
            if row is None:  # taken by another balancer meanwhile (locked, gone or not READY)
                continue
            write(
                conn,
                "UPDATE vicidial_hopper SET status = 'QUEUE', user = %s WHERE hopper_id = %s",
                fit(f"VDFC_{server_ip}", 20),
                hopper_id,
            )
            write(
                conn, "UPDATE vicidial_hopper SET status = 'INCALL' WHERE hopper_id = %s", hopper_id
            )
            return HopperRow(
                int(row[0]), int(row[1]), text(row[2]), None if row[3] is None else text(row[3])
            )
        if len(ids) < limit:
            return None


def unclaim(conn: Connection, hopper: HopperRow) -> None:
    """Put a claimed row back as it was (READY, its user): the lead stays in the hopper."""
    write(
        conn,
        "UPDATE vicidial_hopper SET status = 'READY', user = %s WHERE hopper_id = %s",
        hopper.user,
        hopper.hopper_id,
    )


def read_lead(conn: Connection, lead_id: int) -> Lead | None:
    row = one_row(
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
    return Lead(
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


def claim_lead(
    conn: Connection,
    campaign_id: str,
    server_ip: str,
    orphans: list[int],
    skip: Collection[int] = (),
) -> tuple[HopperRow, Lead] | None:
    """Claim a hopper row whose lead exists; rows naming a missing lead are deleted (rule 8)."""
    while True:
        hopper = claim_row(conn, campaign_id, server_ip, skip)
        if hopper is None:
            return None
        lead = read_lead(conn, hopper.lead_id)
        if lead is not None:
            return hopper, lead
        # VICIdial leaves such a row INCALL and loses a call on it; we drop it and claim again.
        write(conn, "DELETE FROM vicidial_hopper WHERE hopper_id = %s", hopper.hopper_id)
        orphans.append(hopper.lead_id)
        log.warning(
            "campaign %s: hopper row %d names lead %d, which is not in vicidial_list;"
            " row deleted, claiming another lead",
            campaign_id,
            hopper.hopper_id,
            hopper.lead_id,
        )
