"""assign-phone, drain and undrain against real MariaDB and Redis (CliRunner and a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import execute, fetchall

from balancer.agents.facts import Grouping, GroupingMode
from balancer.cli.app import main
from balancer.db import agents as db_agents
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.errors import BalancerError
from balancer.store.base import Channel, ChannelClass, Health, ServerMeta
from balancer.store.redis import RedisStore

PREFIX = "vbagents:"
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- seeding


def add_server(
    db: Connection,
    ip: str,
    *,
    server_id: str | None = None,
    active: str = "Y",
    login: str | None = "Y",
    max_trunks: int = 23,
    updater_age_s: float | None = 0.0,
    conferences: int = 3,
) -> None:
    execute(
        db,
        "INSERT INTO servers (server_id, server_ip, active, active_agent_login_server,"
        " max_vicidial_trunks) VALUES (%s, %s, %s, %s, %s)",
        server_id or "ast" + ip.rsplit(".", 1)[1],
        ip,
        active,
        login,
        max_trunks,
    )
    if updater_age_s is not None:
        execute(
            db,
            "INSERT INTO server_updater (server_ip, last_update)"
            " VALUES (%s, NOW() - INTERVAL %s SECOND)",
            ip,
            int(updater_age_s),
        )
    for i in range(conferences):
        execute(
            db,
            "INSERT INTO vicidial_conferences (conf_exten, server_ip, extension)"
            " VALUES (%s, %s, '')",
            8600051 + i,
            ip,
        )


def add_agents(db: Connection, ip: str, count: int, campaign: str = "CAMP1") -> None:
    for i in range(count):
        execute(
            db,
            "INSERT INTO vicidial_live_agents (user, server_ip, conf_exten, extension, status,"
            " campaign_id) VALUES (%s, %s, '8600051', %s, 'READY', %s)",
            f"u{ip}-{campaign}-{i}",
            ip,
            f"SIP/{i}",
            campaign,
        )


def add_phone(db: Connection, login: str, ip: str, active: str = "Y") -> None:
    execute(
        db,
        "INSERT INTO phones (extension, server_ip, login, pass, active, protocol)"
        " VALUES (%s, %s, %s, 'x', %s, 'SIP')",
        login,
        ip,
        login,
        active,
    )


def add_alias(db: Connection, alias: str, logins: str) -> None:
    execute(
        db,
        "INSERT INTO phones_alias (alias_id, alias_name, logins_list) VALUES (%s, %s, %s)",
        alias,
        alias,
        logins,
    )


def add_campaign(
    db: Connection, campaign: str, grouping: str | None = None, limit: int | None = None
) -> None:
    """A campaign, with VICIdial's own login grouping columns when given (else its defaults)."""
    execute(
        db,
        "INSERT INTO vicidial_campaigns (campaign_id, campaign_name, active) VALUES (%s, %s, 'Y')",
        campaign,
        campaign,
    )
    if grouping is not None:
        execute(
            db,
            "UPDATE vicidial_campaigns SET pllb_grouping = %s WHERE campaign_id = %s",
            grouping,
            campaign,
        )
    if limit is not None:
        execute(
            db,
            "UPDATE vicidial_campaigns SET pllb_grouping_limit = %s WHERE campaign_id = %s",
            limit,
            campaign,
        )


async def publish(
    redis_url: str,
    servers: dict[str, tuple[Health, int, int]],
    reason: str = "",
) -> None:
    """Live state for each server: (health, agent phone channels, trunk lines)."""
    store = RedisStore(redis_url, PREFIX, state_ttl_s=60)
    try:
        for ip, (health, agent_phones, trunks) in servers.items():
            await store.set_meta(
                ip,
                ServerMeta(
                    server_id="ast" + ip.rsplit(".", 1)[1],
                    health=health,
                    health_reason=reason if health is not Health.UP else "",
                ),
            )
            channels = [
                Channel(f"{ip}.a{i}", f"SIP/{i}-0000", ChannelClass.AGENT)
                for i in range(agent_phones)
            ] + [
                Channel(f"{ip}.t{i}", f"SIP/alpha-{i:08x}", ChannelClass.TRUNK, "alpha")
                for i in range(trunks)
            ]
            await store.replace_channels(ip, channels)
        await store.touch_daemon("test-daemon", 60)
    finally:
        await store.close()


async def drained_in_store(redis_url: str) -> set[str]:
    store = RedisStore(redis_url, PREFIX, state_ttl_s=60)
    try:
        return await store.drained()
    finally:
        await store.close()


def write_config(
    tmp_path: Path, database_url: DatabaseUrl, redis_url: str, extra: str = "", mode: str = ""
) -> Path:
    path = tmp_path / "vb.toml"
    path.write_text(
        f'[database]\nurl = "{database_url.unmasked()}"\n'
        f'[redis]\nurl = "{redis_url}"\nkey_prefix = "{PREFIX}"\n'
        "[agents]\ndefault_capacity = 20\n"
        + (f'mode = "{mode}"\n' if mode else "")
        + '[agents.capacity]\n"10.10.0.1" = 40\n"10.10.0.2" = 10\n'
        + extra
    )
    return path


def cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), *args])


# --------------------------------------------------------------------------- SQL reads


def test_resolve_phones(db: Connection) -> None:
    add_phone(db, "1011", "10.10.0.1")
    add_phone(db, "1012", "10.10.0.2")
    add_phone(db, "1013", "10.10.0.3", active="N")
    add_alias(db, "agent7", " 1012 ,1011,,9999")
    by_alias = db_agents.resolve_phones(db, "agent7")
    assert by_alias.alias_id == "agent7"
    assert [p.login for p in by_alias.phones] == ["1012", "1011"]
    assert by_alias.logins == ("1012", "1011", "9999") and by_alias.missing == ("9999",)
    by_list = db_agents.resolve_phones(db, "1013,1011")
    assert by_list.alias_id is None
    assert [(p.login, p.active) for p in by_list.phones] == [("1013", False), ("1011", True)]
    assert [p.login for p in db_agents.resolve_phones(db, "1011").phones] == ["1011"]
    with pytest.raises(BalancerError, match="'nobody' is neither a phones_alias id nor a login"):
        db_agents.resolve_phones(db, "nobody")
    with pytest.raises(BalancerError, match="phone logins '8,9': none of them is in phones"):
        db_agents.resolve_phones(db, "8,9")
    add_alias(db, "ghost", "8,9")
    with pytest.raises(BalancerError, match=r"phone alias 'ghost': none of its logins \(8, 9\)"):
        db_agents.resolve_phones(db, "ghost")
    add_alias(db, "empty", " , ")
    with pytest.raises(BalancerError, match="logins_list is empty"):
        db_agents.resolve_phones(db, "empty")


def test_read_agent_tables(db: Connection) -> None:
    add_server(db, "10.10.0.1", conferences=2, updater_age_s=5)
    add_server(db, "10.10.0.2", login="N", conferences=0, updater_age_s=None)
    add_agents(db, "10.10.0.1", 3)
    add_agents(db, "10.10.0.1", 2, campaign="CAMP2")
    add_agents(db, "10.10.0.2", 1)
    # Not counted, as in the agent screen's own query: a remote agent, and a NULL extension.
    execute(
        db,
        "INSERT INTO vicidial_live_agents (user, server_ip, extension, campaign_id)"
        " VALUES ('remote1', '10.10.0.2', 'R/5551212', 'CAMP1'),"
        " ('nullext', '10.10.0.1', NULL, 'CAMP1')",
    )
    execute(
        db,
        "UPDATE vicidial_conferences SET extension = 'SIP/1' WHERE server_ip = '10.10.0.1'"
        " AND conf_exten = 8600051",
    )
    execute(
        db,
        "UPDATE servers SET conf_engine = 'CONFBRIDGE', active_twin_server_ip = ' 10.10.0.9 '"
        " WHERE server_ip = '10.10.0.2'",
    )
    execute(
        db,
        "INSERT INTO vicidial_confbridges (conf_exten, server_ip, extension) VALUES"
        " (9600000, '10.10.0.2', ''), (9600001, '10.10.0.2', NULL), (9600002, '10.10.0.2', 'x')",
    )
    add_campaign(db, "CAMP1", "CASCADING", 4)
    execute(db, "INSERT INTO system_settings (pllb_grouping_limit) VALUES (30)")
    tables = db_agents.read_agent_tables(db, "CAMP1")
    assert tables.agents == {"10.10.0.1": 5, "10.10.0.2": 1}
    assert tables.campaign_agents == {"10.10.0.1": 3, "10.10.0.2": 1}
    assert tables.free_conferences == {"10.10.0.1": 1}
    assert tables.free_confbridges == {"10.10.0.2": 2}
    assert set(tables.updater_ages) == {"10.10.0.1"}
    assert 4.0 <= tables.updater_ages["10.10.0.1"] < 30
    two = tables.servers["10.10.0.2"]
    assert (two.login_flag, two.conf_engine, two.twin_server_ip) == ("N", "CONFBRIDGE", "10.10.0.9")
    one = tables.servers["10.10.0.1"]
    assert (one.max_trunks, one.conf_engine, one.twin_server_ip) == (23, "MEETME", "")
    assert tables.grouping == Grouping("CAMP1", GroupingMode.CASCADING, 4, 30)
    assert db_agents.read_agent_tables(db).grouping.mode is GroupingMode.DISABLED
    add_campaign(db, "PLAIN")
    assert db_agents.load_grouping(db, "PLAIN") == Grouping("PLAIN", GroupingMode.DISABLED, 50, 30)
    execute(db, "DELETE FROM system_settings")
    execute(db, "UPDATE vicidial_campaigns SET pllb_grouping_limit = NULL")
    # No system_settings row: VICIdial's default; a NULL limit: nothing is below it.
    assert db_agents.load_grouping(db, "CAMP1") == Grouping("CAMP1", GroupingMode.CASCADING, 0, 100)
    assert db_agents.find_server(db, "ast2") == db_agents.load_server_records(db)["10.10.0.2"]
    assert db_agents.find_server(db, "10.10.0.1") == db_agents.load_server_records(db)["10.10.0.1"]
    assert db_agents.find_server(db, "nope") is None
    # The keeper's lighter read: no conferences, no optional columns.
    flags = db_agents.read_flag_tables(db)
    assert flags.agents == tables.agents and flags.free_conferences == {}
    assert flags.servers["10.10.0.2"].conf_engine == "MEETME"


def test_older_vicidial_schema_without_confbridge_or_twin(
    database_url: DatabaseUrl, db: Connection
) -> None:
    """A VICIdial from before ConfBridge and twins: their defaults, no error."""
    from balancer.db import schema
    from balancer.db.connection import connect, connect_server

    name = f"{database_url.database}_old"
    admin = connect_server(database_url)
    try:
        execute(admin, f"DROP DATABASE IF EXISTS `{name}`")
        execute(admin, f"CREATE DATABASE `{name}`")
        old = connect(database_url.with_database(name))
        try:
            schema.install(old)
            execute(old, "DROP TABLE vicidial_confbridges")
            execute(
                old,
                "ALTER TABLE servers DROP COLUMN conf_engine, DROP COLUMN active_twin_server_ip",
            )
            add_server(old, "10.10.0.1")
            tables = db_agents.read_agent_tables(old)
            record = tables.servers["10.10.0.1"]
            assert (record.conf_engine, record.twin_server_ip) == ("MEETME", "")
            assert tables.free_confbridges == {} and tables.free_conferences == {"10.10.0.1": 3}
        finally:
            old.close()
    finally:
        execute(admin, f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


# --------------------------------------------------------------------------- assign-phone


def seed_cluster(db: Connection) -> None:
    """Big 10.10.0.1 (40 agents capacity), small 10.10.0.2 (10), default 10.10.0.3 (20)."""
    for ip in ("10.10.0.1", "10.10.0.2", "10.10.0.3"):
        add_server(db, ip)
        add_phone(db, "10" + ip[-1], ip)
    add_alias(db, "agent7", "101,102,103")


def test_assign_prefers_spare_capacity_over_agent_count(
    db: Connection, database_url: DatabaseUrl, redis_db: str, tmp_path: Path
) -> None:
    seed_cluster(db)
    add_agents(db, "10.10.0.1", 14)  # 14/40 = 0.35
    add_agents(db, "10.10.0.2", 9)  # 9/10 = 0.90, fewer agents (VICIdial's pick)
    asyncio.run(
        publish(
            redis_db,
            {
                "10.10.0.1": (Health.UP, 0, 3),
                "10.10.0.2": (Health.UP, 0, 0),
                "10.10.0.3": (Health.DOWN, 0, 0),
            },
            reason="connection closed",
        )
    )
    config = write_config(tmp_path, database_url, redis_db)
    result = cli(config, "assign-phone", "agent7")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        "phone 101 on 10.10.0.1 (ast1): score 0.35 (agents 14/40, trunks 3/23) — lowest among "
        "2 eligible; skipped 10.10.0.3: DOWN (connection closed)"
    )
    [row] = fetchall(db, "SELECT * FROM vb_decision_log WHERE kind = 'assign_phone'")
    assert (row["server_ip"], row["outcome"]) == ("10.10.0.1", "assigned")
    assert str(row["reason"]).startswith("score 0.35")
    assert json.loads(str(row["details"]))["chosen"]["login"] == "101"

    # Many more agents on the big server (34/40) still beat the nearly full small one (9/10).
    add_agents(db, "10.10.0.1", 20)  # 34/40 = 0.85
    result = cli(config, "assign-phone", "101,102,103", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["chosen"]["server_ip"] == "10.10.0.1"  # 0.85 < 0.90
    assert doc["alias_id"] is None and doc["logins"] == ["101", "102", "103"]
    assert doc["mode"] == "capacity"
    assert doc["grouping"] == {
        "mode": "DISABLED",
        "campaign_limit": 50,
        "system_limit": 100,
        "applied": False,
    }
    by_ip = {c["server_ip"]: c for c in doc["candidates"]}
    assert by_ip["10.10.0.2"]["score"] == 0.9 and by_ip["10.10.0.2"]["eligible"] is True
    assert by_ip["10.10.0.3"]["eligible"] is False
    assert by_ip["10.10.0.3"]["health"] == "down"
    assert sorted(doc) == sorted(
        [
            "version",
            "query",
            "alias_id",
            "logins",
            "missing_logins",
            "campaign_id",
            "mode",
            "grouping",
            "chosen",
            "reason",
            "candidates",
        ]
    )


def test_assign_skips_down_drained_admin_and_no_conference(
    db: Connection, database_url: DatabaseUrl, redis_db: str, tmp_path: Path
) -> None:
    add_server(db, "10.10.0.1")
    add_server(db, "10.10.0.2", login="N")  # the admin's own 'N'
    add_server(db, "10.10.0.3", conferences=0)
    add_server(db, "10.10.0.4", updater_age_s=300)
    add_server(db, "10.10.0.5")
    for n in range(1, 6):
        add_phone(db, f"10{n}", f"10.10.0.{n}")
    add_agents(db, "10.10.0.5", 15)
    up = (Health.UP, 0, 0)
    asyncio.run(publish(redis_db, {f"10.10.0.{n}": up for n in range(1, 6)}))
    config = write_config(tmp_path, database_url, redis_db)
    assert cli(config, "drain", "10.10.0.1").exit_code == 0
    result = cli(config, "assign-phone", "101,102,103,104,105,999", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["chosen"]["server_ip"] == "10.10.0.5"
    assert doc["missing_logins"] == ["999"]
    problems = {c["server_ip"]: c["problems"][0] for c in doc["candidates"] if c["problems"]}
    assert problems["10.10.0.1"] == "DRAINED"
    assert problems["10.10.0.2"].startswith("agent logins off by the admin")
    assert problems["10.10.0.3"] == "no free conference in vicidial_conferences"
    assert problems["10.10.0.4"].startswith("server_updater stale")
    text = cli(config, "assign-phone", "101,102,103,104,105,999")
    assert text.output.rstrip().endswith("; not in phones: 999")

    # Nothing eligible: exit 1, the reasons on stderr.
    result = cli(config, "assign-phone", "101,102")
    assert result.exit_code == 1
    assert "no eligible server: 10.10.0.1: DRAINED; 10.10.0.2: agent logins off" in result.output
    rows = fetchall(db, "SELECT outcome FROM vb_decision_log WHERE kind = 'assign_phone'")
    assert [r["outcome"] for r in rows] == ["assigned", "assigned", "no_server"]
    result = cli(config, "assign-phone", "101,102", "--json")
    assert result.exit_code == 1 and json.loads(result.output)["chosen"] is None


def test_assign_errors(
    db: Connection, database_url: DatabaseUrl, redis_db: str, tmp_path: Path
) -> None:
    seed_cluster(db)
    config = write_config(tmp_path, database_url, redis_db)
    result = cli(config, "assign-phone", "nobody")
    assert result.exit_code == 1
    assert "'nobody' is neither a phones_alias id nor a login in phones" in result.output
    result = cli(config, "assign-phone", "agent7", "--campaign", "NOPE")
    assert result.exit_code == 1 and "campaign 'NOPE': not in vicidial_campaigns" in result.output
    memory = tmp_path / "memory"
    memory.mkdir()
    result = cli(write_config(memory, database_url, "memory://"), "assign-phone", "agent7")
    assert result.exit_code == 1 and "redis.url is 'memory://'" in result.output


def test_assign_grouping_modes(
    db: Connection, database_url: DatabaseUrl, redis_db: str, tmp_path: Path
) -> None:
    seed_cluster(db)
    add_campaign(db, "ONE", "ONE_SERVER_ONLY")
    add_campaign(db, "CASC", "CASCADING", 3)
    add_campaign(db, "PLAIN")
    add_agents(db, "10.10.0.1", 30, campaign="OTHER")  # 30/40 = 0.75
    add_agents(db, "10.10.0.3", 2, campaign="ONE")  # 2/20 = 0.10
    asyncio.run(publish(redis_db, {f"10.10.0.{n}": (Health.UP, 0, 0) for n in (1, 2, 3)}))
    config = write_config(tmp_path, database_url, redis_db)

    def pick(campaign: str) -> dict[str, object]:
        result = cli(config, "assign-phone", "agent7", "--campaign", campaign, "--json")
        assert result.exit_code == 0, result.output
        doc: dict[str, object] = json.loads(result.output)
        return doc

    # ONE_SERVER_ONLY: where the campaign's agents are, although 10.10.0.2 is emptier.
    doc = pick("ONE")
    assert doc["chosen"]["server_ip"] == "10.10.0.3"  # type: ignore[index]
    assert "ONE_SERVER_ONLY: campaign ONE already has 2 agents here" in str(doc["reason"])
    assert doc["grouping"] == {
        "mode": "ONE_SERVER_ONLY",
        "campaign_limit": 50,
        "system_limit": 100,
        "applied": True,
    }
    # No grouping: plain score (10.10.0.2 is empty).
    assert pick("PLAIN")["chosen"]["server_ip"] == "10.10.0.2"  # type: ignore[index]

    # CASCADING, limit 3: fill one server with 3 of the campaign's agents, then the next.
    seen = []
    for _ in range(6):
        doc = pick("CASC")
        ip = str(doc["chosen"]["server_ip"])  # type: ignore[index]
        seen.append(ip)
        add_agents(db, ip, 1, campaign="CASC")
    assert seen == ["10.10.0.2"] * 3 + ["10.10.0.3"] * 3


def test_assign_in_vicidial_mode_picks_what_the_agent_screen_picks(
    db: Connection, database_url: DatabaseUrl, tmp_path: Path
) -> None:
    """agents.mode = "vicidial": VICIdial's own rule from VICIdial's own tables, no live state
    needed (so memory:// will do)."""
    for ip in ("10.10.0.1", "10.10.0.2", "10.10.0.3"):
        add_server(db, ip)
    add_server(db, "10.10.0.4", conferences=0)
    execute(
        db,
        "UPDATE servers SET conf_engine = 'CONFBRIDGE' WHERE server_ip = '10.10.0.4'",
    )
    execute(
        db,
        "INSERT INTO vicidial_confbridges (conf_exten, server_ip, extension)"
        " VALUES (9600000, '10.10.0.4', '')",
    )
    execute(
        db, "UPDATE servers SET active_twin_server_ip = '10.10.0.9' WHERE server_ip = '10.10.0.2'"
    )
    for n in range(1, 5):
        add_phone(db, f"10{n}", f"10.10.0.{n}")
    add_alias(db, "agent7", "101,102,103,104")
    add_agents(db, "10.10.0.1", 2)
    for i in range(3):  # remote agents: not counted
        execute(
            db,
            "INSERT INTO vicidial_live_agents (user, server_ip, extension, campaign_id)"
            " VALUES (%s, '10.10.0.1', %s, 'CAMP1')",
            f"remote{i}",
            f"R/55512{i}",
        )
    add_agents(db, "10.10.0.3", 2)
    add_agents(db, "10.10.0.4", 2)
    memory = tmp_path / "memory"
    memory.mkdir()
    config = write_config(memory, database_url, "memory://", mode="vicidial")

    def pick(*extra: str) -> dict[str, object]:
        result = cli(config, "assign-phone", "agent7", "--json", *extra)
        assert result.exit_code == 0, result.output
        doc: dict[str, object] = json.loads(result.output)
        return doc

    # 10.10.0.2's twin has no server_updater: skipped. 2 agents each on the rest (the remote
    # ones do not count); the tie goes to the later login, the ConfBridge server's.
    doc = pick()
    assert doc["mode"] == "vicidial" and doc["chosen"]["login"] == "104"  # type: ignore[index]
    assert doc["chosen"]["conference_table"] == "vicidial_confbridges"  # type: ignore[index]
    assert str(doc["reason"]).startswith(
        "fewest agents: 2 non-remote agents logged in, among 3 eligible logins "
        "(tied with 101, 103: the later login wins"
    )
    assert "skipped 10.10.0.2: twin 10.10.0.9 not live (no server_updater row)" in str(
        doc["reason"]
    )
    execute(db, "INSERT INTO server_updater (server_ip, last_update) VALUES ('10.10.0.9', NOW())")
    assert pick()["chosen"]["login"] == "102"  # type: ignore[index]

    # ONE_SERVER_ONLY: the first eligible login whose server has the campaign's agents.
    add_campaign(db, "ONE", "ONE_SERVER_ONLY")
    add_agents(db, "10.10.0.3", 1, campaign="ONE")
    doc = pick("--campaign", "ONE")
    assert doc["chosen"]["login"] == "103"  # type: ignore[index]
    assert doc["grouping"]["applied"] is True  # type: ignore[index]
    # CASCADING: under the campaign's limit (2) and the system's.
    add_campaign(db, "CASC", "CASCADING", 2)
    add_agents(db, "10.10.0.1", 1, campaign="CASC")
    assert pick("--campaign", "CASC")["chosen"]["login"] == "101"  # type: ignore[index]
    add_agents(db, "10.10.0.1", 1, campaign="CASC")  # at the limit now: fewest agents again
    assert pick("--campaign", "CASC")["chosen"]["login"] == "102"  # type: ignore[index]
    execute(db, "INSERT INTO system_settings (pllb_grouping_limit) VALUES (3)")
    execute(db, "UPDATE vicidial_campaigns SET pllb_grouping_limit = 9 WHERE campaign_id = 'CASC'")
    # 10.10.0.1 has 4 non-remote agents, the system limit is 3: not cascaded to.
    doc = pick("--campaign", "CASC")
    assert doc["chosen"]["login"] == "102" and doc["grouping"]["applied"] is False  # type: ignore[index]
    rows = fetchall(db, "SELECT details FROM vb_decision_log WHERE kind = 'assign_phone'")
    assert {json.loads(str(r["details"]))["mode"] for r in rows} == {"vicidial"}

    # One login, no list: the screen uses it as it is.
    result = cli(config, "assign-phone", "102")
    assert result.exit_code == 0
    assert "a single login: the agent screen uses it as it is" in result.output


# --------------------------------------------------------------------------- drain / undrain


def test_drain_and_undrain_by_ip_or_id(
    db: Connection, database_url: DatabaseUrl, redis_db: str, tmp_path: Path
) -> None:
    add_server(db, "10.10.0.1")
    add_server(db, "10.10.0.2", server_id="bigbox")
    config = write_config(tmp_path, database_url, redis_db)
    result = cli(config, "drain", "bigbox", "--reason", "kernel update")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("drained 10.10.0.2 (bigbox): no new balance calls")
    assert asyncio.run(drained_in_store(redis_db)) == {"10.10.0.2"}
    assert "already" in cli(config, "drain", "10.10.0.2").output
    result = cli(config, "undrain", "10.10.0.2")
    assert result.exit_code == 0 and result.output.startswith("undrained 10.10.0.2 (bigbox)")
    assert asyncio.run(drained_in_store(redis_db)) == set()
    rows = fetchall(
        db,
        "SELECT server_ip, outcome, reason FROM vb_decision_log WHERE kind = 'drain' ORDER BY id",
    )
    assert [(r["server_ip"], r["outcome"]) for r in rows] == [
        ("10.10.0.2", "drained"),
        ("10.10.0.2", "drained"),
        ("10.10.0.2", "undrained"),
    ]
    assert rows[0]["reason"] == "kernel update"
    assert rows[2]["reason"] == "operator: vici-balancer undrain"

    result = cli(config, "drain", "10.9.9.9")
    assert result.exit_code == 1
    assert "server '10.9.9.9': no servers row with that server_ip or server_id" in result.output
    memory = tmp_path / "memory"
    memory.mkdir()
    result = cli(write_config(memory, database_url, "memory://"), "drain", "10.10.0.1")
    assert result.exit_code == 1 and "drain needs the state store shared" in result.output
    assert asyncio.run(drained_in_store(redis_db)) == set()


def run_cli(tmp_path: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VICI_BALANCER_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "balancer.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_drain_round_trip_seen_by_another_process(
    db: Connection, database_url: DatabaseUrl, redis_db: str, tmp_path: Path
) -> None:
    add_server(db, "10.10.0.1")
    add_server(db, "10.10.0.2")
    asyncio.run(publish(redis_db, {"10.10.0.1": (Health.UP, 0, 0), "10.10.0.2": (Health.UP, 0, 0)}))
    config = write_config(tmp_path, database_url, redis_db)

    # Another process drains; this one (and `status` in a third) sees it.
    done = run_cli(tmp_path, config, "drain", "ast2")
    assert done.returncode == 0, done.stderr
    assert asyncio.run(drained_in_store(redis_db)) == {"10.10.0.2"}
    status = run_cli(tmp_path, config, "status", "--json")
    assert status.returncode == 0, status.stderr
    health = {s["server_ip"]: s["health"] for s in json.loads(status.stdout)["servers"]}
    assert health == {"10.10.0.1": "up", "10.10.0.2": "drained"}

    # This process undrains; another process sees it.
    assert cli(config, "undrain", "10.10.0.2").exit_code == 0
    status = run_cli(tmp_path, config, "status", "--json")
    health = {s["server_ip"]: s["health"] for s in json.loads(status.stdout)["servers"]}
    assert health == {"10.10.0.1": "up", "10.10.0.2": "up"}
    unknown = run_cli(tmp_path, config, "undrain", "nope")
    assert unknown.returncode == 1 and "server 'nope'" in unknown.stderr
