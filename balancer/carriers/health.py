"""Carrier health from AMI: breakers per carrier and per (carrier, server), lines, the chooser.

`CarrierHealth` is a tracker listener (balancer/live/tracker.py) and the executor's call router
(balancer/carriers/routing.py `CallRouter`). Every event handler is O(1): a dict lookup or two, one
window append, one breaker step.

What it reads:
- trunk channels (the tracker classified them by peer name): lines in use per (carrier, server);
- the Hangup ``Cause`` of a trunk channel that was not answered, and DialEnd ``ANSWER`` for one
  that was: the call outcomes its breakers count (routing.classify_cause);
- PeerStatus (chan_sip), ContactStatus (PJSIP) and Registry: an unreachable peer or a failed
  registration holds that carrier's breaker on that server OPEN until it recovers, then probes.

Lines a call will use are reserved when the executor commits it (``placed``) and released when
its trunk channel appears (Newchannel whose CallerIDName is the call's caller code), when it
ends, or after its dial timeout: a cycle placing calls faster than channels appear never
overruns a carrier's line cap.

State lives in the process; the leader publishes it (``run_publisher``) as a document in the
state store for `vici-balancer routes` in another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import random
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from balancer.carriers.routing import (
    Breaker,
    BreakerState,
    CarrierPick,
    NoCarrier,
    Outcome,
    PlacedCall,
    RouteTable,
    choose_carrier,
    classify_cause,
    match_keys,
)
from balancer.config import CarrierConfig, RouteConfig, RoutingConfig
from balancer.db.records import CarrierRow
from balancer.errors import BalancerError
from balancer.store.base import Channel, ChannelClass, StateStore
from balancer.store.keys import ROUTES_DOCUMENT

log = logging.getLogger(__name__)

ROUTES_VERSION = 1
ALL_SERVERS = "0.0.0.0"  # vicidial_server_carriers.server_ip for a carrier on every server
UP_STATE = "6"
_CALLER_CODE = re.compile(r"V\d{19}")
# chan_sip PeerStatus, PJSIP ContactStatus and Registry values: the carrier cannot take calls ...
_BAD = {
    "PeerStatus": frozenset({"unreachable", "unregistered", "rejected"}),
    "ContactStatus": frozenset({"unreachable", "removed"}),
    "Registry": frozenset({"rejected", "failed", "timeout", "no authentication", "unregistered"}),
}
# ... or it can again (anything else, e.g. "Request Sent", changes nothing).
_GOOD = {
    "PeerStatus": frozenset({"reachable", "registered", "lagged"}),
    "ContactStatus": frozenset({"reachable", "created", "updated", "nonqualified"}),
    "Registry": frozenset({"registered"}),
}
_RESERVE_MARGIN_S = 10.0  # a reservation outlives the call's dial timeout by this much
_DECIDED_KEEP_S = 120.0  # a decided call's later legs are recognised (not counted) this long


def caller_code_in(event: Mapping[str, str], *keys: str) -> str | None:
    """The first VICIdial caller code (V + 19 digits) among these headers."""
    for key in keys:
        value = event.get(key)
        if value and _CALLER_CODE.fullmatch(value):
            return value
    return None


def dial_timeout_s(dial_timeout: int) -> float:
    """How long an Originate of this campaign may ring (VICIdial: 60 s when 4 s or less)."""
    return 60.0 if dial_timeout <= 4 else float(dial_timeout)


@dataclass
class _Trunk:
    """One carrier on one server."""

    breaker: Breaker
    lines: int = 0  # live trunk channels
    reserved: int = 0  # committed calls whose channel has not appeared yet
    problems: dict[str, str] = field(default_factory=dict)  # event name -> bad status


class CarrierHealth:
    """Health, lines and choice of every configured carrier on every server."""

    def __init__(
        self,
        carriers: Sequence[CarrierConfig],
        routes: Sequence[RouteConfig],
        routing: RoutingConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.carriers: dict[str, CarrierConfig] = {}
        self.routes: tuple[RouteConfig, ...] = ()
        self.table = RouteTable(())
        self.routing = routing
        self.breakers: dict[str, Breaker] = {}  # carrier-wide
        self.trunks: dict[tuple[str, str], _Trunk] = {}  # (carrier, server)
        self.peer_names: dict[str, str] = {}  # peer/endpoint name -> carrier id
        self.rows: dict[str, set[str]] = {}  # carrier -> server_ips of its active rows
        self.servers: set[str] = set()  # watched servers
        self.observers: list[Callable[[PlacedCall], None]] = []
        self._channels: dict[str, dict[str, str]] = {}  # server -> trunk uniqueid -> carrier
        self._answered: set[tuple[str, str]] = set()  # (server, uniqueid) counted at DialEnd
        self._reservations: dict[str, tuple[str, str, float]] = {}  # code -> carrier, server, due
        self._due: list[tuple[float, str]] = []  # heap of (due, code)
        # The calls the balancer placed whose outcome is not known yet: caller code -> (carrier,
        # server_ip, forget at). Their first Hangup/answer decides, once per call, whatever
        # channels the call had (a Local-only dialplan creates no trunk channel at all).
        self._pending: dict[str, tuple[str, str, float]] = {}
        self._pending_due: list[tuple[float, str]] = []
        self._decided: dict[str, float] = {}  # code -> decided at (insertion ordered)
        self.reconfigure(carriers, routes, routing)

    # ------------------------------------------------------------------ configuration

    def reconfigure(
        self,
        carriers: Sequence[CarrierConfig],
        routes: Sequence[RouteConfig],
        routing: RoutingConfig,
    ) -> None:
        """Apply new carriers, routes and breaker settings (a reload); state of kept carriers
        survives."""
        self.carriers = {c.id: c for c in carriers}
        self.routes = tuple(routes)
        self.table = RouteTable(self.routes)
        self.routing = routing
        for carrier_id in list(self.breakers):
            if carrier_id not in self.carriers:
                del self.breakers[carrier_id]
        for key in list(self.trunks):
            if key[0] not in self.carriers:
                del self.trunks[key]
        for carrier_id in self.carriers:
            self.breakers.setdefault(carrier_id, Breaker(routing, self.clock, spread=2))
        for breaker in self._all_breakers():
            breaker.settings = routing
            breaker.window.window_s = routing.window_s
        for name in self.carriers:
            self.peer_names.setdefault(name, name)

    def update_registry(
        self, peer_names: Mapping[str, str], rows: Iterable[CarrierRow], servers: Iterable[str]
    ) -> None:
        """After a registry refresh: peer name -> carrier, active carrier rows, watched servers."""
        self.peer_names = dict(peer_names)
        for name in self.carriers:
            self.peer_names.setdefault(name, name)
        by_carrier: dict[str, set[str]] = {}
        for row in rows:
            by_carrier.setdefault(row.carrier_id, set()).add(row.server_ip)
        self.rows = by_carrier
        watched = set(servers)
        for server_ip in self.servers - watched:
            self._channels.pop(server_ip, None)
            self._answered = {k for k in self._answered if k[0] != server_ip}
            for key in [k for k in self.trunks if k[1] == server_ip]:
                del self.trunks[key]
        self.servers = watched

    def available_on(self, carrier_id: str) -> set[str] | None:
        """Servers the carrier may be used on; None: every server."""
        config = self.carriers.get(carrier_id)
        if config is None:
            return set()
        if config.servers:
            return set(config.servers)
        rows = self.rows.get(carrier_id, set())
        return None if ALL_SERVERS in rows else set(rows)

    # ------------------------------------------------------------------ the router

    @property
    def routes_calls(self) -> bool:
        """Whether balance calls are routed (routes configured and no bypass)."""
        return bool(self.table) and not self.routing.bypass_balance_calls

    def choose(
        self, server_ip: str, phone_code: str, number: str, exclude: Collection[str] = ()
    ) -> CarrierPick | NoCarrier | None:
        """The carrier for one call on ``server_ip``; None: not routed (campaign prefix)."""
        if not self.routes_calls:
            return None
        route = self.table.match(phone_code, number)
        if route is None:
            return None
        self._expire_reservations()
        return choose_carrier(
            route,
            self.carriers,
            lambda carrier_id: self.unavailable(carrier_id, server_ip),
            self.rng,
            exclude,
        )

    def unavailable(self, carrier_id: str, server_ip: str) -> str | None:
        """Why this carrier cannot take a call on this server now, or None when it can."""
        config = self.carriers.get(carrier_id)
        if config is None:
            return "not configured"
        servers = self.available_on(carrier_id)
        if servers is not None and server_ip not in servers:
            return f"not available on {server_ip}"
        wide = self.breakers[carrier_id]
        if not wide.allows():
            return f"{wide.state} carrier-wide ({wide.reason})"
        trunk = self._trunk(carrier_id, server_ip)
        if not trunk.breaker.allows():
            return f"{trunk.breaker.state} on {server_ip} ({trunk.breaker.reason})"
        cap = config.max_lines_per_server
        if cap and trunk.lines + trunk.reserved >= cap:
            return f"at its line cap on {server_ip} ({trunk.lines + trunk.reserved}/{cap})"
        return None

    def placed(self, call: PlacedCall) -> None:
        """A routed call was committed: reserve its line, count a probe, tell the observers."""
        if call.carrier_id in self.carriers:
            trunk = self._trunk(call.carrier_id, call.server_ip)
            trunk.reserved += 1
            due = self.clock() + dial_timeout_s(call.campaign.dial_timeout) + _RESERVE_MARGIN_S
            old = self._reservations.pop(call.caller_code, None)
            if old is not None:
                self._unreserve(old)
            self._reservations[call.caller_code] = (call.carrier_id, call.server_ip, due)
            heapq.heappush(self._due, (due, call.caller_code))
            self._pending[call.caller_code] = (call.carrier_id, call.server_ip, due)
            heapq.heappush(self._pending_due, (due, call.caller_code))
            self.breakers[call.carrier_id].probe_started()
            trunk.breaker.probe_started()
        for observer in self.observers:
            observer(call)

    def lines(self, carrier_id: str, server_ip: str) -> tuple[int, int]:
        """(live trunk channels, reserved lines) of a carrier on a server."""
        trunk = self.trunks.get((carrier_id, server_ip))
        return (0, 0) if trunk is None else (trunk.lines, trunk.reserved)

    def state(self, carrier_id: str, server_ip: str | None = None) -> BreakerState:
        """A breaker's state: carrier-wide, or on one server (advancing a finished cool-down)."""
        breaker = (
            self.breakers[carrier_id]
            if server_ip is None
            else self._trunk(carrier_id, server_ip).breaker
        )
        breaker.allows()
        return breaker.state

    def states(self) -> list[tuple[str, str | None, str]]:
        """(carrier, server_ip or None for carrier-wide, breaker state) of every breaker, for
        the metrics (balancer/ops/metrics.py reads ``daemon.carrier_health.states()``)."""
        rows: list[tuple[str, str | None, str]] = []
        for carrier_id in sorted(self.carriers):
            rows.append((carrier_id, None, str(self.state(carrier_id))))
            for (carrier, server_ip), trunk in sorted(self.trunks.items()):
                if carrier == carrier_id:
                    trunk.breaker.allows()
                    rows.append((carrier, server_ip, str(trunk.breaker.state)))
        return rows

    # ------------------------------------------------------------------ TrackerListener

    def on_channel_event(
        self, server_ip: str, event: Mapping[str, str], channel: Channel | None
    ) -> None:
        """Lines, outcomes and peer status from one tracked event."""
        name = event.get("Event")
        carrier: str | None = None
        if channel is not None and channel.cls is ChannelClass.TRUNK:
            carrier = channel.carrier
        if name == "Newchannel":
            if channel is not None and carrier is not None:
                # the call's own line is live now: its reservation ends
                self._release(caller_code_in(event, "CallerIDName"))
                self._add_line(server_ip, channel.uniqueid, carrier)
        elif name == "Hangup":
            code = caller_code_in(event, "CallerIDName", "ConnectedLineName")
            self._release(code)
            ours = self._call_outcome(code, event)
            if channel is not None and carrier is not None:
                self._hangup(server_ip, channel.uniqueid, carrier, event, count=not ours)
        elif name == "DialEnd":
            code = caller_code_in(event, "DestCallerIDName", "CallerIDName")
            self._release(code)
            ours = self._call_outcome(code, event)
            if ours:
                return  # counted once for the call, not again for its trunk leg
            if channel is not None and carrier is not None and event.get("DialStatus") == "ANSWER":
                key = (server_ip, channel.uniqueid)
                if key not in self._answered:
                    self._answered.add(key)
                    self._record(carrier, server_ip, Outcome.ANSWERED, "answered")
        elif name == "Rename":
            if channel is not None:
                self._remove_line(server_ip, channel.uniqueid)
                if carrier is not None:
                    self._add_line(server_ip, channel.uniqueid, carrier)
        elif name == "PeerStatus":
            peer = event.get("Peer", "").rpartition("/")[2]
            self._status(server_ip, name, peer, event.get("PeerStatus", ""))
        elif name == "ContactStatus":
            peer = event.get("EndpointName") or event.get("AOR", "")
            self._status(server_ip, name, peer, event.get("ContactStatus", ""))
        elif name == "Registry":
            user = event.get("Username", "").removeprefix("sip:").partition("@")[0]
            peer = user if user in self.peer_names else event.get("Domain", "")
            self._status(server_ip, name, peer, event.get("Status", ""))

    def on_channels_replaced(self, server_ip: str, channels: Sequence[Channel]) -> None:
        """Recount a server's trunk lines from the channel set a snapshot left."""
        live = {
            c.uniqueid: c.carrier
            for c in channels
            if c.cls is ChannelClass.TRUNK and c.carrier in self.carriers
        }
        self._channels[server_ip] = {uid: carrier for uid, carrier in live.items() if carrier}
        counts: dict[str, int] = {}
        for carrier in self._channels[server_ip].values():
            counts[carrier] = counts.get(carrier, 0) + 1
        for (carrier, ip), trunk in self.trunks.items():
            if ip == server_ip:
                trunk.lines = counts.pop(carrier, 0)
        for carrier, n in counts.items():
            self._trunk(carrier, server_ip).lines = n
        self._answered = {
            k for k in self._answered if k[0] != server_ip or k[1] in self._channels[server_ip]
        }

    # ------------------------------------------------------------------ internals

    def _all_breakers(self) -> Iterable[Breaker]:
        yield from self.breakers.values()
        for trunk in self.trunks.values():
            yield trunk.breaker

    def _trunk(self, carrier_id: str, server_ip: str) -> _Trunk:
        key = (carrier_id, server_ip)
        trunk = self.trunks.get(key)
        if trunk is None:
            trunk = _Trunk(Breaker(self.routing, self.clock))
            self.trunks[key] = trunk
        return trunk

    def _add_line(self, server_ip: str, uniqueid: str, carrier: str) -> None:
        if carrier not in self.carriers:
            return
        known = self._channels.setdefault(server_ip, {})
        if uniqueid in known:
            return
        known[uniqueid] = carrier
        self._trunk(carrier, server_ip).lines += 1

    def _remove_line(self, server_ip: str, uniqueid: str) -> None:
        carrier = self._channels.get(server_ip, {}).pop(uniqueid, None)
        if carrier is not None:
            trunk = self._trunk(carrier, server_ip)
            trunk.lines = max(0, trunk.lines - 1)

    def _call_outcome(self, code: str | None, event: Mapping[str, str]) -> bool:
        """A Hangup or DialEnd of a call the balancer placed: its outcome goes to the breakers
        of the carrier it chose, on its server, once. True when the event is such a call's."""
        if code is None:
            return False
        if code in self._decided:
            return True
        call = self._pending.pop(code, None)
        if call is None:
            return False
        if event.get("Event") == "DialEnd":
            if event.get("DialStatus") != "ANSWER":
                self._pending[code] = call  # the Hangup that follows carries the cause
                return True
            outcome, what = Outcome.ANSWERED, "answered"
        elif event.get("ChannelState") == UP_STATE:
            outcome, what = Outcome.ANSWERED, "answered"
        else:
            cause_text = event.get("Cause", "")
            cause = int(cause_text) if cause_text.isdigit() else 0
            outcome, what = classify_cause(cause), f"cause {cause}"
        carrier, server_ip, _ = call
        now = self.clock()
        self._decided[code] = now
        while self._decided:  # oldest first: drop what is too old to see another leg
            oldest = next(iter(self._decided))
            if now - self._decided[oldest] <= _DECIDED_KEEP_S:
                break
            del self._decided[oldest]
        self._record(carrier, server_ip, outcome, what)
        return True

    def _hangup(
        self,
        server_ip: str,
        uniqueid: str,
        carrier: str,
        event: Mapping[str, str],
        *,
        count: bool = True,
    ) -> None:
        self._remove_line(server_ip, uniqueid)
        if not count:
            self._answered.discard((server_ip, uniqueid))
            return
        key = (server_ip, uniqueid)
        if key in self._answered:
            self._answered.discard(key)  # its outcome was counted when it was answered
            return
        if event.get("ChannelState") == UP_STATE:
            self._record(carrier, server_ip, Outcome.ANSWERED, "answered")
            return
        cause_text = event.get("Cause", "")
        if not cause_text.isdigit():
            return
        cause = int(cause_text)
        self._record(carrier, server_ip, classify_cause(cause), f"cause {cause}")

    def _record(self, carrier: str, server_ip: str, outcome: Outcome, what: str) -> None:
        if carrier not in self.carriers or outcome is Outcome.OTHER:
            return
        trunk = self._trunk(carrier, server_ip)
        if trunk.breaker.record(outcome, server_ip):
            self._log_change(carrier, server_ip, trunk.breaker, what)
        wide = self.breakers[carrier]
        if wide.record(outcome, server_ip):
            self._log_change(carrier, None, wide, what)

    def _status(self, server_ip: str, event_name: str, peer: str, status: str) -> None:
        carrier = self.peer_names.get(peer)
        if carrier is None or carrier not in self.carriers:
            return
        value = status.strip().lower()
        trunk = self._trunk(carrier, server_ip)
        if value in _BAD[event_name]:
            trunk.problems[event_name] = f"{event_name} {status}"
        elif value in _GOOD[event_name]:
            if trunk.problems.pop(event_name, None) is None:
                return
        else:
            return
        breaker = trunk.breaker
        if trunk.problems:
            changed = breaker.hold("; ".join(sorted(trunk.problems.values())))
        else:
            changed = breaker.release(f"{event_name} {status}: probing")
        if changed:
            self._log_change(carrier, server_ip, breaker, status)

    def _log_change(self, carrier: str, server_ip: str | None, breaker: Breaker, what: str) -> None:
        where = f"on {server_ip}" if server_ip else "carrier-wide"
        level = logging.WARNING if breaker.state is BreakerState.OPEN else logging.INFO
        log.log(
            level,
            "carrier %s %s: %s (%s; last: %s)",
            carrier,
            where,
            breaker.state,
            breaker.reason,
            what,
        )

    def _release(self, code: str | None) -> None:
        if code is None:
            return
        reservation = self._reservations.pop(code, None)
        if reservation is not None:
            self._unreserve(reservation)

    def _unreserve(self, reservation: tuple[str, str, float]) -> None:
        carrier, server_ip, _ = reservation
        trunk = self.trunks.get((carrier, server_ip))
        if trunk is not None:
            trunk.reserved = max(0, trunk.reserved - 1)

    def _expire_reservations(self) -> None:
        now = self.clock()
        while self._due and self._due[0][0] <= now:
            due, code = heapq.heappop(self._due)
            reservation = self._reservations.get(code)
            if reservation is not None and reservation[2] == due:
                del self._reservations[code]
                self._unreserve(reservation)
        while self._pending_due and self._pending_due[0][0] <= now:
            due, code = heapq.heappop(self._pending_due)
            pending = self._pending.get(code)
            if pending is not None and pending[2] == due:
                del self._pending[code]  # no outcome ever came: nothing to count

    # ------------------------------------------------------------------ the routes document

    def document(self, *, live: bool = True) -> dict[str, Any]:
        """The stable JSON form of `vici-balancer routes` (``live`` False: config only)."""
        now, wall = self.clock(), self.wall()

        def when(breaker: Breaker) -> float | None:
            return round(wall - (now - breaker.changed_at), 3) if breaker.changes else None

        def breaker_entry(breaker: Breaker) -> dict[str, Any]:
            if live:
                breaker.allows()
            return {
                "state": str(breaker.state) if live else "unknown",
                "reason": breaker.reason if live else "",
                "failure_ratio": round(breaker.failure_ratio(), 3),
                "calls_in_window": breaker.calls_in_window(),
                "changed_at": when(breaker) if live else None,
            }

        routes = []
        for route in self.routes:
            routes.append(
                {
                    "name": route.name,
                    "default": route.is_default,
                    "match": [
                        f"{code or '*'}/{prefix or '*'}" for code, prefix in match_keys(route)
                    ],
                    "tiers": [
                        [{"carrier": c, "weight": route.weight(c)} for c in tier]
                        for tier in route.tiers
                    ],
                }
            )
        carriers = []
        for carrier_id, config in sorted(self.carriers.items()):
            available = self.available_on(carrier_id)
            servers = set(self.servers if available is None else available)
            servers |= {ip for (c, ip) in self.trunks if c == carrier_id}
            per_server = []
            for server_ip in sorted(servers):
                trunk = self.trunks.get((carrier_id, server_ip))
                breaker = trunk.breaker if trunk else Breaker(self.routing, self.clock)
                entry = breaker_entry(breaker)
                entry.update(
                    server_ip=server_ip,
                    available=available is None or server_ip in available,
                    lines_in_use=trunk.lines if trunk else 0,
                    reserved=trunk.reserved if trunk else 0,
                    problems=sorted(trunk.problems.values()) if trunk else [],
                )
                per_server.append(entry)
            entry = breaker_entry(self.breakers[carrier_id])
            entry.update(
                id=carrier_id,
                dial_prefix=config.dial_prefix,
                max_lines_per_server=config.max_lines_per_server,
                available_on="all" if available is None else sorted(available),
                servers=per_server,
            )
            carriers.append(entry)
        settings = self.routing
        return {
            "version": ROUTES_VERSION,
            "live": live,
            "generated_at": round(wall, 3),
            "routing": {
                "routes_balance_calls": self.routes_calls,
                "bypass_balance_calls": settings.bypass_balance_calls,
                "retry_failed_calls": settings.retry_failed_calls,
                "failure_threshold": settings.failure_threshold,
                "failure_ratio": settings.failure_ratio,
                "window_s": settings.window_s,
                "cool_down_s": settings.cool_down_s,
                "probe_calls": settings.probe_calls,
            },
            "routes": routes,
            "carriers": carriers,
        }

    async def publish(self, store: StateStore, ttl_s: float) -> None:
        """Put the routes document into the state store (for `routes` in another process)."""
        await store.put_document(ROUTES_DOCUMENT, json.dumps(self.document()), ttl_s)

    async def run_publisher(
        self,
        store: StateStore,
        stop: asyncio.Event,
        should_publish: Callable[[], bool] | None = None,
    ) -> None:
        """Publish every routing.publish_interval_s while ``should_publish()`` (the leader)."""
        while not stop.is_set():
            interval = self.routing.publish_interval_s
            if self.carriers and (should_publish is None or should_publish()):
                try:
                    await self.publish(store, max(3 * interval, 10.0))
                except BalancerError as exc:
                    log.error("cannot publish carrier state: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
