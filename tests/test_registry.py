"""Registry: which rows are watched, at which address, and bad rows skipped with one warning."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from balancer.config import AmiConfig, AmiServerOverride, CarrierConfig, HealthConfig, HostPort
from balancer.db.records import CarrierRow, ServerRow
from balancer.live.health import effective_health
from balancer.live.registry import Registry, RowProblem, WatchedServer, resolve, trunk_names
from balancer.store.base import Health

ROW = ServerRow(
    server_id="ast1",
    server_ip="10.10.0.1",
    active="Y",
    active_asterisk_server="Y",
    active_agent_login_server="Y",
    telnet_host="localhost",
    telnet_port=5038,
    username="cron",
    secret="1234",
    max_vicidial_trunks=23,
    asterisk_version="18.21.0",
)


def test_policy_server_ip() -> None:
    watched = resolve(ROW, AmiConfig())
    assert isinstance(watched, WatchedServer)
    assert (watched.endpoint.host, watched.endpoint.port) == ("10.10.0.1", 5038)
    assert watched.max_trunks == 23


def test_policy_telnet_host() -> None:
    watched = resolve(ROW, AmiConfig(address_policy="telnet_host"))
    assert isinstance(watched, WatchedServer)
    assert watched.endpoint.host == "localhost"


def test_override_wins_address_and_credentials() -> None:
    ami = AmiConfig(
        username="global",
        servers={
            "10.10.0.1": AmiServerOverride(HostPort("127.0.0.1", 15038), None, "override-secret")
        },
    )
    watched = resolve(ROW, ami)
    assert isinstance(watched, WatchedServer)
    assert watched.endpoint.address == "127.0.0.1:15038"
    assert watched.endpoint.username == "global"
    assert watched.endpoint.secret == "override-secret"
    assert "override-secret" not in repr(watched)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"server_ip": "not-an-ip"}, "server_ip"),
        ({"telnet_port": "abc"}, "telnet_port"),
        ({"telnet_port": 0}, "telnet_port"),
        ({"username": ""}, "ASTmgrUSERNAME"),
        ({"secret": ""}, "ASTmgrSECRET"),
        ({"max_vicidial_trunks": None}, "max_vicidial_trunks"),
    ],
)
def test_invalid_fields(change: dict[str, object], field: str) -> None:
    problem = resolve(replace(ROW, **change), AmiConfig())  # type: ignore[arg-type]
    assert isinstance(problem, RowProblem)
    assert problem.field == field


def test_bad_telnet_host_only_matters_for_its_policy() -> None:
    row = replace(ROW, telnet_host="bad host!")
    assert isinstance(resolve(row, AmiConfig()), WatchedServer)
    problem = resolve(row, AmiConfig(address_policy="telnet_host"))
    assert isinstance(problem, RowProblem) and problem.field == "telnet_host"


def test_inactive_rows_not_watched_and_bad_rows_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = [
        ROW,
        replace(ROW, server_id="ast2", server_ip="10.10.0.2", active="N"),
        replace(ROW, server_id="ast3", server_ip="10.10.0.3", active_asterisk_server="N"),
        replace(ROW, server_id="ast4", server_ip="10.10.0.4", telnet_port="x"),
    ]
    registry = Registry(AmiConfig())
    with caplog.at_level(logging.WARNING):
        assert list(registry.watched(rows)) == ["10.10.0.1"]
        assert list(registry.watched(rows)) == ["10.10.0.1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "10.10.0.4" in warnings[0] and "telnet_port" in warnings[0]


def test_trunk_names_from_dialplan_and_config() -> None:
    rows = [
        CarrierRow(
            "ALPHA",
            "10.10.0.1",
            "SIP",
            "exten => _91NXXNXXXXXX,1,Dial(SIP/${EXTEN:1}@alphatel,,tTo)",
        ),
        CarrierRow("BETA", "", "PJSIP", "exten => _8X.,1,Dial(PJSIP/betatrunk/sip:${EXTEN:1}@x)"),
    ]
    names = trunk_names([CarrierConfig("gamma", "7", trunk_names=("gamma-peer",))], rows)
    assert names["alphatel"] == "ALPHA"
    assert names["ALPHA"] == "ALPHA"
    assert names["betatrunk"] == "BETA"
    assert names["gamma-peer"] == "gamma"


def test_effective_health() -> None:
    config = HealthConfig(server_updater_max_age_s=10)
    assert effective_health(Health.UP, "ok", 3.0, config).health is Health.UP
    stale = effective_health(Health.UP, "ok", 30.0, config)
    assert stale.health is Health.DOWN and "server_updater" in stale.reason
    assert effective_health(Health.UP, "ok", None, config).health is Health.UP
    assert effective_health(Health.SUSPECT, "miss", 1.0, config).health is Health.SUSPECT
    off = HealthConfig(server_updater_max_age_s=10, check_server_updater=False)
    assert effective_health(Health.UP, "ok", 30.0, off).health is Health.UP
    assert effective_health(Health.DOWN, "closed", 1.0, config).reason == "closed"
