"""`vici-balancer status` reads the shared store: table, stable JSON, and stale/missing state."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from click.testing import CliRunner

from balancer.cli.app import main
from balancer.live.status import build_status, render_table
from balancer.store.base import Channel, ChannelClass, Health, ServerMeta
from balancer.store.keys import LOGIN_FLAGS_DOCUMENT
from balancer.store.memory import MemoryStore
from balancer.store.redis import RedisStore

PREFIX = "vbstatus:"


def write_config(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / "vb.toml"
    path.write_text(
        f'[database]\nurl = "mysql://u:dbpass@127.0.0.1:3306/vb_test"\n'
        f'[redis]\nurl = "{redis_url}"\nkey_prefix = "{PREFIX}"\n'
    )
    return path


async def populate(redis_url: str, with_daemon: bool = True) -> None:
    store = RedisStore(redis_url, PREFIX, state_ttl_s=30)
    try:
        await store.set_meta(
            "10.10.0.1",
            ServerMeta(
                server_id="ast1",
                address="127.0.0.1:15038",
                health=Health.UP,
                rtt_ms=0.8,
                max_trunks=23,
                last_event_at=time.time() - 2,
            ),
        )
        await store.apply(
            "10.10.0.1",
            [
                Channel("1.1", "SIP/alpha-00000001", ChannelClass.TRUNK, "alpha"),
                Channel("1.2", "SIP/beta-00000002", ChannelClass.TRUNK, "beta"),
                Channel("1.3", "SIP/101-00000003", ChannelClass.AGENT),
                Channel("1.4", "Local/8368@default-00000000;1", ChannelClass.LOCAL),
            ],
            [],
        )
        await store.apply(  # what it had when it was last heard from, before it went DOWN
            "10.10.0.2",
            [
                Channel("2.1", "SIP/alpha-00000011", ChannelClass.TRUNK, "alpha"),
                Channel("2.2", "Local/8368@default-00000001;1", ChannelClass.LOCAL),
            ],
            [],
        )
        await store.set_meta(
            "10.10.0.2",
            ServerMeta(
                server_id="ast2", address="127.0.0.1:15039", health=Health.DOWN, max_trunks=10
            ),
        )
        await store.set_drained("10.10.0.2", True)
        if with_daemon:
            await store.touch_daemon("test-daemon", 30)
    finally:
        await store.close()


def test_status_json_document(tmp_path: Path, redis_db: str) -> None:
    asyncio.run(populate(redis_db))
    result = CliRunner().invoke(
        main, ["--config", str(write_config(tmp_path, redis_db)), "status", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["version"] == 2
    assert doc["daemons"] == ["test-daemon"]
    assert doc["stale"] is False
    first, second = doc["servers"]
    assert first["server_ip"] == "10.10.0.1"
    assert (first["trunk_lines"], first["agent_phones"], first["local"], first["total"]) == (
        2,
        1,
        1,
        4,
    )
    assert first["carriers"] == {"alpha": 1, "beta": 1}
    assert first["health"] == "up" and first["rtt_ms"] == 0.8
    assert 1.5 <= first["last_event_age_s"] <= 10
    assert second["health"] == "drained" and second["tracked_health"] == "down"
    # a DOWN server has no known live lines: null, its last-seen counts apart, 0 in the totals
    assert second["lines_known"] is False and second["trunk_lines"] is None
    assert second["total"] is None and second["last_seen_lines"]["total"] == 2
    assert second["last_seen_lines"]["trunk_lines"] == 1
    assert first["lines_known"] is True and first["last_seen_lines"] is None
    assert doc["totals"]["trunk_lines"] == 2 and doc["totals"]["max_trunks"] == 33
    assert doc["totals"]["up"] == 1 and doc["totals"]["servers"] == 2
    assert doc["login_flags"] is None  # no keeper published
    assert "dbpass" not in result.output


def test_status_table(tmp_path: Path, redis_db: str) -> None:
    asyncio.run(populate(redis_db))
    result = CliRunner().invoke(main, ["--config", str(write_config(tmp_path, redis_db)), "status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["SERVER", "SERVER_IP", "HEALTH"]
    row = next(line for line in lines if line.startswith("ast1"))
    assert "UP" in row and "127.0.0.1:15038" in row and "2/23" in row and "alpha=1 beta=1" in row
    down = next(line for line in lines if line.startswith("ast2"))
    assert "DRAINED" in down and "?/10" in down
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert "1/2 up" in total
    assert "BALANCE: no recent cycle" in result.output


def test_status_without_daemon_is_stale(tmp_path: Path, redis_db: str) -> None:
    asyncio.run(populate(redis_db, with_daemon=False))
    result = CliRunner().invoke(main, ["--config", str(write_config(tmp_path, redis_db)), "status"])
    assert result.exit_code == 1
    assert "WARNING: no daemon is tracking" in result.output


def test_status_empty_store(tmp_path: Path, redis_db: str) -> None:
    result = CliRunner().invoke(
        main, ["--config", str(write_config(tmp_path, redis_db)), "status", "--json"]
    )
    assert result.exit_code == 1
    doc = json.loads(result.output)
    assert doc["servers"] == [] and "the store knows no servers" in doc["problems"]


def test_status_memory_store_explains(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--config", str(write_config(tmp_path, "memory://")), "status"]
    )
    assert result.exit_code == 1
    assert "memory://" in result.output and "redis.url" in result.output


def test_status_redis_unreachable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(
        main,
        ["--config", str(write_config(tmp_path, f"redis://:pw123@127.0.0.1:{port}/0")), "status"],
    )
    assert result.exit_code == 1
    assert "unreachable" in result.output and "pw123" not in result.output


async def test_stale_server_state_flagged() -> None:
    store = MemoryStore(state_ttl_s=0.05)
    await store.set_meta("10.10.0.1", ServerMeta(health=Health.UP))
    await store.touch_daemon("d", 10)
    await asyncio.sleep(0.1)
    doc = await build_status(store, "memory://")
    assert doc["servers"][0]["health"] == "stale"
    assert doc["stale"] and "stale state for 10.10.0.1" in doc["problems"]
    assert "WARNING: stale state" in render_table(doc)


def test_status_watch_redraws_in_place(tmp_path: Path, redis_db: str) -> None:
    asyncio.run(populate(redis_db))
    config = str(write_config(tmp_path, redis_db))
    result = CliRunner().invoke(
        main, ["--config", config, "status", "--watch", "--interval", "0.2", "--count", "2"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("\x1b[H\x1b[2J") == 2  # cursor home + clear before each frame
    assert result.output.count("SERVER_IP") >= 2 and "ast1" in result.output


async def test_login_flags_section() -> None:
    """What the login-flag keeper published: the flags the balancer holds, the others' 'N's."""
    store = MemoryStore(state_ttl_s=30)
    await store.set_meta("10.10.0.1", ServerMeta(health=Health.UP))
    await store.touch_daemon("d", 10)
    doc = await build_status(store, "memory://", now=1000.0)
    assert "LOGIN FLAGS: not published" in render_table(doc)
    published = {
        "version": 1,
        "published_at": 998.0,
        "held": [
            {
                "server_ip": "10.10.0.2",
                "server_id": "ast2",
                "closed_because": "DOWN (connection closed)",
                "since": "2026-01-02 03:04:05",
                "restores": "Y",
                "now": "UP for 1.0s < 2s",
            }
        ],
        "not_ours": [
            {"server_ip": "10.10.0.3", "server_id": "ast3", "flag": "N"},
            {"server_ip": "10.10.0.4", "server_id": "", "flag": None},
        ],
    }
    await store.put_document(LOGIN_FLAGS_DOCUMENT, json.dumps(published), 10)
    doc = await build_status(store, "memory://", now=1000.0)
    assert doc["login_flags"] == published
    lines = render_table(doc).splitlines()
    start = lines.index(
        "LOGIN FLAGS: the balancer holds 1 closed (active_agent_login_server='N', checked 2.0s ago)"
    )
    assert lines[start + 1 : start + 4] == [
        "SERVER_IP  SERVER  SINCE                CLOSED BECAUSE            NOW",
        "10.10.0.2  ast2    2026-01-02 03:04:05  DOWN (connection closed)  UP for 1.0s < 2s",
        "closed by someone else, never re-opened by the balancer: 10.10.0.3 (ast3), 10.10.0.4",
    ]
    await store.put_document(
        LOGIN_FLAGS_DOCUMENT, json.dumps({**published, "held": [], "not_ours": []}), 10
    )
    text = render_table(await build_status(store, "memory://", now=1000.0))
    assert "LOGIN FLAGS: the balancer holds none closed (checked 2.0s ago)" in text
