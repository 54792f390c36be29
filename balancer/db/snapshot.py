"""The balance cycle's database input, read in a constant number of aggregated queries.

`read_snapshot` issues the same eight statements whatever the size of the cluster: one per table,
grouped and counted by the database (VICIdial's own script issues six statements per campaign per
candidate server instead). `StatementCounter` measures that for the benchmark and the tests, by
the server's own per-session ``Questions`` counter, so it counts everything the connection sends
(``BEGIN`` and ``COMMIT`` included) without wrapping the connection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from balancer.balance.model import CampaignInfo, DbSnapshot, ServerInfo, SystemSettings, TrunkRule
from balancer.config import BalanceConfig
from balancer.db.connection import Connection
from balancer.db.rows import text

log = logging.getLogger(__name__)

# NOW() and system_settings in one statement; the LEFT JOIN keeps the row when settings are missing.
_SETTINGS = (
    "SELECT NOW() AS taken_at, s.outbound_autodial_active, s.disable_auto_dial,"
    " s.outbound_calls_per_second, s.call_limit_24hour, s.present"
    " FROM (SELECT 1 AS one) AS clock LEFT JOIN ("
    "SELECT outbound_autodial_active, disable_auto_dial, outbound_calls_per_second,"
    " call_limit_24hour, 1 AS present FROM system_settings LIMIT 1) AS s ON TRUE"
)
_SERVERS = (
    "SELECT server_ip, server_id, active, vicidial_balance_active, vicidial_balance_rank,"
    " max_vicidial_trunks, balance_trunks_offlimits, asterisk_version, routing_prefix,"
    " ext_context, answer_transfer_agent, local_gmt FROM servers"
)
_CAMPAIGNS = (
    "SELECT campaign_id, active, dial_timeout, dial_prefix, campaign_cid, campaign_vdad_exten,"
    " omit_phone_code, queue_priority, auto_alt_dial, use_custom_cid FROM vicidial_campaigns"
)
_SHORTAGES = (
    "SELECT campaign_id, server_ip, SUM(local_trunk_shortage) AS shortage"
    " FROM vicidial_campaign_server_stats"
    " WHERE local_trunk_shortage > 0 AND update_time >= NOW() - INTERVAL %s MICROSECOND"
    " GROUP BY campaign_id, server_ip"
)
_TRUNKS = (
    "SELECT server_ip, campaign_id, dedicated_trunks, trunk_restriction FROM vicidial_server_trunks"
    " ORDER BY server_ip, campaign_id"
)
_AUTO_CALLS = (
    "SELECT server_ip, campaign_id, call_type, COUNT(*) AS calls FROM vicidial_auto_calls"
    " GROUP BY server_ip, campaign_id, call_type"
)
# Every READY row in claim order (VICIdial's hopper is indexed on lead_id only: one scan).
_HOPPER = (
    "SELECT campaign_id, hopper_id FROM vicidial_hopper WHERE status = 'READY'"
    " ORDER BY campaign_id, priority DESC, hopper_id"
)


# Per campaign, agents not PAUSED whose campaign_id or dial_campaign_id is that campaign. UNION
# (not UNION ALL) over (agent, campaign) counts an agent once per campaign, also when both columns
# name the same one. Parameters switch the configurable rules on: count remote agents (whose
# extension starts with 'R', case-sensitive as VICIdial's 'R/<number>'), and a maximum age in
# microseconds (0: any row counts).
_LIVE_AGENTS = (
    "SELECT campaign, COUNT(*) AS agents FROM ("
    "SELECT live_agent_id, campaign_id AS campaign FROM vicidial_live_agents"
    " WHERE status <> 'PAUSED' AND (%s OR extension IS NULL OR extension NOT LIKE BINARY 'R%%')"
    " AND (%s <= 0 OR last_update_time >= NOW() - INTERVAL %s MICROSECOND)"
    " UNION "
    "SELECT live_agent_id, dial_campaign_id FROM vicidial_live_agents"
    " WHERE status <> 'PAUSED' AND (%s OR extension IS NULL OR extension NOT LIKE BINARY 'R%%')"
    " AND (%s <= 0 OR last_update_time >= NOW() - INTERVAL %s MICROSECOND)"
    ") AS agent WHERE campaign IS NOT NULL AND campaign <> '' GROUP BY campaign"
)


def _live_agent_params(config: BalanceConfig) -> tuple[object, ...]:
    max_age_us = int(config.live_agent_max_age_s * 1_000_000)
    return (config.count_remote_agents, max_age_us, max_age_us) * 2


def _rows(conn: Connection, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, tuple(params))
        return list(cur.fetchall())


def _int(value: Any, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _offset(value: Any, server_ip: str) -> float:
    """servers.local_gmt ('-5.00') as hours; an unreadable value falls back to -5 (the default)."""
    try:
        return float(Decimal(text(value).strip()))
    except (InvalidOperation, ValueError):
        log.warning("servers %s: local_gmt %r is not a number; using -5.00", server_ip, value)
        return -5.0


def _settings(row: tuple[Any, ...]) -> SystemSettings | None:
    _, autodial, disabled, cps, limit_24hour, present = row
    if present is None:
        return None
    return SystemSettings(
        outbound_autodial_active=text(autodial) == "1",
        disable_auto_dial=text(disabled) == "1",
        outbound_calls_per_second=_int(cps, 10),
        call_limit_24hour=text(limit_24hour) == "1",
    )


def _server(row: tuple[Any, ...]) -> ServerInfo:
    (
        ip,
        server_id,
        active,
        balance,
        rank,
        trunks,
        offlimits,
        version,
        prefix,
        context,
        ata,
        gmt,
    ) = row
    server_ip = text(ip)
    return ServerInfo(
        server_ip=server_ip,
        server_id=text(server_id),
        active=text(active) == "Y",
        balance_active=text(balance) == "Y",
        rank=_int(rank, 0),
        max_trunks=_int(trunks, 23),
        offlimits=_int(offlimits, 0),
        asterisk_version=text(version),
        routing_prefix=text(prefix),
        ext_context=text(context),
        answer_transfer_agent=text(ata),
        local_gmt=_offset(gmt, server_ip),
    )


def _campaign(row: tuple[Any, ...]) -> CampaignInfo:
    (cid, active, timeout, prefix, ccid, exten, omit, priority, alt, custom) = row
    return CampaignInfo(
        campaign_id=text(cid),
        active=text(active) == "Y",
        dial_timeout=_int(timeout, 60),
        dial_prefix=text(prefix),  # '' stays '': the call writer applies VICIdial's '9'
        campaign_cid=text(ccid),
        vdad_exten=text(exten),
        omit_phone_code=text(omit) == "Y",
        queue_priority=_int(priority, 50),
        auto_alt_dial=text(alt) or "NONE",
        use_custom_cid=text(custom) == "Y",
    )


def read_snapshot(conn: Connection, config: BalanceConfig) -> DbSnapshot:
    """Everything the planner needs from MySQL, in eight statements whatever the cluster size."""
    settings_row = _rows(conn, _SETTINGS)[0]
    taken_at = settings_row[0]
    if not isinstance(taken_at, datetime):  # pragma: no cover - NOW() is always a DATETIME
        raise TypeError(f"NOW() returned {taken_at!r}")
    servers = {s.server_ip: s for s in map(_server, _rows(conn, _SERVERS))}
    campaigns = {c.campaign_id: c for c in map(_campaign, _rows(conn, _CAMPAIGNS))}
    window_us = int(config.shortage_window_s * 1_000_000)
    shortages = {
        (text(camp), text(ip)): _int(n, 0) for camp, ip, n in _rows(conn, _SHORTAGES, (window_us,))
    }
    trunk_rules = tuple(
        TrunkRule(
            server_ip=text(ip),
            campaign_id=text(camp),
            dedicated=_int(dedicated, 0),
            maximum_limit=text(restriction) == "MAXIMUM_LIMIT",
        )
        for ip, camp, dedicated, restriction in _rows(conn, _TRUNKS)
    )
    auto_calls = {
        (text(ip), text(camp), text(kind)): _int(n, 0)
        for ip, camp, kind, n in _rows(conn, _AUTO_CALLS)
    }
    live_agents = {
        text(camp): _int(n, 0) for camp, n in _rows(conn, _LIVE_AGENTS, _live_agent_params(config))
    }
    ready: dict[str, list[int]] = {}
    for camp, hopper_id in _rows(conn, _HOPPER):
        ready.setdefault(text(camp), []).append(int(hopper_id))
    hopper_ready = {camp: len(ids) for camp, ids in ready.items()}
    return DbSnapshot(
        taken_at=taken_at,
        settings=_settings(settings_row),
        servers=servers,
        campaigns=campaigns,
        shortages=shortages,
        trunk_rules=trunk_rules,
        auto_calls=auto_calls,
        live_agents=live_agents,
        hopper_ready=hopper_ready,
        hopper_ids={camp: tuple(ids) for camp, ids in ready.items()},
    )


def session_statements(conn: Connection) -> int:
    """The server's count of statements this session has sent so far, this one included."""
    rows = _rows(conn, "SHOW SESSION STATUS LIKE 'Questions'")
    return int(rows[0][1])


class StatementCounter:
    """Counts the statements a connection sends between laps, by the server's own counter.

    ``lap()`` returns how many statements ran since the previous lap (or since the counter was
    made), not counting the counter's own ``SHOW SESSION STATUS``. Use it on the thread that owns
    the connection, e.g. ``await db.run(StatementCounter)`` then ``await db.run(lambda c:
    counter.lap())``.
    """

    def __init__(self, conn: Connection) -> None:
        """Start counting from now."""
        self.conn = conn
        self._mark = session_statements(conn)

    def lap(self) -> int:
        """Statements sent since the previous lap."""
        now = session_statements(self.conn)
        count = now - self._mark - 1
        self._mark = now
        return count
