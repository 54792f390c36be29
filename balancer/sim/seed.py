"""Seed a scratch database with a small VICIdial cluster for the demo, tests and benchmarks.

Writes `servers` rows pointing at simulated servers (telnet_host/telnet_port on loopback), and
the campaign side of a balance scenario: system_settings, campaigns, lists, leads with READY
hopper rows, live agents, and `vicidial_campaign_server_stats` shortages.
Only for scratch databases: it deletes what it replaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from balancer.db.connection import Connection

CLUSTER_TABLES = (
    "servers",
    "server_updater",
    "phones",
    "vicidial_server_carriers",
)
CAMPAIGN_TABLES = (
    "system_settings",
    "vicidial_campaigns",
    "vicidial_campaign_stats",
    "vicidial_campaign_server_stats",
    "vicidial_server_trunks",
    "vicidial_lists",
    "vicidial_list",
    "vicidial_hopper",
    "vicidial_live_agents",
)


@dataclass(frozen=True)
class SeedServer:
    """A servers row: identity, AMI socket, balance settings."""

    server_ip: str
    host: str
    port: int
    server_id: str = ""
    max_trunks: int = 40
    balance_active: bool = True
    rank: int = 0
    asterisk_version: str = "18.21.0"
    secret: str = "1234"


@dataclass(frozen=True)
class SeedCampaign:
    """A campaign with its list, leads, live agents and per-server shortages."""

    campaign_id: str
    leads: int = 50
    agents_on: str | None = None  # server_ip the live agents are logged into
    agents: int = 2
    shortages: Mapping[str, int] | None = None  # server_ip -> local_trunk_shortage
    dial_prefix: str = "9"
    list_id: int = 0  # 0: derived from the campaign's position


def _delete(conn: Connection, tables: Iterable[str]) -> None:
    with conn.cursor() as cur:
        for table in tables:
            cur.execute(f"DELETE FROM {table}")  # noqa: S608 - our own constant table names


def seed_servers(conn: Connection, servers: Sequence[SeedServer]) -> None:
    """Replace the servers (and their server_updater rows) with these."""
    _delete(conn, CLUSTER_TABLES)
    with conn.cursor() as cur:
        for n, s in enumerate(servers, start=1):
            cur.execute(
                "INSERT INTO servers (server_id, server_ip, active, active_asterisk_server,"
                " active_agent_login_server, telnet_host, telnet_port, ASTmgrUSERNAME,"
                " ASTmgrSECRET, max_vicidial_trunks, asterisk_version, vicidial_balance_active,"
                " vicidial_balance_rank) VALUES (%s, %s, 'Y', 'Y', 'Y', %s, %s, 'cron', %s, %s,"
                " %s, %s, %s)",
                (
                    s.server_id or f"ast{n}",
                    s.server_ip,
                    s.host,
                    s.port,
                    s.secret,
                    s.max_trunks,
                    s.asterisk_version,
                    "Y" if s.balance_active else "N",
                    s.rank,
                ),
            )
            cur.execute(
                "INSERT INTO server_updater (server_ip, last_update) VALUES (%s, NOW())",
                (s.server_ip,),
            )


def seed_campaigns(
    conn: Connection, campaigns: Sequence[SeedCampaign], calls_per_second: int = 50
) -> None:
    """Replace campaigns, lists, leads, hopper, agents and shortages with these."""
    _delete(conn, CAMPAIGN_TABLES)
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO system_settings (outbound_autodial_active, outbound_calls_per_second,"
            " disable_auto_dial) VALUES ('1', %s, '0')",
            (calls_per_second,),
        )
        lead_id = 100000
        for n, camp in enumerate(campaigns, start=1):
            list_id = camp.list_id or 1000 + n
            cur.execute(
                "INSERT INTO vicidial_campaigns (campaign_id, campaign_name, active, dial_prefix,"
                " dial_timeout) VALUES (%s, %s, 'Y', %s, 30)",
                (camp.campaign_id, f"Campaign {camp.campaign_id}", camp.dial_prefix),
            )
            cur.execute(
                "INSERT INTO vicidial_campaign_stats (campaign_id, balance_trunk_fill)"
                " VALUES (%s, 0)",
                (camp.campaign_id,),
            )
            cur.execute(
                "INSERT INTO vicidial_lists (list_id, list_name, campaign_id, active)"
                " VALUES (%s, %s, %s, 'Y')",
                (list_id, f"List {list_id}", camp.campaign_id),
            )
            leads = []
            for i in range(camp.leads):
                lead_id += 1
                leads.append((lead_id, list_id, "1", f"312555{n:02d}{i:02d}"[-10:], "NEW"))
            cur.executemany(
                "INSERT INTO vicidial_list (lead_id, list_id, phone_code, phone_number, status,"
                " gmt_offset_now, called_since_last_reset) VALUES (%s, %s, %s, %s, %s, -5.00, 'N')",
                leads,
            )
            cur.executemany(
                "INSERT INTO vicidial_hopper (lead_id, campaign_id, status, list_id, priority)"
                " VALUES (%s, %s, 'READY', %s, 0)",
                [(lid, camp.campaign_id, list_id) for lid, *_ in leads],
            )
            for a in range(camp.agents if camp.agents_on else 0):
                cur.execute(
                    "INSERT INTO vicidial_live_agents (user, server_ip, conf_exten, extension,"
                    " status, campaign_id) VALUES (%s, %s, %s, %s, 'READY', %s)",
                    (
                        f"agent{n}{a}",
                        camp.agents_on,
                        f"86000{n}{a}",
                        f"SIP/10{a}",
                        camp.campaign_id,
                    ),
                )
            for server_ip, shortage in (camp.shortages or {}).items():
                cur.execute(
                    "INSERT INTO vicidial_campaign_server_stats (campaign_id, server_ip,"
                    " local_trunk_shortage) VALUES (%s, %s, %s)",
                    (camp.campaign_id, server_ip, shortage),
                )


def refresh_shortages(conn: Connection) -> None:
    """Touch every shortage row so it stays inside the freshness window (VICIdial does it)."""
    with conn.cursor() as cur:
        cur.execute("UPDATE vicidial_campaign_server_stats SET update_time = NOW()")
        cur.execute("UPDATE server_updater SET last_update = NOW()")
