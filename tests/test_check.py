"""`vici-balancer check` end to end: temp TOML config, real MariaDB and Redis, simulated servers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest_asyncio
from click.testing import CliRunner, Result
from conftest import execute
from tracking_helpers import seed_server

from balancer.ami.endpoint import AmiEndpoint
from balancer.cli.app import main
from balancer.config import ENV_AMI_SECRET, ENV_DATABASE_URL, ENV_REDIS_URL, AmiConfig
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.ops.checks import CheckResult, check_ami_login
from balancer.sim.server import SimAsterisk

AMI_SECRET = "ami-Secret-7f3a"
WRONG_SECRET = "wrong-Secret-9z"
CLEAN_ENV: dict[str, str | None] = {
    ENV_DATABASE_URL: None,
    ENV_REDIS_URL: None,
    ENV_AMI_SECRET: None,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, db: DatabaseUrl, redis_url: str, extra: str = "") -> Path:
    path = tmp_path / "vici-balancer.toml"
    path.write_text(
        f"""
[database]
url = "{db.unmasked()}"
[redis]
url = "{redis_url}"
key_prefix = "vbchk:"
[ami]
address_policy = "telnet_host"
connect_timeout_s = 1
action_timeout_s = 1
{extra}
"""
    )
    return path


async def invoke(config: Path) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, main, ["--config", str(config), "check"], env=CLEAN_ENV
    )


def lines(result: Result, prefix: str) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith(prefix)]


def assert_no_secrets(result: Result, database_url: DatabaseUrl) -> None:
    text = result.output
    for secret in (AMI_SECRET, WRONG_SECRET):
        assert secret not in text
    assert f":{database_url.password}@" not in text
    assert database_url.unmasked() not in text


@pytest_asyncio.fixture
async def sims() -> AsyncIterator[list[SimAsterisk]]:
    servers = [SimAsterisk(f"10.10.0.{i}", secret=AMI_SECRET) for i in (1, 2)]
    for sim in servers:
        await sim.start()
    yield servers
    for sim in servers:
        await sim.stop()


async def test_working_setup_all_ok(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    sims: list[SimAsterisk],
) -> None:
    for sim in sims:
        seed_server(db, sim, secret=AMI_SECRET)
    sims[0].add_agent_channel("101")
    result = await invoke(write_config(tmp_path, database_url, redis_db))
    assert result.exit_code == 0, result.output
    assert lines(result, "ok   config ")
    (mysql_line,) = lines(result, "ok   mysql  ")
    assert mysql_line.startswith(
        f"ok   mysql  {database_url} (schema ok; no leader; write path: ordered fenced writes"
        " + repair, no transactions (MyISAM/MEMORY tables); engines: MEMORY: vicidial_auto_calls,"
        " vicidial_hopper; MyISAM: vb_leader, vicidial_dial_cid_log,"
    ), mysql_line
    assert "***" in str(database_url) or not database_url.password
    (redis_line,) = lines(result, "ok   redis  ")
    # Wherever the test Redis runs (VB_TEST_REDIS_URL): no service port is hard-coded here.
    redis_at = urlsplit(redis_db)
    assert f"{redis_at.hostname}:{redis_at.port or 6379}" in redis_line
    assert "'vbchk:'" in redis_line
    ami = lines(result, "ok   ami    ")
    assert ami == [
        f"ok   ami    10.10.0.1  {sims[0].address} (logged in, AMI 11.0.0, 1 channel)",
        f"ok   ami    10.10.0.2  {sims[1].address} (logged in, AMI 11.0.0, 0 channels)",
    ]
    assert not lines(result, "FAIL")
    assert_no_secrets(result, database_url)
    # the check logs off: no session is left open on the servers
    for sim in sims:
        assert sim.logins == 1


async def test_wrong_ami_secret_fails_naming_the_server(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    sims: list[SimAsterisk],
) -> None:
    seed_server(db, sims[0], secret=AMI_SECRET)
    seed_server(db, sims[1], secret=WRONG_SECRET)
    result = await invoke(write_config(tmp_path, database_url, redis_db))
    assert result.exit_code == 1, result.output
    assert lines(result, "FAIL ami    ") == [
        f"FAIL ami    10.10.0.2  {sims[1].address}: login rejected: Authentication failed"
    ]
    assert len(lines(result, "ok   ami    10.10.0.1  ")) == 1
    assert "1 of 5 checks failed (ami)" in result.output
    assert_no_secrets(result, database_url)


async def test_missing_table_fails_naming_it(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    sims: list[SimAsterisk],
) -> None:
    seed_server(db, sims[0], secret=AMI_SECRET)
    with db.cursor() as cur:
        cur.execute("RENAME TABLE vicidial_hopper TO vb_check_hidden_hopper")
    try:
        result = await invoke(write_config(tmp_path, database_url, redis_db))
    finally:
        with db.cursor() as cur:
            cur.execute("RENAME TABLE vb_check_hidden_hopper TO vicidial_hopper")
    assert result.exit_code == 1, result.output
    (mysql,) = lines(result, "FAIL mysql  ")
    assert "table vicidial_hopper is missing" in mysql
    assert "schema install" in mysql
    assert lines(result, "ok   ami    10.10.0.1  ")  # the servers table was still readable
    assert_no_secrets(result, database_url)


async def test_unreachable_redis_and_server_fail(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    sims: list[SimAsterisk],
) -> None:
    seed_server(db, sims[0], secret=AMI_SECRET)
    seed_server(db, sims[1], secret=AMI_SECRET)
    address = sims[1].address
    await sims[1].stop()
    redis_url = f"redis://:{WRONG_SECRET}@127.0.0.1:{free_port()}/0"
    result = await invoke(write_config(tmp_path, database_url, redis_url))
    assert result.exit_code == 1, result.output
    (redis_line,) = lines(result, "FAIL redis  ")
    assert "unreachable" in redis_line
    assert lines(result, "FAIL ami    ") == [
        f"FAIL ami    10.10.0.2  {address}: cannot connect: Connection refused"
    ]
    assert "2 of 5 checks failed (redis, ami)" in result.output
    assert_no_secrets(result, database_url)


async def test_memory_store_and_no_servers(
    tmp_path: Path, db: Connection, database_url: DatabaseUrl
) -> None:
    result = await invoke(write_config(tmp_path, database_url, "memory://"))
    assert result.exit_code == 1, result.output
    assert lines(result, "ok   redis  memory:// (in-process store")
    (ami,) = lines(result, "FAIL ami    ")
    assert "no servers rows with active='Y'" in ami


async def test_bad_config_exits_2(tmp_path: Path, database_url: DatabaseUrl) -> None:
    config = write_config(tmp_path, database_url, "memory://", extra="bogus_key = 1")
    result = await invoke(config)
    assert result.exit_code == 2
    assert "ami.bogus_key: unknown key" in result.output


async def test_login_check_times_out_on_a_silent_server(sims: list[SimAsterisk]) -> None:
    sims[0].set_unresponsive(True)
    endpoint = AmiEndpoint("10.10.0.1", sims[0].host, sims[0].port, "cron", AMI_SECRET)
    ami = AmiConfig(connect_timeout_s=1, action_timeout_s=0.3)
    result = await check_ami_login(endpoint, ami)
    assert result == CheckResult(
        "ami", False, f"10.10.0.1  {sims[0].address}: no answer to Login within 0.3s"
    )


async def test_a_fence_table_without_table_locks_fails_the_check(
    tmp_path: Path, db: Connection, database_url: DatabaseUrl, redis_db: str
) -> None:
    execute(db, "ALTER TABLE vb_leader ENGINE=InnoDB")
    try:
        result = await invoke(write_config(tmp_path, database_url, redis_db))
    finally:
        execute(db, "ALTER TABLE vb_leader ENGINE=MyISAM")
    (line,) = lines(result, "FAIL mysql ")
    assert "vb_leader is InnoDB: the leader fence needs a table-locking engine" in line
    assert result.exit_code == 1
