"""The [kamailio] configuration section: endpoints, managed sets, destinations, policy.

Validated like every other section (`balancer.config` calls `parse_kamailio` at load): a bad
value raises ConfigError naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer.config_values import (
    _bool,
    _choice,
    _int_min,
    _nonempty,
    _positive_float,
    _Section,
    _server_ip_key,
    _string_list,
)
from balancer.errors import ConfigError


@dataclass(frozen=True)
class KamailioEndpoint:
    """One Kamailio's JSON-RPC address (over HTTP) and the dispatcher list file it loads."""

    name: str
    url: str  # http://host:port/RPC (xhttp + jsonrpcs)
    list_file: str  # the file Kamailio's dispatcher list_file modparam names


@dataclass(frozen=True)
class KamailioSet:
    """A dispatcher set the balancer manages: its members and what their capacity is."""

    id: int
    capacity: str = "trunks"  # or "agents" (an agent-facing set)
    servers: tuple[str, ...] = ()  # server_ips; empty: every watched server


@dataclass(frozen=True)
class KamailioConfig:
    """[kamailio]: publish health and spare capacity into Kamailio's dispatcher."""

    endpoints: tuple[KamailioEndpoint, ...]
    sets: tuple[KamailioSet, ...]
    algorithm: int = 11  # 9 weight, 11 relative weight (rweight): the attribute written
    publish: str = "leader"  # or "always" (every daemon publishes to its endpoints)
    probing: bool = True  # active destinations carry the probing flag (ds_probing_mode 3)
    sip_port: int = 5060  # destination sip:<server_ip>:<sip_port> unless overridden
    uris: Mapping[str, str] = field(default_factory=dict)  # server_ip -> SIP URI
    poll_interval_s: float = 0.25
    verify_interval_s: float = 2.0
    rpc_timeout_s: float = 2.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    weight_hysteresis: int = 5  # percentage points a share must move before a reload
    max_reloads_per_minute: int = 6

    def uri(self, server_ip: str) -> str:
        """The SIP destination of a server."""
        return self.uris.get(server_ip) or f"sip:{server_ip}:{self.sip_port}"


_SIP_URI_RE = re.compile(r"^sips?:[^\s;,]+$")
_RPC_URL_RE = re.compile(r"^https?://[^\s/:@]+(:[0-9]{1,5})?(/\S*)?$")


def _rpc_url(key: str, value: Any) -> str:
    url = _nonempty(key, value).strip()
    if not _RPC_URL_RE.match(url):
        raise ConfigError(
            f"{key}: expected 'http://host:port/RPC' (jsonrpcs over xhttp), got {url!r}"
        )
    return url


def _sip_uri(key: str, value: Any) -> str:
    uri = _nonempty(key, value).strip()
    if not _SIP_URI_RE.match(uri):
        raise ConfigError(f"{key}: expected a SIP URI such as 'sip:10.0.0.11:5080', got {uri!r}")
    return uri


def parse_kamailio(section: _Section) -> KamailioConfig:
    """The [kamailio] table, validated."""
    endpoints: list[KamailioEndpoint] = []
    raw_endpoints: Any = section.get("endpoints", [], lambda _k, v: v)
    if not isinstance(raw_endpoints, list) or not raw_endpoints:
        raise ConfigError("kamailio.endpoints: expected one or more [[kamailio.endpoints]] tables")
    for index, raw in enumerate(raw_endpoints):
        entry = _Section(f"kamailio.endpoints[{index}]", raw)
        endpoint = KamailioEndpoint(
            name=entry.get("name", "", _nonempty),
            url=entry.get("url", "", _rpc_url),
            list_file=entry.get("list_file", "", _nonempty),
        )
        entry.done()
        for what in ("name", "url", "list_file"):
            if not getattr(endpoint, what):
                raise ConfigError(f"{entry.key(what)}: required")
            if any(getattr(other, what) == getattr(endpoint, what) for other in endpoints):
                raise ConfigError(f"{entry.key(what)}: {getattr(endpoint, what)!r} used twice")
        if not Path(endpoint.list_file).is_absolute():
            raise ConfigError(f"{entry.key('list_file')}: expected an absolute path")
        endpoints.append(endpoint)
    sets: list[KamailioSet] = []
    raw_sets: Any = section.get("sets", [], lambda _k, v: v)
    if not isinstance(raw_sets, list) or not raw_sets:
        raise ConfigError("kamailio.sets: expected one or more [[kamailio.sets]] tables")
    for index, raw in enumerate(raw_sets):
        entry = _Section(f"kamailio.sets[{index}]", raw)
        managed = KamailioSet(
            id=entry.get("id", 0, _int_min(1)),
            capacity=entry.get("capacity", "trunks", _choice("trunks", "agents")),
            servers=entry.get("servers", (), _string_list),
        )
        entry.done()
        if not managed.id:
            raise ConfigError(f"{entry.key('id')}: required (the dispatcher set id)")
        if any(other.id == managed.id for other in sets):
            raise ConfigError(f"{entry.key('id')}: set {managed.id} listed twice")
        for server_ip in managed.servers:
            _server_ip_key(entry.key("servers"), server_ip)
        sets.append(managed)
    uris: dict[str, str] = {}
    servers = section.table("servers")
    for server_ip in list(servers.data):
        servers.used.add(server_ip)
        _server_ip_key(servers.key(server_ip), server_ip)
        entry = servers.table(server_ip)
        uris[server_ip] = entry.get("uri", "", _sip_uri)
        entry.done()
        if not uris[server_ip]:
            raise ConfigError(f"{entry.key('uri')}: required")
    config = KamailioConfig(
        endpoints=tuple(endpoints),
        sets=tuple(sets),
        algorithm=section.get("algorithm", 11, _kamailio_algorithm),
        publish=section.get("publish", "leader", _choice("leader", "always")),
        probing=section.get("probing", True, _bool),
        sip_port=section.get("sip_port", 5060, _port_number),
        uris=uris,
        poll_interval_s=section.get("poll_interval_s", 0.25, _positive_float),
        verify_interval_s=section.get("verify_interval_s", 2.0, _positive_float),
        rpc_timeout_s=section.get("rpc_timeout_s", 2.0, _positive_float),
        retry_initial_s=section.get("retry_initial_s", 0.5, _positive_float),
        retry_max_s=section.get("retry_max_s", 30.0, _positive_float),
        weight_hysteresis=section.get("weight_hysteresis", 5, _int_min(0)),
        max_reloads_per_minute=section.get("max_reloads_per_minute", 6, _int_min(1)),
    )
    section.done()
    if config.poll_interval_s > 0.5:
        # Health changes must reach Kamailio within a second of the balancer seeing them.
        raise ConfigError("kamailio.poll_interval_s: must be <= 0.5 (states publish within 1 s)")
    if config.retry_max_s < config.retry_initial_s:
        raise ConfigError("kamailio.retry_max_s: must be >= kamailio.retry_initial_s")
    if config.max_reloads_per_minute > 60:
        raise ConfigError("kamailio.max_reloads_per_minute: at most 60 (one reload per second)")
    if config.weight_hysteresis > 100:
        raise ConfigError("kamailio.weight_hysteresis: expected percentage points 0-100")
    return config


def _kamailio_algorithm(key: str, value: Any) -> int:
    if value in (9, 11) and not isinstance(value, bool):
        return int(value)
    hint = ""
    if value == 4:
        hint = " (4 is plain round-robin in Kamailio: it ignores weights)"
    elif value == 10:
        hint = " (10, call load, counts only Kamailio's own dialogs and cannot be reloaded)"
    raise ConfigError(f"{key}: expected 9 (weight) or 11 (relative weight), got {value!r}{hint}")


def _port_number(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{key}: expected a port 1-65535, got {value!r}")
    return value
