"""In-process state store (``memory://``): the same semantics as Redis, for a single daemon."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import TypeVar

from balancer.store.base import Channel, ChannelClass, ServerMeta, ServerState, StateStore

_K = TypeVar("_K")


def _later(current: float | None, candidate: float | None) -> float | None:
    """The newer of two last_event_at values; None never wins over a time."""
    # A high-water mark: several writers (tracker, reconcile, a second daemon) report it,
    # and a stale or missing report must not move it back.
    if candidate is None or (current is not None and candidate <= current):
        return current
    return candidate


def _decrement(counter: dict[_K, int], key: _K) -> None:
    left = counter[key] - 1
    if left:
        counter[key] = left
    else:
        del counter[key]  # no zero entries, like the Redis counts hash


class _Server:
    """One server's live state; counts are kept in step with the channel dict."""

    __slots__ = ("carriers", "channels", "counts", "fresh_until", "meta")

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.counts: dict[ChannelClass, int] = {}
        self.carriers: dict[str, int] = {}
        self.meta = ServerMeta()
        self.fresh_until = float("-inf")  # time.monotonic() deadline of the heartbeat

    def add(self, channel: Channel) -> None:
        if channel.uniqueid in self.channels:
            return
        if channel.carrier == "":
            # The Redis encoding cannot tell "" from None; keep both stores identical.
            channel = replace(channel, carrier=None)
        self.channels[channel.uniqueid] = channel
        self.counts[channel.cls] = self.counts.get(channel.cls, 0) + 1
        if channel.carrier is not None:
            self.carriers[channel.carrier] = self.carriers.get(channel.carrier, 0) + 1

    def remove(self, uniqueid: str) -> None:
        channel = self.channels.pop(uniqueid, None)
        if channel is None:
            return
        _decrement(self.counts, channel.cls)
        if channel.carrier is not None:
            _decrement(self.carriers, channel.carrier)

    def advance(self, at: float | None) -> None:
        newer = _later(self.meta.last_event_at, at)
        if newer != self.meta.last_event_at:
            self.meta = replace(self.meta, last_event_at=newer)


class MemoryStore(StateStore):
    """State held in this process; atomic because no method awaits while it mutates."""

    def __init__(self, state_ttl_s: float = 10.0) -> None:
        self.state_ttl_s = state_ttl_s
        self._servers: dict[str, _Server] = {}
        self._drained: set[str] = set()
        self._daemons: dict[str, float] = {}  # name -> time.monotonic() deadline
        self._documents: dict[
            str, tuple[str, float]
        ] = {}  # name -> (text, deadline)  # (token, time.monotonic() deadline)

    def __repr__(self) -> str:
        return f"MemoryStore(state_ttl_s={self.state_ttl_s})"

    def _server(self, server_ip: str) -> _Server:
        server = self._servers.get(server_ip)
        if server is None:
            server = self._servers[server_ip] = _Server()
        return server

    async def apply(
        self,
        server_ip: str,
        adds: Iterable[Channel],
        removes: Iterable[str],
        last_event_at: float | None = None,
    ) -> None:
        """Apply a batch: every add, then every remove; duplicates and absentees change nothing."""
        adds = list(adds)
        removes = list(removes)
        if not adds and not removes and last_event_at is None:
            return
        server = self._server(server_ip)
        for channel in adds:
            server.add(channel)
        for uniqueid in removes:
            server.remove(uniqueid)
        server.advance(last_event_at)

    async def replace_channels(
        self, server_ip: str, channels: Iterable[Channel], at: float | None = None
    ) -> None:
        """Replace the whole channel set (a later duplicate Uniqueid wins) and recount."""
        fresh = _Server()
        for channel in {c.uniqueid: c for c in channels}.values():
            fresh.add(channel)
        server = self._server(server_ip)
        server.channels, server.counts, server.carriers = (
            fresh.channels,
            fresh.counts,
            fresh.carriers,
        )
        server.advance(at)

    async def channels(self, server_ip: str) -> dict[str, Channel]:
        """The server's live channels by Uniqueid (a copy)."""
        server = self._servers.get(server_ip)
        return {} if server is None else dict(server.channels)

    async def set_meta(self, server_ip: str, meta: ServerMeta) -> None:
        """Store the meta (last_event_at only moves forward) and refresh the heartbeat."""
        server = self._server(server_ip)
        newer = _later(server.meta.last_event_at, meta.last_event_at)
        server.meta = meta if newer == meta.last_event_at else replace(meta, last_event_at=newer)
        server.fresh_until = time.monotonic() + self.state_ttl_s

    def _state(self, server_ip: str, server: _Server, now: float) -> ServerState:
        return ServerState(
            server_ip=server_ip,
            meta=server.meta,
            counts=dict(server.counts),
            carriers=dict(server.carriers),
            drained=server_ip in self._drained,
            fresh=now < server.fresh_until,
        )

    async def server(self, server_ip: str) -> ServerState | None:
        """One server's state, or None when it is unknown."""
        server = self._servers.get(server_ip)
        return None if server is None else self._state(server_ip, server, time.monotonic())

    async def servers(self) -> list[ServerState]:
        """Every known server's state, ordered by server_ip."""
        now = time.monotonic()
        return [self._state(ip, self._servers[ip], now) for ip in sorted(self._servers)]

    async def forget_server(self, server_ip: str) -> None:
        """Drop the server's state; its drain flag stays."""
        self._servers.pop(server_ip, None)

    async def set_drained(self, server_ip: str, drained: bool) -> None:
        """Set or clear the operator's drain flag."""
        if drained:
            self._drained.add(server_ip)
        else:
            self._drained.discard(server_ip)

    async def drained(self) -> set[str]:
        """Server_ips currently drained."""
        return set(self._drained)

    async def touch_daemon(self, name: str, ttl_s: float) -> None:
        """Record that daemon ``name`` is alive for the next ``ttl_s`` seconds."""
        self._daemons[name] = time.monotonic() + ttl_s

    async def daemons(self) -> list[str]:
        """Names of live daemons, sorted; expired ones are forgotten."""
        now = time.monotonic()
        for name in [n for n, until in self._daemons.items() if until <= now]:
            del self._daemons[name]
        return sorted(self._daemons)

    async def put_document(self, name: str, text: str, ttl_s: float) -> None:
        """Keep ``text`` under ``name`` for ``ttl_s`` seconds."""
        self._documents[name] = (text, time.monotonic() + ttl_s)

    async def get_document(self, name: str) -> str | None:
        """The document if present and unexpired."""
        entry = self._documents.get(name)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    async def close(self) -> None:
        """Nothing to release."""
