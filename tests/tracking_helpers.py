"""Helpers for end-to-end tracking tests: seed servers rows, build a config, run a daemon."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from balancer.config import (
    AmiConfig,
    BalanceConfig,
    CarrierConfig,
    Config,
    DatabaseConfig,
    HealthConfig,
    RedisConfig,
)
from balancer.daemon import Daemon
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.sim.server import SimAsterisk
from balancer.store.base import ChannelClass, Health, ServerState, StateStore

FAST_AMI = AmiConfig(
    address_policy="telnet_host",
    connect_timeout_s=1.0,
    action_timeout_s=1.0,
    reconnect_initial_s=0.1,
    reconnect_max_s=0.5,
    registry_refresh_s=0.3,
    reconcile_interval_s=30.0,
)
# A Ping answered later than the interval counts as missed: 0.5 s keeps a loaded CI machine from
# turning healthy servers SUSPECT, while timing tests set their own bounds.
FAST_HEALTH = HealthConfig(heartbeat_interval_s=0.5, heartbeat_misses=2)
CARRIERS = (CarrierConfig("alpha", "9"), CarrierConfig("beta", "8"))


def seed_server(
    conn: Connection,
    sim: SimAsterisk,
    *,
    server_id: str | None = None,
    max_trunks: int = 50,
    secret: str = "1234",
    active: str = "Y",
) -> None:
    """A servers row for a simulated server: telnet_host/port point at its loopback socket."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO servers (server_id, server_ip, active, active_asterisk_server,"
            " telnet_host, telnet_port, ASTmgrUSERNAME, ASTmgrSECRET, max_vicidial_trunks,"
            " asterisk_version)"
            " VALUES (%s, %s, %s, 'Y', %s, %s, 'cron', %s, %s, '18.21.0')",
            (
                server_id or "ast" + sim.server_ip.rsplit(".", 1)[1],
                sim.server_ip,
                active,
                sim.host,
                sim.port,
                secret,
                max_trunks,
            ),
        )


def seed_phones(conn: Connection, server_ip: str, extensions: Sequence[str]) -> None:
    with conn.cursor() as cur:
        for ext in extensions:
            cur.execute(
                "INSERT INTO phones (extension, server_ip, login, pass, active, protocol)"
                " VALUES (%s, %s, %s, 'x', 'Y', 'SIP')",
                (ext, server_ip, ext),
            )


def make_config(
    url: DatabaseUrl,
    redis_url: str = "memory://",
    prefix: str = "vbt:",
    ami: AmiConfig = FAST_AMI,
    health: HealthConfig = FAST_HEALTH,
    **changes: Any,
) -> Config:
    config = Config(
        database=DatabaseConfig(url, "test"),
        redis=RedisConfig(url=redis_url, key_prefix=prefix, state_ttl_s=3.0),
        ami=ami,
        health=health,
        balance=BalanceConfig(enabled=False),  # tracking tests: no balance cycle
        carriers=CARRIERS,
    )
    return replace(config, **changes)


@asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[Daemon]:
    """Run the daemon in a task for the duration of the block; stop and await it after."""
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.serve(stop))
    daemon.serve_task = task  # type: ignore[attr-defined]  # lets tests check it still serves
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        yield daemon
    finally:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            stacks = "\n".join(
                f"{t.get_name()}: {t.get_stack(limit=8)}"
                for t in asyncio.all_tasks()
                if not t.done()
            )
            task.cancel()
            raise AssertionError(f"daemon did not stop within 10 s; tasks:\n{stacks}")
        task.result()


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.02
) -> float:
    """Poll until ``check`` is true; returns the seconds it took. Fails with the timeout."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            last = MISMATCHES[-1] if MISMATCHES else ""
            raise AssertionError(f"condition not met within {timeout}s {last}")
        await asyncio.sleep(interval)


async def state_of(store: StateStore, server_ip: str) -> ServerState | None:
    return await store.server(server_ip)


async def health_is(store: StateStore, server_ip: str, health: Health) -> bool:
    state = await store.server(server_ip)
    return state is not None and state.meta.health is health


def sim_counts(sim: SimAsterisk) -> dict[str, int]:
    """The simulator's own channel counts, by our class names."""
    counts = {"trunk": 0, "agent": 0, "local": 0, "other": 0}
    for channel in sim.channels.values():
        counts[channel.kind] += 1
    return counts


MISMATCHES: list[str] = []


async def store_matches_sim(store: StateStore, sim: SimAsterisk) -> bool:
    """Same Uniqueids, and class counts equal to the simulator's (the last difference is kept)."""
    channels = await store.channels(sim.server_ip)
    if set(channels) != set(sim.channels):
        MISMATCHES.append(
            f"{sim.server_ip}: only tracked {sorted(set(channels) - set(sim.channels))}, "
            f"only simulated {sorted(set(sim.channels) - set(channels))}"
        )
        return False
    state = await store.server(sim.server_ip)
    if state is None:
        return False
    expected = sim_counts(sim)
    return all(state.count(ChannelClass(k)) == v for k, v in expected.items())
