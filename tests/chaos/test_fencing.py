"""The claim and the fence under contention, on VICIdial's stock engines (and InnoDB for the race):

* the real executor against VICIdial's own dialer claim statement (AST_VDauto_dial.pl's
  ``UPDATE vicidial_hopper ... ORDER BY priority DESC, hopper_id LIMIT n``) in a loop on the
  same hopper, thousands of leads: no lead is claimed by both;
* the same with two balancers contending for a short lease on top, taking it from each other
  mid-cycle: nothing is dialed twice, and each takeover's repair settles the loser's rows;
* split brain: two daemons on one database, each with its own (in-process) store: only one
  epoch writes, and a campaign never gets more calls than one leader would place;
* a paused leader (SIGSTOP past its lease): the standby takes over, and after SIGCONT the old
  one writes nothing more (counted by epoch) and keeps tracking;
* a cron ``rebalance --once`` beside a running daemon with ``memory://``: it places nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import balance_seed as seed
import fixtures_sim
import pytest
from conftest import both_engines, execute, fetchall
from tracking_helpers import eventually, make_config, running

from balancer.balance.executor import NOT_LEADER
from balancer.balance.model import Plan
from balancer.config import BalanceConfig, Config, RedisConfig
from balancer.daemon import Daemon, rebalance_once
from balancer.db import fence as lease
from balancer.db.connection import Connection, connect
from balancer.db.fence import LeaderFence
from balancer.db.repair import repair
from balancer.db.url import DatabaseUrl
from balancer.sim.seed import SeedCampaign, SeedServer, seed_campaigns, seed_servers
from balancer.sim.server import SimAsterisk

VDAD = "VDAD_10.10.0.9"  # VICIdial's dialer on a server of its own


def vicidial_dialer(url: DatabaseUrl, stop: threading.Event, taken: list[int]) -> None:
    """AST_VDauto_dial.pl's claim, in a loop: claim 3, read them back by user, dial (delete)."""
    conn = connect(url)
    try:
        while True:
            with conn.cursor() as cur:
                claimed = cur.execute(
                    "UPDATE vicidial_hopper SET status = 'QUEUE', user = %s"
                    " WHERE campaign_id = 'CAMP1' AND status = 'READY'"
                    " ORDER BY priority DESC, hopper_id LIMIT 3",
                    (VDAD,),
                )
                if claimed:
                    cur.execute(
                        "SELECT lead_id FROM vicidial_hopper WHERE user = %s AND status = 'QUEUE'",
                        (VDAD,),
                    )
                    taken.extend(int(row[0]) for row in cur.fetchall())
                    cur.execute(
                        "DELETE FROM vicidial_hopper WHERE user = %s AND status = 'QUEUE'",
                        (VDAD,),
                    )
                elif stop.is_set():
                    return
            time.sleep(0.001)
    finally:
        conn.close()


def balancer_dialed(db: Connection) -> list[int]:
    return [
        int(str(r["callerid"])[-10:]) for r in fetchall(db, "SELECT callerid FROM vicidial_manager")
    ]


@pytest.fixture(params=["stock", "innodb"])
def engine_url(request: pytest.FixtureRequest) -> DatabaseUrl:
    return both_engines(request)


@pytest.fixture
def engine_db(engine_url: DatabaseUrl) -> Iterator[Connection]:
    conn = connect(engine_url)
    with conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        for (table,) in cur.fetchall():
            if table != "vb_schema_version":
                cur.execute(f"DELETE FROM `{table}`")
    yield conn
    conn.close()


def seed_hopper(db: Connection, leads: int) -> None:
    seed.server(db, "10.10.0.1", max_vicidial_trunks=10_000)
    seed.server(db, "10.10.0.2", max_vicidial_trunks=10_000)
    seed.campaign(db)
    seed.lead_list(db)
    seed.leads(db, leads)


def big_plan(calls: int) -> Plan:
    return seed.one_placement("CAMP1", "10.10.0.1", calls)


def test_the_executor_against_vicidials_own_claims(
    engine_db: Connection, engine_url: DatabaseUrl
) -> None:
    leads = 2000
    seed_hopper(engine_db, leads)
    stop = threading.Event()
    taken: list[int] = []
    dialer = threading.Thread(target=vicidial_dialer, args=(engine_url, stop, taken))
    dialer.start()
    try:
        fence = seed.take_lease(engine_db)
        for _ in range(200):
            report = seed.execute_plan(engine_db, big_plan(40), fence=fence)
            assert not report.errors, report.errors
            if seed.count(engine_db, "vicidial_hopper", "status = 'READY'") == 0:
                break
    finally:
        stop.set()
        dialer.join(60)
    ours = balancer_dialed(engine_db)
    assert ours and taken, "both sides must have dialed for the race to mean anything"
    assert len(ours) == len(set(ours)) and len(taken) == len(set(taken))
    assert set(ours).isdisjoint(taken), "a lead was claimed by both"
    assert set(ours) | set(taken) == set(range(1, leads + 1))
    assert seed.count(engine_db, "vicidial_hopper") == 0


def test_two_balancers_taking_the_lease_from_each_other_and_vicidial(
    engine_db: Connection, engine_url: DatabaseUrl
) -> None:
    leads = 1500
    seed_hopper(engine_db, leads)
    stop = threading.Event()
    taken: list[int] = []
    errors: list[BaseException] = []
    epochs: list[set[int]] = [set(), set()]

    def balancer(index: int) -> None:
        conn = connect(engine_url)
        try:
            while not stop.is_set():
                # a lease far shorter than a cycle: the other one takes it over mid-cycle
                epoch = lease.take(conn, f"balancer-{index}", 0.05)
                if epoch is None:
                    time.sleep(0.01)
                    continue
                epochs[index].add(epoch)
                fence = LeaderFence(lease.BALANCE_LEASE, epoch)
                seed.execute_plan(conn, big_plan(30), fence=fence)
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=balancer, args=(i,)) for i in (0, 1)]
    dialer = threading.Thread(target=vicidial_dialer, args=(engine_url, stop, taken))
    for thread in (*threads, dialer):
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if seed.count(engine_db, "vicidial_hopper", "status = 'READY'") == 0:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in (*threads, dialer):
            thread.join(60)
    assert not errors, errors
    assert epochs[0] and epochs[1], "both balancers must have led at some point"
    assert epochs[0].isdisjoint(epochs[1]), "two balancers held the same epoch"
    # a new leader (the others stopped renewing) repairs whatever a takeover cut short
    execute(engine_db, "UPDATE vb_leader SET expires_at = NOW(6) - INTERVAL 1 SECOND")
    final = seed.take_lease(engine_db, "final")
    repair(engine_db, final, seed.snapshot(engine_db).servers, lambda _now: False)
    ours = balancer_dialed(engine_db)
    assert len(ours) == len(set(ours)), "a lead was dialed twice by the balancers"
    assert set(ours).isdisjoint(taken), "a lead was claimed by a balancer and by VICIdial"
    claimed = fetchall(
        engine_db, "SELECT lead_id, status FROM vicidial_hopper WHERE status <> 'READY'"
    )
    assert claimed == []
    ready = {
        int(str(r["lead_id"])) for r in fetchall(engine_db, "SELECT lead_id FROM vicidial_hopper")
    }
    assert set(ours) | set(taken) | ready == set(range(1, leads + 1))
    calls = {
        str(r["callerid"]) for r in fetchall(engine_db, "SELECT callerid FROM vicidial_auto_calls")
    }
    codes = {
        str(r["callerid"]) for r in fetchall(engine_db, "SELECT callerid FROM vicidial_manager")
    }
    assert calls == codes, "an Originate without its call row, or a call row never dialed"


# --------------------------------------------------------------------------- daemons

IPS = ("10.10.0.1", "10.10.0.2", "10.10.0.3")


async def start_cluster(stack: contextlib.AsyncExitStack, url: DatabaseUrl) -> list[SimAsterisk]:
    return await fixtures_sim.start_cluster(stack, url, IPS, max_lines=200, call_duration_s=60)


def memory_config(url: DatabaseUrl, **balance: object) -> Config:
    config = make_config(url, redis_url="memory://", prefix="vbfence:")
    settings = {"enabled": True, "cycle_interval_s": 0.2, "lock_ttl_s": 1.0, **balance}
    return replace(
        config,
        redis=RedisConfig(url="memory://"),
        balance=BalanceConfig(**settings),  # type: ignore[arg-type]
    )


def seed_daemons(db: Connection, sims: list[SimAsterisk], shortage: int, leads: int = 400) -> None:
    seed_servers(db, [SeedServer(s.server_ip, s.host, s.port, max_trunks=200) for s in sims])
    seed_campaigns(
        db,
        [SeedCampaign("CAMPF", leads=leads, agents_on=IPS[0], shortages={IPS[0]: shortage})],
        calls_per_second=50,
    )


def outbalance(db: Connection) -> int:
    rows = fetchall(
        db, "SELECT COUNT(*) AS n FROM vicidial_auto_calls WHERE call_type = 'OUTBALANCE'"
    )
    return int(str(rows[0]["n"]))


def epochs_writing(db: Connection) -> dict[int, int]:
    rows = fetchall(
        db,
        "SELECT epoch, COUNT(*) AS n FROM vb_decision_log WHERE epoch IS NOT NULL GROUP BY epoch",
    )
    return {int(str(r["epoch"])): int(str(r["n"])) for r in rows}


async def test_split_brain_two_daemons_each_with_its_own_store(
    db: Connection, database_url: DatabaseUrl
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sims = await start_cluster(stack, database_url)
        seed_daemons(db, sims, shortage=30)
        config = memory_config(database_url)
        first, second = Daemon(config), Daemon(config)  # memory://: two views, one database
        async with running(first), running(second):

            async def filled() -> bool:
                return outbalance(db) >= 30

            await eventually(filled, timeout=30)
            # a few more cycles of both: still exactly what one leader would place
            for _ in range(10):
                await asyncio.sleep(0.2)
                assert outbalance(db) == 30
            leaders = [d for d in (first, second) if d.leadership.leading]
            assert len(leaders) == 1
    assert outbalance(db) == 30
    assert len(epochs_writing(db)) == 1, "two epochs wrote"


SPAWN_CONFIG = """
[database]
url = "{url}"
[redis]
url = "memory://"
[ami]
address_policy = "telnet_host"
registry_refresh_s = 0.5
reconnect_initial_s = 0.1
reconnect_max_s = 0.5
[health]
heartbeat_interval_s = 0.5
[balance]
cycle_interval_s = 0.2
lock_ttl_s = 1.0
"""


def spawn(path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VICI_BALANCER_LOOPBACK_ONLY": "1"}
    with open(path.with_suffix(".log"), "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "balancer.cli", "--config", str(path), "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def holder(db: Connection) -> str:
    rows = fetchall(db, "SELECT holder, epoch FROM vb_leader")
    return str(rows[0]["holder"]) if rows else ""


async def test_a_paused_leader_writes_nothing_after_the_takeover(
    tmp_path: Path, db: Connection, database_url: DatabaseUrl
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sims = await start_cluster(stack, database_url)
        seed_daemons(db, sims, shortage=20, leads=600)
        execute(db, "UPDATE system_settings SET outbound_calls_per_second = 10")  # long cycles
        path = tmp_path / "vb.toml"
        path.write_text(SPAWN_CONFIG.format(url=database_url.unmasked()))
        proc = spawn(path)
        try:

            async def subprocess_leads() -> bool:
                return f":{proc.pid}/" in holder(db) and outbalance(db) >= 3

            await eventually(subprocess_leads, timeout=20)
            old_epoch = int(str(fetchall(db, "SELECT epoch FROM vb_leader")[0]["epoch"]))
            proc.send_signal(signal.SIGSTOP)  # mid-cycle: its lease runs out while it sleeps
            standby = Daemon(memory_config(database_url, lock_ttl_s=1.0))
            async with running(standby):

                async def standby_leads() -> bool:
                    return standby.leadership.leading

                await eventually(standby_leads, timeout=20)
                assert standby.leadership.epoch == old_epoch + 1
                before = epochs_writing(db).get(old_epoch, 0)
                old_calls = fetchall(db, "SELECT COUNT(*) AS n FROM vicidial_manager")[0]["n"]
                proc.send_signal(signal.SIGCONT)
                # more shortage: the new leader places; the old one, awake again, must not
                execute(
                    db,
                    "UPDATE vicidial_campaign_server_stats SET local_trunk_shortage = 40,"
                    " update_time = NOW()",
                )

                async def filled() -> bool:
                    return outbalance(db) >= 40

                await eventually(filled, timeout=30)
                await asyncio.sleep(2.0)  # the old process has had many cycles' time to try
                assert epochs_writing(db).get(old_epoch, 0) == before, "the old epoch wrote"
                assert outbalance(db) == 40, "more calls than one leader places"
                assert proc.poll() is None, "the old daemon must keep running (tracking)"
                assert int(str(old_calls)) <= 40
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log = path.with_suffix(".log").read_text()
    assert "lost leadership" in log or "no longer leader" in log, log[-2000:]
    claimed = fetchall(db, "SELECT lead_id FROM vicidial_hopper WHERE status <> 'READY'")
    assert claimed == []
    codes = [str(r["callerid"]) for r in fetchall(db, "SELECT callerid FROM vicidial_manager")]
    assert len({c[-10:] for c in codes}) == len(codes), "a lead was dialed twice"


async def test_cron_beside_a_daemon_with_memory_places_nothing(
    db: Connection, database_url: DatabaseUrl
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sims = await start_cluster(stack, database_url)
        seed_daemons(db, sims, shortage=10)
        config = memory_config(database_url)
        daemon = Daemon(config)
        async with running(daemon):

            async def leads() -> bool:
                return daemon.leadership.leading and outbalance(db) >= 10

            await eventually(leads, timeout=20)
            execute(
                db,
                "UPDATE vicidial_campaign_server_stats SET local_trunk_shortage = 25,"
                " update_time = NOW()",
            )
            result = await rebalance_once(config)
            assert result.report is None and result.skipped == NOT_LEADER
            assert result.plan.total_calls > 0  # it saw the demand; it was not its to fill
            # only the daemon's epoch ever wrote; the one-shot never took the lease
            assert set(epochs_writing(db)) == {daemon.leadership.epoch}
            assert daemon.leadership.leading  # the daemon kept its lease throughout
