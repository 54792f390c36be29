"""VICIdial's command sender played against the simulator, on the real test database."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

from conftest import execute, fetchall
from fixtures_sim import RawAmiClient, SimFactory

from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.sim import CommandSender, SimAsterisk, SimCarrier
from balancer.sim.sender import parse_command_lines

Connect = Callable[..., Awaitable[RawAmiClient]]

_INSERT = (
    "INSERT INTO vicidial_manager (uniqueid, entry_date, status, response, server_ip, channel,"
    " action, callerid, cmd_line_b, cmd_line_c, cmd_line_d, cmd_line_e, cmd_line_f, cmd_line_g,"
    " cmd_line_h, cmd_line_i, cmd_line_j, cmd_line_k)"
    " VALUES ('', NOW(), 'NEW', 'N', %s, '', %s, %s, %s, %s, %s, %s, %s, %s, '', '', '', %s)"
)


def queue_originate(db: Connection, server_ip: str, dial: str, caller_code: str) -> int:
    """A vicidial_manager Originate row in the shape VICIdial writes it; returns its man_id."""
    execute(
        db,
        _INSERT,
        server_ip,
        "Originate",
        caller_code,
        "Exten: 8368",
        "Context: default",
        f"Channel: Local/{dial}@default",
        "Priority: 1",
        f'Callerid: "{caller_code}" <0000000000>',
        "Timeout: 60000",
        f"VDACnote: CAMP1|100001|1|{dial[-10:]}|OUTBALANCE|NONE|50|10.10.0.1|CAMPAIGN_CID",
    )
    return int(str(fetchall(db, "SELECT LAST_INSERT_ID() AS id")[0]["id"]))


def queue_hangup(db: Connection, server_ip: str, channel: str) -> int:
    """A vicidial_manager Hangup row."""
    execute(
        db,
        _INSERT,
        server_ip,
        "Hangup",
        "HLbalancer",
        f"Channel: {channel}",
        "",
        "",
        "",
        "",
        "",
        "",
    )
    return int(str(fetchall(db, "SELECT LAST_INSERT_ID() AS id")[0]["id"]))


def statuses(db: Connection) -> dict[int, str]:
    rows = fetchall(db, "SELECT man_id, status FROM vicidial_manager")
    return {int(str(r["man_id"])): str(r["status"]) for r in rows}


def test_parse_command_lines() -> None:
    row = {
        "cmd_line_b": "Exten: 138368",
        "cmd_line_d": "Channel: Local/913125550001@default",
        "cmd_line_f": 'Callerid: "V1221354560000100001" <0000000000>',
        "cmd_line_k": "VDACnote: CAMP1|100001|1|3125550001|OUTBALANCE|NONE|50|10.10.0.1|X",
        "cmd_line_h": "",
        "cmd_line_i": None,
    }
    assert parse_command_lines(row) == {
        "exten": "138368",
        "channel": "Local/913125550001@default",
        "callerid": '"V1221354560000100001" <0000000000>',
        "vdacnote": "CAMP1|100001|1|3125550001|OUTBALANCE|NONE|50|10.10.0.1|X",
    }


async def test_sender_runs_the_new_rows_of_its_own_server(
    db: Connection, database_url: DatabaseUrl, sim_factory: SimFactory, ami_connect: Connect
) -> None:
    sim = await sim_factory("10.10.0.1", answer_delay_s=0.01, call_duration_s=30)
    client = await ami_connect(sim, events="call")
    mine = [
        queue_originate(db, "10.10.0.1", "913125550001", "V1221354560000100001"),
        queue_originate(db, "10.10.0.1", "913125550002", "V1221354560000100002"),
        queue_originate(db, "10.10.0.1", "3125550003", "V1221354560000100003"),  # no carrier
    ]
    other = queue_originate(db, "10.10.0.2", "913125550004", "V1221354560000100004")
    sender = CommandSender(sim, database_url)
    try:
        assert await sender.run_once() == 3
        await sender.wait_idle()
        assert await sender.run_once() == 0
    finally:
        await sender.stop()
    assert statuses(db) == {mine[0]: "SENT", mine[1]: "SENT", mine[2]: "SENT", other: "NEW"}
    assert list(sender.executed_ids) == mine
    assert (sim.originates, sender.answered, sender.failed) == (3, 3, 0)
    assert sim.channel_count() == 3 * 2 + 2 and sim.trunk_lines_in_use("alpha") == 2
    responses = await client.wait_for_events(lambda ev: ev["Event"] == "OriginateResponse", 3)
    assert {ev["ActionID"] for ev in responses} == {f"V122135456000010000{i}" for i in (1, 2, 3)}
    assert {ev["Exten"] for ev in responses} == {"8368"}
    names = {ch.name for ch in sim.channels.values() if ch.kind == "local"}
    assert sum(n.startswith("Local/913125550001@default-") for n in names) == 2


async def test_two_senders_never_run_a_row_twice(
    db: Connection, database_url: DatabaseUrl, sim_factory: SimFactory
) -> None:
    sim = await sim_factory("10.10.0.1", answer_delay_s=0.0, max_lines=1000, call_duration_s=30)
    ids = {queue_originate(db, "10.10.0.1", f"9312555{i:04d}", f"V{i:019d}") for i in range(60)}
    one, two = CommandSender(sim, database_url), CommandSender(sim, database_url)
    try:
        for _ in range(10):
            claimed = await asyncio.gather(one.run_once(), two.run_once())
            if claimed == [0, 0]:
                break
        await one.wait_idle()
        await two.wait_idle()
    finally:
        await one.stop()
        await two.stop()
    ran_one, ran_two = set(one.executed_ids), set(two.executed_ids)
    assert not ran_one & ran_two
    assert ran_one | ran_two == ids
    assert len(one.executed_ids) + len(two.executed_ids) == 60
    assert sim.originates == 60
    assert set(statuses(db).values()) == {"SENT"}


async def test_hangup_rows_and_unknown_actions(
    db: Connection, database_url: DatabaseUrl, sim_factory: SimFactory
) -> None:
    sim = await sim_factory("10.10.0.1", answer_delay_s=0.01)
    uniqueid = await sim.originate("913125550001", duration_s=30)
    assert uniqueid is not None
    queue_hangup(db, "10.10.0.1", sim.channels[uniqueid].name)
    queue_hangup(db, "10.10.0.1", "SIP/nobody-00000000")
    execute(
        db,
        "INSERT INTO vicidial_manager (entry_date, status, response, server_ip, action, callerid)"
        " VALUES (NOW(), 'NEW', 'N', '10.10.0.1', 'Redirect', 'RR1')",
    )
    sender = CommandSender(sim, database_url)
    try:
        assert await sender.run_once() == 3
    finally:
        await sender.stop()
    assert sim.channel_count() == 0
    assert (sender.hangups, sender.skipped) == (1, 2)


async def test_failed_calls_are_counted_and_rows_stay_sent(
    db: Connection, database_url: DatabaseUrl, sim_factory: SimFactory
) -> None:
    sim = await sim_factory(
        "10.10.0.1", answer_delay_s=0.01, carriers=[SimCarrier("alpha", "9", fail_cause=34)]
    )
    man_id = queue_originate(db, "10.10.0.1", "913125550001", "V1221354560000100001")
    sender = CommandSender(sim, database_url)
    try:
        await sender.run_once()
        await sender.wait_idle()
    finally:
        await sender.stop()
    assert (sender.answered, sender.failed) == (0, 1)
    assert statuses(db) == {man_id: "SENT"}
    assert sim.channel_count() == 0


async def test_started_sender_polls_until_stopped(
    db: Connection, database_url: DatabaseUrl, sim: SimAsterisk
) -> None:
    async with CommandSender(sim, database_url, poll_interval_s=0.02) as sender:
        queue_originate(db, "10.10.0.1", "913125550001", "V1221354560000100001")
        for _ in range(200):
            if sender.answered:
                break
            await asyncio.sleep(0.01)
        assert sender.answered == 1
        queue_originate(db, "10.10.0.1", "913125550002", "V1221354560000100002")
        for _ in range(200):
            if sender.answered == 2:
                break
            await asyncio.sleep(0.01)
        assert sender.answered == 2
    assert sim.originates == 2


async def test_sender_survives_database_errors(database_url: DatabaseUrl, sim: SimAsterisk) -> None:
    bad = dataclasses.replace(database_url, password=database_url.password + "-wrong")
    async with CommandSender(sim, bad, poll_interval_s=0.02) as sender:
        for _ in range(200):
            if sender.db_errors >= 2:
                break
            await asyncio.sleep(0.01)
        assert sender.db_errors >= 2  # it keeps polling after an error
    assert sim.originates == 0
