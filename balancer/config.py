"""Configuration: a TOML file, environment overrides, astguiclient.conf fallback; one frozen object.

Every setting is defined once, here, with its default. Validation happens at load; any bad value
raises ConfigError naming the key (``section.key``) and the expected form.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer.astguiclient import read_astguiclient
from balancer.config_values import (  # the value checkers every section uses
    HostPort as HostPort,
)
from balancer.config_values import (
    _bool,
    _choice,
    _int_min,
    _log_level,
    _nonempty,
    _nonneg_float,
    _positive_float,
    _redis_url,
    _Section,
    _server_ip_key,
    _string,
    _string_list,
    parse_host_port,
)
from balancer.config_values import is_ipv4 as is_ipv4
from balancer.db.url import DatabaseUrl, parse_database_url
from balancer.errors import ConfigError
from balancer.kamailio.settings import (  # [kamailio] lives beside the code that uses it
    KamailioConfig as KamailioConfig,
)
from balancer.kamailio.settings import KamailioEndpoint as KamailioEndpoint
from balancer.kamailio.settings import KamailioSet as KamailioSet
from balancer.kamailio.settings import parse_kamailio
from balancer.ops.retention_settings import (  # [retention], beside the task that prunes
    RetentionConfig as RetentionConfig,
)
from balancer.ops.retention_settings import parse_retention
from balancer.web.settings import ENV_HTTP_TOKEN as ENV_HTTP_TOKEN  # [http]: beside the server
from balancer.web.settings import HttpConfig as HttpConfig
from balancer.web.settings import parse_http

DEFAULT_CONFIG_PATH = Path("/etc/vici-balancer.toml")
DEFAULT_ASTGUICLIENT_PATH = Path("/etc/astguiclient.conf")
ENV_DATABASE_URL = "VICI_BALANCER_DATABASE_URL"
ENV_REDIS_URL = "VICI_BALANCER_REDIS_URL"
ENV_AMI_SECRET = "VICI_BALANCER_AMI_SECRET"


@dataclass(frozen=True)
class DatabaseConfig:
    url: DatabaseUrl
    source: str  # where the URL came from: "config", "env" or the astguiclient path
    connect_timeout_s: float = 5.0


@dataclass(frozen=True)
class RedisConfig:
    url: str = "memory://"
    key_prefix: str = "vb:"
    state_ttl_s: float = 10.0

    @property
    def is_memory(self) -> bool:
        return self.url == "memory://"


@dataclass(frozen=True)
class AmiServerOverride:
    address: HostPort | None = None
    username: str | None = None
    secret: str | None = None


@dataclass(frozen=True)
class AmiConfig:
    address_policy: str = "server_ip"  # or "telnet_host"
    events: str = "call,system"
    use_filters: bool = True
    connect_timeout_s: float = 3.0
    action_timeout_s: float = 5.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 10.0
    registry_refresh_s: float = 10.0
    reconcile_interval_s: float = 30.0
    max_message_bytes: int = 65536
    username: str | None = None
    secret: str | None = None
    servers: Mapping[str, AmiServerOverride] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthConfig:
    heartbeat_interval_s: float = 1.0
    heartbeat_misses: int = 2
    heartbeat_timeout_s: float = 0.5  # a Ping unanswered this long is a miss (<= the interval)
    server_updater_max_age_s: float = 60.0
    check_server_updater: bool = True


@dataclass(frozen=True)
class BalanceConfig:
    enabled: bool = True  # false: the daemon only tracks
    mode: str = "live"  # or "faithful"
    cycle_interval_s: float = 2.5
    staggered: bool = False
    shortage_window_s: float = 1200.0
    live_agent_max_age_s: float = 0.0  # 0: VICIdial's behaviour, any live agent row counts
    count_remote_agents: bool = True  # VICIdial counts them for the live-agent rule
    lock_ttl_s: float = 5.0
    # This host's own server_ip, which VICIdial writes in each VDACnote ('' -> the target's)
    host_server_ip: str = ""


@dataclass(frozen=True)
class AgentsConfig:
    mode: str = "capacity"  # assign-phone: "capacity", or "vicidial" (the agent screen's own pick)
    default_capacity: int = 100
    capacity: Mapping[str, int] = field(default_factory=dict)
    manage_login_flags: bool = True
    hysteresis_pct: float = 10.0


@dataclass(frozen=True)
class CarrierConfig:
    id: str
    dial_prefix: str
    trunk_names: tuple[str, ...] = ()
    max_lines_per_server: int = 0  # 0: no cap
    servers: tuple[str, ...] = ()  # empty: where vicidial_server_carriers has an active row


@dataclass(frozen=True)
class RouteConfig:
    """One route: which called numbers it matches and its carriers in failover order."""

    name: str
    # Each tier is a set of equals sharing traffic by weight; tiers are tried in order.
    tiers: tuple[tuple[str, ...], ...]
    phone_codes: tuple[str, ...] = ()  # empty: any phone_code
    prefixes: tuple[str, ...] = ()  # number prefixes (after the phone_code); empty: any number
    weights: Mapping[str, int] = field(default_factory=dict)  # carrier -> weight (default 1)

    @property
    def carriers(self) -> tuple[str, ...]:
        """Every carrier of the route, in failover order."""
        return tuple(c for tier in self.tiers for c in tier)

    @property
    def is_default(self) -> bool:
        """Matches every number (no phone_code and no prefix given)."""
        return not self.phone_codes and not self.prefixes

    def weight(self, carrier: str) -> int:
        return self.weights.get(carrier, 1)


@dataclass(frozen=True)
class RoutingConfig:
    """Carrier health (circuit breaker) settings and how balance calls use the routes."""

    bypass_balance_calls: bool = False  # true: balance calls keep the campaign's dial prefix
    retry_failed_calls: bool = True  # re-place a call that failed on a trunk once, next carrier
    failure_threshold: int = 3  # consecutive trunk failures that open a breaker
    failure_ratio: float = 0.5  # ... or this share of trunk failures over the window
    ambiguous_ratio: float = 0.8  # ... or this share of ambiguous causes (1, 18, 21)
    window_s: float = 60.0  # sliding window of call outcomes
    min_calls: int = 10  # outcomes in the window before a ratio counts
    cool_down_s: float = 30.0  # OPEN this long, then HALF-OPEN
    probe_calls: int = 2  # HALF-OPEN: calls let through; all must succeed to close again
    publish_interval_s: float = 2.0  # carrier state published for `routes` this often


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    format: str = "text"  # or "json"


@dataclass(frozen=True)
class Config:
    """The whole configuration, immutable once loaded."""

    database: DatabaseConfig
    redis: RedisConfig = field(default_factory=RedisConfig)
    ami: AmiConfig = field(default_factory=AmiConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    carriers: tuple[CarrierConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    kamailio: KamailioConfig | None = None  # None: no [kamailio] section
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    path: str | None = None


# --------------------------------------------------------------------------- sections


def _database(section: _Section, env: Mapping[str, str], astguiclient_path: Path) -> DatabaseConfig:
    timeout = section.get("connect_timeout_s", 5.0, _positive_float)
    conf_path = Path(section.get("astguiclient_conf", str(astguiclient_path), _nonempty))
    file_url = section.optional("url", _string)
    section.done()
    if env.get(ENV_DATABASE_URL):
        return DatabaseConfig(
            parse_database_url(env[ENV_DATABASE_URL], ENV_DATABASE_URL), "env", timeout
        )
    if file_url:
        return DatabaseConfig(parse_database_url(file_url, "database.url"), "config", timeout)
    if conf_path.exists():
        return DatabaseConfig(read_astguiclient(conf_path).database_url(), str(conf_path), timeout)
    raise ConfigError(
        f"database.url: not set; set it in the config file, in ${ENV_DATABASE_URL}, "
        f"or provide {conf_path} (VARDB_* lines)"
    )


def _ami(section: _Section, env: Mapping[str, str]) -> AmiConfig:
    overrides: dict[str, AmiServerOverride] = {}
    servers = section.table("servers")
    for server_ip in list(servers.data):
        servers.used.add(server_ip)
        _server_ip_key(servers.key(server_ip), server_ip)
        entry = servers.table(server_ip)
        overrides[server_ip] = AmiServerOverride(
            address=entry.optional("address", parse_host_port),
            username=entry.optional("username", _nonempty),
            secret=entry.optional("secret", _nonempty),
        )
        entry.done()
    config = AmiConfig(
        address_policy=section.get(
            "address_policy", "server_ip", _choice("server_ip", "telnet_host")
        ),
        events=section.get("events", "call,system", _nonempty),
        use_filters=section.get("use_filters", True, _bool),
        connect_timeout_s=section.get("connect_timeout_s", 3.0, _positive_float),
        action_timeout_s=section.get("action_timeout_s", 5.0, _positive_float),
        reconnect_initial_s=section.get("reconnect_initial_s", 0.5, _positive_float),
        reconnect_max_s=section.get("reconnect_max_s", 10.0, _positive_float),
        registry_refresh_s=section.get("registry_refresh_s", 10.0, _positive_float),
        reconcile_interval_s=section.get("reconcile_interval_s", 30.0, _positive_float),
        max_message_bytes=section.get("max_message_bytes", 65536, _int_min(1024)),
        username=section.optional("username", _nonempty),
        secret=env.get(ENV_AMI_SECRET) or section.optional("secret", _nonempty),
        servers=overrides,
    )
    section.done()
    if config.reconnect_max_s < config.reconnect_initial_s:
        raise ConfigError("ami.reconnect_max_s: must be >= ami.reconnect_initial_s")
    return config


def _health(section: _Section) -> HealthConfig:
    interval = section.get("heartbeat_interval_s", 1.0, _positive_float)
    timeout = section.get("heartbeat_timeout_s", min(0.5, interval), _positive_float)
    if timeout > interval:
        raise ConfigError("health.heartbeat_timeout_s: must be <= health.heartbeat_interval_s")
    config = HealthConfig(
        heartbeat_interval_s=interval,
        heartbeat_misses=section.get("heartbeat_misses", 2, _int_min(1)),
        heartbeat_timeout_s=timeout,
        server_updater_max_age_s=section.get("server_updater_max_age_s", 60.0, _positive_float),
        check_server_updater=section.get("check_server_updater", True, _bool),
    )
    section.done()
    return config


def _host_ip(key: str, value: Any) -> str:
    text = _string(key, value).strip()
    if text and not is_ipv4(text):
        raise ConfigError(f"{key}: expected this host's server_ip (IPv4), got {text!r}")
    return text


def _balance(section: _Section, host_server_ip: str) -> BalanceConfig:
    config = BalanceConfig(
        enabled=section.get("enabled", True, _bool),
        mode=section.get("mode", "live", _choice("live", "faithful")),
        cycle_interval_s=section.get("cycle_interval_s", 2.5, _positive_float),
        staggered=section.get("staggered", False, _bool),
        shortage_window_s=section.get("shortage_window_s", 1200.0, _positive_float),
        live_agent_max_age_s=section.get("live_agent_max_age_s", 0.0, _nonneg_float),
        count_remote_agents=section.get("count_remote_agents", True, _bool),
        lock_ttl_s=section.get("lock_ttl_s", 5.0, _positive_float),
        host_server_ip=section.get("host_server_ip", host_server_ip, _host_ip),
    )
    section.done()
    return config


def _agents(section: _Section) -> AgentsConfig:
    capacity: dict[str, int] = {}
    table = section.table("capacity")
    for server_ip, value in table.data.items():
        table.used.add(server_ip)
        key = table.key(server_ip)
        capacity[_server_ip_key(key, server_ip)] = _int_min(0)(key, value)
    config = AgentsConfig(
        mode=section.get("mode", "capacity", _choice("capacity", "vicidial")),
        default_capacity=section.get("default_capacity", 100, _int_min(0)),
        capacity=capacity,
        manage_login_flags=section.get("manage_login_flags", True, _bool),
        hysteresis_pct=section.get("hysteresis_pct", 10.0, _nonneg_float),
    )
    section.done()
    return config


def _carriers(value: Any) -> tuple[CarrierConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError("carriers: expected an array of tables ([[carriers]])")
    carriers: list[CarrierConfig] = []
    seen_ids: set[str] = set()
    seen_prefixes: dict[str, str] = {}
    for index, raw in enumerate(value):
        section = _Section(f"carriers[{index}]", raw)
        carrier = CarrierConfig(
            id=section.get("id", "", _nonempty),
            dial_prefix=section.get("dial_prefix", "", _nonempty),
            trunk_names=section.get("trunk_names", (), _string_list),
            max_lines_per_server=section.get("max_lines_per_server", 0, _int_min(0)),
            servers=section.get("servers", (), _string_list),
        )
        section.done()
        if not carrier.id:
            raise ConfigError(f"carriers[{index}].id: required")
        if not carrier.dial_prefix:
            raise ConfigError(f"carriers[{index}].dial_prefix: required")
        if carrier.id in seen_ids:
            raise ConfigError(f"carriers[{index}].id: duplicate carrier id {carrier.id!r}")
        if carrier.dial_prefix in seen_prefixes:
            raise ConfigError(
                f"carriers[{index}].dial_prefix: {carrier.dial_prefix!r} already used by "
                f"carrier {seen_prefixes[carrier.dial_prefix]!r}"
            )
        for server_ip in carrier.servers:
            _server_ip_key(f"carriers[{index}].servers", server_ip)
        seen_ids.add(carrier.id)
        seen_prefixes[carrier.dial_prefix] = carrier.id
        carriers.append(carrier)
    return tuple(carriers)


def _digits(key: str, value: Any) -> tuple[str, ...]:
    texts = _string_list(key, value)
    for text in texts:
        if not text.isdigit():
            raise ConfigError(f"{key}: expected digits only, got {text!r}")
    return texts


def _ratio(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{key}: expected a number > 0 and <= 1, got {value!r}")
    return float(value)


def _tiers(key: str, value: Any) -> tuple[tuple[str, ...], ...]:
    """["a", ["b", "c"], "d"]: a string is a tier of one, an array a tier of equals."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected an array of carrier ids (or arrays of equals)")
    tiers: list[tuple[str, ...]] = []
    for item in value:
        if isinstance(item, str) and item:
            tiers.append((item,))
        elif isinstance(item, list) and item and all(isinstance(c, str) and c for c in item):
            tiers.append(tuple(item))
        else:
            raise ConfigError(f"{key}: expected carrier ids or arrays of carrier ids, got {item!r}")
    return tuple(tiers)


def _weights(key: str, value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table carrier = weight, got {value!r}")
    return {str(k): _int_min(1)(f"{key}.{k}", v) for k, v in value.items()}


def _routes(value: Any, carriers: tuple[CarrierConfig, ...]) -> tuple[RouteConfig, ...]:
    """[[routes]]: every carrier known, no route empty, no (phone_code, prefix) matched twice."""
    if not isinstance(value, list):
        raise ConfigError("routes: expected an array of tables ([[routes]])")
    known = {c.id for c in carriers}
    routes: list[RouteConfig] = []
    names: dict[str, int] = {}
    matched: dict[tuple[str, str], tuple[int, str]] = {}
    for index, raw in enumerate(value):
        where = f"routes[{index}]"
        section = _Section(where, raw)
        name = section.get("name", "", _nonempty)
        route = RouteConfig(
            name=name,
            phone_codes=section.get("phone_codes", (), _digits),
            prefixes=section.get("prefixes", (), _digits),
            tiers=section.get("carriers", (), _tiers),
            weights=section.get("weights", {}, _weights),
        )
        section.done()
        if not name:
            raise ConfigError(f"{where}.name: required")
        if name in names:
            raise ConfigError(
                f"{where}.name: duplicate route name {name!r} (also routes[{names[name]}])"
            )
        names[name] = index
        if not route.tiers:
            raise ConfigError(f"{where}.carriers: route {name!r} lists no carriers")
        seen: set[str] = set()
        for carrier in route.carriers:
            if carrier not in known:
                raise ConfigError(
                    f"{where}.carriers: unknown carrier {carrier!r} in route {name!r}"
                    f" (known: {', '.join(sorted(known)) or 'none'})"
                )
            if carrier in seen:
                raise ConfigError(f"{where}.carriers: carrier {carrier!r} listed twice in {name!r}")
            seen.add(carrier)
        for carrier in route.weights:
            if carrier not in seen:
                raise ConfigError(
                    f"{where}.weights: {carrier!r} is not a carrier of route {name!r}"
                )
        for key in _match_keys(route):
            if key in matched:
                other, other_name = matched[key]
                raise ConfigError(
                    f"{where}.prefixes: route {name!r} matches {_describe_match(key)}, "
                    f"already matched by route {other_name!r} (routes[{other}])"
                )
            matched[key] = (index, name)
        routes.append(route)
    return tuple(routes)


def _match_keys(route: RouteConfig) -> list[tuple[str, str]]:
    """Every (phone_code, number prefix) pair a route matches on ('' = any)."""
    return [
        (code, prefix) for code in route.phone_codes or ("",) for prefix in route.prefixes or ("",)
    ]


def _describe_match(key: tuple[str, str]) -> str:
    code, prefix = key
    if not code and not prefix:
        return "every number (default route)"
    return f"phone_code {code or '*'} prefix {prefix or '*'}"


def _routing(section: _Section) -> RoutingConfig:
    config = RoutingConfig(
        bypass_balance_calls=section.get("bypass_balance_calls", False, _bool),
        retry_failed_calls=section.get("retry_failed_calls", True, _bool),
        failure_threshold=section.get("failure_threshold", 3, _int_min(1)),
        failure_ratio=section.get("failure_ratio", 0.5, _ratio),
        ambiguous_ratio=section.get("ambiguous_ratio", 0.8, _ratio),
        window_s=section.get("window_s", 60.0, _positive_float),
        min_calls=section.get("min_calls", 10, _int_min(1)),
        cool_down_s=section.get("cool_down_s", 30.0, _positive_float),
        probe_calls=section.get("probe_calls", 2, _int_min(1)),
        publish_interval_s=section.get("publish_interval_s", 2.0, _positive_float),
    )
    section.done()
    return config


# --------------------------------------------------------------------------- entry points


def config_from_dict(
    data: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    astguiclient_path: Path = DEFAULT_ASTGUICLIENT_PATH,
    path: str | None = None,
) -> Config:
    """Build and validate a Config from parsed TOML data plus the environment."""
    env = os.environ if env is None else env
    root = _Section("", dict(data))
    conf_path = Path(
        str(dict(data.get("database") or {}).get("astguiclient_conf", astguiclient_path))
    )
    # VICIdial's own notion of this host: its VARserver_ip, unless the config names another.
    host_ip = (read_astguiclient(conf_path).server_ip or "") if conf_path.is_file() else ""
    database = _database(root.table("database"), env, astguiclient_path)

    redis_section = root.table("redis")
    redis_url = redis_section.get("url", "memory://", _redis_url)
    if env.get(ENV_REDIS_URL):
        redis_url = _redis_url(ENV_REDIS_URL, env[ENV_REDIS_URL])
    redis = RedisConfig(
        url=redis_url,
        key_prefix=redis_section.get("key_prefix", "vb:", _nonempty),
        state_ttl_s=redis_section.get("state_ttl_s", 10.0, _positive_float),
    )
    redis_section.done()

    http = parse_http(root.table("http"), root.table("metrics"), env)

    log_section = root.table("log")
    log = LogConfig(
        level=log_section.get("level", "INFO", _log_level),
        format=log_section.get("format", "text", _choice("text", "json")),
    )
    log_section.done()

    no_carriers: tuple[CarrierConfig, ...] = ()
    carriers = root.get("carriers", no_carriers, lambda _k, v: _carriers(v))
    config = Config(
        database=database,
        redis=redis,
        ami=_ami(root.table("ami"), env),
        health=_health(root.table("health")),
        balance=_balance(root.table("balance"), host_ip),
        agents=_agents(root.table("agents")),
        carriers=carriers,
        routes=root.get("routes", (), lambda _k, v: _routes(v, carriers)),
        routing=_routing(root.table("routing")),
        http=http,
        log=log,
        kamailio=parse_kamailio(root.table("kamailio")) if "kamailio" in data else None,
        retention=parse_retention(root.table("retention")),
        path=path,
    )
    root.done()
    return config


def load_config(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    astguiclient_path: Path = DEFAULT_ASTGUICLIENT_PATH,
) -> Config:
    """Load the TOML file at ``path`` (a missing default path means all defaults)."""
    data: dict[str, Any] = {}
    chosen = path if path is not None else DEFAULT_CONFIG_PATH
    if chosen.exists():
        try:
            data = tomllib.loads(chosen.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{chosen}: cannot read: {exc.strerror}") from None
    elif path is not None:
        raise ConfigError(f"{chosen}: config file not found")
    return config_from_dict(data, env, astguiclient_path, str(chosen) if chosen.exists() else None)
