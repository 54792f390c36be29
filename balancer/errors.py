"""The balancer's own exception hierarchy; every message names the server, key or row at fault."""


class BalancerError(Exception):
    """Base of every error the balancer raises on purpose."""


class ConfigError(BalancerError):
    """Invalid configuration: the message names the key and the expected form."""


class DatabaseError(BalancerError):
    """MySQL/MariaDB unreachable, refused, or missing what the balancer needs."""


class StoreError(BalancerError):
    """The live-state store (Redis) is unreachable or holds something unexpected."""


class AmiError(BalancerError):
    """An AMI session failed: connect, login, timeout or protocol garbage."""


class AmiProtocolError(AmiError):
    """The peer sent bytes that are not AMI (oversized line, garbage)."""


class KamailioError(BalancerError):
    """A Kamailio JSON-RPC endpoint is unreachable, slow, or refused a command."""
