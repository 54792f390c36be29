"""Fault suite: balance traffic running against 3 simulated servers, real MariaDB and Redis.

Each scenario injects one fault mid-run, then checks the same invariants: no lead dialed twice,
no lead left claimed, no call row without its manager row, tracked channel counts exact after a
snapshot, and the daemon still running (or cleanly exited, for SIGTERM). Bounded in time: every
wait has a timeout and each scenario runs a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import pymysql
import pytest_asyncio
from conftest import execute, fetchall
from tracking_helpers import eventually, health_is, make_config, running, store_matches_sim

from balancer.config import BalanceConfig, Config
from balancer.daemon import Daemon
from balancer.db.connection import Connection, connect
from balancer.db.url import DatabaseUrl
from balancer.errors import BalancerError
from balancer.sim.seed import SeedCampaign, SeedServer, seed_campaigns, seed_servers
from balancer.sim.sender import CommandSender
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health

IPS = ("10.10.0.1", "10.10.0.2", "10.10.0.3")
HOLD_S = 1.5  # a balance call's length on the simulated servers


@dataclass
class Cluster:
    sims: list[SimAsterisk]
    senders: list[CommandSender]
    url: DatabaseUrl


async def _janitor(url: DatabaseUrl, stop: asyncio.Event) -> None:
    """VICIdial's side: dialers keep reporting the shortage; ended calls leave auto_calls.
    Like VICIdial's own scripts it reconnects when its connection is killed."""
    conn: Connection | None = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = await asyncio.to_thread(connect, url)
            await asyncio.to_thread(_sweep, conn)
        except (pymysql.err.Error, BalancerError):
            if conn is not None:
                with contextlib.suppress(pymysql.err.Error):
                    conn.close()
            conn = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.3)
    if conn is not None:
        conn.close()


def _sweep(conn: Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("UPDATE vicidial_campaign_server_stats SET update_time = NOW()")
        cur.execute("UPDATE server_updater SET last_update = NOW()")
        cur.execute(
            "DELETE FROM vicidial_auto_calls WHERE call_time < NOW() - INTERVAL %s SECOND",
            (int(HOLD_S) + 1,),
        )


@pytest_asyncio.fixture
async def cluster(db: Connection, database_url: DatabaseUrl) -> AsyncIterator[Cluster]:
    async with AsyncExitStack() as stack:
        sims, senders = [], []
        for ip in IPS:
            sim = SimAsterisk(ip, max_lines=100, call_duration_s=HOLD_S)
            await sim.start()
            stack.push_async_callback(sim.stop)
            sender = CommandSender(sim, database_url, poll_interval_s=0.05)
            await sender.start()
            stack.push_async_callback(sender.stop)
            sims.append(sim)
            senders.append(sender)
        seed_servers(db, [SeedServer(s.server_ip, s.host, s.port, max_trunks=20) for s in sims])
        seed_campaigns(
            db,
            [SeedCampaign("CHAOS", leads=2000, agents_on=IPS[0], shortages={IPS[0]: 12})],
            calls_per_second=40,
        )
        stop = asyncio.Event()
        janitor = asyncio.create_task(_janitor(database_url, stop))

        async def end_janitor() -> None:
            stop.set()
            await janitor

        stack.push_async_callback(end_janitor)
        yield Cluster(sims, senders, database_url)


def chaos_config(url: DatabaseUrl, redis_url: str, prefix: str = "vbchaos:") -> Config:
    config = make_config(url, redis_url=redis_url, prefix=prefix)
    return replace(
        config,
        ami=replace(config.ami, reconcile_interval_s=1.0),
        balance=BalanceConfig(cycle_interval_s=0.3, lock_ttl_s=1.5),
    )


def placed(db: Connection) -> int:
    return int(fetchall(db, "SELECT COUNT(*) AS n FROM vicidial_manager")[0]["n"])  # type: ignore[call-overload]


async def placing(db: Connection, more_than: int) -> bool:
    return placed(db) > more_than


def assert_invariants(db: Connection, *, settled: bool = True) -> None:
    """No lead twice, no call row without its Originate, no lead left claimed.

    While a daemon runs (``settled=False``) one placement may be in flight: its hopper rows are
    claimed by our marker, and its current call may have records but no Originate yet.
    """
    manager = fetchall(db, "SELECT callerid, server_ip FROM vicidial_manager")
    codes = [r["callerid"] for r in manager]
    assert len(codes) == len(set(codes)), "an Originate was written twice"
    leads = [str(c)[-10:] for c in codes]
    assert len(leads) == len(set(leads)), "a lead was dialed twice"
    claimed = fetchall(
        db, "SELECT lead_id, status, user FROM vicidial_hopper WHERE status <> 'READY'"
    )
    in_flight = {f"{int(r['lead_id']):010d}" for r in claimed if r["status"] == "QUEUE"}  # type: ignore[call-overload]
    if settled:
        assert claimed == [], f"leads left claimed: {claimed}"
    else:
        assert all(str(r["user"]).startswith("VB") for r in claimed), claimed

    def unexplained(rows: set[object]) -> set[object]:
        return {c for c in rows - set(codes) if str(c)[-10:] not in in_flight}

    calls = {r["callerid"] for r in fetchall(db, "SELECT callerid FROM vicidial_auto_calls")}
    assert unexplained(calls) == set(), "a call row has no Originate row"
    logged = {r["caller_code"] for r in fetchall(db, "SELECT caller_code FROM vicidial_dial_log")}
    assert unexplained(logged) == set() and set(codes) <= logged, "dial log and Originates disagree"
    ready = {
        int(r["lead_id"])  # type: ignore[call-overload]
        for r in fetchall(db, "SELECT lead_id FROM vicidial_hopper WHERE status = 'READY'")
    }
    assert not {int(lead) for lead in leads} & ready, "a dialed lead is back in the hopper"


async def assert_counts_exact(daemon: Daemon, sims: list[SimAsterisk]) -> None:
    """Counts equal the simulators' after a snapshot, and the daemon is still serving."""
    assert not daemon.serve_task.done(), "the daemon stopped"  # type: ignore[attr-defined]
    for sim in sims:
        daemon.tracker.request_snapshot(sim.server_ip)

    async def exact() -> bool:
        for sim in sims:
            if not await store_matches_sim(daemon.store, sim):
                daemon.tracker.request_snapshot(sim.server_ip)
                return False
        return True

    await eventually(exact, timeout=8, interval=0.1)


async def test_kill_a_server(db: Connection, redis_db: str, cluster: Cluster) -> None:
    daemon = Daemon(chaos_config(cluster.url, redis_db))
    async with running(daemon):
        await eventually(lambda: placing(db, 10), timeout=15)
        await cluster.senders[2].stop()
        await cluster.sims[2].stop()
        await eventually(lambda: health_is(daemon.store, IPS[2], Health.DOWN), timeout=3)
        mark = placed(db)
        await eventually(lambda: placing(db, mark + 10), timeout=15)
        assert_invariants(db, settled=False)
        await assert_counts_exact(daemon, cluster.sims[:2])
    assert_invariants(db)


async def test_hang_a_server(db: Connection, redis_db: str, cluster: Cluster) -> None:
    daemon = Daemon(chaos_config(cluster.url, redis_db))
    async with running(daemon):
        await eventually(lambda: placing(db, 10), timeout=15)
        cluster.sims[1].set_unresponsive(True)
        await eventually(lambda: health_is(daemon.store, IPS[1], Health.DOWN), timeout=4)
        since = fetchall(db, "SELECT NOW(6) AS t")[0]["t"]
        mark = placed(db)
        await eventually(lambda: placing(db, mark + 10), timeout=15)
        late = fetchall(
            db,
            "SELECT COUNT(*) AS n FROM vicidial_manager WHERE server_ip = %s AND entry_date > %s",
            IPS[1],
            since,
        )
        assert late[0]["n"] == 0, "a hung (DOWN) server received calls"
        cluster.sims[1].set_unresponsive(False)
        await eventually(lambda: health_is(daemon.store, IPS[1], Health.UP), timeout=5)
        await assert_counts_exact(daemon, cluster.sims)
    assert_invariants(db)


async def test_garbage_from_one_server(db: Connection, redis_db: str, cluster: Cluster) -> None:
    daemon = Daemon(chaos_config(cluster.url, redis_db))
    async with running(daemon):
        await eventually(lambda: placing(db, 10), timeout=15)
        before = [s.logins for s in cluster.sims]
        await cluster.sims[2].send_garbage()
        await cluster.sims[2].send_big_line()

        async def relogged() -> bool:
            return cluster.sims[2].logins > before[2]

        await eventually(relogged, timeout=5)
        assert [s.logins for s in cluster.sims[:2]] == before[:2]  # the others untouched
        mark = placed(db)
        await eventually(lambda: placing(db, mark + 5), timeout=15)
        await assert_counts_exact(daemon, cluster.sims)
    assert_invariants(db)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("private redis-server did not start")


async def test_restart_redis(db: Connection, cluster: Cluster) -> None:
    """A Redis of this test's own, killed and restarted mid-run (empty afterwards)."""
    port = _free_port()
    redis_proc = _start_redis(port)
    config = chaos_config(cluster.url, f"redis://127.0.0.1:{port}/0")
    daemon = Daemon(config)
    try:
        async with running(daemon):
            await eventually(lambda: placing(db, 10), timeout=15)
            redis_proc.kill()
            redis_proc.wait()
            # The lease lives in the database and stays ours, but without the live view (lines,
            # drain flags) no cycle places a call; the placement in flight has ended by now.
            await asyncio.sleep(1.0)
            mark = placed(db)
            await asyncio.sleep(1.0)
            assert placed(db) == mark
            assert daemon.leadership.leading
            redis_proc = _start_redis(port)
            # The state is rebuilt from snapshots and placing resumes, under the same epoch.
            await eventually(lambda: placing(db, mark + 10), timeout=20)
            await assert_counts_exact(daemon, cluster.sims)
            assert daemon.tracker.store_errors > 0
    finally:
        redis_proc.kill()
        redis_proc.wait()
    assert_invariants(db)


async def test_kill_db_connections_mid_transaction(
    db: Connection, redis_db: str, cluster: Cluster
) -> None:
    execute(db, "UPDATE system_settings SET outbound_calls_per_second = 20")
    daemon = Daemon(chaos_config(cluster.url, redis_db))
    async with running(daemon):
        for _ in range(3):
            mark = placed(db)
            await eventually(lambda mark=mark: placing(db, mark + 3), timeout=15)
            own = fetchall(db, "SELECT CONNECTION_ID() AS id")[0]["id"]
            for row in fetchall(
                db,
                "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> %s"
                " AND user = %s",
                cluster.url.database,
                own,
                cluster.url.user,
            ):
                # The connection may have ended on its own meanwhile.
                with contextlib.suppress(pymysql.err.Error):
                    execute(db, f"KILL {int(row['id'])}")  # type: ignore[call-overload]
        mark = placed(db)
        await eventually(lambda: placing(db, mark + 5), timeout=15)
        await assert_counts_exact(daemon, cluster.sims)
    assert_invariants(db)


def _write_config(path: Path, config: Config) -> None:
    path.write_text(
        f"""
[database]
url = "{config.database.url.unmasked()}"
[redis]
url = "{config.redis.url}"
key_prefix = "{config.redis.key_prefix}"
state_ttl_s = 3
[ami]
address_policy = "telnet_host"
registry_refresh_s = 0.5
reconnect_initial_s = 0.1
reconnect_max_s = 0.5
reconcile_interval_s = 1
[health]
heartbeat_interval_s = 0.5
[balance]
cycle_interval_s = 0.3
lock_ttl_s = 1.5
"""
    )


def _spawn_daemon(config_path: Path) -> subprocess.Popen[bytes]:
    """`vici-balancer run` in its own process; its log goes to <config>.log."""
    env = {**os.environ, "VICI_BALANCER_LOOPBACK_ONLY": "1"}
    with open(config_path.with_suffix(".log"), "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "balancer.cli", "--config", str(config_path), "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def lease_holder(db: Connection) -> str:
    """Who holds the balance lease in vb_leader ('' when released or never taken)."""
    rows = fetchall(db, "SELECT holder, expires_at > NOW(6) AS live FROM vb_leader")
    return str(rows[0]["holder"]) if rows and rows[0]["live"] else ""


async def test_kill_the_leader_while_a_standby_runs(
    tmp_path: Path, db: Connection, redis_db: str, cluster: Cluster
) -> None:
    config = chaos_config(cluster.url, redis_db)
    path = tmp_path / "vb.toml"
    _write_config(path, config)
    leader = _spawn_daemon(path)
    try:

        async def subprocess_leads() -> bool:
            return f":{leader.pid}/" in lease_holder(db)

        await eventually(subprocess_leads, timeout=15)
        standby = Daemon(config)
        async with running(standby):
            await eventually(lambda: placing(db, 10), timeout=15)
            assert not standby.leadership.leading
            leader.send_signal(signal.SIGKILL)  # mid-cycle, mid-call maybe: no cleanup at all
            leader.wait(5)

            async def standby_leads() -> bool:
                return standby.leadership.leading

            # it takes over once the lease expires by the database's clock; its first cycle's
            # repair step finishes or undoes whatever the killed leader left between two writes
            await eventually(standby_leads, timeout=10 * config.balance.lock_ttl_s)
            mark = placed(db)
            await eventually(lambda: placing(db, mark + 10), timeout=15)
            await assert_counts_exact(standby, cluster.sims)
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()
    assert_invariants(db)


async def test_sigterm_mid_cycle(
    tmp_path: Path, db: Connection, redis_db: str, cluster: Cluster
) -> None:
    execute(db, "UPDATE system_settings SET outbound_calls_per_second = 10")  # long cycles
    config = chaos_config(cluster.url, redis_db)
    path = tmp_path / "vb.toml"
    _write_config(path, config)
    proc = _spawn_daemon(path)
    try:
        await eventually(lambda: placing(db, 5), timeout=15)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0
        # The one summary line with counters.
        assert "stopped after" in path.with_suffix(".log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lease_holder(db) == ""  # released, not left to expire
    assert_invariants(db)
