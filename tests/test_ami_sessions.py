"""AMI sessions against simulated servers: the reconnect schedule, hung peers, true reasons, counts.

Behaviour, not speed: the backoff is checked through an injected sleep (which records what the
session asked to wait and then waits only a moment) and a seeded random source; deadlines exist
only so that a hung test ends. How fast these things happen is measured in bench/detect.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import pytest
import pytest_asyncio
from tracking_helpers import FAST_AMI, FAST_HEALTH, eventually, make_config, running, seed_server

from balancer.ami.endpoint import AmiEndpoint
from balancer.ami.session import AmiSession, backoff_ceiling_s
from balancer.config import AmiConfig, HealthConfig
from balancer.daemon import Daemon
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health

# Production-sized backoff: the injected sleep never waits it, so the test stays fast.
AMI = replace(FAST_AMI, reconnect_initial_s=0.5, reconnect_max_s=30.0)
HEALTH = FAST_HEALTH  # Pings every 0.5 s, each given 0.5 s: a loaded machine does not miss them


@dataclass
class Listener:
    """Records what a session reports, in order."""

    health: list[tuple[Health, str]] = field(default_factory=list)
    logins: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_login(self, server_ip: str) -> None:
        self.logins += 1
        self.changed.set()

    def on_event(self, server_ip: str, event: dict[str, str]) -> None:
        pass

    def on_health(self, server_ip: str, health: Health, reason: str) -> None:
        self.health.append((health, reason))
        self.changed.set()

    def on_rtt(self, server_ip: str, rtt_ms: float) -> None:
        pass

    @property
    def states(self) -> list[Health]:
        """Health in order, repeats (a new reason for the same state) folded."""
        out: list[Health] = []
        for health, _ in self.health:
            if not out or out[-1] is not health:
                out.append(health)
        return out


@dataclass
class FakeTime:
    """The session's clock and sleep: a sleep records the wait and moves the clock by it, at once.

    So the schedule is checked exactly (as if every wait had been waited) in no time at all.
    """

    session: AmiSession | None = None
    now: float = 1000.0
    waits: list[tuple[float, float]] = field(default_factory=list)  # (delay, its ceiling)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert self.session is not None
        self.waits.append((seconds, self.session.last_backoff_ceiling_s))
        self.now += seconds
        await asyncio.sleep(0.005)  # a real moment, so that refused attempts do not spin


def endpoint_for(sim: SimAsterisk) -> AmiEndpoint:
    return AmiEndpoint(sim.server_ip, sim.host, sim.port, sim.username, sim.secret)


def make_session(
    endpoint: AmiEndpoint,
    listener: Listener,
    *,
    ami: AmiConfig = AMI,
    health: HealthConfig = HEALTH,
    seed: int = 1,
) -> tuple[AmiSession, FakeTime]:
    fake = FakeTime()
    session = AmiSession(
        endpoint,
        ami,
        health,
        listener,
        rng=random.Random(seed),
        sleep=fake.sleep,
        clock=fake.clock,
    )
    fake.session = session
    return session, fake


def expected_ceilings(delays: list[float], initial: float, cap: float) -> list[float]:
    """Each wait's ceiling: the time unreachable so far (the waits before it), within limits."""
    return [min(cap, max(initial, sum(delays[:i]))) for i in range(len(delays))]


def free_port() -> int:
    """A loopback port nobody listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    async def probe() -> bool:
        return check()

    await eventually(probe, timeout=timeout, interval=0.005)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[SimAsterisk]:
    sim = SimAsterisk("10.10.0.1")
    await sim.start()
    yield sim
    await sim.stop()


async def stopped(session: AmiSession) -> None:
    await asyncio.wait_for(session.stop(), 10)


# ---------------------------------------------------------------------------- backoff


async def test_a_flapping_server_is_reconnected_after_each_outage_with_the_backoff_reset(
    server: SimAsterisk,
) -> None:
    """Six outages: each one's waits start from reconnect_initial_s again and never exceed the
    time the server has been away, so it is back within about as long as each outage lasted."""
    listener = Listener()
    session, fake = make_session(endpoint_for(server), listener)
    session.start()
    try:
        await until(lambda: session.health is Health.UP)
        outages: list[list[tuple[float, float]]] = []
        for flap in range(6):
            first = len(fake.waits)
            await server.stop()  # connection closed, then every attempt refused
            # Let the outage last a few attempts: the ceiling grows before the server is back.
            await until(lambda first=first: len(fake.waits) - first >= 6)  # type: ignore[misc]
            logins = session.logins
            await server.start()  # same port: the server answers again
            await until(lambda logins=logins: session.logins > logins)  # type: ignore[misc]
            assert session.health is Health.UP, f"flap {flap}"
            assert session.failures == 0, f"flap {flap}: the login did not reset the backoff"
            outages.append(fake.waits[first:])
        for flap, waits in enumerate(outages):
            delays, ceilings = [d for d, _ in waits], [c for _, c in waits]
            assert ceilings[0] == 0.5, f"flap {flap}: not reset"
            assert ceilings == pytest.approx(expected_ceilings(delays, 0.5, 30.0)), f"flap {flap}"
            assert ceilings[-1] > 0.5, f"flap {flap}: the ceiling never grew"
        assert all(0.0 <= delay <= ceiling for delay, ceiling in fake.waits)
        assert listener.states == [Health.UP] + [Health.DOWN, Health.UP] * 6
        assert session.reconnects == len(fake.waits)  # one attempt after every wait
    finally:
        await stopped(session)


async def test_a_connection_that_logged_in_waits_at_most_the_initial_backoff() -> None:
    """Dropped right after every login, the session keeps coming back with the first ceiling."""
    sim = SimAsterisk("10.10.0.2")
    await sim.start()
    listener = Listener()
    session, fake = make_session(endpoint_for(sim), listener)
    session.start()
    try:
        for _ in range(5):
            logins = session.logins
            await until(lambda logins=logins: session.logins > logins)  # type: ignore[misc]
            await sim.drop_clients()
        await until(lambda: len(fake.waits) >= 5)
        assert [ceiling for _, ceiling in fake.waits[:5]] == [0.5] * 5
    finally:
        await stopped(session)
        await sim.stop()


def test_backoff_ceiling_follows_the_outage_within_its_limits() -> None:
    assert [backoff_ceiling_s(t, 0.5, 30.0) for t in (0.0, 0.2, 0.5, 1.0, 7.5, 30.0, 99.0)] == [
        0.5,
        0.5,
        0.5,
        1.0,
        7.5,
        30.0,
        30.0,
    ]


async def _waits_against_a_closed_port(seed: int, count: int) -> list[tuple[float, float]]:
    listener = Listener()
    endpoint = AmiEndpoint("10.10.0.9", "127.0.0.1", free_port(), "cron", "1234")
    ami = replace(AMI, reconnect_initial_s=0.5, reconnect_max_s=4.0)
    session, fake = make_session(endpoint, listener, ami=ami, seed=seed)
    session.start()
    try:
        await until(lambda: len(fake.waits) >= count, timeout=30)
    finally:
        await stopped(session)
    assert listener.health and all(h is Health.DOWN for h, _ in listener.health)
    assert listener.health[-1] == (Health.DOWN, "stopped")
    return fake.waits[:count]


async def test_jitter_at_the_cap_spreads_over_the_whole_range() -> None:
    """Full jitter: at the cap, waits cover [0, cap] evenly; seeded, so the draw is repeatable."""
    waits = await _waits_against_a_closed_port(seed=7, count=320)
    delays, ceilings = [d for d, _ in waits], [c for _, c in waits]
    assert ceilings == pytest.approx(expected_ceilings(delays, 0.5, 4.0))
    at_cap = [delay for delay, ceiling in waits if ceiling == 4.0]
    assert len(at_cap) >= 300
    assert all(0.0 <= delay <= 4.0 for delay in at_cap)
    assert len(set(at_cap)) == len(at_cap), "no two balancers' waits should coincide"
    # Every quarter of the range gets its share (uniform would give a quarter each).
    quarters = [sum(1 for d in at_cap if q <= d < q + 1) for q in range(4)]
    assert all(0.15 * len(at_cap) <= n <= 0.35 * len(at_cap) for n in quarters), quarters
    assert min(at_cap) < 0.2 and max(at_cap) > 3.8
    # Same seed, same schedule; another seed (another balancer), another one.
    assert await _waits_against_a_closed_port(seed=7, count=20) == waits[:20]
    other = await _waits_against_a_closed_port(seed=8, count=20)
    assert [d for d, _ in other] != [d for d, _ in waits[:20]]


# ---------------------------------------------------------------------------- hung peers


async def test_an_unresponsive_server_goes_suspect_then_down_then_comes_back(
    server: SimAsterisk,
) -> None:
    listener = Listener()
    session, _ = make_session(endpoint_for(server), listener)
    session.start()
    try:
        await until(lambda: session.health is Health.UP)
        mark = len(listener.health)
        server.set_unresponsive(True)
        await until(lambda: session.health is Health.DOWN)
        server.set_unresponsive(False)
        await until(lambda: session.health is Health.UP)
        after = listener.health[mark:]
        states = [h for i, (h, _) in enumerate(after) if i == 0 or after[i - 1][0] is not h]
        assert states == [Health.SUSPECT, Health.DOWN, Health.UP]
        assert after[0] == (Health.SUSPECT, "heartbeat missed (1)")
        assert after[1] == (Health.DOWN, "no answer to 2 heartbeats")
        assert after[-1] == (Health.UP, "logged in")
    finally:
        await stopped(session)


# ---------------------------------------------------------------------------- reasons


async def test_a_stopped_session_says_stopped_not_its_last_error(server: SimAsterisk) -> None:
    """After a heartbeat DOWN and a recovery, stop() reports "stopped", not the old error."""
    listener = Listener()
    session, _ = make_session(endpoint_for(server), listener)
    session.start()
    await until(lambda: session.health is Health.UP)
    server.set_unresponsive(True)
    await until(lambda: session.last_error == "no answer to 2 heartbeats")
    server.set_unresponsive(False)
    logins = session.logins
    await until(lambda: session.logins > logins and session.health is Health.UP)
    await stopped(session)
    assert listener.health[-2][0] is Health.UP
    assert listener.health[-1] == (Health.DOWN, "stopped")
    assert session.health_reason == "stopped"


async def test_each_down_says_the_cause_of_that_change(server: SimAsterisk) -> None:
    """A hang, then a closed connection, then a refused one: three DOWNs, three causes."""
    listener = Listener()
    session, _ = make_session(endpoint_for(server), listener)
    session.start()
    try:
        await until(lambda: session.health is Health.UP)
        server.set_unresponsive(True)
        await until(lambda: session.health is Health.DOWN)
        server.set_unresponsive(False)
        await until(lambda: session.health is Health.UP)
        mark = len(listener.health)
        await server.drop_clients()
        await until(lambda: session.logins >= 3 and session.health is Health.UP)
        dropped = [r for h, r in listener.health[mark:] if h is Health.DOWN]
        assert dropped and "heartbeat" not in dropped[0], dropped
        assert "closed" in dropped[0] or "lost" in dropped[0], dropped
        mark = len(listener.health)
        await server.stop()
        await until(lambda: any("cannot connect" in r for _, r in listener.health[mark:]))
        downs = [r for h, r in listener.health[mark:] if h is Health.DOWN]
        assert "heartbeat" not in downs[0] and "cannot connect" not in downs[0], downs
    finally:
        await stopped(session)


async def test_stop_ends_a_session_whose_task_lost_a_cancellation(
    server: SimAsterisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11 asyncio.wait_for (in a library, say) can swallow a cancellation that
    arrives as its future completes; stop() must still end the session, not wait forever."""
    listener = Listener()
    session, _ = make_session(endpoint_for(server), listener)
    original = session._attempt
    lost: list[bool] = []

    async def losing_the_first_cancellation() -> None:
        try:
            await original()
        except asyncio.CancelledError:
            if lost:
                raise
            lost.append(True)
            await asyncio.Event().wait()  # carries on as if nothing had been asked

    monkeypatch.setattr(session, "_attempt", losing_the_first_cancellation)
    session.start()
    await until(lambda: session.health is Health.UP)
    await asyncio.wait_for(session.stop(), 10)  # 10 s only ends a hung test
    assert lost == [True]
    assert listener.health[-1] == (Health.DOWN, "stopped")


# ---------------------------------------------------------------------------- the daemon


def _summary_reconnects(records: list[logging.LogRecord]) -> int:
    lines = [r.getMessage() for r in records if " stopped after " in r.getMessage()]
    assert len(lines) == 1, lines
    match = re.search(r"(\d+) reconnects", lines[0])
    assert match is not None, lines[0]
    return int(match.group(1))


async def test_shutdown_summary_counts_every_sessions_reconnects(
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The summary's reconnects equal the sessions' sum, a removed server's included; the store
    is left with each server's final count and "stopped"."""
    sims = [SimAsterisk(f"10.10.0.{i}") for i in (1, 2, 3)]
    for sim in sims:
        await sim.start()
        seed_server(db, sim)
    caplog.set_level(logging.INFO, logger="balancer.daemon")
    daemon = Daemon(make_config(database_url, redis_url=redis_db))
    seen: dict[int, AmiSession] = {}
    try:
        async with running(daemon):

            async def logged_in(ip: str, count: int) -> bool:
                session = daemon.fabric.sessions.get(ip)
                if session is not None:
                    seen[id(session)] = session
                return session is not None and session.logins >= count

            for ip in ("10.10.0.1", "10.10.0.2", "10.10.0.3"):
                await eventually(lambda ip=ip: logged_in(ip, 1))  # type: ignore[misc]
            for round_ in range(2, 5):
                await sims[0].drop_clients()
                await eventually(lambda r=round_: logged_in("10.10.0.1", r))  # type: ignore[misc]
            await sims[1].drop_clients()
            await eventually(lambda: logged_in("10.10.0.2", 2))
            # A server removed from the registry takes its session with it: its count stays.
            await sims[2].drop_clients()
            await eventually(lambda: logged_in("10.10.0.3", 2))
            with db.cursor() as cur:
                cur.execute("DELETE FROM servers WHERE server_ip = '10.10.0.3'")
            await eventually(lambda: _gone(daemon, "10.10.0.3"))
            for session in daemon.fabric.sessions.values():
                seen[id(session)] = session
    finally:
        for sim in sims:
            await sim.stop()
    total = sum(session.reconnects for session in seen.values())
    assert total >= 5
    assert _summary_reconnects(caplog.records) == total
    from balancer.store.factory import open_store

    store = open_store(daemon.config.redis)
    try:
        for ip in ("10.10.0.1", "10.10.0.2"):
            state = await store.server(ip)
            assert state is not None
            assert state.meta.health is Health.DOWN
            assert state.meta.health_reason == "stopped"
            (session,) = [s for s in seen.values() if s.endpoint.server_ip == ip]
            assert state.meta.reconnects == session.reconnects
    finally:
        await store.close()


async def _gone(daemon: Daemon, server_ip: str) -> bool:
    return server_ip not in daemon.fabric.sessions
