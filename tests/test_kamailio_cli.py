"""`vici-balancer kamailio`, `status`, `check` and the metrics show the Kamailio RPC endpoints.

A daemon publishing to a real Kamailio through a real Redis; the CLI runs as another process
would (CliRunner, its own config file), reading Kamailio over RPC and the daemon's document.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from kamailio_helpers import Rig, flags_are, free_port, rig, settled, until
from tracking_helpers import running

from balancer.cli.app import main
from balancer.daemon import Daemon
from balancer.db.url import DatabaseUrl
from balancer.ops.metrics import render

pytestmark = pytest.mark.slow


def cli_config(tmp_path: Path, r: Rig, database_url: DatabaseUrl, redis_url: str) -> Path:
    """The TOML an operator would write for this rig (plus an endpoint nobody listens on)."""
    kconf = r.daemon.config.kamailio
    assert kconf is not None
    endpoint = kconf.endpoints[0]
    dead = free_port(socket.SOCK_STREAM)
    lines = [
        "[database]",
        f'url = "mysql://{database_url.user}:vbtest@127.0.0.1:3306/{database_url.database}"',
        "[redis]",
        f'url = "{redis_url}"',
        'key_prefix = "vbt:"',
        "[ami]",
        'address_policy = "telnet_host"',
        "connect_timeout_s = 1",
        "action_timeout_s = 1",
        "[kamailio]",
        "rpc_timeout_s = 1",
        "[[kamailio.endpoints]]",
        f'name = "{endpoint.name}"',
        f'url = "{endpoint.url}"',
        f'list_file = "{endpoint.list_file}"',
        "[[kamailio.sets]]",
        "id = 1",
    ]
    for server_ip, uri in kconf.uris.items():
        lines += [f'[kamailio.servers."{server_ip}"]', f'uri = "{uri}"']
    path = tmp_path / "vb.toml"
    path.write_text("\n".join(lines) + "\n")
    with_dead = tmp_path / "vb-dead.toml"
    with_dead.write_text(
        path.read_text().replace(
            "[[kamailio.sets]]",
            f'[[kamailio.endpoints]]\nname = "kam-dead"\nurl = "http://127.0.0.1:{dead}/RPC"\n'
            f'list_file = "{tmp_path / "dead.list"}"\n[[kamailio.sets]]',
        )
    )
    return path


async def invoke(*args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args))
    return result.exit_code, result.output


async def test_kamailio_command_status_check_and_metrics(
    database_url: DatabaseUrl, sim_factory: object, tmp_path: Path, redis_db: str
) -> None:
    async with rig(database_url, sim_factory, tmp_path, redis_url=redis_db) as r:
        await settled(r, {"ast1": 34, "ast2": 33, "ast3": 33})
        await r.sims[1].stop()
        await until(lambda: flags_are(r.kam, ast2="IX"), "ast2 inactive")
        path = cli_config(tmp_path, r, database_url, redis_db)

        async def documented() -> bool:
            code, _ = await invoke("--config", str(path), "kamailio", "--json")
            return code == 0

        for _ in range(100):  # the daemon publishes its document every second
            if await documented():
                break
            await asyncio.sleep(0.1)
        code, out = await invoke("--config", str(path), "kamailio", "--json")
        assert code == 0, out
        doc = json.loads(out)
        (endpoint,) = doc["endpoints"]
        assert endpoint["reachable"] and endpoint["published_by"] == r.daemon.name
        assert endpoint["last_publish_at"] is not None
        rows = {d["duid"]: d for d in endpoint["sets"][0]["destinations"]}
        assert rows["ast1"]["kamailio"] == {"flags": "AP", "weight": 34}
        assert rows["ast1"]["wanted"]["state"] == "active"
        assert rows["ast2"]["kamailio"]["flags"] == "IX"
        assert rows["ast2"]["wanted"] == {
            "state": "inactive",
            "weight": 33,
            "spare": 30,
            "reason": "down",
        }
        assert all(row["in_step"] for row in rows.values())

        code, table = await invoke("--config", str(path), "kamailio")
        assert code == 0 and "ENDPOINT kam1" in table and "SET 1 (trunks, algorithm 11)" in table

        # status shows the RPC endpoint the daemon publishes to.
        code, out = await invoke("--config", str(path), "status", "--json")
        status = json.loads(out)
        (kam,) = status["kamailio"]
        assert kam["name"] == "kam1" and kam["url"] == r.kam.url and kam["reachable"] is True
        code, table = await invoke("--config", str(path), "status")
        assert "KAMAILIO" in table and r.kam.url in table

        # check: one line per endpoint; an unreachable one fails the check.
        dead_path = tmp_path / "vb-dead.toml"
        code, out = await invoke("--config", str(dead_path), "check")
        lines = [line for line in out.splitlines() if " kamailio " in f" {line} "]
        assert any(line.startswith("ok") and "kam1" in line for line in lines), out
        assert any(line.startswith("FAIL") and "kam-dead" in line for line in lines), out
        assert code == 1
        # ... and `kamailio` says it is unreachable, with exit 1.
        code, out = await invoke("--config", str(dead_path), "kamailio", "--json")
        assert code == 1 and not json.loads(out)["endpoints"][1]["reachable"]

        # Prometheus: publishes, failures and lag per endpoint.
        text = (await render(r.daemon)).decode()
        assert 'vici_balancer_kamailio_endpoint_up{endpoint="kam1"} 1' in text
        assert 'vici_balancer_kamailio_publishes_total{endpoint="kam1",kind="state"}' in text
        assert 'vici_balancer_kamailio_publish_failures_total{endpoint="kam1"} 0' in text
        assert "vici_balancer_kamailio_publish_lag_seconds_count" in text

        # Kamailio gone: `kamailio` says so, with exit 1.
        r.kam.stop()
        code, out = await invoke("--config", str(path), "kamailio", "--json")
        assert code == 1 and not json.loads(out)["endpoints"][0]["reachable"]


async def test_only_the_leader_publishes_and_a_new_leader_takes_over(
    database_url: DatabaseUrl, sim_factory: object, tmp_path: Path, redis_db: str
) -> None:
    async with rig(
        database_url, sim_factory, tmp_path, redis_url=redis_db, balance=True, start=False
    ) as r:
        leader = r.daemon
        standby = Daemon(leader.config)
        leading = running(leader)
        await leading.__aenter__()
        try:
            await until(lambda: leader.leadership.leading, "the first daemon leads")
            async with running(standby):
                await settled(r)
                await asyncio.sleep(1.0)  # a few of the standby's ticks
                assert standby.kamailio is not None
                publisher = standby.kamailio.publishers[0]
                assert publisher.stats.passes == 0, "a standby published (publish = 'leader')"
                assert standby.kamailio.document()["publishing"] is False

                await leading.__aexit__(None, None, None)  # the leader stops, releasing the lease
                leading = None  # type: ignore[assignment]
                await until(lambda: standby.leadership.leading, "the standby takes over")
                await standby.store.set_drained("10.10.0.1", True)
                await until(lambda: flags_are(r.kam, ast1="IX"), "the new leader publishes")
                assert publisher.stats.passes > 0
        finally:
            if leading is not None:
                await leading.__aexit__(None, None, None)
