"""Carrier routing, pure: route matching, weighted choice among equals, the circuit breaker.

No I/O here. The clock (breaker) and the random source (weighted choice) are injected, so every
decision can be replayed in a test. `balancer/carriers/health.py` feeds these from AMI events;
`balancer/carriers/failover.py` re-places calls that failed on a trunk.

Hangup causes are classified as in the shared DESIGN.md ("Hangup causes"): trunk failures count
against a carrier, called-party outcomes (busy, no answer, normal clearing) count FOR it (the
trunk did its job), ambiguous causes only by their rate, anything else not at all.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from balancer.balance.model import CampaignInfo, ServerInfo
from balancer.config import CarrierConfig, RouteConfig, RoutingConfig

# Asterisk hangup causes (DESIGN.md "Hangup causes").
TRUNK_FAILURE_CAUSES = frozenset({27, 34, 38, 41, 42, 58, 102, 127})
CALLED_PARTY_CAUSES = frozenset({16, 17, 19, 28})
AMBIGUOUS_CAUSES = frozenset({1, 18, 21})


class Outcome(StrEnum):
    """What one call on a trunk says about the carrier."""

    ANSWERED = "answered"
    CALLED_PARTY = "called_party"  # busy, no answer, normal clearing, invalid number
    TRUNK_FAILURE = "trunk_failure"
    AMBIGUOUS = "ambiguous"
    OTHER = "other"  # a cause we do not judge the carrier by

    @property
    def is_success(self) -> bool:
        """The trunk carried the call to the called party."""
        return self in (Outcome.ANSWERED, Outcome.CALLED_PARTY)


def classify_cause(cause: int) -> Outcome:
    """The outcome a hangup cause stands for (before answer)."""
    if cause in TRUNK_FAILURE_CAUSES:
        return Outcome.TRUNK_FAILURE
    if cause in CALLED_PARTY_CAUSES:
        return Outcome.CALLED_PARTY
    if cause in AMBIGUOUS_CAUSES:
        return Outcome.AMBIGUOUS
    return Outcome.OTHER


# --------------------------------------------------------------------------- circuit breaker


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class _Window:
    """Outcomes of the last ``window_s`` seconds with running counts (amortised O(1) updates)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.entries: deque[tuple[float, Outcome, str]] = deque()
        self.total = 0
        self.failures = 0
        self.ambiguous = 0
        self.by_source: dict[str, int] = {}  # failures (trunk or ambiguous) per source

    def add(self, now: float, outcome: Outcome, source: str) -> None:
        self.entries.append((now, outcome, source))
        self._count(outcome, source, 1)
        self.expire(now)

    def expire(self, now: float) -> None:
        cutoff = now - self.window_s
        while self.entries and self.entries[0][0] < cutoff:
            _, outcome, source = self.entries.popleft()
            self._count(outcome, source, -1)

    def clear(self) -> None:
        self.entries.clear()
        self.by_source.clear()
        self.total = self.failures = self.ambiguous = 0

    def _count(self, outcome: Outcome, source: str, step: int) -> None:
        self.total += step
        if outcome is Outcome.TRUNK_FAILURE:
            self.failures += step
        elif outcome is Outcome.AMBIGUOUS:
            self.ambiguous += step
        else:
            return
        left = self.by_source.get(source, 0) + step
        if left > 0:
            self.by_source[source] = left
        else:
            self.by_source.pop(source, None)


class Breaker:
    """A circuit breaker over one carrier (or one carrier on one server).

    CLOSED: calls flow. It OPENs after ``failure_threshold`` consecutive trunk failures, or when
    trunk failures (or ambiguous causes) exceed their ratio over the window once ``min_calls``
    outcomes are in it. OPEN: no calls for ``cool_down_s``, then HALF-OPEN: ``probe_calls`` calls
    are let through; if they all succeed it CLOSEs (with a fresh window), one trunk failure
    OPENs it again. Called-party outcomes are successes: they never open it.

    ``spread`` is how many distinct sources (servers) the failures must come from before it
    opens: a carrier-wide breaker uses 2, so one server's trouble never takes a carrier off the
    others. ``hold`` keeps it OPEN while a known condition lasts (peer unreachable, registration
    rejected); ``release`` goes straight to HALF-OPEN to probe the recovered carrier.
    """

    def __init__(
        self, settings: RoutingConfig, clock: Callable[[], float], spread: int = 1
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.spread = spread
        self.state = BreakerState.CLOSED
        self.reason = ""
        self.changed_at = clock()
        self.changes = 0
        self.window = _Window(settings.window_s)
        self.streak = 0  # consecutive trunk failures
        self.streak_sources: set[str] = set()
        self.held: str | None = None  # why it is held OPEN, if it is
        self.probes_started = 0
        self.probes_succeeded = 0
        self.last_probe_at: float | None = None

    # ------------------------------------------------------------------ reading

    def allows(self) -> bool:
        """Whether a call may go through now (moves OPEN to HALF-OPEN after the cool-down)."""
        if self.state is BreakerState.CLOSED:
            return True
        now = self.clock()
        if self.state is BreakerState.OPEN:
            if self.held is not None or now - self.changed_at < self.settings.cool_down_s:
                return False
            self._move(BreakerState.HALF_OPEN, "cool-down over: probing", now)
        # HALF-OPEN: a few probes; a probe whose outcome never came frees its slot after a while
        if (
            self.last_probe_at is not None
            and now - self.last_probe_at > self.settings.cool_down_s
            and self.probes_started > self.probes_succeeded
        ):
            self.probes_started = self.probes_succeeded
        return self.probes_started < self.settings.probe_calls

    def failure_ratio(self) -> float:
        """Trunk failures / outcomes in the window (0 when empty)."""
        self.window.expire(self.clock())
        return self.window.failures / self.window.total if self.window.total else 0.0

    def calls_in_window(self) -> int:
        self.window.expire(self.clock())
        return self.window.total

    # ------------------------------------------------------------------ writing

    def probe_started(self) -> None:
        """A call was placed through this breaker (counts as a probe when HALF-OPEN)."""
        if self.state is BreakerState.HALF_OPEN:
            self.probes_started += 1
            self.last_probe_at = self.clock()

    def record(self, outcome: Outcome, source: str = "") -> bool:
        """Count one call's outcome; True when the state changed."""
        if outcome is Outcome.OTHER:
            return False
        now = self.clock()
        if self.state is BreakerState.OPEN:
            return False  # calls placed before it opened: already judged
        if self.state is BreakerState.HALF_OPEN:
            if outcome is Outcome.TRUNK_FAILURE:
                self._open(now, f"probe failed ({outcome.value})")
                return True
            if outcome.is_success:
                self.probes_succeeded += 1
                if self.probes_succeeded >= self.settings.probe_calls:
                    self._move(
                        BreakerState.CLOSED, f"{self.probes_succeeded} probes succeeded", now
                    )
                    return True
            return False
        self.window.add(now, outcome, source)
        if outcome is Outcome.TRUNK_FAILURE:
            self.streak += 1
            self.streak_sources.add(source)
        elif outcome.is_success:
            self.streak = 0
            self.streak_sources.clear()
        why = self._trip_reason()
        if why is not None:
            self._open(now, why)
            return True
        return False

    def hold(self, reason: str) -> bool:
        """Keep it OPEN while ``reason`` lasts; True when the state changed."""
        changed = self.state is not BreakerState.OPEN
        self.held = reason
        if changed or self.reason != reason:
            self._open(self.clock(), reason)
        return changed

    def release(self, reason: str) -> bool:
        """The held condition ended: HALF-OPEN at once, to probe. True when the state changed."""
        if self.held is None:
            return False
        self.held = None
        self._move(BreakerState.HALF_OPEN, reason, self.clock())
        return True

    # ------------------------------------------------------------------ internals

    def _trip_reason(self) -> str | None:
        settings, window = self.settings, self.window
        if self.streak >= settings.failure_threshold and len(self.streak_sources) >= self.spread:
            return f"{self.streak} consecutive trunk failures"
        if window.total < settings.min_calls or len(window.by_source) < self.spread:
            return None
        if window.failures / window.total > settings.failure_ratio:
            return (
                f"trunk failure ratio {window.failures}/{window.total} over "
                f"{settings.window_s:g}s > {settings.failure_ratio:g}"
            )
        if window.ambiguous / window.total > settings.ambiguous_ratio:
            return (
                f"ambiguous cause ratio {window.ambiguous}/{window.total} over "
                f"{settings.window_s:g}s > {settings.ambiguous_ratio:g}"
            )
        return None

    def _open(self, now: float, reason: str) -> None:
        self._move(BreakerState.OPEN, reason, now)

    def _move(self, state: BreakerState, reason: str, now: float) -> None:
        if state is not self.state:
            self.changes += 1
            self.changed_at = now
        self.state = state
        self.reason = reason
        self.probes_started = self.probes_succeeded = 0
        self.last_probe_at = None
        if state is not BreakerState.CLOSED:
            return
        # a fresh start: the failures that opened it must not trip it again at once
        self.window.clear()
        self.streak = 0
        self.streak_sources.clear()


# --------------------------------------------------------------------------- routes


def match_keys(route: RouteConfig) -> list[tuple[str, str]]:
    """Every (phone_code, number prefix) pair a route matches on ('' = any)."""
    codes = route.phone_codes or ("",)
    prefixes = route.prefixes or ("",)
    return [(code, prefix) for code in codes for prefix in prefixes]


class RouteTable:
    """Finds the route of a called number: the longest match wins, then the one listed first.

    A match's length is the digits it names: phone_code plus number prefix. A route without
    phone_codes and prefixes is the default and matches every number (length 0).
    """

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(routes)
        keyed = [
            (len(code) + len(prefix), bool(code), -index, code, prefix, route)
            for index, route in enumerate(self.routes)
            for code, prefix in match_keys(route)
        ]
        keyed.sort(key=lambda k: (k[0], k[1], k[2]), reverse=True)
        self._keys = [(code, prefix, route) for _, _, _, code, prefix, route in keyed]

    def __bool__(self) -> bool:
        return bool(self.routes)

    def match(self, phone_code: str, number: str) -> RouteConfig | None:
        """The route for this number, or None when no route (and no default) matches."""
        for code, prefix, route in self._keys:
            if (not code or code == phone_code) and number.startswith(prefix):
                return route
        return None


@dataclass(frozen=True)
class CarrierPick:
    """The carrier chosen for one call, and the prefix that selects it in the dialplan."""

    carrier_id: str
    dial_prefix: str
    route: str
    tier: int  # 0: the route's first choice


@dataclass(frozen=True)
class NoCarrier:
    """No carrier of the route can take the call; the reason names each one's problem."""

    route: str
    reason: str


Availability = Callable[[str], str | None]  # carrier id -> why it cannot take a call, or None


def choose_carrier(
    route: RouteConfig,
    carriers: Mapping[str, CarrierConfig],
    unavailable: Availability,
    rng: random.Random,
    exclude: Collection[str] = (),
) -> CarrierPick | NoCarrier:
    """The first tier with a usable carrier; among its usable equals, a weighted random pick."""
    problems: list[str] = []
    for tier_index, tier in enumerate(route.tiers):
        usable: list[str] = []
        for carrier_id in tier:
            if carrier_id in exclude:
                problems.append(f"{carrier_id}: the call just failed there")
                continue
            why = unavailable(carrier_id)
            if why is None and carrier_id not in carriers:
                why = "not configured"
            if why is None:
                usable.append(carrier_id)
            else:
                problems.append(f"{carrier_id}: {why}")
        if usable:
            if len(usable) == 1:
                chosen = usable[0]
            else:
                weights = [route.weight(c) for c in usable]
                chosen = rng.choices(usable, weights=weights)[0]
            return CarrierPick(chosen, carriers[chosen].dial_prefix, route.name, tier_index)
    return NoCarrier(route.name, f"route {route.name!r}: " + "; ".join(problems))


# --------------------------------------------------------------------------- executor contract


@dataclass(frozen=True)
class PlacedCall:
    """A committed call whose carrier the balancer chose (what failover needs to re-place it)."""

    caller_code: str
    lead_id: int
    campaign: CampaignInfo
    server: ServerInfo
    carrier_id: str
    route: str
    phone_code: str
    number: str
    alt_dial: str
    placed_at: datetime  # the time in its caller code (database clock)
    retry_of: str | None = None  # the failed call's caller code, when this is its retry

    @property
    def server_ip(self) -> str:
        return self.server.server_ip


class CallRouter(Protocol):
    """What the executor asks for every call (implemented by carriers.CarrierHealth)."""

    def choose(
        self, server_ip: str, phone_code: str, number: str, exclude: Collection[str] = ()
    ) -> CarrierPick | NoCarrier | None:
        """The carrier for a call on this server; None: not routed (keep the campaign prefix)."""

    def placed(self, call: PlacedCall) -> None:
        """A routed call was committed (counts its line and any half-open probe)."""
