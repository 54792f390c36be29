"""The dashboard's live document and its push stream: built from the daemon's live objects.

One `Feed` per HTTP server. While a page is connected it rebuilds the document every `tick_s`
and pushes it to every connected page when something in it changed (or a new chart point was
taken, or `resync_s` passed); with no page connected it only samples the line history, so the
chart has its 15 minutes ready when someone opens the page. It reads the daemon only through
`MetricsSource` (what the metrics read: store, tracker, leadership, cycle) plus the optional
``cycle_stats`` and ``carrier_health``, and `vb_decision_log` over its own database connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from balancer import __version__
from balancer.db.decisions import recent_decisions
from balancer.db.worker import DbWorker
from balancer.errors import BalancerError
from balancer.live.status import build_status
from balancer.ops.metrics import CycleStats, MetricsSource

log = logging.getLogger(__name__)

DASHBOARD_VERSION = 1
STORE_TIMEOUT_S = 2.0
DB_TIMEOUT_S = 5.0


def status_source(daemon: MetricsSource) -> str:
    """Where the status document's data comes from, spelled as `status` spells it."""
    redis = daemon.config.redis
    return "memory://" if redis.is_memory else redis.url.split("@")[-1]


async def status_document(daemon: MetricsSource) -> dict[str, Any]:
    """The `status --json` document, read from the daemon's state store."""
    return await asyncio.wait_for(
        build_status(daemon.store, status_source(daemon)), STORE_TIMEOUT_S
    )


class LineHistory:
    """Trunk lines per server: one point every ``step_s`` over the last ``window_s``."""

    def __init__(self, window_s: float = 900.0, step_s: float = 5.0) -> None:
        self.window_s = window_s
        self.step_s = step_s
        self._points: deque[dict[str, Any]] = deque(maxlen=int(window_s // step_s) + 1)

    def due(self, now: float) -> bool:
        """True when the next point should be taken."""
        return not self._points or now - self._points[-1]["t"] >= self.step_s

    def add(self, now: float, lines: Mapping[str, int]) -> dict[str, Any]:
        """Record one point (the oldest falls out of the window) and return it."""
        point = {"t": round(now, 3), "lines": dict(lines)}
        self._points.append(point)
        return point

    def document(self) -> dict[str, Any]:
        """Every point, oldest first, with the step and window the page draws them over."""
        return {"step_s": self.step_s, "window_s": self.window_s, "points": list(self._points)}


class PlacedWindow:
    """Calls placed per server: in total (from CycleStats) and over the last minute."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def update(self, now: float, stats: CycleStats | None) -> dict[str, dict[str, int]]:
        """Per server_ip {"total", "last_minute"}, sampling the totals now."""
        totals: dict[str, int] = {}
        for (server_ip, _carrier), n in (stats.placed if stats is not None else {}).items():
            totals[server_ip] = totals.get(server_ip, 0) + n
        samples = self._samples
        samples.append((now, totals))
        # keep one sample at least a window old as the baseline
        while len(samples) > 2 and samples[1][0] <= now - self.window_s:
            samples.popleft()
        base = samples[0][1]
        return {
            ip: {"total": n, "last_minute": max(0, n - base.get(ip, 0))}
            for ip, n in sorted(totals.items())
        }


@dataclass(eq=False)
class Subscriber:
    """One connected page: the messages waiting for it (None ends the stream)."""

    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(8))
    dropped: bool = False


def sse(event: str, doc: Mapping[str, Any]) -> bytes:
    """One server-sent event (JSON has no raw newlines, so one data line suffices)."""
    return f"event: {event}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()


class Feed:
    """Builds the dashboard document and pushes it to connected pages."""

    def __init__(
        self,
        daemon: MetricsSource,
        db: DbWorker | None,
        *,
        tick_s: float = 1.0,
        resync_s: float = 10.0,
        decisions_every_s: float = 2.0,
        decisions_limit: int = 30,
        history: LineHistory | None = None,
    ) -> None:
        self.daemon = daemon
        self.db = db
        self.tick_s = tick_s
        self.resync_s = resync_s
        self.decisions_every_s = decisions_every_s
        self.decisions_limit = decisions_limit
        self.history = history or LineHistory()
        self.placed = PlacedWindow()
        self.subscribers: set[Subscriber] = set()
        self.published = 0
        self._wake = asyncio.Event()
        self._signature = ""
        self._published_at = 0.0
        self._decisions: list[dict[str, Any]] = []
        self._decisions_error: str | None = None
        self._decisions_at = 0.0

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, limit: int) -> Subscriber | None:
        """A new page's subscription, or None when ``limit`` pages are already connected."""
        if len(self.subscribers) >= limit:
            return None
        sub = Subscriber()
        self.subscribers.add(sub)
        self._wake.set()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget a page (its stream ended)."""
        self.subscribers.discard(sub)

    def close(self) -> None:
        """End every stream."""
        for sub in list(self.subscribers):
            self._end(sub)

    def _end(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        while True:  # make room for the end marker: the page reconnects and gets it all anew
            try:
                sub.queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                sub.queue.get_nowait()

    def _publish(self, message: bytes) -> None:
        for sub in list(self.subscribers):
            try:
                sub.queue.put_nowait(message)
            except asyncio.QueueFull:
                # A page that cannot keep up is cut off rather than buffered without bound.
                sub.dropped = True
                self._end(sub)
        self.published += 1

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Sample and push until cancelled; a failure is logged and the next tick tries again."""
        while True:
            try:
                await self.tick(time.time())
            except Exception:
                log.exception("dashboard feed: tick failed")
            interval = self.tick_s if self.subscribers else self.history.step_s
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def tick(self, now: float) -> None:
        """One round: a chart point when due, and a push when a page is connected."""
        need_point = self.history.due(now)
        if not self.subscribers and not need_point:
            return
        doc = await self.build(now)
        changed = False
        status = doc["status"]
        if need_point and status is not None:
            # a DOWN or stale server's lines are unknown (status document v2): no point, a gap
            lines = {
                s["server_ip"]: int(s["trunk_lines"])
                for s in status["servers"]
                if s["trunk_lines"] is not None
            }
            doc["point"] = self.history.add(now, lines)
            changed = True
        if not self.subscribers:
            return
        signature = _signature(doc)
        if signature != self._signature or now - self._published_at >= self.resync_s:
            changed = True
        if changed:
            self._signature = signature
            self._published_at = now
            self._publish(sse("dashboard", doc))

    async def initial(self) -> bytes:
        """What a page gets first: the whole document with the chart's history."""
        doc = await self.build(time.time())
        doc["history"] = self.history.document()
        return sse("dashboard", doc)

    # ------------------------------------------------------------------ the document

    async def build(self, now: float) -> dict[str, Any]:
        """The dashboard document as of now."""
        daemon = self.daemon
        status: dict[str, Any] | None = None
        store_error: str | None = None
        try:
            status = await status_document(daemon)
        except (BalancerError, TimeoutError) as exc:
            store_error = f"the state store did not answer: {exc or 'timeout'}"
        stats = getattr(daemon, "cycle_stats", None)
        stats = stats if isinstance(stats, CycleStats) else None
        if self.subscribers:
            await self._refresh_decisions(now)
        config = daemon.config
        cycle = daemon.cycle
        return {
            "version": DASHBOARD_VERSION,
            "generated_at": round(now, 3),
            "daemon": {
                "name": daemon.name,
                "version": __version__,
                "leader": daemon.leadership.leading,
                "leader_epoch": daemon.leadership.epoch,  # the database lease's term
                "leadership_changes": daemon.leadership.changes,
                "balancing": config.balance.enabled,
                "mode": config.balance.mode,
                "cycles": cycle.cycles if cycle is not None else 0,
                "cycle_interval_s": config.balance.cycle_interval_s,
                "last_cycle_at": stats.last_cycle_at if stats is not None else None,
                "call_errors": stats.call_errors if stats is not None else 0,
            },
            "status": status,
            "store_error": store_error,
            "placed": self.placed.update(now, stats),
            "carriers": carrier_rows(getattr(daemon, "carrier_health", None)),
            "decisions": self._decisions,
            "decisions_error": self._decisions_error,
        }

    async def _refresh_decisions(self, now: float) -> None:
        if self.db is None or now - self._decisions_at < self.decisions_every_s:
            return
        self._decisions_at = now
        limit = self.decisions_limit
        try:
            self._decisions = await asyncio.wait_for(
                self.db.run(lambda conn: recent_decisions(conn, limit)), DB_TIMEOUT_S
            )
            self._decisions_error = None
        except Exception as exc:  # a missing table or a lost database: say so on the page
            self._decisions_error = f"vb_decision_log could not be read: {exc or 'timeout'}"


def carrier_rows(health: Any) -> list[dict[str, Any]]:
    """Per carrier: its carrier-wide breaker state and, per server, its state, reason and lines.

    States come from ``states()`` (what the metrics read); reasons and lines, when the engine
    offers them, from its ``document()`` (what `routes` shows). A broken engine shows nothing.
    """
    states_fn = getattr(health, "states", None)
    if not callable(states_fn):
        return []
    try:
        rows: Iterable[tuple[str, str | None, str]] = states_fn()
        carriers: dict[str, dict[str, Any]] = {}
        for carrier, server_ip, state in rows:
            entry = carriers.setdefault(
                str(carrier), {"carrier": str(carrier), "state": "closed", "servers": {}}
            )
            if server_ip is None:
                entry["state"] = str(state)
            else:
                entry["servers"][str(server_ip)] = {"state": str(state), "reason": "", "lines": 0}
        _add_details(health, carriers)
    except Exception:  # carrier health is someone else's code: the page must not fail on it
        log.exception("dashboard: carrier health could not be read")
        return []
    return [carriers[c] for c in sorted(carriers)]


def _add_details(health: Any, carriers: dict[str, dict[str, Any]]) -> None:
    document_fn = getattr(health, "document", None)
    if not callable(document_fn):
        return
    for doc in document_fn().get("carriers", []):
        entry = carriers.get(str(doc.get("id")))
        if entry is None:
            continue
        entry["reason"] = str(doc.get("reason") or "")
        for per in doc.get("servers", []):
            server = entry["servers"].get(str(per.get("server_ip")))
            if server is not None:
                server["reason"] = str(per.get("reason") or "")
                server["lines"] = int(per.get("lines_in_use") or 0)


def _signature(doc: Mapping[str, Any]) -> str:
    """The document without what changes every second by itself (times and ages)."""
    status = doc["status"]
    steady: dict[str, Any] = {k: v for k, v in doc.items() if k not in ("generated_at", "point")}
    if status is not None:
        steady["status"] = {
            **{k: v for k, v in status.items() if k != "generated_at"},
            "servers": [
                {k: v for k, v in s.items() if k != "last_event_age_s"} for s in status["servers"]
            ],
        }
    return json.dumps(steady, sort_keys=True, default=str)
