r"""Every Redis key name the balancer uses, in one place; nothing else formats a key.

Layout under the prefix (``vb:`` by default, so several clusters can share one Redis):

    <p>servers                  set     server_ips the store has heard of
    <p>server:<ip>:meta         hash    ServerMeta fields as text ("" for None)
    <p>server:<ip>:channels     hash    uniqueid -> "cls\x1fcarrier\x1fname" (store.redis)
    <p>server:<ip>:counts       hash    class -> n, "carrier:<id>" -> n (no zero entries)
    <p>server:<ip>:heartbeat    string  with TTL: the tracker published this server recently
    <p>drained                  set     operator's drain flags (outlive forget_server)
    <p>daemons                  set     names of daemons that have sent a heartbeat
    <p>daemon:<name>            string  with TTL: that daemon is alive
"""

from __future__ import annotations

# Field-name prefix of per-carrier counters inside the counts hash (a field, not a key, but the
# Lua script and the readers must agree on it, so it lives here too).
CARRIER_FIELD = "carrier:"


# Names of published documents (Keys.document): the last balance cycle's summary, for `status`;
# the leader's carrier health and route table, for `routes`.
BALANCE_SUMMARY = "balance"
ROUTES_DOCUMENT = "routes"
# every servers row the registry read, tracked or not (so `status` lists all of them)
SERVERS_DOCUMENT = "servers"
# The login-flag keeper's view: the active_agent_login_server flags the balancer holds closed
# and why (published by the keeper of the leading daemon, for `status`).
LOGIN_FLAGS_DOCUMENT = "login_flags"
# Each publishing daemon's Kamailio state, as "kamailio:<daemon name>" (for status/kamailio).
KAMAILIO_DOCUMENT = "kamailio"


def kamailio_document(daemon: str) -> str:
    """The document name a daemon publishes its Kamailio state under."""
    return f"{KAMAILIO_DOCUMENT}:{daemon}"


class Keys:
    """Key names for one key prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "vb:") -> None:
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"Keys({self.prefix!r})"

    # ------------------------------------------------------------------ per server

    def servers(self) -> str:
        """Set of every server_ip the store has heard of."""
        return f"{self.prefix}servers"

    def meta(self, server_ip: str) -> str:
        """Hash of the server's ServerMeta fields."""
        return f"{self.prefix}server:{server_ip}:meta"

    def channels(self, server_ip: str) -> str:
        """Hash uniqueid -> encoded channel."""
        return f"{self.prefix}server:{server_ip}:channels"

    def counts(self, server_ip: str) -> str:
        """Hash class -> count and carrier:<id> -> count, kept in step with the channels hash."""
        return f"{self.prefix}server:{server_ip}:counts"

    def heartbeat(self, server_ip: str) -> str:
        """String with a TTL; present while the server's state is fresh."""
        return f"{self.prefix}server:{server_ip}:heartbeat"

    def server_keys(self, server_ip: str) -> tuple[str, ...]:
        """Every per-server key (what forget_server deletes); the drain flag is not among them."""
        return (
            self.meta(server_ip),
            self.channels(server_ip),
            self.counts(server_ip),
            self.heartbeat(server_ip),
        )

    # ------------------------------------------------------------------ cluster wide

    def drained(self) -> str:
        """Set of drained server_ips."""
        return f"{self.prefix}drained"

    def daemons(self) -> str:
        """Set of daemon names that have sent a heartbeat (pruned when their key expires)."""
        return f"{self.prefix}daemons"

    def daemon(self, name: str) -> str:
        """String with a TTL; present while that daemon is alive."""
        return f"{self.prefix}daemon:{name}"

    def document(self, name: str) -> str:
        """String with a TTL: a published document such as the last balance cycle's summary."""
        return f"{self.prefix}doc:{name}"

    @staticmethod
    def carrier_field(carrier: str) -> str:
        """Field name of a carrier's counter inside the counts hash."""
        return f"{CARRIER_FIELD}{carrier}"
