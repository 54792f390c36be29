"""The registry's rows as plain records (no I/O): what `queries` reads from servers and carriers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServerRow:
    """One `servers` row, as stored (strings may be empty or invalid; the registry validates)."""

    server_id: str
    server_ip: str
    active: str
    active_asterisk_server: str
    active_agent_login_server: str
    telnet_host: str
    telnet_port: Any
    username: str
    secret: str
    max_vicidial_trunks: Any
    asterisk_version: str


@dataclass(frozen=True)
class CarrierRow:
    carrier_id: str
    server_ip: str
    protocol: str
    dialplan_entry: str
