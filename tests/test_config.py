"""Configuration: every bad key exits 2 with its name; env and astguiclient.conf fallbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from balancer.astguiclient import parse_astguiclient
from balancer.cli.app import main
from balancer.config import (
    HostPort,
    RoutingConfig,
    config_from_dict,
    load_config,
    parse_host_port,
)
from balancer.db.url import parse_database_url
from balancer.errors import ConfigError

DB = {"database": {"url": "mysql://cron:secretpw@127.0.0.1:3306/asterisk"}}
TWO_CARRIERS = {"carriers": [{"id": "a", "dial_prefix": "7"}, {"id": "b", "dial_prefix": "8"}]}
NO_CONF = Path("/nonexistent/astguiclient.conf")


def build(data: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    return config_from_dict(data, env or {}, NO_CONF)


def test_defaults() -> None:
    config = build(DB)
    assert config.redis.is_memory
    assert config.redis.key_prefix == "vb:"
    assert config.ami.address_policy == "server_ip"
    assert config.health.heartbeat_interval_s == 1.0
    assert config.health.heartbeat_misses == 2
    assert config.health.heartbeat_timeout_s == 0.5
    assert config.balance.mode == "live"
    assert config.balance.cycle_interval_s == 2.5
    assert config.ami.reconnect_max_s == 10.0
    assert config.database.url.database == "asterisk"
    assert config.database.source == "config"


def test_heartbeat_timeout_defaults_to_the_interval_when_that_is_shorter() -> None:
    config = build({**DB, "health": {"heartbeat_interval_s": 0.3}})
    assert config.health.heartbeat_timeout_s == 0.3


def test_example_config_is_valid_and_complete() -> None:
    """The documented example loads, and documents every section the loader knows."""
    path = Path(__file__).parents[1] / "config" / "vici-balancer.example.toml"
    config = load_config(path, env={}, astguiclient_path=NO_CONF)
    assert config.carriers
    text = path.read_text()
    for section in (
        "[database]",
        "[redis]",
        "[ami]",
        "[health]",
        "[balance]",
        "[agents]",
        "[[carriers]]",
        "[[routes]]",
        "[routing]",
    ):
        assert section in text
    assert config.routes and config.routing == RoutingConfig()


def test_routes_tiers_weights_and_routing_defaults() -> None:
    config = build(
        {
            **DB,
            "carriers": [
                {"id": "a", "dial_prefix": "7"},
                {"id": "b", "dial_prefix": "8"},
                {"id": "c", "dial_prefix": "6"},
            ],
            "routes": [
                {
                    "name": "chicago",
                    "phone_codes": ["1"],
                    "prefixes": ["312", "773"],
                    "carriers": ["a", ["b", "c"]],
                    "weights": {"b": 3},
                },
                {"name": "default", "carriers": ["c"]},
            ],
            "routing": {"cool_down_s": 5, "bypass_balance_calls": True},
        }
    )
    chicago, default = config.routes
    assert chicago.tiers == (("a",), ("b", "c"))
    assert chicago.carriers == ("a", "b", "c")
    assert (chicago.weight("b"), chicago.weight("c")) == (3, 1)
    assert chicago.phone_codes == ("1",) and chicago.prefixes == ("312", "773")
    assert default.is_default and not chicago.is_default
    assert config.routing.cool_down_s == 5.0 and config.routing.bypass_balance_calls
    assert build(DB).routing == RoutingConfig(
        bypass_balance_calls=False,
        retry_failed_calls=True,
        failure_threshold=3,
        failure_ratio=0.5,
        ambiguous_ratio=0.8,
        window_s=60.0,
        min_calls=10,
        cool_down_s=30.0,
        probe_calls=2,
        publish_interval_s=2.0,
    )


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        (
            [{"name": "us", "carriers": ["a"]}, {"name": "uk", "carriers": ["zeta"]}],
            "routes[1].carriers: unknown carrier 'zeta' in route 'uk' (known: a, b)",
        ),
        (
            [{"name": "empty", "carriers": []}],
            "routes[0].carriers: route 'empty' lists no carriers",
        ),
        (
            [
                {"name": "us", "phone_codes": ["1"], "prefixes": ["312"], "carriers": ["a"]},
                {"name": "chi", "phone_codes": ["1", "44"], "prefixes": ["312"], "carriers": ["b"]},
            ],
            "routes[1].prefixes: route 'chi' matches phone_code 1 prefix 312, "
            "already matched by route 'us' (routes[0])",
        ),
        (
            [{"name": "d1", "carriers": ["a"]}, {"name": "d2", "carriers": ["b"]}],
            "routes[1].prefixes: route 'd2' matches every number (default route), "
            "already matched by route 'd1' (routes[0])",
        ),
    ],
)
def test_route_errors_name_the_route(routes: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build({**DB, **TWO_CARRIERS, "routes": routes})
    assert str(info.value) == message


def test_cli_bad_route_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[database]\nurl = "mysql://u:p@127.0.0.1/db"\n'
        '[[carriers]]\nid = "a"\ndial_prefix = "7"\n'
        '[[routes]]\nname = "us"\ncarriers = ["a", "ghost"]\n'
    )
    result = run_cli(["--config", str(path), "schema", "check"])
    assert result.exit_code == 2
    assert "routes[0].carriers: unknown carrier 'ghost' in route 'us'" in result.output


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"redis": {"url": "http://x"}}, "redis.url"),
        ({"redis": {"key_prefix": ""}}, "redis.key_prefix"),
        ({"redis": {"state_ttl_s": 0}}, "redis.state_ttl_s"),
        ({"ami": {"address_policy": "dns"}}, "ami.address_policy"),
        ({"ami": {"connect_timeout_s": -1}}, "ami.connect_timeout_s"),
        ({"ami": {"connect_timeout_s": "3"}}, "ami.connect_timeout_s"),
        ({"ami": {"reconnect_max_s": 0.1}}, "ami.reconnect_max_s"),
        ({"ami": {"servers": {"10.0.0.1": {"address": "nohost"}}}}, "ami.servers.10.0.0.1.address"),
        (
            {"ami": {"servers": {"10.0.0.1": {"address": "h:99999"}}}},
            "ami.servers.10.0.0.1.address",
        ),
        ({"ami": {"servers": {"not-an-ip": {}}}}, "ami.servers.not-an-ip"),
        ({"ami": {"servers": {"10.0.0.1": {"port": 1}}}}, "ami.servers.10.0.0.1.port"),
        ({"ami": {"max_message_bytes": 10}}, "ami.max_message_bytes"),
        ({"health": {"heartbeat_misses": 0}}, "health.heartbeat_misses"),
        ({"health": {"heartbeat_timeout_s": 0}}, "health.heartbeat_timeout_s"),
        (
            {"health": {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 0.6}},
            "health.heartbeat_timeout_s",
        ),
        ({"health": {"check_server_updater": "yes"}}, "health.check_server_updater"),
        ({"balance": {"mode": "fast"}}, "balance.mode"),
        ({"balance": {"staggered": 1}}, "balance.staggered"),
        ({"agents": {"default_capacity": -1}}, "agents.default_capacity"),
        ({"agents": {"mode": "fewest"}}, "agents.mode"),
        ({"agents": {"capacity": {"10.0.0.1": "many"}}}, "agents.capacity.10.0.0.1"),
        ({"carriers": [{"id": "a"}]}, "carriers[0].dial_prefix"),
        ({"carriers": [{"dial_prefix": "9"}]}, "carriers[0].id"),
        (
            {"carriers": [{"id": "a", "dial_prefix": "9"}, {"id": "b", "dial_prefix": "9"}]},
            "carriers[1].dial_prefix",
        ),
        (
            {"carriers": [{"id": "a", "dial_prefix": "9"}, {"id": "a", "dial_prefix": "8"}]},
            "carriers[1].id",
        ),
        ({"carriers": [{"id": "a", "dial_prefix": "9", "servers": ["x"]}]}, "carriers[0].servers"),
        ({**TWO_CARRIERS, "routes": [{"name": "r", "carriers": ["a", "x"]}]}, "routes[0].carriers"),
        ({**TWO_CARRIERS, "routes": [{"name": "r", "carriers": []}]}, "routes[0].carriers"),
        ({**TWO_CARRIERS, "routes": [{"name": "r"}]}, "routes[0].carriers"),
        ({**TWO_CARRIERS, "routes": [{"carriers": ["a"]}]}, "routes[0].name"),
        ({**TWO_CARRIERS, "routes": [{"name": "r", "carriers": [["a", 1]]}]}, "routes[0].carriers"),
        ({**TWO_CARRIERS, "routes": [{"name": "r", "carriers": ["a", "a"]}]}, "routes[0].carriers"),
        (
            {**TWO_CARRIERS, "routes": [{"name": "r", "carriers": ["a"], "prefixes": ["31x"]}]},
            "routes[0].prefixes",
        ),
        (
            {**TWO_CARRIERS, "routes": [{"name": "r", "carriers": ["a"], "weights": {"b": 2}}]},
            "routes[0].weights",
        ),
        (
            {**TWO_CARRIERS, "routes": [{"name": "r", "carriers": ["a"], "weights": {"a": 0}}]},
            "routes[0].weights.a",
        ),
        (
            {
                **TWO_CARRIERS,
                "routes": [{"name": "r", "carriers": ["a"]}, {"name": "r", "carriers": ["b"]}],
            },
            "routes[1].name",
        ),
        ({**TWO_CARRIERS, "routes": [{"name": "r", "carriers": ["a"], "x": 1}]}, "routes[0].x"),
        ({"routes": {"name": "r"}}, "routes"),
        ({"routing": {"failure_ratio": 1.5}}, "routing.failure_ratio"),
        ({"routing": {"failure_threshold": 0}}, "routing.failure_threshold"),
        ({"routing": {"cool_down_s": 0}}, "routing.cool_down_s"),
        ({"routing": {"bypass_balance_calls": "no"}}, "routing.bypass_balance_calls"),
        ({"routing": {"probes": 2}}, "routing.probes"),
        ({"metrics": {"listen": "9108"}}, "metrics.listen"),
        ({"metrics": {"port": 9108}}, "metrics.port"),
        ({"http": {"listen": "9108"}}, "http.listen"),
        ({"http": {"listen": "0.0.0.0:9108"}}, "http.token"),
        ({"http": {"listen": "[::]:9108"}}, "http.token"),
        ({"http": {"listen": "dash.example.com:9108"}}, "http.token"),
        ({"metrics": {"listen": "0.0.0.0:9108"}}, "http.token"),
        ({"http": {"listen": "0.0.0.0:9108", "token": "short"}}, "http.token"),
        ({"http": {"token": ""}}, "http.token"),
        ({"http": {"listn": "127.0.0.1:9108"}}, "http.listn"),
        (
            {"http": {"listen": "127.0.0.1:9108"}, "metrics": {"listen": "127.0.0.1:9109"}},
            "metrics.listen",
        ),
        ({"log": {"level": "LOUD"}}, "log.level"),
        ({"log": {"format": "xml"}}, "log.format"),
        ({"bogus": {}}, "bogus"),
        ({"redis": {"urll": "memory://"}}, "redis.urll"),
        ({"health": []}, "health"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build({**DB, **data})
    assert str(info.value).startswith(f"{key}:"), str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:p@h/db",
        "mysql://u:p@/db",
        "mysql://h:3306/db",
        "mysql://u:p@h:3306/",
        "mysql://u:p@h:notaport/db",
    ],
)
def test_bad_database_urls(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        build({"database": {"url": url}})
    assert str(info.value).startswith("database.url:")
    assert ":p@" not in str(info.value)


def test_http_defaults_off_and_loopback_needs_no_token() -> None:
    config = build(DB)
    assert config.http.listen is None and config.http.token is None
    for host in ("127.0.0.1", "127.0.0.53", "localhost", "[::1]"):
        http = build({**DB, "http": {"listen": f"{host}:9108"}}).http
        assert http.loopback and http.listen_key == "http.listen", host
        assert http.listen is not None and http.listen.port == 9108


def test_metrics_listen_still_works_as_http_listen() -> None:
    http = build({**DB, "metrics": {"listen": "127.0.0.1:9108"}}).http
    assert http.listen == HostPort("127.0.0.1", 9108)
    assert http.listen_key == "metrics.listen"
    assert build({**DB, "metrics": {"listen": ""}}).http.listen is None


def test_http_token_from_config_or_environment_never_shown() -> None:
    secret = "s3cret-token-0123456789"
    config = build({**DB, "http": {"listen": "0.0.0.0:9108", "token": secret}})
    assert config.http.token == secret and config.http.token_source == "http.token"
    assert not config.http.loopback
    assert secret not in repr(config)
    env_secret = "from-the-environment-42"
    config = build(
        {**DB, "http": {"listen": "10.0.0.5:9108"}}, {"VICI_BALANCER_HTTP_TOKEN": env_secret}
    )
    assert config.http.token == env_secret
    assert config.http.token_source == "VICI_BALANCER_HTTP_TOKEN"


def test_cli_non_loopback_http_without_token_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "open.toml"
    path.write_text(
        '[database]\nurl = "mysql://u:p@127.0.0.1/db"\n[http]\nlisten = "0.0.0.0:9108"\n'
    )
    result = run_cli(["--config", str(path), "run"])
    assert result.exit_code == 2
    assert "http.token" in result.output and "not a loopback address" in result.output


def test_database_url_password_masked() -> None:
    url = parse_database_url("mysql://cron:s%40cret@db.example:3307/asterisk")
    assert url.password == "s@cret"
    assert url.port == 3307
    assert "s@cret" not in str(url) and "s%40cret" not in str(url)
    assert "s@cret" not in repr(url)
    assert parse_database_url(url.unmasked()) == url


def test_env_overrides_file() -> None:
    env = {
        "VICI_BALANCER_DATABASE_URL": "mysql://u:p@10.9.9.9:3306/other",
        "VICI_BALANCER_REDIS_URL": "redis://127.0.0.1:6379/2",
        "VICI_BALANCER_AMI_SECRET": "envsecret",
    }
    config = build(DB, env)
    assert config.database.url.database == "other"
    assert config.database.source == "env"
    assert config.redis.url == "redis://127.0.0.1:6379/2"
    assert config.ami.secret == "envsecret"


def test_bad_env_url_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^VICI_BALANCER_REDIS_URL:"):
        build(DB, {"VICI_BALANCER_REDIS_URL": "ftp://x"})


ASTGUI = """
# astguiclient.conf
VARserver_ip => 10.10.0.5
VARDB_server => 10.10.0.1
VARDB_database => asterisk
VARDB_user => cron
VARDB_pass => 1234
VARDB_port => 3307
VARactive_keepalives => 123456789E
"""


def test_astguiclient_parsing() -> None:
    conf = parse_astguiclient(ASTGUI)
    url = conf.database_url()
    assert (url.host, url.port, url.user, url.password, url.database) == (
        "10.10.0.1",
        3307,
        "cron",
        "1234",
        "asterisk",
    )
    assert conf.server_ip == "10.10.0.5"


def test_astguiclient_fallback(tmp_path: Path) -> None:
    path = tmp_path / "astguiclient.conf"
    path.write_text(ASTGUI)
    config = config_from_dict({}, {}, path)
    assert config.database.url.port == 3307
    assert config.database.source == str(path)


def test_the_vdacnote_host_is_this_hosts_own_server_ip(tmp_path: Path) -> None:
    path = tmp_path / "astguiclient.conf"
    path.write_text(ASTGUI)
    assert config_from_dict({}, {}, path).balance.host_server_ip == "10.10.0.5"  # VARserver_ip
    named = config_from_dict({"balance": {"host_server_ip": "10.10.0.9"}}, {}, path)
    assert named.balance.host_server_ip == "10.10.0.9"  # the config names it explicitly
    assert build({"database": {"url": "mysql://u@127.0.0.1/db"}}).balance.host_server_ip == ""
    with pytest.raises(ConfigError, match=r"^balance\.host_server_ip: expected this host"):
        config_from_dict({"balance": {"host_server_ip": "ast1"}}, {}, path)


def test_retention_settings_are_validated() -> None:
    db = {"database": {"url": "mysql://u@127.0.0.1/db"}}
    config = build({**db, "retention": {"decision_log_days": 7, "batch_rows": 500}})
    assert (config.retention.decision_log_days, config.retention.batch_rows) == (7, 500)
    assert build(db).retention.decision_log_max_rows == 5_000_000
    with pytest.raises(ConfigError, match=r"^retention\.batch_rows"):
        build({**db, "retention": {"batch_rows": 0}})
    with pytest.raises(ConfigError, match=r"retention\.keep_forever"):
        build({**db, "retention": {"keep_forever": True}})


def test_astguiclient_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "astguiclient.conf"
    path.write_text("VARDB_server => 10.0.0.1\nVARDB_user => cron\n")
    with pytest.raises(ConfigError, match="VARDB_database is missing"):
        config_from_dict({}, {}, path)


def test_no_database_anywhere() -> None:
    with pytest.raises(ConfigError, match=r"^database\.url: not set"):
        build({})


def test_host_port_forms() -> None:
    assert parse_host_port("k", "127.0.0.1:5038") == HostPort("127.0.0.1", 5038)
    assert parse_host_port("k", "[::1]:5038") == HostPort("::1", 5038)
    assert str(HostPort("::1", 5038)) == "[::1]:5038"


def test_server_overrides() -> None:
    config = build(
        {
            **DB,
            "ami": {
                "servers": {
                    "10.10.0.1": {"address": "127.0.0.1:15038", "username": "u", "secret": "s"}
                }
            },
        }
    )
    override = config.ami.servers["10.10.0.1"]
    assert override.address == HostPort("127.0.0.1", 15038)
    assert override.secret == "s"


def test_config_is_immutable() -> None:
    config = build(DB)
    with pytest.raises(AttributeError):
        config.redis = None  # type: ignore[misc]


def run_cli(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False)


def test_cli_bad_config_exits_2_naming_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[database]\nurl = "mysql://u:hunter2@127.0.0.1/db"\n[balance]\nmode = "x"\n')
    result = run_cli(["--config", str(path), "schema", "check"])
    assert result.exit_code == 2
    assert "balance.mode" in result.output
    assert "hunter2" not in result.output


def test_cli_invalid_toml_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[database\n")
    result = run_cli(["--config", str(path), "schema", "check"])
    assert result.exit_code == 2
    assert "not valid TOML" in result.output


def test_cli_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli(["--config", str(tmp_path / "none.toml"), "schema", "check"])
    assert result.exit_code == 2
    assert "config file not found" in result.output


def test_cli_bad_database_url_option_exits_2() -> None:
    result = run_cli(["schema", "check", "--database-url", "mysql://nohost"])
    assert result.exit_code == 2
    assert "--database-url" in result.output


def test_cli_help_lists_commands() -> None:
    result = run_cli(["--help"])
    assert result.exit_code == 0
    for command in ("schema", "sim"):
        assert command in result.output
