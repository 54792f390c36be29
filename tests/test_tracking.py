"""End to end: the daemon tracks simulated servers over real sockets into real Redis (and memory).

Servers rows live in real MariaDB with telnet_host/telnet_port pointing at each simulator's
loopback socket (address_policy = telnet_host), so nothing ever dials a server_ip.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio
from tracking_helpers import (
    FAST_AMI,
    eventually,
    health_is,
    make_config,
    running,
    seed_phones,
    seed_server,
    sim_counts,
    store_matches_sim,
)

from balancer.daemon import Daemon
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.sim.model import SimCarrier
from balancer.sim.server import SimAsterisk
from balancer.store.base import ChannelClass, Health, StateStore
from balancer.store.factory import open_store

CARRIERS = [SimCarrier("alpha", "9"), SimCarrier("beta", "8", technology="PJSIP")]


@pytest_asyncio.fixture
async def sims() -> AsyncIterator[list[SimAsterisk]]:
    servers = [
        SimAsterisk(f"10.10.0.{i}", carriers=CARRIERS, max_lines=200, call_duration_s=30)
        for i in (1, 2, 3)
    ]
    for sim in servers:
        await sim.start()
    yield servers
    for sim in servers:
        await sim.stop()


@pytest_asyncio.fixture(params=["redis", "memory"])
async def store(request: pytest.FixtureRequest, redis_db: str) -> AsyncIterator[StateStore]:
    url = redis_db if request.param == "redis" else "memory://"
    config = make_config(DatabaseUrl("127.0.0.1", 3306, "x", "x"), redis_url=url)
    store = open_store(config.redis)
    yield store
    await store.close()


def seeded(db: Connection, sims: list[SimAsterisk]) -> None:
    for sim in sims:
        seed_server(db, sim)
        seed_phones(db, sim.server_ip, ["101", "102", "103"])


async def all_up(store: StateStore, sims: list[SimAsterisk]) -> bool:
    for sim in sims:
        if not await health_is(store, sim.server_ip, Health.UP):
            return False
    return True


async def test_counts_exact_after_burst(
    db: Connection, database_url: DatabaseUrl, sims: list[SimAsterisk], store: StateStore
) -> None:
    seeded(db, sims)
    daemon = Daemon(make_config(database_url), store=store)
    async with running(daemon):
        await eventually(lambda: all_up(store, sims))
        # A burst: trunk calls on both carriers, agent phones, inbound trunk lines, local calls.
        for n, sim in enumerate(sims):
            results = await asyncio.gather(
                *(
                    sim.originate(f"9312555{n}{i:03d}", duration_s=0.3 + (i % 5) * 0.2)
                    for i in range(40)
                ),
                *(sim.originate(f"8312555{n}{i:03d}", duration_s=30) for i in range(10)),
                *(sim.originate(f"7{i:03d}", duration_s=30) for i in range(3)),
            )
            assert all(r is not None for r in results)
            for peer in ("101", "102"):
                sim.add_agent_channel(peer, duration_s=30)
            sim.add_trunk_channel("alpha", duration_s=30)
        for sim in sims:
            await eventually(lambda sim=sim: store_matches_sim(store, sim))
        state = await store.server(sims[0].server_ip)
        assert state is not None
        assert state.count(ChannelClass.AGENT) == 2
        assert state.carriers.get("beta") == 10
        # Let the short calls end: counts follow the hangups exactly.
        await asyncio.sleep(1.5)
        for sim in sims:
            await eventually(lambda sim=sim: store_matches_sim(store, sim))
            assert sim_counts(sim)["trunk"] == 11  # 10 beta + 1 inbound alpha still up
        await sims[1].hangup_all()
        await eventually(lambda: store_matches_sim(store, sims[1]))
        state = await store.server(sims[1].server_ip)
        assert state is not None and state.total == 0


async def test_missed_events_heal_at_next_snapshot(
    db: Connection, database_url: DatabaseUrl, sims: list[SimAsterisk], redis_db: str
) -> None:
    seeded(db, sims[:1])
    sim = sims[0]
    config = make_config(
        database_url, redis_url=redis_db, ami=replace(FAST_AMI, reconcile_interval_s=0.5)
    )
    daemon = Daemon(config)
    async with running(daemon):
        store = daemon.store
        await eventually(lambda: all_up(store, [sim]))
        sim.suppress_events(True)
        logins, snapshots = sim.logins, daemon.counters.snapshots
        for i in range(5):
            await sim.originate(f"93125550{i:03d}", duration_s=30)
        assert not await store_matches_sim(store, sim)
        await eventually(lambda: store_matches_sim(store, sim), timeout=10)
        # Healed by a reconcile snapshot on the same connection, not by events or a reconnect.
        assert daemon.counters.snapshots > snapshots
        assert sim.logins == logins
        sim.suppress_events(False)


async def test_dropped_connection_with_lost_events_heals_on_reconnect(
    db: Connection, database_url: DatabaseUrl, sims: list[SimAsterisk], redis_db: str
) -> None:
    seeded(db, sims)
    daemon = Daemon(make_config(database_url, redis_url=redis_db))
    async with running(daemon):
        store = daemon.store
        await eventually(lambda: all_up(store, sims))
        sim = sims[0]
        await sim.originate("93125550001", duration_s=30)
        await eventually(lambda: store_matches_sim(store, sim))
        # Change the channels with no events sent (lost), then drop the connection: the
        # reconnect's snapshot must heal it. (Changing them after the drop raced the reconnect.)
        sim.suppress_events(True)
        await sim.hangup_all()
        for i in range(4):
            await sim.originate(f"8312555{i:04d}", duration_s=30)
        logins = sim.logins
        await sim.drop_clients()
        sim.suppress_events(False)
        await eventually(lambda: _logged_in_again(sim, logins), timeout=5)
        await eventually(lambda: store_matches_sim(store, sim), timeout=5)
        for other in sims[1:]:
            assert await health_is(store, other.server_ip, Health.UP)


async def test_closed_connection_is_down_at_once_and_stays_down(
    db: Connection,
    database_url: DatabaseUrl,
    sims: list[SimAsterisk],
    redis_db: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A closed (then refused) server goes UP -> DOWN, never through SUSPECT; the others stay UP.
    How fast: bench/detect.py."""
    seeded(db, sims)
    caplog.set_level(logging.INFO, logger="balancer.live.tracker")
    daemon = Daemon(make_config(database_url, redis_url=redis_db))
    async with running(daemon):
        store = daemon.store
        await eventually(lambda: all_up(store, sims))
        await sims[2].stop()
        await eventually(lambda: health_is(store, "10.10.0.3", Health.DOWN), timeout=10)
        await asyncio.sleep(0.3)
        assert await health_is(store, "10.10.0.3", Health.DOWN)
        assert await all_up(store, sims[:2])
    assert transitions(caplog, sims[2])[:2] == [("down", "up"), ("up", "down")]
    assert all(t == ("down", "up") for t in transitions(caplog, sims[0])[:1])


def transitions(caplog: pytest.LogCaptureFixture, sim: SimAsterisk) -> list[tuple[str, str]]:
    """The tracker's health changes of one server, in order, from its log lines."""
    pattern = re.compile(rf"server {re.escape(sim.server_ip)}( \(\w+\))?: (\w+) -> (\w+) ")
    found = (pattern.match(r.getMessage()) for r in caplog.records)
    return [(m.group(2), m.group(3)) for m in found if m is not None]


def reasons(caplog: pytest.LogCaptureFixture, sim: SimAsterisk) -> list[str]:
    pattern = re.compile(rf"server {re.escape(sim.server_ip)}( \(\w+\))?: \w+ -> \w+ \((.*)\)$")
    found = (pattern.match(r.getMessage()) for r in caplog.records)
    return [m.group(2) for m in found if m is not None]


async def test_unresponsive_server_goes_suspect_then_down_then_recovers(
    db: Connection,
    database_url: DatabaseUrl,
    sims: list[SimAsterisk],
    redis_db: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """UP -> SUSPECT -> DOWN -> UP, each change with its cause; the other servers stay UP.
    How fast with the default settings: bench/detect.py."""
    seeded(db, sims)
    caplog.set_level(logging.INFO, logger="balancer.live.tracker")
    daemon = Daemon(make_config(database_url, redis_url=redis_db))
    sim = sims[1]
    async with running(daemon):
        store = daemon.store
        await eventually(lambda: all_up(store, sims))
        sim.set_unresponsive(True)
        await eventually(lambda: health_is(store, sim.server_ip, Health.DOWN), timeout=10)
        assert await all_up(store, [sims[0], sims[2]])
        sim.set_unresponsive(False)
        await eventually(lambda: health_is(store, sim.server_ip, Health.UP), timeout=15)
    assert transitions(caplog, sim)[:5] == [
        ("down", "up"),
        ("up", "suspect"),
        ("suspect", "down"),
        ("down", "up"),
        ("up", "down"),  # the daemon stopped
    ]
    assert reasons(caplog, sim)[1:5] == [
        "heartbeat missed (1)",
        "no answer to 2 heartbeats",
        "logged in",
        "stopped",
    ]
    for other in (sims[0], sims[2]):
        assert transitions(caplog, other) == [("down", "up"), ("up", "down")]


@pytest.mark.parametrize(
    "fault", ["garbage", "big_line", "half_message", "invalid_utf8", "login_rejected"]
)
async def test_bad_input_reconnects_only_that_session(
    db: Connection, database_url: DatabaseUrl, sims: list[SimAsterisk], redis_db: str, fault: str
) -> None:
    if fault == "login_rejected":
        seed_server(db, sims[0], secret="wrong")
        for sim in sims[1:]:
            seed_server(db, sim)
    else:
        seeded(db, sims)
    daemon = Daemon(make_config(database_url, redis_url=redis_db))
    async with running(daemon):
        store = daemon.store
        sim = sims[0]
        if fault == "login_rejected":
            await eventually(lambda: all_up(store, sims[1:]))
            session = daemon.fabric.sessions[sim.server_ip]

            async def failed_thrice() -> bool:
                return session.failures >= 3

            await eventually(failed_thrice, timeout=10)
            state = await store.server(sim.server_ip)
            assert state is not None and state.meta.health is Health.DOWN
            assert state.meta.health_reason == "login rejected: Authentication failed"
            # A rejected login is a failure: it never resets the backoff (whose schedule
            # test_ami_sessions checks), and the server stays DOWN with the rejection as cause.
            assert session.logins == 0
            assert sim.login_failures >= 3
            return
        await eventually(lambda: all_up(store, sims))
        await sims[1].originate("93125550001", duration_s=30)
        logins = sim.logins
        if fault == "garbage":
            await sim.send_garbage()
        elif fault == "big_line":
            await sim.send_big_line()
        elif fault == "half_message":
            await sim.send_half_message()
        elif fault == "invalid_utf8":
            await sim.send_invalid_utf8()
        if fault == "invalid_utf8":
            # A valid message with bad bytes is decoded with replacement: no reconnect needed.
            await asyncio.sleep(0.5)
            assert sim.logins == logins
        else:
            await eventually(lambda: _logged_in_again(sim, logins), timeout=5)
        await eventually(lambda: all_up(store, sims), timeout=5)
        await eventually(lambda: store_matches_sim(store, sims[1]))
        await sim.originate("93125550002", duration_s=30)
        await eventually(lambda: store_matches_sim(store, sim))


async def _logged_in_again(sim: SimAsterisk, before: int) -> bool:
    return sim.logins > before


async def test_registry_add_remove_change(
    db: Connection, database_url: DatabaseUrl, sims: list[SimAsterisk], redis_db: str
) -> None:
    seed_server(db, sims[0])
    daemon = Daemon(make_config(database_url, redis_url=redis_db))
    async with running(daemon):
        store = daemon.store
        await eventually(lambda: all_up(store, sims[:1]))
        # Added: a new row is connected without a restart.
        seed_server(db, sims[1])
        await eventually(lambda: all_up(store, sims[:2]))
        # Changed: the row now points at the third simulator's socket.
        with db.cursor() as cur:
            cur.execute(
                "UPDATE servers SET telnet_port = %s WHERE server_ip = %s",
                (sims[2].port, sims[1].server_ip),
            )
        before = sims[2].logins
        await eventually(lambda: _logged_in_again(sims[2], before))
        # Removed: deactivated rows are disconnected and forgotten.
        with db.cursor() as cur:
            cur.execute(
                "UPDATE servers SET active = 'N' WHERE server_ip = %s", (sims[0].server_ip,)
            )

        async def forgotten() -> bool:
            return await store.server(sims[0].server_ip) is None

        await eventually(forgotten)
        # Invalid row: skipped, others tracked.
        with db.cursor() as cur:
            cur.execute(
                "INSERT INTO servers (server_id, server_ip, active, telnet_host, telnet_port)"
                " VALUES ('bad', '10.10.0.99', 'Y', 'not a host!', 5038)"
            )
        await asyncio.sleep(0.5)
        assert await store.server("10.10.0.99") is None
        assert await health_is(store, sims[1].server_ip, Health.UP)


async def test_stale_server_updater_marks_down(
    db: Connection, database_url: DatabaseUrl, sims: list[SimAsterisk], redis_db: str
) -> None:
    seeded(db, sims[:2])
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO server_updater (server_ip, last_update) VALUES (%s, NOW()),"
            " (%s, NOW() - INTERVAL 10 MINUTE)",
            (sims[0].server_ip, sims[1].server_ip),
        )
    daemon = Daemon(make_config(database_url, redis_url=redis_db))
    async with running(daemon):
        store = daemon.store
        await eventually(lambda: health_is(store, sims[0].server_ip, Health.UP))
        await eventually(lambda: health_is(store, sims[1].server_ip, Health.DOWN))
        state = await store.server(sims[1].server_ip)
        assert state is not None and "server_updater" in state.meta.health_reason
        with db.cursor() as cur:
            cur.execute("UPDATE server_updater SET last_update = NOW()")
        await eventually(lambda: health_is(store, sims[1].server_ip, Health.UP))


async def test_database_outage_keeps_tracking(
    db: Connection, database_url: DatabaseUrl, sims: list[SimAsterisk], redis_db: str
) -> None:
    """The registry cannot be read: the known servers stay tracked, nothing is dropped."""
    seeded(db, sims[:1])
    bad = replace(database_url, password="wrong-password")
    daemon = Daemon(make_config(database_url, redis_url=redis_db))
    async with running(daemon):
        store = daemon.store
        await eventually(lambda: all_up(store, sims[:1]))
        assert daemon._db is not None
        daemon._db.url = bad
        await daemon._db.run(lambda conn: conn.close())  # the next query needs a new connection
        await daemon.refresh_registry()
        assert daemon.counters.registry_failures >= 1
        await sims[0].originate("93125550001", duration_s=30)
        await eventually(lambda: store_matches_sim(store, sims[0]))
        assert await health_is(store, sims[0].server_ip, Health.UP)
