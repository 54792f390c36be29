"""The package as an admin installs it: a wheel built from this checkout, installed into a fresh
virtualenv outside it (as the systemd unit assumes, /opt/vici-balancer), then the installed
console script run from elsewhere: its schema, its shipped files, check, one-shot and daemon.
And an unexpected error prints one line naming what failed (the traceback only with --debug).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import fetchall

from balancer.cli.app import main
from balancer.db.connection import connect, connect_server
from balancer.db.url import DatabaseUrl

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The console script of a wheel of this checkout, in a virtualenv of its own."""
    where = tmp_path_factory.mktemp("opt")
    wheels = where / "wheels"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = list(wheels.glob("vici_balancer-*.whl"))
    venv = where / "vici-balancer"
    made = _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    assert made.returncode == 0, made.stderr
    pip = _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv / "bin" / "vici-balancer"


@pytest.fixture
def fresh_db(database_url: DatabaseUrl) -> Iterator[DatabaseUrl]:
    url = database_url.with_database(f"{database_url.database}_pkg")
    server = connect_server(url)
    with server.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        cur.execute(f"CREATE DATABASE `{url.database}`")
    try:
        yield url
    finally:
        with server.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        server.close()


def outside_env() -> dict[str, str]:
    """An environment in which nothing of the checkout is importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["VICI_BALANCER_LOOPBACK_ONLY"] = "1"
    return env


def test_the_installed_package_installs_its_schema_and_runs(
    installed: Path, fresh_db: DatabaseUrl, tmp_path: Path
) -> None:
    env = outside_env()
    run = {"cwd": str(tmp_path), "env": env, "timeout": 120}
    url = fresh_db.unmasked()
    # the schema is package data: found wherever the package is installed
    schema = _run([str(installed), "schema", "install", "--database-url", url], **run)
    assert schema.returncode == 0, schema.stderr
    assert "created vicidial_hopper" in schema.stdout and "created vb_leader" in schema.stdout
    conn = connect(fresh_db)
    try:
        engines = {
            str(r["t"]): str(r["e"])
            for r in fetchall(
                conn,
                "SELECT table_name AS t, engine AS e FROM information_schema.tables"
                " WHERE table_schema = DATABASE()",
            )
        }
    finally:
        conn.close()
    assert engines["vicidial_hopper"] == "MEMORY" and engines["vicidial_list"] == "MyISAM"
    assert _run([str(installed), "schema", "check", "--database-url", url], **run).returncode == 0
    # the shipped files: an admin starts from the example config
    listed = _run([str(installed), "files"], **run)
    assert listed.returncode == 0
    assert {"vici-balancer.example.toml", "vici-balancer.service", "vici-balancer.cron"} <= set(
        listed.stdout.split()
    )
    example = _run([str(installed), "files", "vici-balancer.example.toml"], **run)
    assert "[balance]" in example.stdout
    config = tmp_path / "vb.toml"
    config.write_text(
        f'[database]\nurl = "{url}"\n[redis]\nurl = "memory://"\n'
        "[ami]\nregistry_refresh_s = 0.5\n[balance]\ncycle_interval_s = 0.5\n"
    )
    checked = _run([str(installed), "--config", str(config), "check"], **run)
    # every check runs; with no Asterisk server in this database only the AMI one fails
    assert "ok   config" in checked.stdout and "ok   mysql" in checked.stdout
    assert "FAIL ami    no servers rows" in checked.stdout
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    once = _run(
        [str(installed), "--config", str(config), "rebalance", "--once", "--dry-run"], **run
    )
    assert once.returncode == 0, once.stderr
    # the daemon starts, leads and stops cleanly on SIGTERM
    log = tmp_path / "daemon.log"
    with open(log, "wb") as sink:
        daemon = subprocess.Popen(
            [str(installed), "--config", str(config), "run"],
            cwd=str(tmp_path),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 60
        conn = connect(fresh_db)
        try:
            while time.monotonic() < deadline:
                rows = fetchall(conn, "SELECT holder FROM vb_leader")
                if rows and f":{daemon.pid}/" in str(rows[0]["holder"]):
                    break
                assert daemon.poll() is None, log.read_text()[-2000:]
                time.sleep(0.1)
            else:
                raise AssertionError("the installed daemon never took the lease")
        finally:
            conn.close()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_an_unexpected_error_is_one_line_unless_debug(
    monkeypatch: pytest.MonkeyPatch, database_url: DatabaseUrl
) -> None:
    from balancer.db import schema

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(schema, "install", broken)
    args = ["schema", "install", "--database-url", database_url.unmasked()]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "vici-balancer: schema-install failed unexpectedly: RuntimeError: disk on fire"
        " (run with --debug for the traceback)"
    ]
    debug = CliRunner().invoke(main, ["--debug", *args])
    assert isinstance(debug.exception, RuntimeError) and "disk on fire" in str(debug.exception)
