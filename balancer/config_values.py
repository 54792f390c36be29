"""Typed reads of TOML values for the configuration: each checker's error names the key.

Shared by `balancer.config` and the sections that live beside their integration
(`balancer.kamailio.settings`); the underscore names are the configuration's own helpers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from balancer.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class HostPort:
    """A TCP address; host is a name or an IP literal (IPv6 without brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --------------------------------------------------------------------------- value checkers


class _Section:
    """Reads typed values from one TOML table and reports unknown keys."""

    def __init__(self, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: expected a table, got {type(data).__name__}")
        self.name = name
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def get(self, key: str, default: T, check: Callable[[str, Any], T]) -> T:
        self.used.add(key)
        if key not in self.data:
            return default
        return check(self.key(key), self.data[key])

    def optional(self, key: str, check: Callable[[str, Any], T]) -> T | None:
        self.used.add(key)
        if key not in self.data:
            return None
        return check(self.key(key), self.data[key])

    def table(self, key: str) -> _Section:
        self.used.add(key)
        return _Section(self.key(key), self.data.get(key, {}))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _nonempty(key: str, value: Any) -> str:
    text = _string(key, value)
    if not text.strip():
        raise ConfigError(f"{key}: must not be empty")
    return text


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _int_min(minimum: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
        return value

    return check


def _positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key}: expected a number of seconds > 0, got {value!r}")
    return float(value)


def _nonneg_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{key}: expected a number >= 0, got {value!r}")
    return float(value)


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            expected = " or ".join(repr(c) for c in choices)
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")
        return str(value)

    return check


def _string_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def parse_host_port(key: str, value: Any) -> HostPort:
    """Parse 'host:port' or '[v6]:port'; the error names the key."""
    text = _string(key, value).strip()
    host, sep, port_text = text.rpartition(":")
    if text.startswith("["):
        host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: expected 'host:port' (port 1-65535), got {text!r}")
    return HostPort(host, int(port_text))


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals (what tests may ever connect to)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ipv4(text: str) -> bool:
    """True for a dotted-quad IPv4 address (VICIdial's server_ip form)."""
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _server_ip_key(key: str, value: str) -> str:
    if not is_ipv4(value):
        raise ConfigError(f"{key}: server key must be a server_ip (IPv4), got {value!r}")
    return value


def _redis_url(key: str, value: Any) -> str:
    url = _string(key, value).strip()
    if url != "memory://" and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"{key}: expected 'memory://' or 'redis://host:port/db', got {url.split('@')[-1]!r}"
        )
    return url


def _log_level(key: str, value: Any) -> str:
    return _choice("DEBUG", "INFO", "WARNING", "ERROR")(key, str(value).upper())
