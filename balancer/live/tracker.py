"""The channel tracker: AMI events in, live channel sets and server meta out to the store.

Event handlers are O(1): they classify the channel and append an operation to the server's
pending list. One flusher task writes pending operations to the store in batches (one atomic
store call per server per batch), so ingest keeps up with tens of thousands of events per second.

A CoreShowChannels snapshot replaces a server's set wholesale (on login and every reconcile
interval), so a missed event heals. Events that arrive while a snapshot is in flight are replayed
after the replacement, so the snapshot never erases a channel born during it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from balancer.config import HealthConfig
from balancer.errors import BalancerError
from balancer.live.health import effective_health
from balancer.store.base import Channel, ChannelClass, Health, ServerMeta, StateStore

log = logging.getLogger(__name__)

# Events the tracker consumes (the channel set) and hands to its listeners (carrier health:
# answers, peer and registration status); also the AMI Filter whitelist it asks servers for.
CHANNEL_EVENTS = ("Newchannel", "Hangup", "Rename", "FullyBooted", "Shutdown")
LISTENER_EVENTS = ("DialEnd", "PeerStatus", "ContactStatus", "Registry")
TRACKED_EVENTS = CHANNEL_EVENTS + LISTENER_EVENTS


class TrackerListener(Protocol):
    """Receives the tracked events with their channel already classified (O(1) per event).

    ``channel`` is the event's subject: Channel for Newchannel and Hangup, Newname for Rename,
    DestChannel for DialEnd (None for the rest). Handlers run on the event loop, must be O(1)
    and must not block; an exception is logged and swallowed (it never reaches the session).
    """

    def on_channel_event(
        self, server_ip: str, event: Mapping[str, str], channel: Channel | None
    ) -> None:
        """One tracked event of a watched server."""

    def on_channels_replaced(self, server_ip: str, channels: Sequence[Channel]) -> None:
        """The server's channel set as a snapshot left it (events during it replayed)."""


class Classifier:
    """Classifies a channel name as trunk (with carrier), agent phone, local or other."""

    def __init__(
        self,
        trunks: Mapping[str, str] | None = None,
        phones: Mapping[str, set[str]] | None = None,
    ) -> None:
        self.trunks = dict(trunks or {})
        self.phones = {ip: frozenset(exts) for ip, exts in (phones or {}).items()}

    def classify(self, server_ip: str, name: str) -> tuple[ChannelClass, str | None]:
        """(class, carrier id or None) for a channel such as 'SIP/alpha-0000001a'."""
        tech, slash, rest = name.partition("/")
        if not slash:
            return ChannelClass.OTHER, None
        if tech == "Local":
            return ChannelClass.LOCAL, None
        peer = rest.rpartition("-")[0] or rest
        carrier = self.trunks.get(peer)
        if carrier is not None:
            return ChannelClass.TRUNK, carrier
        if peer in self.phones.get(server_ip, ()):
            return ChannelClass.AGENT, None
        return ChannelClass.OTHER, None

    def channel(self, server_ip: str, uniqueid: str, name: str) -> Channel:
        cls, carrier = self.classify(server_ip, name)
        return Channel(uniqueid, name, cls, carrier)


@dataclass
class _ServerTrack:
    """In-process bookkeeping for one server."""

    meta: ServerMeta
    ami_health: Health = Health.DOWN
    ami_reason: str = "not connected yet"
    updater_age_s: float | None = None
    pending: list[tuple[str, object]] | None = None
    snapshot_buffer: list[tuple[str, object]] | None = (
        None  # not None while a snapshot is in flight
    )
    last_event_at: float | None = None
    events: int = 0
    meta_dirty: bool = True


class Tracker:
    """Implements SessionListener; owns the in-process view and writes it to the store."""

    def __init__(
        self,
        store: StateStore,
        health: HealthConfig,
        classifier: Classifier | None = None,
        flush_interval_s: float = 0.005,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.health_config = health
        self.classifier = classifier or Classifier()
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self.servers: dict[str, _ServerTrack] = {}
        self._wake = asyncio.Event()
        # One flush at a time: two interleaved flushes could write a server's batches out of order.
        self._flush_lock = asyncio.Lock()
        self._snapshot_requests: asyncio.Queue[str] = asyncio.Queue()
        self.store_errors = 0
        self.events_total = 0
        self.snapshotted: set[str] = set()  # servers whose channel set came from a snapshot
        self.listeners: list[TrackerListener] = []
        self.listener_errors = 0

    def add_listener(self, listener: TrackerListener) -> None:
        """Also hand every tracked event to ``listener`` (carrier health, failover)."""
        self.listeners.append(listener)

    # ------------------------------------------------------------------ registry side

    def add_server(self, server_ip: str, meta: ServerMeta) -> None:
        """Start tracking a server (or update its static facts)."""
        track = self.servers.get(server_ip)
        if track is None:
            self.servers[server_ip] = _ServerTrack(meta=meta, pending=[])
        else:
            track.meta = replace(
                track.meta,
                server_id=meta.server_id,
                address=meta.address,
                max_trunks=meta.max_trunks,
            )
            track.meta_dirty = True
        self._wake.set()

    def remove_server(self, server_ip: str) -> None:
        self.servers.pop(server_ip, None)

    def set_updater_age(self, server_ip: str, age_s: float | None) -> None:
        track = self.servers.get(server_ip)
        if track is not None and track.updater_age_s != age_s:
            track.updater_age_s = age_s
            self._refresh_health(track, server_ip)

    # ------------------------------------------------------------------ SessionListener

    def on_login(self, server_ip: str) -> None:
        self.request_snapshot(server_ip)

    def on_event(self, server_ip: str, event: dict[str, str]) -> None:
        track = self.servers.get(server_ip)
        if track is None:
            return
        name = event.get("Event")
        subject: Channel | None = None
        if name == "Newchannel":
            uid, channel = event.get("Uniqueid"), event.get("Channel")
            if not uid or not channel:
                return
            subject = self.classifier.channel(server_ip, uid, channel)
            self._push(track, ("add", subject))
        elif name == "Hangup":
            uid = event.get("Uniqueid")
            if not uid:
                return
            self._push(track, ("remove", uid))
            if self.listeners and (channel := event.get("Channel")):
                subject = self.classifier.channel(server_ip, uid, channel)
        elif name == "Rename":
            uid, new = event.get("Uniqueid"), event.get("Newname")
            if not uid or not new:
                return
            subject = self.classifier.channel(server_ip, uid, new)
            self._push(track, ("remove", uid))
            self._push(track, ("add", subject))
        elif name in LISTENER_EVENTS:
            if self.listeners:
                if name == "DialEnd" and (dest := event.get("DestChannel")):
                    uid = event.get("DestUniqueid") or ""
                    subject = self.classifier.channel(server_ip, uid, dest)
                self._notify(server_ip, event, subject)
            return
        elif name == "FullyBooted":
            self.request_snapshot(server_ip)
            return
        else:
            return
        now = self.clock()
        track.last_event_at = now
        track.events += 1
        self.events_total += 1
        if self.listeners:
            self._notify(server_ip, event, subject)

    def _notify(self, server_ip: str, event: Mapping[str, str], channel: Channel | None) -> None:
        for listener in self.listeners:
            try:
                listener.on_channel_event(server_ip, event, channel)
            except Exception:  # a listener's bug must never cost us the AMI session
                self._listener_failed()

    def _listener_failed(self) -> None:
        self.listener_errors += 1
        if self.listener_errors == 1 or self.listener_errors % 1000 == 0:
            log.exception("tracker listener failed (%d so far)", self.listener_errors)

    def on_health(self, server_ip: str, health: Health, reason: str) -> None:
        track = self.servers.get(server_ip)
        if track is None:
            return
        track.ami_health = health
        track.ami_reason = reason
        if health is Health.UP and track.meta.connected_since is None:
            track.meta = replace(track.meta, connected_since=self.clock())
        elif health is Health.DOWN:
            track.meta = replace(track.meta, connected_since=None)
        self._refresh_health(track, server_ip)

    def on_rtt(self, server_ip: str, rtt_ms: float) -> None:
        track = self.servers.get(server_ip)
        if track is not None:
            track.meta = replace(track.meta, rtt_ms=round(rtt_ms, 2))
            track.meta_dirty = True

    def set_reconnects(self, server_ip: str, reconnects: int) -> None:
        track = self.servers.get(server_ip)
        if track is not None and track.meta.reconnects != reconnects:
            track.meta = replace(track.meta, reconnects=reconnects)
            track.meta_dirty = True

    # ------------------------------------------------------------------ internals

    def _push(self, track: _ServerTrack, op: tuple[str, object]) -> None:
        assert track.pending is not None
        track.pending.append(op)
        if track.snapshot_buffer is not None:
            track.snapshot_buffer.append(op)
        self._wake.set()

    def _refresh_health(self, track: _ServerTrack, server_ip: str) -> None:
        verdict = effective_health(
            track.ami_health, track.ami_reason, track.updater_age_s, self.health_config
        )
        if (verdict.health, verdict.reason) != (track.meta.health, track.meta.health_reason):
            if verdict.health is not track.meta.health:
                # named by server_ip (and server_id), as everywhere else; not by AMI address
                name = (
                    f"{server_ip} ({track.meta.server_id})" if track.meta.server_id else server_ip
                )
                log.info(
                    "server %s: %s -> %s (%s)",
                    name,
                    track.meta.health,
                    verdict.health,
                    verdict.reason,
                )
            track.meta = replace(track.meta, health=verdict.health, health_reason=verdict.reason)
            track.meta_dirty = True
            self._wake.set()

    def request_snapshot(self, server_ip: str) -> None:
        """Ask for a CoreShowChannels snapshot of this server (served by the snapshot loop)."""
        track = self.servers.get(server_ip)
        if track is not None and track.snapshot_buffer is None:
            track.snapshot_buffer = []
            self._snapshot_requests.put_nowait(server_ip)

    async def apply_snapshot(self, server_ip: str, items: list[dict[str, str]]) -> None:
        """Replace a server's channels from CoreShowChannel items, then replay buffered events."""
        track = self.servers.get(server_ip)
        if track is None:
            return
        channels = [
            self.classifier.channel(server_ip, item["Uniqueid"], item["Channel"])
            for item in items
            if item.get("Uniqueid") and item.get("Channel")
        ]
        buffered = track.snapshot_buffer or []
        track.snapshot_buffer = None
        if self.listeners:
            self._notify_replaced(server_ip, channels, buffered)
        assert track.pending is not None
        # Everything pending before the replacement is superseded by it, except the events that
        # arrived during the snapshot: those are replayed after it.
        track.pending = [("replace", channels), *buffered]
        self.snapshotted.add(server_ip)
        self._wake.set()

    def _notify_replaced(
        self, server_ip: str, channels: list[Channel], buffered: list[tuple[str, object]]
    ) -> None:
        # Listeners saw the buffered events live; hand them the set those events leave behind.
        final = {c.uniqueid: c for c in channels}
        for kind, value in buffered:
            if kind == "add" and isinstance(value, Channel):
                final[value.uniqueid] = value
            elif kind == "remove":
                final.pop(str(value), None)
        result = list(final.values())
        for listener in self.listeners:
            try:
                listener.on_channels_replaced(server_ip, result)
            except Exception:
                self._listener_failed()

    def cancel_snapshot(self, server_ip: str) -> None:
        """The snapshot failed: stop buffering (the next one will heal)."""
        track = self.servers.get(server_ip)
        if track is not None:
            track.snapshot_buffer = None

    async def next_snapshot_request(self) -> str:
        return await self._snapshot_requests.get()

    async def flush(self) -> None:
        """Write every pending operation and dirty meta to the store (after any flush in flight)."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        for server_ip, track in list(self.servers.items()):
            ops = track.pending
            if ops:
                track.pending = []
                try:
                    await self._write_ops(server_ip, ops, track.last_event_at)
                except BalancerError as exc:
                    self._store_failed(exc)
                    self.request_snapshot(server_ip)  # lost writes heal from a snapshot
            if track.meta_dirty:
                track.meta_dirty = False
                try:
                    await self.store.set_meta(server_ip, track.meta)
                except BalancerError as exc:
                    track.meta_dirty = True
                    self._store_failed(exc)

    async def _write_ops(
        self, server_ip: str, ops: list[tuple[str, object]], last_event_at: float | None
    ) -> None:
        # Consecutive add/remove operations go in one atomic batch; a replacement splits batches.
        batch: list[tuple[str, object]] = []
        for kind, value in ops:
            if kind == "replace":
                if batch:
                    await self._apply_batch(server_ip, batch, last_event_at)
                    batch = []
                assert isinstance(value, list)
                await self.store.replace_channels(server_ip, value, self.clock())
            else:
                batch.append((kind, value))
        if batch:
            await self._apply_batch(server_ip, batch, last_event_at)

    async def _apply_batch(
        self, server_ip: str, batch: list[tuple[str, object]], last_event_at: float | None
    ) -> None:
        # A store call applies its adds before its removes, so a channel born and dead within
        # one batch ends absent, as it should. Only a removal followed by a re-add of the same
        # Uniqueid (Rename, a reused id) must split the batch to keep the order.
        adds: list[Channel] = []
        removes: list[str] = []
        removed: set[str] = set()
        for kind, value in batch:
            if kind == "add":
                assert isinstance(value, Channel)
                if value.uniqueid in removed:
                    await self.store.apply(server_ip, adds, removes, last_event_at)
                    adds, removes, removed = [], [], set()
                adds.append(value)
            else:
                uid = str(value)
                removes.append(uid)
                removed.add(uid)
        if adds or removes:
            await self.store.apply(server_ip, adds, removes, last_event_at)

    def _store_failed(self, exc: BaseException) -> None:
        self.store_errors += 1
        if self.store_errors == 1 or self.store_errors % 100 == 0:
            log.error("state store write failed (%d so far): %s", self.store_errors, exc)

    async def run_flusher(self, stop: asyncio.Event) -> None:
        """Flush pending work shortly after it appears, until ``stop`` is set."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({woken, stopping}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                self._wake.clear()
                await asyncio.sleep(self.flush_interval_s)
                try:
                    await self.flush()
                except Exception:
                    log.exception("flush failed (the tracker carries on)")
        finally:
            stopping.cancel()

    async def publish_meta(self) -> None:
        """Mark every server's meta for republishing (refreshes its heartbeat TTL)."""
        for track in self.servers.values():
            track.meta_dirty = True
        self._wake.set()

    def health_of(self, server_ip: str) -> Health | None:
        track = self.servers.get(server_ip)
        return track.meta.health if track is not None else None
