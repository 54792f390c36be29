"""The [http] configuration section: where the daemon's one HTTP server listens, and its token.

Validated like every other section (`balancer.config` calls `parse_http` at load): a bad value
raises ConfigError naming the key. The older ``[metrics] listen`` is still read here, as the
listen address, so configurations written before the dashboard keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from balancer.config_values import (
    HostPort,
    _nonempty,
    _Section,
    is_loopback,
    parse_host_port,
)
from balancer.errors import ConfigError

ENV_HTTP_TOKEN = "VICI_BALANCER_HTTP_TOKEN"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class HttpConfig:
    """The daemon's one HTTP server: /metrics, /api/status, the event stream, the dashboard."""

    listen: HostPort | None = None  # None: no HTTP server
    listen_key: str = "http.listen"  # the key it was set with (the old metrics.listen still works)
    token: str | None = field(default=None, repr=False)  # required off loopback
    token_source: str = ""  # "http.token" or the environment variable, for messages

    @property
    def loopback(self) -> bool:
        """True when the listen address only accepts connections from this machine."""
        return self.listen is None or is_loopback(self.listen.host)


def _optional_listen(key: str, value: Any) -> HostPort | None:
    """A listen address, or None for "" (off)."""
    if value == "":
        return None
    return parse_host_port(key, value)


def parse_http(
    http_section: _Section, metrics_section: _Section, env: Mapping[str, str]
) -> HttpConfig:
    """[http], with the older [metrics] listen still accepted as its listen address."""
    listen, listen_key = http_section.get("listen", None, _optional_listen), "http.listen"
    old = metrics_section.get("listen", None, _optional_listen)
    metrics_section.done()
    if "listen" in metrics_section.data:
        if "listen" in http_section.data:
            raise ConfigError("metrics.listen: replaced by http.listen; remove metrics.listen")
        listen, listen_key = old, "metrics.listen"
    token, token_source = http_section.optional("token", _nonempty), "http.token"
    if env.get(ENV_HTTP_TOKEN):
        token, token_source = env[ENV_HTTP_TOKEN], ENV_HTTP_TOKEN
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{token_source}: a token needs at least {MIN_TOKEN_CHARS} characters")
    http_section.done()
    config = HttpConfig(listen, listen_key, token, token_source if token is not None else "")
    if not config.loopback and token is None:
        raise ConfigError(
            f"http.token: {listen_key} {listen} is not a loopback address, so a token is "
            f"required (http.token or {ENV_HTTP_TOKEN}); or listen on 127.0.0.1 and tunnel"
        )
    return config
