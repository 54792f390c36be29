"""read_snapshot against a seeded VICIdial database: values, configurable rules, query count."""

from __future__ import annotations

from datetime import datetime, timedelta

import balance_seed as seed
from conftest import execute, fetchall

from balancer.balance.model import CampaignInfo, ServerInfo, SystemSettings, TrunkRule
from balancer.config import BalanceConfig
from balancer.db.connection import Connection
from balancer.db.snapshot import StatementCounter, read_snapshot


def _seed_cluster(db: Connection) -> None:
    seed.insert(
        db,
        "system_settings",
        outbound_autodial_active="1",
        disable_auto_dial="0",
        outbound_calls_per_second=40,
    )
    seed.server(
        db,
        "10.10.0.1",
        vicidial_balance_rank=3,
        max_vicidial_trunks=40,
        balance_trunks_offlimits=2,
        routing_prefix="13",
        ext_context="default",
        answer_transfer_agent="8365",
        local_gmt="-5.00",
    )
    seed.server(
        db,
        "10.10.0.10",
        active="N",
        vicidial_balance_active="N",
        asterisk_version="1.4.21.2",
        local_gmt="5.75",
        ext_context="vici",
    )
    seed.campaign(db, "CAMP1")
    seed.campaign(
        db,
        "CAMP2",
        active="N",
        dial_timeout=4,
        dial_prefix="",
        campaign_cid="5551234",
        campaign_vdad_exten="",
        omit_phone_code="Y",
        queue_priority=-5,
        auto_alt_dial="ALT_AND_ADDR3",
        use_custom_cid="Y",
    )
    stats = (
        "INSERT INTO vicidial_campaign_server_stats (campaign_id, server_ip, local_trunk_shortage,"
        " update_time) VALUES (%s, %s, %s, NOW() - INTERVAL %s SECOND)"
    )
    execute(db, stats, "CAMP1", "10.10.0.1", 4, 5)
    execute(db, stats, "CAMP1", "10.10.0.10", 3, 600)
    execute(db, stats, "CAMP2", "10.10.0.1", 7, 21 * 60)  # stale: outside the 20-minute window
    execute(db, stats, "CAMP2", "10.10.0.10", 0, 0)  # no shortage
    seed.insert(
        db,
        "vicidial_server_trunks",
        server_ip="10.10.0.1",
        campaign_id="CAMP1",
        dedicated_trunks=5,
        trunk_restriction="MAXIMUM_LIMIT",
    )
    seed.insert(
        db,
        "vicidial_server_trunks",
        server_ip="10.10.0.10",
        campaign_id="CAMP2",
        dedicated_trunks=2,
    )
    calls = [
        ("10.10.0.1", "CAMP1", "OUTBALANCE"),
        ("10.10.0.1", "CAMP1", "OUTBALANCE"),
        ("10.10.0.1", "CAMP1", "OUT"),
        ("10.10.0.10", "CAMP2", "IN"),
        ("10.10.0.10", "CAMP1", "OUTBALANCE"),
    ]
    for ip, camp, kind in calls:
        seed.insert(
            db, "vicidial_auto_calls", server_ip=ip, campaign_id=camp, call_type=kind, status="LIVE"
        )
    agents = [
        # (extension, status, campaign_id, dial_campaign_id, age in seconds)
        ("SIP/101", "READY", "CAMP1", "", 1),
        ("SIP/102", "INCALL", "CAMP1", "CAMP2", 1),  # counts for both campaigns
        ("SIP/103", "READY", "CAMP2", "CAMP2", 1),  # once for CAMP2, not twice
        ("SIP/104", "PAUSED", "CAMP1", "CAMP1", 1),  # paused: not counted
        ("R/3125559999", "READY", "CAMP1", "", 1),  # remote agent
        ("rsip105", "READY", "CAMP1", "", 1),  # lower-case 'r': not a remote agent
        ("SIP/106", "READY", "CAMP1", "", 3600),  # an hour since its last update
    ]
    for number, (extension, status, camp, dial_camp, age) in enumerate(agents):
        execute(
            db,
            "INSERT INTO vicidial_live_agents (user, server_ip, conf_exten, extension, status,"
            " campaign_id, dial_campaign_id, last_update_time)"
            " VALUES (%s, '10.10.0.1', '8600051', %s, %s, %s, %s, NOW() - INTERVAL %s SECOND)",
            f"agent{number}",
            extension,
            status,
            camp,
            dial_camp,
            age,
        )
    for lead_id, camp, status in [
        (1, "CAMP1", "READY"),
        (2, "CAMP1", "READY"),
        (3, "CAMP1", "QUEUE"),
        (4, "CAMP2", "READY"),
        (5, "CAMP2", "DONE"),
    ]:
        seed.hopper(db, lead_id, camp, status=status)


def test_snapshot_of_a_seeded_cluster(db: Connection) -> None:
    _seed_cluster(db)
    snap = read_snapshot(db, BalanceConfig())
    db_now = fetchall(db, "SELECT NOW() AS now")[0]["now"]
    assert isinstance(db_now, datetime)
    assert timedelta(0) <= db_now - snap.taken_at <= timedelta(seconds=2)
    assert snap.settings == SystemSettings(True, False, 40)
    assert snap.servers == {
        "10.10.0.1": ServerInfo(
            server_ip="10.10.0.1",
            server_id="S1",
            active=True,
            balance_active=True,
            rank=3,
            max_trunks=40,
            offlimits=2,
            asterisk_version="13.38.3-vici",
            routing_prefix="13",
            ext_context="default",
            answer_transfer_agent="8365",
            local_gmt=-5.0,
        ),
        "10.10.0.10": ServerInfo(
            server_ip="10.10.0.10",
            server_id="S10",
            active=False,
            balance_active=False,
            rank=0,
            max_trunks=23,
            offlimits=0,
            asterisk_version="1.4.21.2",
            routing_prefix="13",
            ext_context="vici",
            answer_transfer_agent="8365",
            local_gmt=5.75,
        ),
    }
    assert snap.campaigns == {
        "CAMP1": CampaignInfo("CAMP1"),
        "CAMP2": CampaignInfo(
            campaign_id="CAMP2",
            active=False,
            dial_timeout=4,
            dial_prefix="",
            campaign_cid="5551234",
            vdad_exten="",
            omit_phone_code=True,
            queue_priority=-5,
            auto_alt_dial="ALT_AND_ADDR3",
            use_custom_cid=True,
        ),
    }
    assert snap.shortages == {("CAMP1", "10.10.0.1"): 4, ("CAMP1", "10.10.0.10"): 3}
    assert set(snap.trunk_rules) == {
        TrunkRule("10.10.0.1", "CAMP1", 5, True),
        TrunkRule("10.10.0.10", "CAMP2", 2, False),
    }
    assert snap.auto_calls == {
        ("10.10.0.1", "CAMP1", "OUTBALANCE"): 2,
        ("10.10.0.1", "CAMP1", "OUT"): 1,
        ("10.10.0.10", "CAMP2", "IN"): 1,
        ("10.10.0.10", "CAMP1", "OUTBALANCE"): 1,
    }
    assert snap.auto_calls_on("10.10.0.1") == 3
    assert snap.outbalance("CAMP1") == 3
    # VICIdial's defaults: remote agents and stale rows count
    assert snap.live_agents == {"CAMP1": 5, "CAMP2": 2}
    assert snap.hopper_ready == {"CAMP1": 2, "CAMP2": 1}


def test_missing_system_settings_is_none(db: Connection) -> None:
    seed.server(db)
    snap = read_snapshot(db, BalanceConfig())
    assert snap.settings is None
    assert list(snap.servers) == ["10.10.0.1"]
    assert snap.campaigns == snap.shortages == snap.auto_calls == {}
    assert snap.live_agents == snap.hopper_ready == {}
    assert snap.trunk_rules == ()


def test_autodial_switches(db: Connection) -> None:
    seed.insert(
        db,
        "system_settings",
        outbound_autodial_active="0",
        disable_auto_dial="1",
        outbound_calls_per_second=0,
    )
    assert read_snapshot(db, BalanceConfig()).settings == SystemSettings(False, True, 0)


def test_shortage_window_is_a_setting(db: Connection) -> None:
    _seed_cluster(db)
    snap = read_snapshot(db, BalanceConfig(shortage_window_s=60))
    assert snap.shortages == {("CAMP1", "10.10.0.1"): 4}
    snap = read_snapshot(db, BalanceConfig(shortage_window_s=3600))
    assert snap.shortages == {
        ("CAMP1", "10.10.0.1"): 4,
        ("CAMP1", "10.10.0.10"): 3,
        ("CAMP2", "10.10.0.1"): 7,
    }


def test_remote_agents_excluded_when_configured(db: Connection) -> None:
    _seed_cluster(db)
    snap = read_snapshot(db, BalanceConfig(count_remote_agents=False))
    assert snap.live_agents == {"CAMP1": 4, "CAMP2": 2}


def test_only_fresh_agents_when_configured(db: Connection) -> None:
    _seed_cluster(db)
    snap = read_snapshot(db, BalanceConfig(live_agent_max_age_s=60))
    assert snap.live_agents == {"CAMP1": 4, "CAMP2": 2}
    snap = read_snapshot(db, BalanceConfig(live_agent_max_age_s=60, count_remote_agents=False))
    assert snap.live_agents == {"CAMP1": 3, "CAMP2": 2}


def _seed_size(db: Connection, servers: int, campaigns: int) -> None:
    seed.insert(db, "system_settings", outbound_calls_per_second=10)
    for s in range(servers):
        ip = f"10.20.{s // 250}.{s % 250 + 1}"
        seed.server(db, ip)
        for c in range(campaigns):
            camp = f"C{c:03d}"
            execute(
                db,
                "INSERT INTO vicidial_campaign_server_stats (campaign_id, server_ip,"
                " local_trunk_shortage) VALUES (%s, %s, %s)",
                camp,
                ip,
                (s + c) % 3,
            )
            seed.insert(
                db, "vicidial_auto_calls", server_ip=ip, campaign_id=camp, call_type="OUTBALANCE"
            )
            if s == 0:
                seed.campaign(db, camp)
                seed.hopper(db, 1000 + c, camp)
                seed.insert(
                    db,
                    "vicidial_live_agents",
                    server_ip=ip,
                    campaign_id=camp,
                    status="READY",
                    extension=f"SIP/{c}",
                )
            if c == 0:
                seed.insert(
                    db, "vicidial_server_trunks", server_ip=ip, campaign_id=camp, dedicated_trunks=1
                )


def test_statement_count_is_constant(db: Connection) -> None:
    config = BalanceConfig(count_remote_agents=False, live_agent_max_age_s=30)
    counts = []
    for servers, campaigns in ((2, 2), (20, 30)):
        for table in (
            "system_settings",
            "servers",
            "vicidial_campaigns",
            "vicidial_campaign_server_stats",
            "vicidial_server_trunks",
            "vicidial_auto_calls",
            "vicidial_live_agents",
            "vicidial_hopper",
        ):
            execute(db, f"DELETE FROM {table}")
        _seed_size(db, servers, campaigns)
        counter = StatementCounter(db)
        snap = read_snapshot(db, config)
        counts.append(counter.lap())
        assert len(snap.servers) == servers and len(snap.campaigns) == campaigns
        assert len(snap.auto_calls) == servers * campaigns
        assert sum(snap.hopper_ready.values()) == campaigns
    assert counts[0] == counts[1] == 8


def test_statement_counter_counts_every_statement(db: Connection) -> None:
    counter = StatementCounter(db)
    assert counter.lap() == 0
    db.begin()
    execute(db, "SELECT 1")
    db.commit()
    assert counter.lap() == 3  # BEGIN, SELECT, COMMIT
    assert counter.lap() == 0
