"""Prometheus metrics through the official client: a collector over the daemon's live objects.

Pull model: nothing on the hot paths counts for us. At scrape time `render(source)` reads the
daemon's live objects through `MetricsSource` (a protocol the daemon satisfies; this module never
imports the daemon): tracker, fabric sessions, leadership, the balance cycle's counters and, for
line counts, the state store; `DaemonCollector` turns them into prometheus_client metric
families and `generate_latest` writes the text format. The two things that cannot be read back
later are recorded as they happen by small objects defined here: `CycleStats` (the balance
cycle's durations and calls placed, fed one `CycleResult` per cycle by the daemon) and
`EventRate` (a rolling events/s sampled by the HTTP server).

Optional inputs found on the daemon with getattr, so this module works before they exist:
  daemon.cycle_stats    a CycleStats the balance loop feeds (`cycle_stats.observe(result)`)
  daemon.carrier_health anything with ``states() -> Iterable[(carrier_id, server_ip | None,
                        state)]``; state is one of BREAKER_STATES (others are shown as given).
                        Without it no breaker metrics are rendered.
  daemon.kamailio       a KamailioSync ([kamailio]); its publishers give the kamailio_* families
  daemon.kamailio_lag   a Histogram of the publish lag to Kamailio

The HTTP side is `balancer/web/server.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

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
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
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
Sample = tuple[Labels, float]  # (labels, value) of one sample of a family


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


def bucket_bound(bound: float) -> str:
    """A histogram bucket's ``le`` label as this exporter has always written it ("1", "0.25")."""
    if math.isinf(bound):
        return "+Inf"
    return str(int(bound)) if bound.is_integer() else repr(bound)


async def read_states(daemon: MetricsSource) -> dict[str, ServerState] | None:
    """The store's view of every server, or None when the store does not answer in time."""
    try:
        states = await asyncio.wait_for(daemon.store.servers(), STORE_READ_TIMEOUT_S)
    except (BalancerError, TimeoutError) as exc:
        log.warning("metrics: the state store did not answer: %s", exc)
        return None
    return {state.server_ip: state for state in states}


class DaemonCollector(Collector):
    """A prometheus_client collector over the daemon's live objects, read when it is collected.

    Line counts live in the state store, which can only be read with an await, while
    ``collect()`` is synchronous: `render` reads them first and hands them over as ``states``.
    """

    def __init__(
        self,
        daemon: MetricsSource,
        states: Mapping[str, ServerState] | None,
        events: EventRate | None = None,
    ) -> None:
        self.daemon = daemon
        self.states = states
        self.events = events

    def collect(self) -> Iterator[Metric]:
        """Every family of one scrape; a family with no samples is left out."""
        for family in self._families():
            if family.samples:
                yield family

    def _families(self) -> Iterator[Metric]:
        daemon, states = self.daemon, self.states
        tracker, fabric, config = daemon.tracker, daemon.fabric, daemon.config
        now_wall, now_mono = time.time(), time.monotonic()

        yield _gauge("up", "1 while the daemon serves.", [({}, 1)])
        info = {
            "version": __version__,
            "name": daemon.name,
            "store": "memory" if config.redis.is_memory else "redis",
            "mode": config.balance.mode,
        }
        yield _gauge("info", "Build and runtime facts of this daemon (always 1).", [(info, 1)])
        started = now_wall - (now_mono - daemon.counters.started_at)
        yield _gauge(
            "start_time_seconds", "When the daemon started (epoch seconds).", [({}, started)]
        )
        yield _gauge(
            "leader",
            "1 while this daemon holds the leader lease (it places the calls), else 0.",
            [({}, 1 if daemon.leadership.leading else 0)],
        )
        yield _counter(
            "leadership_changes_total",
            "Times this daemon became or stopped being the leader.",
            [({}, daemon.leadership.changes)],
        )
        yield _gauge(
            "state_store_up",
            "1 when the state store answered this scrape, else 0 (line metrics are then absent).",
            [({}, 0 if states is None else 1)],
        )
        yield _gauge(
            "servers_watched", "Servers with an AMI session.", [({}, len(tracker.servers))]
        )

        # ---------------------------------------------------------------- per server
        servers = sorted(tracker.servers.items())
        ids = {ip: {"server_ip": ip, "server_id": track.meta.server_id} for ip, track in servers}
        lines: list[Sample] = []
        carrier_lines: list[Sample] = []
        drained: list[Sample] = []
        if states is not None:
            for ip, _ in servers:
                state = states.get(ip)
                counts = state.counts if state is not None else {}
                for cls in ChannelClass:
                    lines.append(({**ids[ip], "class": str(cls)}, counts.get(cls, 0)))
                for carrier, n in sorted((state.carriers if state is not None else {}).items()):
                    carrier_lines.append(({**ids[ip], "carrier": carrier}, n))
                drained.append((ids[ip], 1 if state is not None and state.drained else 0))
        yield _gauge("server_lines", "Live channels on the server by class.", lines)
        yield _gauge(
            "server_carrier_lines", "Live trunk channels on the server by carrier.", carrier_lines
        )
        yield _gauge(
            "server_max_trunks",
            "The server's max_vicidial_trunks.",
            [(ids[ip], track.meta.max_trunks) for ip, track in servers],
        )
        yield _gauge(
            "server_health",
            "1 for the server's current health state (up, suspect, down), 0 for the others.",
            [
                ({**ids[ip], "state": str(health)}, 1 if track.meta.health is health else 0)
                for ip, track in servers
                for health in HEALTH_STATES
            ],
        )
        yield _gauge("server_drained", "1 while an operator has drained the server.", drained)
        yield _gauge(
            "server_ami_rtt_seconds",
            "Round trip of the last AMI heartbeat (Ping).",
            [
                (ids[ip], track.meta.rtt_ms / 1000.0)
                for ip, track in servers
                if track.meta.rtt_ms is not None
            ],
        )
        sessions = fabric.sessions
        yield _gauge(
            "server_ami_connected",
            "1 while the AMI session is logged in.",
            [(ids[ip], 1 if ip in sessions and sessions[ip].connected else 0) for ip, _ in servers],
        )
        yield _counter(
            "server_ami_reconnects_total",
            "AMI reconnect attempts since the session started.",
            [(ids[ip], sessions[ip].reconnects) for ip, _ in servers if ip in sessions],
        )
        yield _counter(
            "server_events_total",
            "Tracked AMI events received from the server.",
            [(ids[ip], track.events) for ip, track in servers],
        )
        yield _gauge(
            "server_last_event_age_seconds",
            "Seconds since the last tracked event from the server.",
            [
                (ids[ip], max(0.0, now_wall - track.last_event_at))
                for ip, track in servers
                if track.last_event_at is not None
            ],
        )

        # ---------------------------------------------------------------- ingest
        yield _counter(
            "events_total", "Tracked AMI events, all servers.", [({}, tracker.events_total)]
        )
        if self.events is not None:
            self.events.sample(tracker.events_total)
            yield _gauge(
                "events_per_second",
                f"Tracked AMI events per second over the last {self.events.window_s:g}s.",
                [({}, round(self.events.rate(), 3))],
            )
        yield _counter(
            "store_errors_total",
            "State store writes that failed (healed by the next snapshot).",
            [({}, tracker.store_errors)],
        )
        counters = daemon.counters
        yield _counter(
            "snapshots_total",
            "CoreShowChannels snapshots by outcome.",
            [
                ({"outcome": "ok"}, counters.snapshots),
                ({"outcome": "failed"}, counters.snapshot_failures),
            ],
        )
        yield _counter(
            "registry_refreshes_total",
            "Re-reads of the servers table by outcome.",
            [
                ({"outcome": "ok"}, counters.registry_refreshes),
                ({"outcome": "failed"}, counters.registry_failures),
            ],
        )

        # ---------------------------------------------------------------- balancing
        cycle = daemon.cycle
        if cycle is not None:
            yield _counter("cycles_total", "Balance cycles started.", [({}, cycle.cycles)])
        stats = getattr(daemon, "cycle_stats", None)
        if isinstance(stats, CycleStats):
            yield _histogram(
                "cycle_duration_seconds", "Duration of one balance cycle.", stats.durations
            )
            yield _counter(
                "calls_placed_total",
                "Balance calls placed (committed) by server and carrier.",
                [
                    ({"server_ip": ip, "carrier": carrier}, n)
                    for (ip, carrier), n in sorted(stats.placed.items())
                ],
            )
            yield _counter(
                "call_errors_total",
                "Balance calls that failed and were rolled back.",
                [({}, stats.call_errors)],
            )
            if stats.last_cycle_at is not None:
                yield _gauge(
                    "last_cycle_timestamp_seconds",
                    "When the last balance cycle finished (epoch seconds).",
                    [({}, stats.last_cycle_at)],
                )
        yield _gauge(
            "carrier_breaker_state",
            "1 for each carrier breaker's current state (per server if it has one), 0 for others.",
            _breaker_samples(getattr(daemon, "carrier_health", None)),
        )
        yield from _kamailio_families(daemon)
        yield from _retention_families(daemon)


def _retention_families(daemon: MetricsSource) -> Iterator[Metric]:
    """Pruning of our own growing tables ([retention]); read from the daemon's ``retention``."""
    retention = getattr(daemon, "retention", None)
    stats = getattr(retention, "stats", None)
    if stats is None:
        return
    yield _counter(
        "retention_pruned_rows_total",
        "Rows of our own tables deleted by retention, by table.",
        [({"table": table}, n) for table, n in sorted(stats.pruned.items())],
    )
    yield _counter("retention_passes_total", "Retention passes completed.", [({}, stats.passes)])
    yield _counter(
        "retention_failures_total", "Retention passes that failed.", [({}, stats.failures)]
    )
    if stats.last_pass_at is not None:
        yield _gauge(
            "retention_last_pass_timestamp_seconds",
            "When retention last completed a pass (epoch seconds).",
            [({}, stats.last_pass_at)],
        )


def _kamailio_families(daemon: MetricsSource) -> Iterator[Metric]:
    """[kamailio] publishing, per endpoint (absent without the section). Reads the daemon's
    ``kamailio`` (a KamailioSync) and ``kamailio_lag`` (a Histogram) found with getattr."""
    sync = getattr(daemon, "kamailio", None)
    publishers = getattr(sync, "publishers", None) or []
    rows = [({"endpoint": p.endpoint.name}, p) for p in publishers]
    yield _gauge(
        "kamailio_endpoint_up",
        "1 when the last publish to this Kamailio's RPC endpoint succeeded, else 0.",
        [(labels, 1 if p.reachable else 0) for labels, p in rows],
    )
    yield _counter(
        "kamailio_publishes_total",
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
    yield _counter(
        "kamailio_publish_failures_total",
        "Publish passes that failed (endpoint unreachable, slow or refusing).",
        [(labels, p.stats.failures) for labels, p in rows],
    )
    yield _counter(
        "kamailio_reloads_deferred_total",
        "Reloads postponed by kamailio.max_reloads_per_minute or refused by reload_delta.",
        [(labels, p.stats.reloads_deferred) for labels, p in rows],
    )
    yield _gauge(
        "kamailio_last_publish_timestamp_seconds",
        "When a change was last published to this Kamailio (epoch seconds).",
        [(labels, p.stats.last_publish_at) for labels, p in rows if p.stats.last_publish_at],
    )
    lag = getattr(daemon, "kamailio_lag", None)
    if rows and isinstance(lag, Histogram):
        yield _histogram(
            "kamailio_publish_lag_seconds",
            "From the balancer seeing a destination's state change to Kamailio acknowledging it.",
            lag,
        )


def _histogram(name: str, help_text: str, hist: Histogram) -> Metric:
    return HistogramMetricFamily(
        PREFIX + name,
        help_text,
        buckets=[(bucket_bound(b), float(n)) for b, n in hist.cumulative()],
        sum_value=hist.sum,
    )


def _gauge(name: str, help_text: str, samples: Iterable[Sample]) -> Metric:
    return _with_samples(GaugeMetricFamily(PREFIX + name, help_text, labels=()), samples)


def _counter(name: str, help_text: str, samples: Iterable[Sample]) -> Metric:
    return _with_samples(CounterMetricFamily(PREFIX + name, help_text, labels=()), samples)


def _with_samples(family: Metric, samples: Iterable[Sample]) -> Metric:
    """Add samples with their own label sets (prometheus_client's families fix the label names
    at creation; ours vary per family, so each sample is added as a Sample directly)."""
    sample_name = family.name + ("_total" if family.type == "counter" else "")
    for labels, value in samples:
        family.add_sample(sample_name, dict(labels), float(value))
    return family


async def render(daemon: MetricsSource, events: EventRate | None = None) -> bytes:
    """The text exposition of one scrape, read from the daemon's live objects and its store.

    Async because line counts live in the state store (Redis, or in process). ``events`` is the
    rolling event rate kept by the HTTP server; without it events/s is not rendered.
    """
    states = await read_states(daemon)
    return generate_latest(DaemonCollector(daemon, states, events))


def _breaker_samples(health: Any) -> list[Sample]:
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
    samples: list[Sample] = []
    for carrier, server_ip, current in rows:
        known = BREAKER_STATES if current in BREAKER_STATES else (*BREAKER_STATES, current)
        for state in known:
            labels = {"carrier": carrier, "server_ip": server_ip, "state": state}
            samples.append((labels, 1 if state == current else 0))
    return samples
