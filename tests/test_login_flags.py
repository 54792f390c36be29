"""The login-flag keeper against real MariaDB: a store whose health we set, then a live daemon."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import pytest_asyncio
from click.testing import CliRunner
from conftest import execute, fetchall
from tracking_helpers import FAST_HEALTH, eventually, health_is, make_config, running, seed_server

from balancer.agents.flag_rules import FlagAction, FlagChange
from balancer.agents.login_flags import LoginFlagKeeper, flag_settings
from balancer.cli.app import main
from balancer.config import AgentsConfig, Config, HealthConfig
from balancer.daemon import Daemon
from balancer.db import agents as db_agents
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.db.worker import DbWorker
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health, ServerMeta, StateStore
from balancer.store.memory import MemoryStore
from balancer.store.redis import RedisStore

IPS = ("10.10.0.1", "10.10.0.2", "10.10.0.3")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def add_server(db: Connection, ip: str, login: str = "Y") -> None:
    execute(
        db,
        "INSERT INTO servers (server_id, server_ip, active, active_agent_login_server)"
        " VALUES (%s, %s, 'Y', %s)",
        "ast" + ip[-1],
        ip,
        login,
    )


def set_agents(db: Connection, ip: str, count: int, first: int = 0) -> None:
    """``count`` agents on the server, users u<first>... (two servers' users must differ)."""
    execute(db, "DELETE FROM vicidial_live_agents WHERE server_ip = %s", ip)
    for i in range(first, first + count):
        execute(
            db,
            "INSERT INTO vicidial_live_agents (user, server_ip, extension, campaign_id)"
            " VALUES (%s, %s, %s, 'CAMP1')",
            f"u{i}",
            ip,
            f"SIP/{i}",
        )


def flags(db: Connection) -> dict[str, str | None]:
    rows = fetchall(db, "SELECT server_ip, active_agent_login_server AS f FROM servers")
    return {str(r["server_ip"]): None if r["f"] is None else str(r["f"]) for r in rows}


def records(db: Connection) -> dict[str, tuple[str, str | None]]:
    rows = fetchall(db, "SELECT server_ip, set_to, previous FROM vb_login_flags")
    return {str(r["server_ip"]): (str(r["set_to"]), r["previous"]) for r in rows}  # type: ignore[misc]


def flag_log(db: Connection) -> list[tuple[str, str]]:
    rows = fetchall(
        db, "SELECT server_ip, outcome FROM vb_decision_log WHERE kind = 'login_flag' ORDER BY id"
    )
    return [(str(r["server_ip"]), str(r["outcome"])) for r in rows]


async def set_health(store: StateStore, ip: str, health: Health, reason: str = "") -> None:
    await store.set_meta(
        ip, ServerMeta(server_id="ast" + ip[-1], health=health, health_reason=reason)
    )


def unit_config(database_url: DatabaseUrl, **agents: object) -> Config:
    # heartbeat 1 s x 2 misses: settle 2 s; startup grace 1 s connect + 3 s.
    return make_config(
        database_url,
        health=HealthConfig(heartbeat_interval_s=1.0, heartbeat_misses=2),
        agents=AgentsConfig(default_capacity=10, hysteresis_pct=20.0, **agents),  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture
async def worker(database_url: DatabaseUrl) -> AsyncIterator[DbWorker]:
    db = DbWorker(database_url)
    yield db
    await db.close()


def actions(changes: list[FlagChange]) -> list[tuple[str, FlagAction]]:
    return [(c.server_ip, c.action) for c in changes]


# --------------------------------------------------------------------------- keeper, store by hand


async def test_down_closes_and_recovery_reopens_after_settle(
    db: Connection, database_url: DatabaseUrl, worker: DbWorker
) -> None:
    for ip in IPS:
        add_server(db, ip)
    execute(db, "UPDATE servers SET active_agent_login_server = 'N' WHERE server_ip = '10.10.0.3'")
    store = MemoryStore(30)
    clock = Clock()
    keeper = LoginFlagKeeper(unit_config(database_url), store, worker, clock=clock)
    for ip in IPS:
        await set_health(store, ip, Health.UP)
    assert await keeper.reconcile_once() == []

    await set_health(store, "10.10.0.1", Health.DOWN, "connection closed")
    await set_health(store, "10.10.0.3", Health.DOWN, "connection closed")
    changed = await keeper.reconcile_once()
    assert actions(changed) == [("10.10.0.1", FlagAction.CLOSE)]
    assert changed[0].reason == "DOWN (connection closed)"
    assert flags(db) == {"10.10.0.1": "N", "10.10.0.2": "Y", "10.10.0.3": "N"}
    assert records(db) == {"10.10.0.1": ("N", "Y")}
    assert flag_log(db) == [("10.10.0.1", "closed")]
    assert await keeper.reconcile_once() == []  # nothing more to do

    # Back UP: held closed until UP for the settle time (2 s), then re-opened.
    await set_health(store, "10.10.0.1", Health.UP)
    await set_health(store, "10.10.0.3", Health.UP)
    assert await keeper.reconcile_once() == []
    clock.now += 1.0
    assert await keeper.reconcile_once() == []
    # A bounce (SUSPECT) restarts the settle time.
    await set_health(store, "10.10.0.1", Health.SUSPECT)
    assert await keeper.reconcile_once() == []
    await set_health(store, "10.10.0.1", Health.UP)
    await keeper.reconcile_once()
    clock.now += 1.5
    assert await keeper.reconcile_once() == []
    clock.now += 0.5
    assert actions(await keeper.reconcile_once()) == [("10.10.0.1", FlagAction.REOPEN)]
    # The admin's own 'N' on 10.10.0.3 was never touched, DOWN or UP.
    assert flags(db) == {"10.10.0.1": "Y", "10.10.0.2": "Y", "10.10.0.3": "N"}
    assert records(db) == {}
    assert flag_log(db) == [("10.10.0.1", "closed"), ("10.10.0.1", "reopened")]


async def test_capacity_with_hysteresis_and_drain(
    db: Connection, database_url: DatabaseUrl, worker: DbWorker
) -> None:
    add_server(db, "10.10.0.1")
    add_server(db, "10.10.0.2")
    store = MemoryStore(30)
    clock = Clock()
    config = unit_config(database_url, capacity={"10.10.0.2": 4})
    keeper = LoginFlagKeeper(config, store, worker, clock=clock)
    await set_health(store, "10.10.0.1", Health.UP)
    await set_health(store, "10.10.0.2", Health.UP)
    set_agents(db, "10.10.0.1", 9)
    set_agents(db, "10.10.0.2", 4)  # its own capacity: 4
    assert actions(await keeper.reconcile_once()) == [("10.10.0.2", FlagAction.CLOSE)]
    clock.now += 10  # both UP for longer than the settle time from here on
    set_agents(db, "10.10.0.1", 10)
    [change] = await keeper.reconcile_once()
    assert (change.server_ip, change.reason) == ("10.10.0.1", "at agent capacity (10/10)")
    # 20 % hysteresis: capacity 10 re-opens at 8, capacity 4 at 3.
    set_agents(db, "10.10.0.1", 9)
    set_agents(db, "10.10.0.2", 3)
    assert actions(await keeper.reconcile_once()) == [("10.10.0.2", FlagAction.REOPEN)]
    set_agents(db, "10.10.0.1", 8)
    assert actions(await keeper.reconcile_once()) == [("10.10.0.1", FlagAction.REOPEN)]
    assert flags(db) == {"10.10.0.1": "Y", "10.10.0.2": "Y"}

    # DRAINED closes (even a server the store has no fresh state for); undrain re-opens.
    await store.set_drained("10.10.0.1", True)
    [change] = await keeper.reconcile_once()
    assert (change.action, change.reason) == (FlagAction.CLOSE, "DRAINED")
    await store.set_drained("10.10.0.1", False)
    assert actions(await keeper.reconcile_once()) == [("10.10.0.1", FlagAction.REOPEN)]
    assert records(db) == {}


async def test_readme_example_full_server_closed_then_reopened_by_the_hysteresis(
    db: Connection, database_url: DatabaseUrl, worker: DbWorker, redis_db: str, tmp_path: Path
) -> None:
    """README, "Login flags": capacity 20, hysteresis 10 %. The 20th agent closes ast2's flag,
    the agent screen (mode "vicidial") stops choosing it, `status` says why; 19 agents keep it
    closed, 18 re-open it."""
    for ip in ("10.10.0.1", "10.10.0.2"):
        add_server(db, ip)
        execute(db, "INSERT INTO server_updater (server_ip, last_update) VALUES (%s, NOW())", ip)
        execute(
            db,
            "INSERT INTO vicidial_conferences (conf_exten, server_ip, extension)"
            " VALUES (8600051, %s, '')",
            ip,
        )
        execute(
            db,
            "INSERT INTO phones (extension, server_ip, login, pass, active, protocol)"
            " VALUES (%s, %s, %s, 'x', 'Y', 'SIP')",
            "10" + ip[-1],
            ip,
            "10" + ip[-1],
        )
    execute(db, "INSERT INTO phones_alias (alias_id, logins_list) VALUES ('agent7', '101,102')")
    prefix = "vbflags:"
    store = RedisStore(redis_db, prefix, state_ttl_s=30)
    clock = Clock()
    config = make_config(
        database_url,
        redis_url=redis_db,
        prefix=prefix,
        health=HealthConfig(heartbeat_interval_s=1.0, heartbeat_misses=2),
        agents=AgentsConfig(default_capacity=20, hysteresis_pct=10.0),
    )
    keeper = LoginFlagKeeper(config, store, worker, clock=clock)
    toml = tmp_path / "vb.toml"
    toml.write_text(
        f'[database]\nurl = "{database_url.unmasked()}"\n'
        f'[redis]\nurl = "{redis_db}"\nkey_prefix = "{prefix}"\n[agents]\nmode = "vicidial"\n'
    )

    async def cli(*args: str) -> str:
        # The commands run their own event loop: off this one.
        invoke = partial(CliRunner().invoke, main, ["--config", str(toml), *args])
        result = await asyncio.to_thread(invoke)
        assert result.exception is None or isinstance(result.exception, SystemExit), result
        return result.output

    try:
        for ip in ("10.10.0.1", "10.10.0.2"):
            await set_health(store, ip, Health.UP)
        await store.touch_daemon("test-daemon", 60)
        set_agents(db, "10.10.0.1", 19)
        set_agents(db, "10.10.0.2", 19, first=100)
        assert await keeper.reconcile_once() == []
        clock.now += 10  # UP for longer than the settle time (1 s x 2 misses) from here on
        assert "LOGIN FLAGS: the balancer holds none closed" in await cli("status")

        # The 20th agent on ast2: full, its flag closed.
        set_agents(db, "10.10.0.2", 20, first=100)
        [change] = await keeper.reconcile_once()
        assert (change.action, change.reason) == (FlagAction.CLOSE, "at agent capacity (20/20)")
        assert flags(db)["10.10.0.2"] == "N"
        # VICIdial's agent screen skips it now (mode "vicidial" shows the screen's own pick).
        picked = await cli("assign-phone", "agent7", "--json")
        assert '"login": "101"' in picked
        assert "skipped 10.10.0.2: agent logins off (active_agent_login_server='N')" in picked
        table = await cli("status")
        assert (
            "LOGIN FLAGS: the balancer holds 1 closed (active_agent_login_server='N', checked"
            in table
        )
        row = next(line for line in table.splitlines() if line.startswith("10.10.0.2  ast2"))
        assert row.split()[4:] == ["at", "agent", "capacity", "(20/20)"] * 2

        # One agent logs out: 19/20 is below capacity but above the re-open mark (18).
        set_agents(db, "10.10.0.2", 19, first=100)
        assert await keeper.reconcile_once() == []
        row = next(
            line for line in (await cli("status")).splitlines() if line.startswith("10.10.0.2")
        )
        assert row.endswith("at agent capacity (20/20)  19/20 agents, re-opens at 18")

        # Another: 18/20, re-opened to the admin's 'Y'; the record is gone.
        set_agents(db, "10.10.0.2", 18, first=100)
        [change] = await keeper.reconcile_once()
        assert (change.action, change.reason) == (FlagAction.REOPEN, "UP, 18/20 agents")
        assert flags(db)["10.10.0.2"] == "Y" and records(db) == {}
        assert flag_log(db) == [("10.10.0.2", "closed"), ("10.10.0.2", "reopened")]
        assert "LOGIN FLAGS: the balancer holds none closed" in await cli("status")
        assert '"login": "102"' in await cli("assign-phone", "agent7", "--json")  # 18 < 19
    finally:
        await store.close()


async def test_startup_grace_and_admin_overrides(
    db: Connection, database_url: DatabaseUrl, worker: DbWorker
) -> None:
    add_server(db, "10.10.0.1")
    add_server(db, "10.10.0.2")
    store = MemoryStore(30)
    clock = Clock()
    keeper = LoginFlagKeeper(unit_config(database_url), store, worker, clock=clock)
    # A fresh daemon reports DOWN ("not connected yet") until it logs in: not acted on at once.
    await set_health(store, "10.10.0.1", Health.DOWN, "not connected yet")
    await set_health(store, "10.10.0.2", Health.UP)
    assert await keeper.reconcile_once() == []
    clock.now += 4.0  # grace: connect timeout 1 s + 3 heartbeats
    assert actions(await keeper.reconcile_once()) == [("10.10.0.1", FlagAction.CLOSE)]

    # The admin re-opens it by hand while it is still DOWN: the keeper closes it again.
    execute(db, "UPDATE servers SET active_agent_login_server = 'Y' WHERE server_ip = '10.10.0.1'")
    assert actions(await keeper.reconcile_once()) == [("10.10.0.1", FlagAction.CLOSE)]
    # Once UP, an admin 'Y' with the keeper's record left over: the record is released.
    await set_health(store, "10.10.0.1", Health.UP)
    execute(db, "UPDATE servers SET active_agent_login_server = 'Y' WHERE server_ip = '10.10.0.1'")
    assert actions(await keeper.reconcile_once()) == [("10.10.0.1", FlagAction.RELEASE)]
    assert records(db) == {}
    # The admin then sets 'N' on an UP server: it stays 'N' for good.
    execute(db, "UPDATE servers SET active_agent_login_server = 'N' WHERE server_ip = '10.10.0.1'")
    clock.now += 100
    assert await keeper.reconcile_once() == []
    assert await keeper.reconcile_once(final=True) == []
    assert flags(db)["10.10.0.1"] == "N"

    # A record whose server row is gone is forgotten.
    execute(
        db, "INSERT INTO vb_login_flags (server_ip, set_to, previous) VALUES ('10.9.9.9', 'N', 'Y')"
    )
    assert actions(await keeper.reconcile_once()) == [("10.9.9.9", FlagAction.RELEASE)]
    assert flag_log(db)[-1] == ("10.9.9.9", "released")


async def test_writes_recheck_under_lock(db: Connection) -> None:
    """A decision that went stale before its write changes nothing (no admin 'N' overwritten)."""
    add_server(db, "10.10.0.1", login="N")  # the admin's
    add_server(db, "10.10.0.2")
    assert not db_agents.close_login_flag(db, "10.10.0.1", "DOWN")
    assert not db_agents.reopen_login_flag(db, "10.10.0.1", "UP")  # not the balancer's 'N'
    assert not db_agents.release_login_flag(db, "10.10.0.1", "x")
    assert db_agents.close_login_flag(db, "10.10.0.2", "DOWN")
    assert not db_agents.close_login_flag(db, "10.10.0.2", "DOWN")  # already closed
    assert not db_agents.release_login_flag(db, "10.10.0.2", "x")  # still ours
    assert db_agents.reopen_login_flag(db, "10.10.0.2", "UP")
    assert flags(db) == {"10.10.0.1": "N", "10.10.0.2": "Y"}
    assert records(db) == {}
    assert not db_agents.close_login_flag(db, "10.9.9.9", "unknown server")
    assert db.get_autocommit()  # every transaction ended


async def test_run_final_pass_switch_and_leader(
    db: Connection, database_url: DatabaseUrl, worker: DbWorker
) -> None:
    add_server(db, "10.10.0.1")
    add_server(db, "10.10.0.2")
    store = MemoryStore(30)
    await set_health(store, "10.10.0.1", Health.UP)
    await set_health(store, "10.10.0.2", Health.DOWN, "connection closed")
    set_agents(db, "10.10.0.1", 10)
    config = unit_config(database_url)

    # Not the leader: nothing is written.
    follower = LoginFlagKeeper(config, store, worker, is_leader=lambda: False)
    follower.startup_grace_s = 0
    assert await follower.reconcile_once() == []

    keeper = LoginFlagKeeper(config, store, worker, interval_s=0.05)
    keeper.startup_grace_s = 0
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))
    await eventually(lambda: _async(flags(db) == {"10.10.0.1": "N", "10.10.0.2": "N"}), 3)
    # At shutdown the flags say what is true now: 9/10 re-opens (no hysteresis, no settle);
    # the DOWN server stays closed.
    set_agents(db, "10.10.0.1", 9)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert flags(db) == {"10.10.0.1": "Y", "10.10.0.2": "N"}
    assert records(db) == {"10.10.0.2": ("N", "Y")}

    # manage_login_flags off: run() returns at once and writes nothing.
    await set_health(store, "10.10.0.2", Health.UP)
    off = replace(config, agents=replace(config.agents, manage_login_flags=False))
    idle = LoginFlagKeeper(off, store, worker)
    await asyncio.wait_for(idle.run(asyncio.Event()), 1)
    assert idle.passes == 0 and flags(db)["10.10.0.2"] == "N"


async def _async(value: bool) -> bool:
    return value


def test_flag_settings_from_config(database_url: DatabaseUrl) -> None:
    config = unit_config(database_url)
    settings = flag_settings(config)
    assert (settings.hysteresis_pct, settings.settle_s, settings.updater_max_age_s) == (20, 2, 60)
    off = replace(config, health=replace(config.health, check_server_updater=False))
    assert flag_settings(off).updater_max_age_s is None


# --------------------------------------------------------------------------- end to end


@pytest_asyncio.fixture
async def sims() -> AsyncIterator[list[SimAsterisk]]:
    servers = [SimAsterisk(ip) for ip in IPS]
    for sim in servers:
        await sim.start()
    yield servers
    for sim in servers:
        await sim.stop()


@pytest.mark.slow
async def test_daemon_down_flips_flag_and_recovery_restores_it(
    db: Connection, database_url: DatabaseUrl, sims: list[SimAsterisk]
) -> None:
    for sim in sims:
        seed_server(db, sim)
    execute(db, "UPDATE servers SET active_agent_login_server = 'N' WHERE server_ip = '10.10.0.3'")
    health = replace(FAST_HEALTH, heartbeat_interval_s=0.2)  # heartbeat 0.2 s x 2
    config = make_config(database_url, health=health)
    daemon = Daemon(config)
    keeper_db = DbWorker(database_url)
    stop = asyncio.Event()
    try:
        async with running(daemon):
            store = daemon.store
            keeper = LoginFlagKeeper(config, store, keeper_db)
            task = asyncio.create_task(keeper.run(stop))
            for ip in IPS:
                await eventually(partial(health_is, store, ip, Health.UP))
            await asyncio.sleep(0.3)
            assert flags(db) == {"10.10.0.1": "Y", "10.10.0.2": "Y", "10.10.0.3": "N"}

            async def flag_is(ip: str, value: str) -> bool:
                return (await asyncio.to_thread(flags, db))[ip] == value

            # A closed connection is DOWN; the flag follows (how fast: bench/detect.py).
            await sims[0].stop()
            await eventually(lambda: flag_is("10.10.0.1", "N"), timeout=15)
            # The admin's 'N' server goes DOWN too: it is not the keeper's, so no record.
            await sims[2].stop()
            await eventually(lambda: health_is(store, "10.10.0.3", Health.DOWN), timeout=15)
            await asyncio.sleep(0.5)
            assert records(db) == {"10.10.0.1": ("N", "Y")}

            # Recovery: reconnect (backoff <= 0.5 s), then UP for the settle time (0.4 s).
            await sims[0].start()
            await sims[2].start()
            await eventually(lambda: flag_is("10.10.0.1", "Y"), timeout=20)
            await eventually(lambda: health_is(store, "10.10.0.3", Health.UP), timeout=15)
            assert flags(db) == {"10.10.0.1": "Y", "10.10.0.2": "Y", "10.10.0.3": "N"}
            assert records(db) == {}

            # At shutdown the flags stay as the live truth says: a DOWN server stays closed.
            await sims[1].stop()
            await eventually(lambda: flag_is("10.10.0.2", "N"), timeout=15)
            stop.set()
            await asyncio.wait_for(task, 15)
        assert flags(db) == {"10.10.0.1": "Y", "10.10.0.2": "N", "10.10.0.3": "N"}
        assert flag_log(db) == [
            ("10.10.0.1", "closed"),
            ("10.10.0.1", "reopened"),
            ("10.10.0.2", "closed"),
        ]
    finally:
        stop.set()
        await keeper_db.close()
