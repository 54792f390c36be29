"""`vici-balancer demo`: the whole balancer against simulated Asterisk servers, on loopback.

Starts N simulated servers with background call traffic, each running VICIdial's command sender
(it executes the `vicidial_manager` rows the balancer writes). Seeds a scratch database with the
servers and two campaigns whose dialers report trunk shortages, runs the real daemon (tracking and
balancing) on the in-process store, and prints the status table while it runs. Partway through,
one server stops answering (SUSPECT, then DOWN: it gets no more balance calls) and later recovers.
At the end the tracked counts are compared with the simulators' own, and the balance calls are
checked: every lead dialed once, every call row with its Originate row.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import replace

from balancer.config import (
    AmiConfig,
    BalanceConfig,
    CarrierConfig,
    Config,
    DatabaseConfig,
    HealthConfig,
    HttpConfig,
    RedisConfig,
)
from balancer.daemon import Daemon
from balancer.db import schema
from balancer.db.connection import Connection, connect
from balancer.db.url import DatabaseUrl
from balancer.errors import ConfigError
from balancer.live.status import build_status, render_table
from balancer.sim.model import SimCarrier
from balancer.sim.seed import SeedCampaign, SeedServer, seed_campaigns, seed_servers
from balancer.sim.sender import CommandSender
from balancer.sim.server import SimAsterisk
from balancer.sim.traffic import run_traffic
from balancer.store.base import Health

CARRIERS = (SimCarrier("alpha", "9"), SimCarrier("beta", "8", technology="PJSIP"))
AGENT_PEERS = ("101", "102", "103", "104", "105", "106")
CALL_HOLD_S = 8.0  # how long a balance call lasts on a simulated server


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
        balance=BalanceConfig(cycle_interval_s=1.0, lock_ttl_s=3.0),
        carriers=tuple(CarrierConfig(c.name, c.dial_prefix) for c in CARRIERS),
    )


def seed(conn: Connection, sims: list[SimAsterisk]) -> None:
    """Servers, phones and carriers for the simulators; two campaigns short of lines."""
    seed_servers(
        conn,
        [
            SeedServer(s.server_ip, s.host, s.port, server_id=f"demo{n}", max_trunks=30, rank=1)
            for n, s in enumerate(sims, start=1)
        ],
    )
    with conn.cursor() as cur:
        for i, sim in enumerate(sims, start=1):
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
    first, second = sims[0].server_ip, sims[min(1, len(sims) - 1)].server_ip
    seed_campaigns(
        conn,
        [
            SeedCampaign("CAMPA", leads=400, agents_on=first, shortages={first: 6}),
            SeedCampaign(
                "CAMPB", leads=400, agents_on=second, shortages={second: 4}, dial_prefix="8"
            ),
        ],
        calls_per_second=20,
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
    """VICIdial's side of the loop: updaters report in, dialers keep reporting their shortage,
    and calls that ended leave vicidial_auto_calls (VICIdial's own scripts do that)."""
    with conn.cursor() as cur:
        cur.execute("UPDATE server_updater SET last_update = NOW()")
        cur.execute("UPDATE vicidial_campaign_server_stats SET update_time = NOW()")
        cur.execute(
            "DELETE FROM vicidial_auto_calls WHERE call_type = 'OUTBALANCE'"
            " AND call_time < NOW() - INTERVAL %s SECOND",
            (int(CALL_HOLD_S),),
        )


async def run_demo(
    url: DatabaseUrl,
    duration_s: float = 20.0,
    servers: int = 3,
    refresh_s: float = 2.0,
    echo: Callable[[str], None] = print,
    clear_screen: bool | None = None,
    http: HttpConfig | None = None,
) -> bool:
    """Run the demo; True when the tracked counts ended equal to the simulators' own."""
    if not url.database.startswith("vb_"):
        raise ConfigError(
            f"--database-url: the demo rewrites the servers/phones tables of {url.database!r}; "
            "give it a scratch database whose name starts with 'vb_' (make demo uses vb_demo)"
        )
    clear = sys.stdout.isatty() if clear_screen is None else clear_screen
    sims = [
        SimAsterisk(f"10.10.0.{i}", carriers=CARRIERS, max_lines=40, call_duration_s=CALL_HOLD_S)
        for i in range(1, servers + 1)
    ]
    senders: list[CommandSender] = []
    try:
        for sim in sims:
            await sim.start()
        conn = await asyncio.to_thread(connect, url)
        try:
            await asyncio.to_thread(schema.install, conn)
            await asyncio.to_thread(seed, conn, sims)
        finally:
            conn.close()
        # The command senders poll vicidial_manager: started before the schema exists, each
        # poll of a fresh database warned that the table did not exist.
        senders = [CommandSender(sim, url, poll_interval_s=0.1) for sim in sims]
        for sender in senders:
            await sender.start()
        config = demo_config(url)
        daemon = Daemon(config if http is None else replace(config, http=http))
        stop = asyncio.Event()
        traffic_stop = asyncio.Event()
        started = time.monotonic()
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
                if daemon.http is not None:
                    head += f"\ndashboard: {daemon.http.url}"
                echo(("\x1b[H\x1b[2J" if clear else "") + head + "\n" + frame + "\n")
                await asyncio.sleep(min(refresh_s, max(0.05, duration_s - elapsed)))
            traffic_stop.set()
            # No new calls from here on: what is live must now match what is tracked.
            for sender in senders:
                await sender.stop()
            tracked_ok = await _final_check(daemon, sims, echo)
            stop.set()
        ok = tracked_ok and await asyncio.to_thread(_check_calls, url, echo)
    finally:
        for sender in senders:
            await sender.stop()
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


def _check_calls(url: DatabaseUrl, echo: Callable[[str], None]) -> bool:
    """Every balance call has its Originate row, and no lead was dialed twice."""
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*), COUNT(DISTINCT callerid) FROM vicidial_manager")
            originates, distinct = cur.fetchone() or (0, 0)
            cur.execute("SELECT COUNT(*) FROM vicidial_hopper WHERE status <> 'READY'")
            (claimed,) = cur.fetchone() or (0,)
            cur.execute("SELECT server_ip, COUNT(*) FROM vicidial_manager GROUP BY server_ip")
            per_server = ", ".join(f"{ip}: {n}" for ip, n in sorted(cur.fetchall()))
    finally:
        conn.close()
    ok = bool(originates == distinct and claimed == 0)
    echo(
        f"demo: the balancer placed {originates} calls ({per_server or 'none'}); "
        + ("every lead dialed once, none left claimed" if ok else "INCONSISTENT call rows")
    )
    return ok


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
