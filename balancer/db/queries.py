"""Reads of the VICIdial tables the tracker needs: servers, carriers, phones, server_updater.

Each function takes a connection and issues one parameterized query; rows come back as plain
records, with no interpretation beyond types (that is the registry's job).
"""

from __future__ import annotations

from balancer.db.connection import Connection
from balancer.db.records import CarrierRow, ServerRow
from balancer.db.rows import dict_rows


def load_servers(conn: Connection) -> list[ServerRow]:
    """Every `servers` row (active or not: the registry decides)."""
    rows = dict_rows(
        conn,
        "SELECT server_id, server_ip, active, active_asterisk_server, active_agent_login_server,"
        " telnet_host, telnet_port, ASTmgrUSERNAME, ASTmgrSECRET, max_vicidial_trunks,"
        " asterisk_version FROM servers ORDER BY server_ip",
    )
    return [
        ServerRow(
            server_id=str(r["server_id"] or ""),
            server_ip=str(r["server_ip"] or ""),
            active=str(r["active"] or ""),
            active_asterisk_server=str(r["active_asterisk_server"] or ""),
            active_agent_login_server=str(r["active_agent_login_server"] or ""),
            telnet_host=str(r["telnet_host"] or ""),
            telnet_port=r["telnet_port"],
            username=str(r["ASTmgrUSERNAME"] or ""),
            secret=str(r["ASTmgrSECRET"] or ""),
            max_vicidial_trunks=r["max_vicidial_trunks"],
            asterisk_version=str(r["asterisk_version"] or ""),
        )
        for r in rows
    ]


def load_carriers(conn: Connection) -> list[CarrierRow]:
    """Active `vicidial_server_carriers` rows."""
    rows = dict_rows(
        conn,
        "SELECT carrier_id, server_ip, protocol, dialplan_entry FROM vicidial_server_carriers"
        " WHERE active = %s",
        "Y",
    )
    return [
        CarrierRow(
            str(r["carrier_id"]),
            str(r["server_ip"] or ""),
            str(r["protocol"] or ""),
            str(r["dialplan_entry"] or ""),
        )
        for r in rows
    ]


def load_phone_extensions(conn: Connection) -> dict[str, set[str]]:
    """server_ip -> extensions of the active phones registered there."""
    phones: dict[str, set[str]] = {}
    for r in dict_rows(conn, "SELECT extension, server_ip FROM phones WHERE active = %s", "Y"):
        phones.setdefault(str(r["server_ip"]), set()).add(str(r["extension"]))
    return phones


def load_updater_ages(conn: Connection) -> dict[str, float]:
    """server_ip -> seconds since its server_updater.last_update, by the database's own clock."""
    rows = dict_rows(
        conn,
        "SELECT server_ip, TIMESTAMPDIFF(MICROSECOND, last_update, NOW(6)) / 1e6 AS age"
        " FROM server_updater",
    )
    return {str(r["server_ip"]): float(r["age"]) for r in rows if r["age"] is not None}
