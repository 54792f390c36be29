"""The state-store interface and the records it holds. Two implementations: memory and Redis."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class ChannelClass(StrEnum):
    """What a live channel is, for line counting."""

    TRUNK = "trunk"  # an outside line through a carrier: counts against max_vicidial_trunks
    AGENT = "agent"  # an agent's phone
    LOCAL = "local"  # Local/...;1 and ;2 legs inside Asterisk
    OTHER = "other"  # anything else (unknown peers, DAHDI without a carrier, ...)


class Health(StrEnum):
    """A server's AMI/VICIdial health as the tracker sees it (DRAINED is an operator flag)."""

    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"


@dataclass(frozen=True)
class Channel:
    """One live channel on one server, keyed by its Uniqueid (unique per server only)."""

    uniqueid: str
    name: str
    cls: ChannelClass
    carrier: str | None = None


@dataclass(frozen=True)
class ServerMeta:
    """Per-server facts the tracker publishes beside the channel set."""

    server_id: str = ""
    address: str = ""
    health: Health = Health.DOWN
    health_reason: str = ""
    connected_since: float | None = None  # epoch seconds
    last_event_at: float | None = None  # epoch seconds
    rtt_ms: float | None = None
    reconnects: int = 0
    max_trunks: int = 0


@dataclass(frozen=True)
class ServerState:
    """Everything a reader (status, planner) sees about one server."""

    server_ip: str
    meta: ServerMeta
    counts: dict[ChannelClass, int] = field(default_factory=dict)
    carriers: dict[str, int] = field(default_factory=dict)
    drained: bool = False
    fresh: bool = False  # the tracker's heartbeat for this server has not expired

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def count(self, cls: ChannelClass) -> int:
        return self.counts.get(cls, 0)


class StateStore(ABC):
    """Live state shared by the tracker (writer), the planner and the CLI (readers).

    Channel updates for one server are atomic: a reader never sees a count that disagrees with
    the channel set. Adding a channel already present, or removing one absent, changes nothing.
    """

    @abstractmethod
    async def apply(
        self,
        server_ip: str,
        adds: Iterable[Channel],
        removes: Iterable[str],
        last_event_at: float | None = None,
    ) -> None:
        """Apply a batch atomically: every birth (adds) first, then every death (Uniqueids).

        A channel born and dead within one batch is therefore absent afterwards.
        ``last_event_at`` (like every last_event_at write) only ever moves forward.
        """

    @abstractmethod
    async def replace_channels(
        self, server_ip: str, channels: Iterable[Channel], at: float | None = None
    ) -> None:
        """Replace the server's whole channel set (a CoreShowChannels snapshot), atomically.

        ``at`` (the snapshot's time) advances last_event_at like an event would.
        """

    @abstractmethod
    async def channels(self, server_ip: str) -> dict[str, Channel]:
        """The server's live channels by Uniqueid."""

    @abstractmethod
    async def set_meta(self, server_ip: str, meta: ServerMeta) -> None:
        """Publish the server's meta and refresh its heartbeat (expires after the state TTL).

        last_event_at is a high-water mark: an older or None value here leaves the stored one.
        """

    @abstractmethod
    async def server(self, server_ip: str) -> ServerState | None:
        """One server's state, or None when the store has never heard of it."""

    @abstractmethod
    async def servers(self) -> list[ServerState]:
        """Every known server's state, ordered by server_ip."""

    @abstractmethod
    async def forget_server(self, server_ip: str) -> None:
        """Drop everything about a server (it left the registry). Its drain flag survives."""

    @abstractmethod
    async def set_drained(self, server_ip: str, drained: bool) -> None:
        """Operator's drain flag; survives restarts and is seen by every process."""

    @abstractmethod
    async def drained(self) -> set[str]:
        """Server_ips currently drained."""

    @abstractmethod
    async def touch_daemon(self, name: str, ttl_s: float) -> None:
        """Heartbeat of a running daemon (for status to tell whether anyone is tracking)."""

    @abstractmethod
    async def daemons(self) -> list[str]:
        """Names of daemons whose heartbeat has not expired."""

    @abstractmethod
    async def put_document(self, name: str, text: str, ttl_s: float) -> None:
        """Publish a small text document (e.g. the last cycle's summary) that expires."""

    @abstractmethod
    async def get_document(self, name: str) -> str | None:
        """A published document, or None when absent or expired."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""
