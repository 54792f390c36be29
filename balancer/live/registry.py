"""From `servers` rows to the set of AMI endpoints to watch (pure: no I/O).

A row is watched when active='Y' and active_asterisk_server='Y'. Its address comes from the
per-server override in config, else the configured policy. Rows with invalid fields are skipped
with one warning naming the server and field (repeated refreshes do not repeat the warning).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from balancer.ami.endpoint import AmiEndpoint
from balancer.config import AmiConfig, CarrierConfig, is_ipv4
from balancer.db.records import CarrierRow, ServerRow

log = logging.getLogger(__name__)

_HOST_RE = re.compile(r"^[A-Za-z0-9.\-:]+$")


@dataclass(frozen=True)
class WatchedServer:
    """A server the fabric keeps a session to, with the facts status shows beside it."""

    endpoint: AmiEndpoint
    server_id: str
    max_trunks: int


@dataclass(frozen=True)
class RowProblem:
    server: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"servers row {self.server}: {self.field} {self.message}; skipped"


def _port(value: object) -> int | None:
    try:
        port = int(str(value))
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def resolve(row: ServerRow, ami: AmiConfig) -> WatchedServer | RowProblem:
    """The endpoint for one active row, or the first problem that prevents watching it."""
    name = row.server_ip or row.server_id or "?"
    if not is_ipv4(row.server_ip):
        return RowProblem(name, "server_ip", f"is not an IPv4 address ({row.server_ip!r})")
    override = ami.servers.get(row.server_ip)
    username = (override and override.username) or ami.username or row.username
    secret = (override and override.secret) or ami.secret or row.secret
    if not username:
        return RowProblem(name, "ASTmgrUSERNAME", "is empty")
    if not secret:
        return RowProblem(name, "ASTmgrSECRET", "is empty")
    try:
        max_trunks = int(row.max_vicidial_trunks)
    except (TypeError, ValueError):
        return RowProblem(
            name, "max_vicidial_trunks", f"is not a number ({row.max_vicidial_trunks!r})"
        )
    if override and override.address:
        host, port = override.address.host, override.address.port
    else:
        port_or_none = _port(row.telnet_port)
        if port_or_none is None:
            return RowProblem(name, "telnet_port", f"is not a port number ({row.telnet_port!r})")
        port = port_or_none
        if ami.address_policy == "telnet_host":
            host = row.telnet_host.strip()
            if not host or not _HOST_RE.match(host):
                return RowProblem(name, "telnet_host", f"is not a host name ({row.telnet_host!r})")
        else:
            host = row.server_ip
    endpoint = AmiEndpoint(row.server_ip, host, port, username, secret, row.server_id)
    return WatchedServer(endpoint, row.server_id, max(0, max_trunks))


class Registry:
    """Turns successive `servers` snapshots into the watched set, warning once per bad row."""

    def __init__(self, ami: AmiConfig) -> None:
        self.ami = ami
        self._warned: set[tuple[str, str, str]] = set()

    def untracked(self, rows: Iterable[ServerRow]) -> dict[str, str]:
        """server_ip -> why the registry does not watch that servers row."""
        why: dict[str, str] = {}
        for row in rows:
            if row.active != "Y":
                why[row.server_ip] = "servers.active is not 'Y'"
            elif row.active_asterisk_server != "Y":
                why[row.server_ip] = "servers.active_asterisk_server is not 'Y'"
            else:
                resolved = resolve(row, self.ami)
                if isinstance(resolved, RowProblem):
                    why[row.server_ip] = str(resolved)
        return why

    def watched(self, rows: Iterable[ServerRow]) -> dict[str, WatchedServer]:
        """server_ip -> WatchedServer for every active Asterisk server with valid fields."""
        result: dict[str, WatchedServer] = {}
        for row in rows:
            if row.active != "Y" or row.active_asterisk_server != "Y":
                continue
            resolved = resolve(row, self.ami)
            if isinstance(resolved, RowProblem):
                key = (resolved.server, resolved.field, resolved.message)
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("%s", resolved)
                continue
            if resolved.endpoint.server_ip in result:
                log.warning("servers row %s: duplicate server_ip; first row kept", row.server_ip)
                continue
            result[resolved.endpoint.server_ip] = resolved
        return result


# A carrier's dialplan names the trunk it dials: Dial(SIP/${EXTEN}@peer) or Dial(SIP/peer/...).
_DIAL_AT = re.compile(r"(?:SIP|PJSIP|IAX2)/[^@,)\s]*@([A-Za-z0-9_.\-]+)", re.IGNORECASE)
_DIAL_SLASH = re.compile(r"(?:SIP|PJSIP|IAX2)/([A-Za-z0-9_.\-]+)/", re.IGNORECASE)


def trunk_names(carriers: Iterable[CarrierConfig], rows: Iterable[CarrierRow]) -> dict[str, str]:
    """Peer/endpoint name -> carrier id, from config and from vicidial_server_carriers rows.

    A carrier's own id always names it; its dialplan entry's Dial() targets add the peer names its
    channels actually carry. Config wins where both name the same peer.
    """
    names: dict[str, str] = {}
    for row in rows:
        names.setdefault(row.carrier_id, row.carrier_id)
        for pattern in (_DIAL_AT, _DIAL_SLASH):
            for peer in pattern.findall(row.dialplan_entry):
                if "$" not in peer:
                    names.setdefault(peer, row.carrier_id)
    for carrier in carriers:
        names[carrier.id] = carrier.id
        for peer in carrier.trunk_names:
            names[peer] = carrier.id
    return names
