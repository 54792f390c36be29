"""VICIdial's field rules for one balance call (VICIDIAL.md, "Placing one balance call"): pure
functions, no I/O. balancer/db/calls.py writes what they compute."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from balancer.balance.model import CampaignInfo, ServerInfo

NON_DIGITS = re.compile(r"\D")
_LEADING_DIGITS = re.compile(r"\d+")


_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# A hopper row this balancer claimed: 'VB' + the caller code's 9 time digits + 9 base-36 chars.
CLAIM_MARKER = re.compile(r"^VB([0-9]{9})[0-9A-Z]{9}$")


def code_time(now: datetime) -> str:
    """The caller code's time part: the last 9 digits of MMDDhhmmss."""
    return f"{now:%m%d%H%M%S}"[-9:]


def caller_code(now: datetime, lead_id: int) -> str:
    """'V' + the last 9 digits of MMDDhhmmss + the lead_id zero-padded to 10 (20 characters)."""
    return "V" + code_time(now) + f"{lead_id:010d}"


def _base36(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, rest = divmod(value, 36)
        digits.append(_BASE36[rest])
    return "".join(reversed(digits))


def claim_marker(now: datetime, epoch: int, sequence: int) -> str:
    """The vicidial_hopper.user a claim writes (20 characters, unique to this cycle and claim).

    It carries the caller code's time digits, so the repair step can tell from the hopper row
    alone which caller code its call has, plus the leader epoch and a per-leader sequence (both
    wrap: only markers alive at the same moment need to differ).
    """
    return "VB" + code_time(now) + _base36(epoch, 4) + _base36(sequence, 5)


def marker_caller_code(marker: str, lead_id: int) -> str | None:
    """The caller code of the call a claim marker's lead gets; None for a foreign marker."""
    match = CLAIM_MARKER.match(marker)
    if match is None:
        return None
    return "V" + match.group(1) + f"{lead_id:010d}"


def next_called_since_last_reset(value: str) -> str:
    """'Y' -> 'Y1', 'Yn' -> 'Y(n+1)', 'Y10' stays (VICIdial stores '' there), else 'Y'."""
    if not value.startswith("Y"):
        return "Y"
    suffix = value[1:]
    count = int(suffix) if suffix.isdigit() else 0
    return f"Y{min(count + 1, 10)}"


def dial_prefix(list_prefix: str, campaign_prefix: str) -> str:
    """The list's prefix, else the campaign's, '9' when empty; one containing 'x'/'X' is none."""
    prefix = list_prefix or campaign_prefix or "9"
    return "" if "x" in prefix.lower() else prefix


def caller_id(
    code: str, list_override: str, campaign: CampaignInfo, security_phrase: str
) -> tuple[str, str, str]:
    """(CID number, CID type, Callerid value), VICIdial's rule: the first candidate LONGER than 6
    characters of the list override, the lead's security_phrase digits (use_custom_cid='Y') and
    the campaign CID; when none qualifies, no CID at all and the bare caller code."""
    candidates = [(list_override.strip(), "LIST_CID")]
    if campaign.use_custom_cid:
        candidates.append((NON_DIGITS.sub("", security_phrase), "CUSTOM_CID"))
    candidates.append((campaign.campaign_cid, "CAMPAIGN_CID"))
    for number, kind in candidates:
        if len(number) > 6:
            return number, kind, f'"{code}" <{number}>'
    return "", "", code


def asterisk_major(version: str) -> int | None:
    """The leading number of asterisk_version ('13.38.3-vici' -> 13); None when there is none."""
    match = _LEADING_DIGITS.match(version.strip())
    return int(match.group()) if match else None


def originate_exten(server: ServerInfo, campaign: CampaignInfo) -> str:
    """routing_prefix (Asterisk 12 and later only) + campaign VDAD exten (else the server's)."""
    exten = campaign.vdad_exten or server.answer_transfer_agent
    major = asterisk_major(server.asterisk_version)
    return f"{server.routing_prefix}{exten}" if major is not None and major >= 12 else exten


def timeout_ms(dial_timeout: int) -> int:
    """dial_timeout in ms; 60000 when it is 4 s or less."""
    return 60000 if dial_timeout <= 4 else dial_timeout * 1000


def lead_local_time(now: datetime, server_gmt: float, lead_gmt: float, dst: bool) -> datetime:
    """The lead's local time: now - (server local_gmt - lead gmt_offset_now [+1 in DST]) hours."""
    return now - timedelta(hours=server_gmt - lead_gmt + (1 if dst else 0))
