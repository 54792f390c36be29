"""`vici-balancer demo`: the whole tracker against simulated Asterisk servers, on loopback.

Starts N simulated servers with call traffic, seeds their `servers` rows into a scratch database,
runs the real daemon on the in-process store, and prints the status table while it runs. Partway
through, one server stops answering (it goes SUSPECT, then DOWN) and later recovers.
At the end the tracked counts are compared with the simulators' own.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable

from balancer.config import (
    AmiConfig,
    CarrierConfig,
    Config,
    DatabaseConfig,
    HealthConfig,
    RedisConfig,
)
from balancer.daemon import Daemon
from balancer.db import schema
from balancer.db.connection import Connection, connect
from balancer.db.url import DatabaseUrl
from balancer.errors import ConfigError
from balancer.sim.model import SimCarrier
from balancer.sim.server import SimAsterisk
from balancer.sim.traffic import run_traffic
from balancer.status import build_status, render_table
from balancer.store.base import Health

CARRIERS = (SimCarrier("alpha", "9"), SimCarrier("beta", "8", technology="PJSIP"))
AGENT_PEERS = ("101", "102", "103", "104", "105", "106")
DEMO_TABLES = ("servers", "phones", "server_updater", "vicidial_server_carriers")


def demo_config(url: DatabaseUrl) -> Config:
    """Short intervals so that a 20 s demo shows reconnects and snapshots."""
    return Config(
        database=DatabaseConfig(url, "demo"),
        redis=RedisConfig(url="memory://"),
        ami=AmiConfig(
            address_policy="telnet_host",
            reconnect_initial_s=0.5,
            reconnect_max_s=2.0,
            action_timeout_s=2.0,
            registry_refresh_s=2.0,
            reconcile_interval_s=5.0,
        ),
        health=HealthConfig(heartbeat_interval_s=1.0, heartbeat_misses=2),
        carriers=tuple(CarrierConfig(c.name, c.dial_prefix) for c in CARRIERS),
    )


def seed(conn: Connection, sims: list[SimAsterisk]) -> None:
    """Replace the demo's servers, phones, carriers and server_updater rows."""
    with conn.cursor() as cur:
        for table in DEMO_TABLES:
            cur.execute(f"DELETE FROM {table}")  # noqa: S608 - table names are our constants
        for i, sim in enumerate(sims, start=1):
            cur.execute(
                "INSERT INTO servers (server_id, server_ip, active, active_asterisk_server,"
                " telnet_host, telnet_port, ASTmgrUSERNAME, ASTmgrSECRET, max_vicidial_trunks,"
                " asterisk_version, vicidial_balance_active) VALUES"
                " (%s, %s, 'Y', 'Y', %s, %s, 'cron', '1234', %s, '18.21.0', 'Y')",
                (f"demo{i}", sim.server_ip, sim.host, sim.port, 40),
            )
            cur.execute(
                "INSERT INTO server_updater (server_ip, last_update) VALUES (%s, NOW())",
                (sim.server_ip,),
            )
            for peer in AGENT_PEERS:
                cur.execute(
                    "INSERT INTO phones (extension, server_ip, login, pass, active, protocol)"
                    " VALUES (%s, %s, %s, 'demo', 'Y', 'SIP')",
                    (peer, sim.server_ip, f"{peer}{i}"),
                )
        for carrier in CARRIERS:
            cur.execute(
                "INSERT INTO vicidial_server_carriers (carrier_id, carrier_name, protocol,"
                " dialplan_entry, server_ip, active) VALUES (%s, %s, %s, %s, '', 'Y')",
                (
                    carrier.name,
                    carrier.name,
                    carrier.technology,
                    f"exten => _{carrier.dial_prefix}X.,1,Dial({carrier.technology}/"
                    f"${{EXTEN:1}}@{carrier.name},,To)",
                ),
            )


async def _keep_updater_fresh(url: DatabaseUrl, stop: asyncio.Event) -> None:
    """Play VICIdial's per-server updater: touch server_updater every second."""
    conn = await asyncio.to_thread(connect, url)
    try:
        while not stop.is_set():
            await asyncio.to_thread(_touch_updater, conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        conn.close()


def _touch_updater(conn: Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("UPDATE server_updater SET last_update = NOW()")


async def run_demo(
    url: DatabaseUrl,
    duration_s: float = 20.0,
    servers: int = 3,
    refresh_s: float = 2.0,
    echo: Callable[[str], None] = print,
    clear_screen: bool | None = None,
) -> bool:
    """Run the demo; True when the tracked counts ended equal to the simulators' own."""
    if not url.database.startswith("vb_"):
        raise ConfigError(
            f"--database-url: the demo rewrites the servers/phones tables of {url.database!r}; "
            "give it a scratch database whose name starts with 'vb_' (make demo uses vb_demo)"
        )
    clear = sys.stdout.isatty() if clear_screen is None else clear_screen
    sims = [
        SimAsterisk(f"10.10.0.{i}", carriers=CARRIERS, max_lines=40, call_duration_s=8.0)
        for i in range(1, servers + 1)
    ]
    for sim in sims:
        await sim.start()
    conn = await asyncio.to_thread(connect, url)
    try:
        await asyncio.to_thread(schema.install, conn)
        await asyncio.to_thread(seed, conn, sims)
    finally:
        conn.close()

    daemon = Daemon(demo_config(url))
    stop = asyncio.Event()
    traffic_stop = asyncio.Event()
    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(daemon.serve(stop))
            group.create_task(_keep_updater_fresh(url, stop))
            for n, sim in enumerate(sims):
                group.create_task(
                    run_traffic(
                        sim,
                        calls_per_s=3.0 + n,
                        duration_s=duration_s,
                        prefixes=("9", "8"),
                        hold_s=(1.0, 6.0),
                        agent_peers=AGENT_PEERS[: 2 + n],
                    )
                )
            group.create_task(_fault_show(sims[-1], duration_s, traffic_stop))
            await _wait_until_up(daemon, len(sims), timeout_s=min(5.0, duration_s / 2))
            while (elapsed := time.monotonic() - started) < duration_s:
                doc = await build_status(daemon.store, "memory:// (in-process)")
                frame = render_table(doc)
                head = (
                    f"vici-balancer demo: {len(sims)} simulated Asterisk servers on loopback, "
                    f"t={elapsed:4.1f}s of {duration_s:g}s"
                )
                echo(("\x1b[H\x1b[2J" if clear else "") + head + "\n" + frame + "\n")
                await asyncio.sleep(min(refresh_s, max(0.05, duration_s - elapsed)))
            traffic_stop.set()
            ok = await _final_check(daemon, sims, echo)
            stop.set()
    finally:
        for sim in sims:
            await sim.stop()
    return ok


async def _wait_until_up(daemon: Daemon, count: int, timeout_s: float) -> None:
    """Give the daemon a moment to log in everywhere, so the first table is not empty."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = await daemon.store.servers()
        if len([s for s in states if s.meta.health is Health.UP]) >= count:
            return
        await asyncio.sleep(0.05)


async def _fault_show(sim: SimAsterisk, duration_s: float, stop: asyncio.Event) -> None:
    """Make one server stop answering for a while, so the table shows SUSPECT/DOWN and recovery."""
    try:
        await asyncio.wait_for(stop.wait(), duration_s * 0.35)
        return
    except TimeoutError:
        pass
    sim.set_unresponsive(True)
    try:
        await asyncio.wait_for(stop.wait(), max(3.5, duration_s * 0.25))
    except TimeoutError:
        pass
    finally:
        sim.set_unresponsive(False)


async def _final_check(
    daemon: Daemon, sims: list[SimAsterisk], echo: Callable[[str], None]
) -> bool:
    """Wait for the last snapshot to settle, then compare tracked and simulated channels."""
    deadline = time.monotonic() + 10.0
    while True:
        mismatched = []
        for sim in sims:
            tracked = await daemon.store.channels(sim.server_ip)
            if set(tracked) != set(sim.channels):
                mismatched.append(sim.server_ip)
        if not mismatched or time.monotonic() > deadline:
            break
        for sim in sims:
            daemon.tracker.request_snapshot(sim.server_ip)
        await asyncio.sleep(0.5)
    total = sum(len(sim.channels) for sim in sims)
    if mismatched:
        echo(f"demo: tracked channels differ from the simulators' on {', '.join(mismatched)}")
        return False
    echo(f"demo: tracked channels equal the simulators' own ({total} live on {len(sims)} servers)")
    return True
