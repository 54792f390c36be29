"""Prometheus metrics: a dependency-free text exposition (format 0.0.4) over a tiny HTTP server.

Pull model: nothing on the hot paths counts for us. At scrape time `render(source)` reads the
daemon's live objects through `MetricsSource` (a protocol the daemon satisfies; this module never
imports the daemon) (tracker, fabric sessions, leadership, the balance cycle's counters) and,
for line counts, the state store. The two things that cannot be read back later are recorded as
they happen by small objects defined here: `CycleStats` (the balance cycle's durations and calls
placed, fed one `CycleResult` per cycle by the daemon) and `EventRate` (a rolling events/s
sampled by the metrics server itself).

Optional inputs found on the daemon with getattr, so this module works before they exist:
  daemon.cycle_stats    a CycleStats the balance loop feeds (`cycle_stats.observe(result)`)
  daemon.carrier_health anything with ``states() -> Iterable[(carrier_id, server_ip | None,
                        state)]``; state is one of BREAKER_STATES (others are shown as given).
                        Without it no breaker metrics are rendered.

The HTTP side lives in `balancer/ops/metrics_http.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from balancer import __version__
from balancer.errors import BalancerError
from balancer.store.base import ChannelClass, Health, ServerState

if TYPE_CHECKING:
    from balancer.ami.fabric import Fabric
    from balancer.balance.cycle import BalanceCycle, CycleResult
    from balancer.balance.leader import Leadership
    from balancer.config import Config
    from balancer.live.tracker import Tracker
    from balancer.store.base import StateStore

log = logging.getLogger(__name__)

PREFIX = "vici_balancer_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Upper bounds (seconds) of the cycle-duration histogram: a cycle is a few SQL round trips plus
# the calls it places at the CPS pace, so from milliseconds to tens of seconds.
CYCLE_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BREAKER_STATES: tuple[str, ...] = ("closed", "open", "half-open")  # routing.BreakerState
HEALTH_STATES: tuple[Health, ...] = (Health.UP, Health.SUSPECT, Health.DOWN)
# Publish lag to Kamailio (balancer sees a change -> Kamailio acknowledged it): milliseconds
# normally, the retry backoff while an endpoint is down.
KAMAILIO_LAG_BUCKETS_S: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STORE_READ_TIMEOUT_S = 2.0

Labels = Mapping[str, str]
Sample = tuple[str, Labels, float]  # (full metric name, labels, value)


# --------------------------------------------------------------------------- what is read


class DaemonCounters(Protocol):
    """The daemon's own totals a scrape shows."""

    @property
    def started_at(self) -> float: ...  # monotonic seconds
    @property
    def snapshots(self) -> int: ...
    @property
    def snapshot_failures(self) -> int: ...
    @property
    def registry_refreshes(self) -> int: ...
    @property
    def registry_failures(self) -> int: ...


class MetricsSource(Protocol):
    """Everything a scrape reads (the daemon is one); optional extras are found with getattr."""

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> Config: ...
    @property
    def store(self) -> StateStore: ...
    @property
    def tracker(self) -> Tracker: ...
    @property
    def fabric(self) -> Fabric: ...
    @property
    def counters(self) -> DaemonCounters: ...
    @property
    def leadership(self) -> Leadership: ...
    @property
    def cycle(self) -> BalanceCycle | None: ...


# --------------------------------------------------------------------------- recorders


class Histogram:
    """A cumulative-bucket histogram (Prometheus semantics), O(buckets) per observation."""

    def __init__(self, buckets: Sequence[float] = CYCLE_BUCKETS_S) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or any(math.isnan(b) or math.isinf(b) for b in bounds):
            raise ValueError(f"histogram buckets must be finite numbers, got {buckets!r}")
        self.bounds: tuple[float, ...] = tuple(bounds)
        self._counts = [0] * len(bounds)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value."""
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self._counts[i] += 1
                break

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) per bucket, +Inf last."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip(self.bounds, self._counts, strict=True):
            running += n
            out.append((bound, running))
        out.append((math.inf, self.count))
        return out


class CycleStats:
    """What the balance loop records per cycle: duration, calls placed per server and carrier."""

    def __init__(self, buckets: Sequence[float] = CYCLE_BUCKETS_S) -> None:
        self.durations = Histogram(buckets)
        self.placed: dict[tuple[str, str], int] = {}  # (server_ip, carrier id or "") -> calls
        self.call_errors = 0
        self.skipped = 0  # cycles that planned but did not execute (dry run, not the leader)
        self.last_cycle_at: float | None = None  # epoch seconds of the last observed cycle

    def observe(self, result: CycleResult) -> None:
        """Record one finished cycle (its seconds and the calls its report placed)."""
        self.observe_seconds(result.seconds)
        if result.skipped is not None:
            self.skipped += 1
        report = result.report
        if report is None:
            return
        self.call_errors += len(report.errors)
        for call in report.results:
            # The routing work adds a carrier to each call; until then it is "".
            self.count_placed(call.server_ip, call.carrier_id or "")

    def observe_seconds(self, seconds: float) -> None:
        """Record one cycle's duration."""
        self.durations.observe(seconds)
        self.last_cycle_at = time.time()

    def count_placed(self, server_ip: str, carrier: str = "", calls: int = 1) -> None:
        """Add placed calls to a (server, carrier) counter."""
        key = (server_ip, carrier)
        self.placed[key] = self.placed.get(key, 0) + calls


class EventRate:
    """Events per second over a rolling window, from samples of a monotonically rising total."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, total: int) -> None:
        """Record the total now; keeps one sample older than the window as the baseline."""
        now = self.clock()
        samples = self._samples
        if samples and total < samples[-1][1]:
            samples.clear()  # the counter restarted: start over rather than report a negative rate
        samples.append((now, total))
        while len(samples) > 2 and samples[1][0] <= now - self.window_s:
            samples.popleft()

    def rate(self) -> float:
        """Events per second between the oldest kept sample and the newest; 0 with one sample."""
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


# --------------------------------------------------------------------------- exposition


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, +Inf/-Inf/NaN spelled as Prometheus does."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{escape_label(str(value))}"' for key, value in labels.items())
    return "{" + inner + "}"


class Exposition:
    """Collects metric families and renders them in the text format, families in insertion order."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self._lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float]]
    ) -> None:
        """One gauge or counter family; rendered only when it has samples."""
        full = self.prefix + name
        self.samples(full, kind, help_text, ((full, labels, value) for labels, value in samples))

    def samples(self, full: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        """A family whose samples carry their own names (histogram _bucket/_sum/_count)."""
        body = [f"{name}{_labels(labels)} {format_value(value)}" for name, labels, value in samples]
        if not body:
            return
        self._lines.append(f"# HELP {full} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {full} {kind}")
        self._lines.extend(body)

    def histogram(self, name: str, help_text: str, histogram: Histogram, labels: Labels) -> None:
        """A histogram family: cumulative buckets with le labels, then _sum and _count."""
        full = self.prefix + name
        rows: list[Sample] = [
            (f"{full}_bucket", {**labels, "le": format_value(float(bound))}, float(count))
            for bound, count in histogram.cumulative()
        ]
        rows.append((f"{full}_sum", labels, histogram.sum))
        rows.append((f"{full}_count", labels, float(histogram.count)))
        self.samples(full, "histogram", help_text, rows)

    def text(self) -> str:
        """The whole exposition, newline-terminated."""
        return "\n".join(self._lines) + "\n" if self._lines else ""


async def _store_states(daemon: MetricsSource) -> dict[str, ServerState] | None:
    """The store's view of every server, or None when the store does not answer in time."""
    try:
        states = await asyncio.wait_for(daemon.store.servers(), STORE_READ_TIMEOUT_S)
    except (BalancerError, TimeoutError) as exc:
        log.warning("metrics: the state store did not answer: %s", exc)
        return None
    return {state.server_ip: state for state in states}


async def render(daemon: MetricsSource, events: EventRate | None = None) -> str:
    """The exposition for one scrape, read from the daemon's live objects and its state store.

    Async because line counts live in the state store (Redis, or in process). ``events`` is the
    rolling event rate kept by the metrics server; without it events/s is not rendered.
    """
    tracker, fabric = daemon.tracker, daemon.fabric
    states = await _store_states(daemon)
    out = Exposition()
    now_wall, now_mono = time.time(), time.monotonic()
    config = daemon.config

    out.family("up", "gauge", "1 while the daemon serves.", [({}, 1)])
    info = {
        "version": __version__,
        "name": daemon.name,
        "store": "memory" if config.redis.is_memory else "redis",
        "mode": config.balance.mode,
    }
    out.family("info", "gauge", "Build and runtime facts of this daemon (always 1).", [(info, 1)])
    started = now_wall - (now_mono - daemon.counters.started_at)
    out.family(
        "start_time_seconds", "gauge", "When the daemon started (epoch seconds).", [({}, started)]
    )
    out.family(
        "leader",
        "gauge",
        "1 while this daemon holds the leader lease (it places the calls), else 0.",
        [({}, 1 if daemon.leadership.leading else 0)],
    )
    out.family(
        "leadership_changes_total",
        "counter",
        "Times this daemon became or stopped being the leader.",
        [({}, daemon.leadership.changes)],
    )
    out.family(
        "state_store_up",
        "gauge",
        "1 when the state store answered this scrape, else 0 (line metrics are then absent).",
        [({}, 0 if states is None else 1)],
    )
    out.family(
        "servers_watched", "gauge", "Servers with an AMI session.", [({}, len(tracker.servers))]
    )

    # ---------------------------------------------------------------- per server
    servers = sorted(tracker.servers.items())
    ids = {ip: {"server_ip": ip, "server_id": track.meta.server_id} for ip, track in servers}
    lines: list[tuple[Labels, float]] = []
    carrier_lines: list[tuple[Labels, float]] = []
    drained: list[tuple[Labels, float]] = []
    if states is not None:
        for ip, _ in servers:
            state = states.get(ip)
            counts = state.counts if state is not None else {}
            for cls in ChannelClass:
                lines.append(({**ids[ip], "class": str(cls)}, counts.get(cls, 0)))
            for carrier, n in sorted((state.carriers if state is not None else {}).items()):
                carrier_lines.append(({**ids[ip], "carrier": carrier}, n))
            drained.append((ids[ip], 1 if state is not None and state.drained else 0))
    out.family("server_lines", "gauge", "Live channels on the server by class.", lines)
    out.family(
        "server_carrier_lines",
        "gauge",
        "Live trunk channels on the server by carrier.",
        carrier_lines,
    )
    out.family(
        "server_max_trunks",
        "gauge",
        "The server's max_vicidial_trunks.",
        [(ids[ip], track.meta.max_trunks) for ip, track in servers],
    )
    out.family(
        "server_health",
        "gauge",
        "1 for the server's current health state (up, suspect, down), 0 for the others.",
        [
            ({**ids[ip], "state": str(health)}, 1 if track.meta.health is health else 0)
            for ip, track in servers
            for health in HEALTH_STATES
        ],
    )
    out.family("server_drained", "gauge", "1 while an operator has drained the server.", drained)
    out.family(
        "server_ami_rtt_seconds",
        "gauge",
        "Round trip of the last AMI heartbeat (Ping).",
        [
            (ids[ip], track.meta.rtt_ms / 1000.0)
            for ip, track in servers
            if track.meta.rtt_ms is not None
        ],
    )
    sessions = fabric.sessions
    out.family(
        "server_ami_connected",
        "gauge",
        "1 while the AMI session is logged in.",
        [(ids[ip], 1 if ip in sessions and sessions[ip].connected else 0) for ip, _ in servers],
    )
    out.family(
        "server_ami_reconnects_total",
        "counter",
        "AMI reconnect attempts since the session started.",
        [(ids[ip], sessions[ip].reconnects) for ip, _ in servers if ip in sessions],
    )
    out.family(
        "server_events_total",
        "counter",
        "Tracked AMI events received from the server.",
        [(ids[ip], track.events) for ip, track in servers],
    )
    out.family(
        "server_last_event_age_seconds",
        "gauge",
        "Seconds since the last tracked event from the server.",
        [
            (ids[ip], max(0.0, now_wall - track.last_event_at))
            for ip, track in servers
            if track.last_event_at is not None
        ],
    )

    # ---------------------------------------------------------------- ingest
    out.family(
        "events_total", "counter", "Tracked AMI events, all servers.", [({}, tracker.events_total)]
    )
    if events is not None:
        events.sample(tracker.events_total)
        out.family(
            "events_per_second",
            "gauge",
            f"Tracked AMI events per second over the last {events.window_s:g}s.",
            [({}, round(events.rate(), 3))],
        )
    out.family(
        "store_errors_total",
        "counter",
        "State store writes that failed (healed by the next snapshot).",
        [({}, tracker.store_errors)],
    )
    counters = daemon.counters
    out.family(
        "snapshots_total",
        "counter",
        "CoreShowChannels snapshots by outcome.",
        [
            ({"outcome": "ok"}, counters.snapshots),
            ({"outcome": "failed"}, counters.snapshot_failures),
        ],
    )
    out.family(
        "registry_refreshes_total",
        "counter",
        "Re-reads of the servers table by outcome.",
        [
            ({"outcome": "ok"}, counters.registry_refreshes),
            ({"outcome": "failed"}, counters.registry_failures),
        ],
    )

    # ---------------------------------------------------------------- balancing
    cycle = daemon.cycle
    if cycle is not None:
        out.family("cycles_total", "counter", "Balance cycles started.", [({}, cycle.cycles)])
    stats = getattr(daemon, "cycle_stats", None)
    if isinstance(stats, CycleStats):
        out.histogram(
            "cycle_duration_seconds", "Duration of one balance cycle.", stats.durations, {}
        )
        out.family(
            "calls_placed_total",
            "counter",
            "Balance calls placed (committed) by server and carrier.",
            [
                ({"server_ip": ip, "carrier": carrier}, n)
                for (ip, carrier), n in sorted(stats.placed.items())
            ],
        )
        out.family(
            "call_errors_total",
            "counter",
            "Balance calls that failed and were rolled back.",
            [({}, stats.call_errors)],
        )
        if stats.last_cycle_at is not None:
            out.family(
                "last_cycle_timestamp_seconds",
                "gauge",
                "When the last balance cycle finished (epoch seconds).",
                [({}, stats.last_cycle_at)],
            )
    out.family(
        "carrier_breaker_state",
        "gauge",
        "1 for each carrier breaker's current state (per server if it has one), 0 for others.",
        _breaker_samples(getattr(daemon, "carrier_health", None)),
    )
    _kamailio_metrics(out, daemon)
    return out.text()


def _kamailio_metrics(out: Exposition, daemon: MetricsSource) -> None:
    """[kamailio] publishing, per endpoint (absent without the section). Reads the daemon's
    ``kamailio`` (a KamailioSync) and ``kamailio_lag`` (a Histogram) found with getattr."""
    sync = getattr(daemon, "kamailio", None)
    publishers = getattr(sync, "publishers", None) or []
    rows = [({"endpoint": p.endpoint.name}, p) for p in publishers]
    out.family(
        "kamailio_endpoint_up",
        "gauge",
        "1 when the last publish to this Kamailio's RPC endpoint succeeded, else 0.",
        [(labels, 1 if p.reachable else 0) for labels, p in rows],
    )
    out.family(
        "kamailio_publishes_total",
        "counter",
        "Changes published to Kamailio, by kind (state: dispatcher.set_duid_state; reload).",
        [
            sample
            for labels, p in rows
            for sample in (
                ({**labels, "kind": "state"}, p.stats.state_changes),
                ({**labels, "kind": "reload"}, p.stats.reloads),
            )
        ],
    )
    out.family(
        "kamailio_publish_failures_total",
        "counter",
        "Publish passes that failed (endpoint unreachable, slow or refusing).",
        [(labels, p.stats.failures) for labels, p in rows],
    )
    out.family(
        "kamailio_reloads_deferred_total",
        "counter",
        "Reloads postponed by kamailio.max_reloads_per_minute or refused by reload_delta.",
        [(labels, p.stats.reloads_deferred) for labels, p in rows],
    )
    out.family(
        "kamailio_last_publish_timestamp_seconds",
        "gauge",
        "When a change was last published to this Kamailio (epoch seconds).",
        [(labels, p.stats.last_publish_at) for labels, p in rows if p.stats.last_publish_at],
    )
    lag = getattr(daemon, "kamailio_lag", None)
    if rows and isinstance(lag, Histogram):
        out.histogram(
            "kamailio_publish_lag_seconds",
            "From the balancer seeing a destination's state change to Kamailio acknowledging it.",
            lag,
            {},
        )


def _breaker_samples(health: Any) -> list[tuple[Labels, float]]:
    """Samples from a carrier-health object's ``states()``; none when absent or broken."""
    states_fn = getattr(health, "states", None)
    if not callable(states_fn):
        return []
    try:
        rows = sorted(
            (str(carrier), "" if server_ip is None else str(server_ip), str(state))
            for carrier, server_ip, state in states_fn()
        )
    except Exception:  # carrier health is someone else's code: a scrape must not fail on it
        log.exception("metrics: carrier_health.states() failed")
        return []
    samples: list[tuple[Labels, float]] = []
    for carrier, server_ip, current in rows:
        known = BREAKER_STATES if current in BREAKER_STATES else (*BREAKER_STATES, current)
        for state in known:
            labels = {"carrier": carrier, "server_ip": server_ip, "state": state}
            samples.append((labels, 1 if state == current else 0))
    return samples
