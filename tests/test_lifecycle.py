"""Daemon lifecycle under real signals raised in this process: SIGTERM, SIGINT twice, SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import fetchall
from tracking_helpers import eventually, health_is, seed_server

from balancer.config import load_config
from balancer.daemon import Daemon
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.lifecycle import serve_until_signalled
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health

CONFIG = """
[database]
url = "{db}"
[redis]
url = "{redis}"
key_prefix = "vblife:"
state_ttl_s = 3
[ami]
address_policy = "telnet_host"
registry_refresh_s = 0.5
reconnect_initial_s = 0.1
reconnect_max_s = 0.5
[health]
heartbeat_interval_s = 0.5
[balance]
cycle_interval_s = {cycle}
lock_ttl_s = 2
"""


@pytest_asyncio.fixture
async def sims() -> AsyncIterator[list[SimAsterisk]]:
    servers = [SimAsterisk(f"10.10.0.{i}") for i in (1, 2)]
    for sim in servers:
        await sim.start()
    yield servers
    for sim in servers:
        await sim.stop()


def write(path: Path, database_url: DatabaseUrl, redis_url: str, cycle: float = 2.5) -> None:
    path.write_text(CONFIG.format(db=database_url.unmasked(), redis=redis_url, cycle=cycle))


async def started(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_url: str,
    sims: list[SimAsterisk],
    **kwargs: object,
) -> tuple[Daemon, asyncio.Task[None], Path]:
    for sim in sims:
        seed_server(db, sim)
    path = tmp_path / "vb.toml"
    write(path, database_url, redis_url)
    daemon = Daemon(load_config(path))
    task = asyncio.create_task(serve_until_signalled(daemon, path, **kwargs))  # type: ignore[arg-type]
    await asyncio.wait_for(daemon.ready.wait(), 10)
    for sim in sims:
        await eventually(lambda sim=sim: health_is(daemon.store, sim.server_ip, Health.UP))
    await eventually(lambda: _leading(daemon))
    return daemon, task, path


async def _leading(daemon: Daemon) -> bool:
    return daemon.leadership.leading


async def test_sigterm_shuts_down_in_order(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    sims: list[SimAsterisk],
) -> None:
    daemon, task, _ = await started(tmp_path, db, database_url, redis_db, sims)
    token = daemon.leadership.token
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 30)  # only ends a hung test: the deadline is tested below
    assert not daemon.leadership.leading
    # The lease was released (not left to expire) and every AMI session logged off.
    [lease] = fetchall(db, "SELECT holder, expires_at < NOW(6) AS expired FROM vb_leader")
    assert lease["holder"] != token and lease["expired"] == 1
    await eventually(lambda: _no_clients(sims), timeout=10)
    # The handlers were removed: SIGTERM is back to its default disposition.
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler)


async def _no_clients(sims: list[SimAsterisk]) -> bool:
    return all(sim.client_count == 0 for sim in sims)


async def test_sighup_reloads_without_dropping_sessions(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    sims: list[SimAsterisk],
) -> None:
    daemon, task, path = await started(tmp_path, db, database_url, redis_db, sims)
    logins = [sim.logins for sim in sims]
    write(path, database_url, redis_db, cycle=0.7)
    os.kill(os.getpid(), signal.SIGHUP)

    async def reloaded() -> bool:
        return daemon.config.balance.cycle_interval_s == 0.7

    await eventually(reloaded, timeout=15)
    assert daemon.reloads == 1
    assert daemon.cycle is not None and daemon.cycle.config.balance.cycle_interval_s == 0.7
    await asyncio.sleep(0.5)
    assert [sim.logins for sim in sims] == logins  # no session was dropped
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 30)


async def test_sighup_with_a_bad_file_keeps_the_running_config(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    sims: list[SimAsterisk],
    caplog: pytest.LogCaptureFixture,
) -> None:
    daemon, task, path = await started(tmp_path, db, database_url, redis_db, sims)
    before = daemon.config
    path.write_text(
        path.read_text().replace("heartbeat_interval_s = 0.5", "heartbeat_interval_s = -1")
    )
    with caplog.at_level(logging.ERROR):
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.5)
    assert daemon.config is before and daemon.reloads == 0
    assert any(
        "config reload rejected" in r.getMessage()
        and "health.heartbeat_interval_s" in r.getMessage()
        for r in caplog.records
    )
    assert await health_is(daemon.store, sims[0].server_ip, Health.UP)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 30)


async def test_second_sigint_forces_exit_and_deadline_cuts_a_stuck_shutdown(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    sims: list[SimAsterisk],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forced: list[float] = []
    daemon, task, _ = await started(
        tmp_path,
        db,
        database_url,
        redis_db,
        sims,
        shutdown_timeout_s=1.0,
        force_exit=lambda: forced.append(time.monotonic()),
    )
    original = daemon._shutdown

    async def stuck_shutdown() -> None:
        # e.g. a hung socket: it never finishes by itself, so only the deadline can end it.
        await asyncio.Event().wait()

    monkeypatch.setattr(daemon, "_shutdown", stuck_shutdown)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.1)
    assert len(forced) == 1  # the second SIGINT asked for an immediate exit
    # Without that exit, the deadline (1 s) ends the stuck shutdown; 30 s only ends a hung test.
    await asyncio.wait_for(task, 30)
    await original()  # release what the cut-short shutdown left open
