"""The command line end to end: `run` in a real process seen by `status` from another, signals,
`schema install/check`, `sim`, `demo`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from click.testing import CliRunner
from fixtures_sim import RawAmiClient
from tracking_helpers import seed_phones, seed_server

from balancer.cli.app import main
from balancer.db.connection import Connection, connect, connect_server
from balancer.db.url import DatabaseUrl
from balancer.sim.server import SimAsterisk

VICI = [sys.executable, "-m", "balancer.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    tmp_path: Path, db: DatabaseUrl, redis_url: str, prefix: str, metrics_port: int = 0
) -> Path:
    path = tmp_path / "vici-balancer.toml"
    metrics = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n' if metrics_port else ""
    path.write_text(
        metrics
        + f"""
[database]
url = "{db.unmasked()}"
[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
state_ttl_s = 3
[ami]
address_policy = "telnet_host"
registry_refresh_s = 0.5
reconnect_initial_s = 0.1
reconnect_max_s = 0.5
[health]
heartbeat_interval_s = 0.3
[[carriers]]
id = "alpha"
dial_prefix = "9"
"""
    )
    return path


@pytest_asyncio.fixture
async def two_sims() -> AsyncIterator[list[SimAsterisk]]:
    sims = [SimAsterisk(f"10.10.0.{i}", call_duration_s=60) for i in (1, 2)]
    for sim in sims:
        await sim.start()
    yield sims
    for sim in sims:
        await sim.stop()


async def test_run_daemon_seen_by_status_in_another_process_then_sigterm(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    two_sims: list[SimAsterisk],
) -> None:
    for sim in two_sims:
        seed_server(db, sim, max_trunks=23)
        seed_phones(db, sim.server_ip, ["101"])
    metrics_port = free_port()
    config = write_config(tmp_path, database_url, redis_db, "vbcli:", metrics_port)
    env = {**os.environ, "VICI_BALANCER_LOOPBACK_ONLY": "1"}
    proc = subprocess.Popen(
        [*VICI, "--config", str(config), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await two_sims[0].originate("93125550001")
        await two_sims[0].originate("93125550002")
        two_sims[1].add_agent_channel("101")
        runner = CliRunner()
        doc: dict[str, object] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            result = await asyncio.to_thread(
                runner.invoke, main, ["--config", str(config), "status", "--json"]
            )
            doc = json.loads(result.output)
            servers = doc["servers"]
            assert isinstance(servers, list)
            if (
                result.exit_code == 0
                and len(servers) == 2
                and servers[0]["trunk_lines"] == 2
                and servers[1]["agent_phones"] == 1
            ):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"status never showed the live lines: {doc}")
        assert servers[0]["health"] == "up" and servers[0]["max_trunks"] == 23
        assert servers[0]["carriers"] == {"alpha": 2}
        table = await asyncio.to_thread(runner.invoke, main, ["--config", str(config), "status"])
        assert "2/23" in table.output
        # The daemon serves Prometheus metrics on the configured loopback port (configured
        # with the older [metrics] listen key, which still works).
        reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        body = (await asyncio.wait_for(reader.read(), 5)).decode()
        writer.close()
        await writer.wait_closed()
        assert body.startswith("HTTP/1.") and " 200 " in body.splitlines()[0]
        assert 'server_ip="10.10.0.1"' in body and "vici_balancer_server_lines{" in body
        proc.send_signal(signal.SIGTERM)
        # The 30 s wait only ends a hung test; the shutdown deadline is test_lifecycle's.
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0
        assert " stopped after " in proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, stderr = proc.communicate()
    assert "daemon" in stderr and "stopped after" in stderr
    assert f":{database_url.password}@" not in stderr  # no password in the logs
    # After the daemon stopped its heartbeat expires: status reports stale and exits 1.
    await asyncio.sleep(3.2)
    result = await asyncio.to_thread(CliRunner().invoke, main, ["--config", str(config), "status"])
    assert result.exit_code == 1 and "no daemon is tracking" in result.output


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[database]\nurl = "mysql://u:p@127.0.0.1/x"\n[health]\nheartbeat_misses = 0\n')
    proc = subprocess.run(
        [*VICI, "--config", str(path), "run"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "health.heartbeat_misses" in proc.stderr


@pytest.fixture
def scratch_db(database_url: DatabaseUrl) -> object:
    url = database_url.with_database(f"{database_url.database}_cli")
    server = connect_server(database_url)
    with server.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        cur.execute(f"CREATE DATABASE `{url.database}`")
    yield url
    with server.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
    server.close()


def test_schema_install_and_check_commands(scratch_db: DatabaseUrl) -> None:
    runner = CliRunner()
    url = scratch_db.unmasked()
    first = runner.invoke(main, ["schema", "install", "--database-url", url])
    assert first.exit_code == 0, first.output
    assert "created" in first.output and "0 already present" in first.output
    assert f":{scratch_db.password}@" not in first.output and ":***@" in first.output
    second = runner.invoke(main, ["schema", "install", "--database-url", url])
    assert second.exit_code == 0 and ": 0 created" in second.output
    ok = runner.invoke(main, ["schema", "check", "--database-url", url])
    assert ok.exit_code == 0 and "ok" in ok.output
    conn = connect(scratch_db)
    with conn.cursor() as cur:
        cur.execute("ALTER TABLE servers DROP COLUMN max_vicidial_trunks")
        cur.execute("DROP TABLE vicidial_manager")
    conn.close()
    bad = runner.invoke(main, ["schema", "check", "--database-url", url])
    assert bad.exit_code == 1
    assert "max_vicidial_trunks" in bad.output and "vicidial_manager" in bad.output


def test_schema_check_unreachable_database_exits_1() -> None:
    url = f"mysql://u:secretpw@127.0.0.1:{free_port()}/vb_none"
    result = CliRunner().invoke(main, ["schema", "check", "--database-url", url])
    assert result.exit_code == 1
    assert "cannot connect" in result.output and "secretpw" not in result.output


async def test_sim_command_serves_ami(tmp_path: Path) -> None:
    base = free_port()
    proc = await asyncio.create_subprocess_exec(
        *VICI, "sim", "--servers", "1", "--base-port", str(base), stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert line.startswith(f"10.10.0.1 127.0.0.1:{base}") and "1234" not in line
        client = await RawAmiClient.connect("127.0.0.1", base)
        try:
            reply = await client.action("Login", Username="cron", Secret="1234")
            assert reply["Response"] == "Success"
        finally:
            await client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 10)


def test_demo_command_on_a_fresh_database(database_url: DatabaseUrl) -> None:
    """As the first `make demo` runs it: an empty database, and no warning about its tables."""
    fresh = database_url.with_database(f"{database_url.database}_demo")
    server = connect_server(database_url)
    try:
        with server.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{fresh.database}`")
            cur.execute(f"CREATE DATABASE `{fresh.database}`")
        port = free_port()
        args = ["demo", "--database-url", fresh.unmasked(), "--duration", "4"]
        result = CliRunner().invoke(main, [*args, "--refresh", "1", "--http", f"127.0.0.1:{port}"])
        assert result.exit_code == 0, result.output
        assert "10.10.0.3" in result.output and "UP" in result.output
        assert "tracked channels equal the simulators' own" in result.output
        assert f"dashboard: http://127.0.0.1:{port}/" in result.output
        # The demo's own log handler writes to the runner's stderr (it replaces caplog's).
        assert "doesn't exist" not in result.stderr
    finally:
        with server.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{fresh.database}`")
        server.close()


def test_demo_serves_the_dashboard_on_loopback_only() -> None:
    result = CliRunner().invoke(
        main, ["demo", "--database-url", "mysql://u:p@127.0.0.1/vb_x", "--http", "0.0.0.0:9"]
    )
    assert result.exit_code == 2 and "--http" in result.output


def test_demo_refuses_a_real_database() -> None:
    result = CliRunner().invoke(
        main, ["demo", "--database-url", "mysql://cron:1234@127.0.0.1:3306/asterisk"]
    )
    assert result.exit_code == 2
    assert "scratch database" in result.output
