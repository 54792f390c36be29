"""The simulated Asterisk over real loopback sockets: wire shapes, call flows, fault injection."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable

import pytest
from fixtures_sim import RawAmiClient, SimFactory
from test_codec import WHOLE as RECORDED

from balancer.ami.codec import Message
from balancer.sim import SimAsterisk, SimCarrier, SimCluster, run_traffic, serve_cluster
from balancer.sim.server import GARBAGE, HALF_MESSAGE

Connect = Callable[..., Awaitable[RawAmiClient]]

# The header layouts Asterisk 22 used, per event name, in the recorded session.
RECORDED_SHAPES: dict[str, set[tuple[str, ...]]] = {}
for _m in RECORDED:
    _name = _m.get("Event") or "Response:" + _m.get("Message", "")
    RECORDED_SHAPES.setdefault(_name, set()).add(tuple(_m))


def _is(name: str, **fields: str) -> Callable[[Message], bool]:
    return lambda ev: ev.get("Event") == name and all(ev.get(k) == v for k, v in fields.items())


async def _originate(
    client: RawAmiClient, dial: str, *, asynchronous: bool = True, **extra: str
) -> str:
    headers = {
        "Channel": f"Local/{dial}@default",
        "Context": "default",
        "Exten": "8365",
        "Priority": "1",
        "Timeout": "30000",
        "CallerID": f"smoke <{dial[-7:]}>",
        **extra,
    }
    if asynchronous:
        headers["Async"] = "true"
    return client.send("Originate", headers)


# ---------------------------------------------------------------------------- login and basics
async def test_banner_login_and_fully_booted(sim: SimAsterisk, ami_connect: Connect) -> None:
    client = await ami_connect(sim, login=False)
    assert client.banner == "Asterisk Call Manager/11.0.0"
    response = await client.action("Login", Username="cron", Secret="1234", ActionID="smoke-1")
    assert response == {
        "Response": "Success",
        "ActionID": "smoke-1",
        "Message": "Authentication accepted",
    }
    booted = await client.wait_for_event(_is("FullyBooted"))
    assert booted["Privilege"] == "system,all" and booted["Status"] == "Fully Booted"
    assert tuple(booted) in RECORDED_SHAPES["FullyBooted"]
    assert (sim.logins, sim.login_failures, sim.connections) == (1, 0, 1)


async def test_wrong_secret_is_refused_and_disconnected(
    sim: SimAsterisk, ami_connect: Connect
) -> None:
    client = await ami_connect(sim, login=False)
    response = await client.login("cron", "wrong")
    assert (response["Response"], response["Message"]) == ("Error", "Authentication failed")
    await client.wait_closed()
    assert (sim.logins, sim.login_failures) == (0, 1)


async def test_actions_before_login_are_denied(sim: SimAsterisk, ami_connect: Connect) -> None:
    client = await ami_connect(sim, login=False)
    for action in ("Ping", "CoreShowChannels", "Command"):
        response = await client.action(action)
        assert (response["Response"], response["Message"]) == ("Error", "Permission denied")
    response = await client.response(await _originate(client, "95551234"))
    assert response["Message"] == "Permission denied"
    assert sim.originates == 0
    assert not client.events


async def test_ping_unknown_action_missing_action_and_logoff(
    sim: SimAsterisk, ami_connect: Connect
) -> None:
    client = await ami_connect(sim)
    pong = await client.action("Ping", ActionID="smoke-12")
    assert list(pong) == ["Response", "ActionID", "Ping", "Timestamp"]
    assert pong["Ping"] == "Pong" and abs(float(pong["Timestamp"]) - time.time()) < 5
    unknown = await client.action("NoSuchThing")
    assert unknown["Response"] == "Error"
    assert unknown["Message"].startswith("Invalid/unknown command")
    client.send_raw(b"ActionID: junk-1\r\nFoo: bar\r\n\r\n")  # no Action: kept, like Asterisk
    missing = await client.response("junk-1")
    assert (missing["Response"], missing["Message"]) == ("Error", "Missing action in request")
    assert (await client.action("Ping"))["Ping"] == "Pong"
    bye = await client.action("Logoff")
    assert (bye["Response"], bye["Message"]) == ("Goodbye", "Thanks for all the fish.")
    await client.wait_closed()
    await asyncio.sleep(0.02)
    assert sim.client_count == 0


def test_only_loopback_hosts_are_allowed() -> None:
    for host in ("0.0.0.0", "10.10.0.1", "example.com", "::"):
        with pytest.raises(ValueError, match="not loopback"):
            SimAsterisk("10.10.0.1", host=host)
    with pytest.raises(ValueError, match="not loopback"):
        SimCluster(2, host="0.0.0.0")
    SimAsterisk("10.10.0.1", host="127.0.0.2")
    SimAsterisk("10.10.0.1", host="::1")


# ---------------------------------------------------------------------------- originate
async def test_async_originate_through_a_carrier(
    sim_factory: SimFactory, ami_connect: Connect
) -> None:
    sim = await sim_factory(answer_delay_s=0.01)
    client = await ami_connect(sim)
    aid = await _originate(client, "95551234", Variable="CALL_DURATION=0.15")
    queued = await client.response(aid)
    assert queued == {
        "Response": "Success",
        "ActionID": aid,
        "Message": "Originate successfully queued",
    }
    done = await client.wait_for_event(_is("OriginateResponse", ActionID=aid))
    assert (done["Response"], done["Reason"], done["Exten"]) == ("Success", "4", "8365")
    assert re.fullmatch(r"Local/95551234@default-00000000;1", done["Channel"])
    assert (done["CallerIDNum"], done["CallerIDName"]) == ("5551234", "smoke")
    new = [ev for ev in client.events if ev["Event"] == "Newchannel"]
    assert [ev["Channel"] for ev in new[:2]] == [
        "Local/95551234@default-00000000;1",
        "Local/95551234@default-00000000;2",
    ]
    assert [(ev["ChannelState"], ev["ChannelStateDesc"]) for ev in new[:2]] == [
        ("0", "Down"),
        ("4", "Ring"),
    ]
    assert new[0]["CallerIDNum"] == "<unknown>"
    assert new[0]["Uniqueid"] == new[0]["Linkedid"] == new[1]["Linkedid"] == done["Uniqueid"]
    trunk = new[2]
    assert re.fullmatch(r"SIP/alpha-[0-9a-f]{8}", trunk["Channel"])
    assert trunk["Exten"] == "5551234"  # the number without the dial prefix
    assert trunk["Linkedid"] == done["Uniqueid"]
    callerid = await client.wait_for_event(_is("NewCallerid"))
    assert (callerid["CallerIDNum"], callerid["CallerIDName"]) == ("5551234", "smoke")
    assert sim.trunk_lines_in_use("alpha") == 1 and sim.channel_count() == 3
    hangups = await client.wait_for_events(_is("Hangup"), 3, within_s=2)
    assert {(h["Cause"], h["Cause-txt"]) for h in hangups} == {("16", "Normal Clearing")}
    assert {h["Uniqueid"] for h in hangups} == {ev["Uniqueid"] for ev in new}
    assert sim.channel_count() == 0


async def test_local_call_events_have_the_recorded_shapes(
    sim_factory: SimFactory, ami_connect: Connect
) -> None:
    sim = await sim_factory(answer_delay_s=0.01)
    client = await ami_connect(sim)
    ok = await _originate(client, "5551234", Variable="CALL_DURATION=0.05")  # no carrier prefix
    await client.wait_for_event(_is("OriginateResponse", ActionID=ok))
    await client.wait_for_events(_is("Hangup"), 2)
    sim.carriers["alpha"].fail_cause = 34
    failed = await _originate(client, "97123")
    await client.wait_for_event(_is("OriginateResponse", ActionID=failed))
    await client.wait_for_events(_is("Hangup"), 5)
    _, _, complete = await client.list_action("CoreShowChannels")
    assert tuple(complete) in RECORDED_SHAPES["CoreShowChannelsComplete"]
    checked = set()
    for ev in client.events:
        name = ev["Event"]
        # the recording has no trunk leg: events about one (and ;2 -> trunk dials) are not compared
        if name not in RECORDED_SHAPES or any(v.startswith("SIP/") for v in ev.values()):
            continue
        assert tuple(ev) in RECORDED_SHAPES[name], (name, list(ev))
        checked.add(name)
    expected = {"Newchannel", "Newstate", "NewCallerid", "Hangup", "DialBegin", "DialEnd"}
    assert checked >= expected | {"OriginateResponse", "LocalBridge", "SoftHangupRequest"}


async def test_sync_originate_replies_after_the_outcome(
    sim_factory: SimFactory, ami_connect: Connect
) -> None:
    sim = await sim_factory(answer_delay_s=0.1, call_duration_s=0.1)
    client = await ami_connect(sim)
    aid = await _originate(client, "95551234", asynchronous=False)
    response = await client.response(aid)
    # The reply comes after the outcome: the call's answer precedes it on the wire.
    replied_at = next(i for i, m in enumerate(client.messages) if m.get("ActionID") == aid)
    answered_at = [
        i
        for i, m in enumerate(client.messages)
        if m.get("Event") == "DialEnd" and m.get("DialStatus") == "ANSWER"
    ]
    assert answered_at and answered_at[0] < replied_at
    assert (response["Response"], response["Message"]) == (
        "Success",
        "Originate successfully queued",
    )
    sim.set_carrier_state("alpha", fail_cause=17)
    aid = await _originate(client, "95551234", asynchronous=False)
    response = await client.response(aid)
    assert (response["Response"], response["Message"]) == ("Error", "Originate failed")
    await asyncio.sleep(0.05)
    assert not [ev for ev in client.events if ev["Event"] == "OriginateResponse"]


@pytest.mark.parametrize(
    ("cause", "status", "text"),
    [
        (34, "CONGESTION", "Circuit/channel congestion"),
        (17, "BUSY", "User busy"),
        (19, "NOANSWER", "No answer"),
        (38, "CHANUNAVAIL", "Network out of order"),
    ],
)
async def test_broken_carrier_fails_like_asterisk(
    sim_factory: SimFactory, ami_connect: Connect, cause: int, status: str, text: str
) -> None:
    carriers = [SimCarrier("alpha", "9", fail_cause=cause), SimCarrier("beta", "8")]
    sim = await sim_factory(carriers=carriers, answer_delay_s=0.01)
    client = await ami_connect(sim)
    aid = await _originate(client, "95551234")
    failure = await client.wait_for_event(_is("OriginateResponse", ActionID=aid))
    assert failure == {
        "Event": "OriginateResponse",
        "Privilege": "call,all",
        "ActionID": aid,
        "Response": "Failure",
        "Channel": "Local/95551234@default",
        "Context": "default",
        "Exten": "8365",
        "Reason": "0",
        "Uniqueid": "<unknown>",
        "CallerIDNum": "5551234",
        "CallerIDName": "smoke",
    }
    hangups = await client.wait_for_events(_is("Hangup"), 3)
    assert {(h["Cause"], h["Cause-txt"]) for h in hangups} == {(str(cause), text)}
    assert any(h["Channel"].startswith("SIP/alpha-") for h in hangups)
    dial_end = [ev for ev in client.events if ev["Event"] == "DialEnd"]
    assert dial_end and {ev["DialStatus"] for ev in dial_end} == {status}
    assert sim.channel_count() == 0
    assert await sim.originate("85551234", duration_s=0.05) is not None  # beta still works


async def test_full_lines_fail_with_the_full_cause(
    sim_factory: SimFactory, ami_connect: Connect
) -> None:
    sim = await sim_factory(max_lines=2, full_cause=34, answer_delay_s=0.01)
    client = await ami_connect(sim)
    first, second = await asyncio.gather(
        sim.originate("95550001", duration_s=1.0), sim.originate("95550002", duration_s=1.0)
    )
    assert first and second and sim.trunk_lines_in_use() == 2
    assert await sim.originate("95550003", duration_s=1.0) is None
    assert await sim.originate("5550004", duration_s=1.0) is not None  # a local call needs no line
    congested = [ev for ev in client.events if _is("Hangup", Cause="34")(ev)]
    assert len(congested) == 3  # trunk, ;2 and ;1 of the third call
    assert sim.trunk_lines_in_use() == 2


async def test_core_show_channels_after_a_burst_and_hangups(
    sim_factory: SimFactory, ami_connect: Connect
) -> None:
    sim = await sim_factory(answer_delay_s=0.01, call_duration_s=30)
    client = await ami_connect(sim, events="off")
    # The watcher logs in first: events sent before a login never reach it (it used to connect
    # after the originates, and missed the early OriginateResponses on a loaded machine).
    watcher = await ami_connect(sim, events="call")
    ids = [await _originate(client, f"9555{i:04d}" if i % 3 else f"555{i:04d}") for i in range(50)]
    await watcher.wait_for_events(_is("OriginateResponse"), 50, within_s=30)
    assert {ev["ActionID"] for ev in watcher.events if ev["Event"] == "OriginateResponse"} == set(
        ids
    )
    response, items, complete = await client.list_action("CoreShowChannels")
    assert (response["EventList"], response["Message"]) == ("start", "Channels will follow")
    assert len(items) == int(complete["ListItems"]) == sim.channel_count() == 50 * 2 + 33
    assert all(tuple(ev) in RECORDED_SHAPES["CoreShowChannel"] for ev in items)
    assert len({ev["Uniqueid"] for ev in items}) == len(items)
    target = next(
        ev for ev in items if ev["Channel"].endswith(";1") and "@default-" in ev["Channel"]
    )
    hung = await client.action("Hangup", Channel=target["Channel"], Cause="16")
    assert (hung["Response"], hung["Message"]) == ("Success", "Channel Hungup")
    missing = await client.action("Hangup", Channel="SIP/nobody-00000000")
    assert (missing["Response"], missing["Message"]) == ("Error", "No such channel")
    _, items, complete = await client.list_action("CoreShowChannels")
    assert len(items) == int(complete["ListItems"]) == sim.channel_count() < 50 * 2 + 33
    assert await sim.hangup_all() == 49
    _, items, complete = await client.list_action("CoreShowChannels")
    assert items == [] and complete["ListItems"] == "0" and sim.channel_count() == 0


async def test_command_channel_count_asterisk22_style(
    sim: SimAsterisk, ami_connect: Connect
) -> None:
    client = await ami_connect(sim)
    await sim.originate("95551234", duration_s=5)
    sim.add_agent_channel("cc100")
    response = await client.action("Command", Command="core show channels count", ActionID="c1")
    assert list(response) == ["Response", "ActionID", "Message", "Output"]
    assert response["Message"] == "Command output follows"
    assert response["Output"] == "4 active channels\n2 active calls\n2 calls processed"
    version = await client.action("Command", Command="core show version")
    assert version["Output"].startswith("Asterisk 22.")
    unknown = await client.action("Command", Command="core show nothing")
    assert unknown["Output"].startswith("No such command 'core show nothing'")


async def test_command_channel_count_legacy_style(
    sim_factory: SimFactory, ami_connect: Connect
) -> None:
    sim = await sim_factory(legacy_command_output=True)
    client = await ami_connect(sim)
    sim.add_agent_channel("cc100")
    response = await client.action("Command", Command="core show channels count", ActionID="c1")
    assert response == {
        "Response": "Follows",
        "Privilege": "Command",
        "ActionID": "c1",
        "Output": "1 active channel\n1 active call\n1 call processed",
    }
    raw = bytes(client.raw)
    assert b"1 call processed\n--END COMMAND--\r\n\r\n" in raw


# ------------------------------------------------------------------------ event mask and filters
async def test_event_masks(sim_factory: SimFactory, ami_connect: Connect) -> None:
    sim = await sim_factory(answer_delay_s=0.01)
    off = await ami_connect(sim, events="off")
    call = await ami_connect(sim, events="call")
    everything = await ami_connect(sim, events="on")
    await sim.originate("95551234", duration_s=0.05)
    await call.wait_for_events(_is("Hangup"), 3)
    await everything.wait_for_events(_is("Hangup"), 3)
    assert off.events == []
    assert (await off.action("Ping"))["Ping"] == "Pong"  # responses still flow
    call_names = {ev["Event"] for ev in call.events}
    assert "Newchannel" in call_names and "Newexten" not in call_names
    assert "FullyBooted" not in call_names and "SuccessfulAuth" not in call_names
    assert {"Newexten", "FullyBooted"} <= {ev["Event"] for ev in everything.events}
    switched = await off.action("Events", EventMask="call")
    assert switched["Events"] == "On"
    assert (await call.action("Events", EventMask="off"))["Events"] == "Off"
    mark = len(call.events)
    await sim.originate("5551234", duration_s=0.05)
    await off.wait_for_events(_is("Hangup"), 2)
    await asyncio.sleep(0.05)
    assert call.events[mark:] == []


async def test_filters_whitelist_and_blacklist(
    sim_factory: SimFactory, ami_connect: Connect
) -> None:
    sim = await sim_factory(answer_delay_s=0.01)
    white = await ami_connect(sim)
    black = await ami_connect(sim)
    start_white, start_black = len(white.events), len(black.events)
    # the regex runs over the whole event text, as in Asterisk: "Event: Hangup" would match
    # HangupRequest too
    ok = await white.action("Filter", Operation="Add", Filter="Event: Newchannel")
    assert (ok["Response"], ok["Message"]) == ("Success", "Success")
    await black.action("Filter", Operation="Add", Filter="!Event: Newexten")
    bad = await white.action("Filter", Operation="Add", Filter="Event: (")
    assert bad["Response"] == "Error"
    await sim.originate("95551234", duration_s=0.05)
    await black.wait_for_events(_is("Hangup"), 3, start=start_black)
    await white.wait_for_events(_is("Newchannel"), 3, start=start_white)
    await asyncio.sleep(0.02)
    assert {ev["Event"] for ev in white.events[start_white:]} == {"Newchannel"}
    names = {ev["Event"] for ev in black.events[start_black:]}
    assert "Newexten" not in names and {"Newchannel", "Hangup"} <= names


# ---------------------------------------------------------------------------- fault injection
async def test_drop_clients_gives_eof_and_reconnect_works(
    sim: SimAsterisk, ami_connect: Connect
) -> None:
    client = await ami_connect(sim)
    await sim.drop_clients()
    await client.wait_closed()
    assert client.error is None and sim.client_count == 0
    again = await ami_connect(sim)
    assert (await again.action("Ping"))["Ping"] == "Pong"
    assert sim.connections == 2


async def test_unresponsive_server_lets_ping_time_out(
    sim: SimAsterisk, ami_connect: Connect
) -> None:
    client = await ami_connect(sim)
    sim.set_unresponsive(True)
    with pytest.raises(TimeoutError):
        await client.action("Ping", within_s=0.2)
    await sim.originate("95551234", duration_s=0.05)
    assert not client.closed and sim.channel_count() == 3
    assert not [ev for ev in client.events if ev["Event"] == "Newchannel"]
    sim.set_unresponsive(False)
    assert (await client.action("Ping"))["Ping"] == "Pong"


async def test_paused_server_answers_nothing_until_it_resumes(
    sim: SimAsterisk, ami_connect: Connect
) -> None:
    """Like SIGSTOP: no reply, no banner for a new connection; on resume, all of it in order."""
    client = await ami_connect(sim)
    sim.set_paused(True)
    first, second = client.send("Ping"), client.send("Ping")
    reader, writer = await asyncio.open_connection(sim.host, sim.port)  # the kernel accepts
    await asyncio.sleep(0.3)
    assert first not in client.responses and second not in client.responses
    with pytest.raises(TimeoutError):  # no banner yet
        await asyncio.wait_for(reader.read(1), 0.05)
    sim.set_paused(False)
    assert (await client.response(second))["Ping"] == "Pong"
    assert list(client.responses)[-2:] == [first, second]
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"Asterisk Call Manager/")
    writer.close()
    await writer.wait_closed()


async def test_garbage_reaches_the_client_and_fails_its_parser(
    sim: SimAsterisk, ami_connect: Connect
) -> None:
    client = await ami_connect(sim)
    await sim.send_garbage()
    error = await client.wait_error()
    assert "not an AMI message" in str(error)
    assert bytes(client.raw).endswith(GARBAGE)


async def test_big_line_fails_the_parser(sim: SimAsterisk, ami_connect: Connect) -> None:
    client = await ami_connect(sim)
    await sim.send_big_line()
    error = await client.wait_error(within_s=5)
    assert "over 65536 bytes without terminator" in str(error)
    assert len(client.raw) > 65536


async def test_half_message_stays_buffered(sim: SimAsterisk, ami_connect: Connect) -> None:
    client = await ami_connect(sim)
    await sim.send_half_message()
    await client.settle()
    assert bytes(client.raw).endswith(HALF_MESSAGE)
    assert client.parser.buffered == len(HALF_MESSAGE)
    assert client.error is None and not client.closed
    with pytest.raises(TimeoutError):  # the stream is stuck mid-message: nothing follows
        await client.action("Ping", within_s=0.2)
    again = await ami_connect(sim)  # a new connection is served normally
    assert (await again.action("Ping"))["Ping"] == "Pong"


async def test_invalid_utf8_event_is_parsed(sim: SimAsterisk, ami_connect: Connect) -> None:
    client = await ami_connect(sim)
    uniqueid = await sim.send_invalid_utf8()
    new = await client.wait_for_event(_is("Newchannel", Uniqueid=uniqueid))
    assert "\ufffd" in new["CallerIDName"] and new["CallerIDName"].startswith("caf")
    await client.wait_for_event(_is("Hangup", Uniqueid=uniqueid))
    assert b"\xff\xfe" in client.raw
    assert (await client.action("Ping"))["Ping"] == "Pong"
    assert sim.channel_count() == 0


async def test_write_delay_slows_every_reply(sim: SimAsterisk, ami_connect: Connect) -> None:
    client = await ami_connect(sim)
    sim.set_write_delay(0.5)
    start = time.monotonic()
    await client.action("Ping")
    delayed = time.monotonic() - start
    assert delayed >= 0.5  # a lower bound: a busy machine only makes it later
    sim.set_write_delay(0)
    start = time.monotonic()
    await client.action("Ping")
    undelayed = time.monotonic() - start
    # Back to undelayed: compared with the delayed reply, not with a wall-clock goal.
    assert undelayed < delayed


async def test_suppressed_events_are_lost_but_channels_exist(
    sim: SimAsterisk, ami_connect: Connect
) -> None:
    client = await ami_connect(sim)
    mark = len(client.events)
    sim.suppress_events(True)
    await sim.originate("95551234", duration_s=5)
    sim.add_agent_channel("cc100")
    await client.settle()
    assert client.events[mark:] == []
    _, items, _ = await client.list_action("CoreShowChannels")
    assert len(items) == sim.channel_count() == 4
    sim.suppress_events(False)
    await sim.hangup_all()
    await client.wait_for_events(_is("Hangup"), 4, start=mark)


async def test_shutdown_event_then_eof(sim: SimAsterisk, ami_connect: Connect) -> None:
    client = await ami_connect(sim)
    await sim.originate("95551234", duration_s=5)
    await sim.shutdown()
    await client.wait_closed()
    shutdown = client.events[-1]
    assert shutdown == {
        "Event": "Shutdown",
        "Privilege": "system,all",
        "Shutdown": "Uncleanly",
        "Restart": "False",
    }
    assert sim.channel_count() == 0
    again = await ami_connect(sim)  # it comes back, like a restarted Asterisk
    assert (await again.action("Ping"))["Ping"] == "Pong"


# ---------------------------------------------------------------------- carriers, agents, cluster
async def test_carrier_health_events(sim_factory: SimFactory, ami_connect: Connect) -> None:
    carriers = [SimCarrier("alpha", "9"), SimCarrier("beta", "8", technology="PJSIP")]
    sim = await sim_factory(carriers=carriers, answer_delay_s=0.01)
    client = await ami_connect(sim, events="system")
    sim.set_carrier_state("alpha", reachable=False)
    peer = await client.wait_for_event(_is("PeerStatus"))
    assert (peer["Peer"], peer["PeerStatus"], peer["ChannelType"]) == (
        "SIP/alpha",
        "Unreachable",
        "SIP",
    )
    assert peer["Privilege"] == "system,all"
    sim.set_carrier_state("beta", reachable=False, registered=False)
    contact = await client.wait_for_event(_is("ContactStatus"))
    assert (contact["AOR"], contact["EndpointName"], contact["ContactStatus"]) == (
        "beta",
        "beta",
        "Unreachable",
    )
    assert contact["URI"].startswith("sip:beta@")
    registry = await client.wait_for_event(_is("Registry"))
    assert (registry["ChannelType"], registry["Username"], registry["Status"]) == (
        "PJSIP",
        "beta",
        "Rejected",
    )
    assert registry["Domain"]
    assert await sim.originate("95551234") is None  # unreachable: CHANUNAVAIL
    sim.set_carrier_state("alpha", reachable=True)
    await client.wait_for_event(_is("PeerStatus", PeerStatus="Reachable"))
    assert await sim.originate("95551234", duration_s=0.05) is not None
    with pytest.raises(ValueError, match="no carrier"):
        sim.set_carrier_state("gamma", fail_cause=34)


async def test_agent_and_inbound_trunk_channels(sim: SimAsterisk, ami_connect: Connect) -> None:
    client = await ami_connect(sim)
    agent = sim.add_agent_channel("cc100")
    inbound = sim.add_trunk_channel("alpha", duration_s=0.05)
    assert re.fullmatch(r"SIP/cc100-[0-9a-f]{8}", sim.channels[agent].name)
    assert (sim.channels[agent].kind, sim.channels[inbound].kind) == ("agent", "trunk")
    assert sim.trunk_lines_in_use("alpha") == 1 and sim.trunk_lines_in_use("beta") == 0
    up = await client.wait_for_event(_is("Newstate", Uniqueid=agent))
    assert up["ChannelStateDesc"] == "Up"
    await client.wait_for_event(_is("Hangup", Uniqueid=inbound))
    assert sim.trunk_lines_in_use() == 0
    assert await sim.hangup(agent, cause=17)
    hangup = await client.wait_for_event(_is("Hangup", Uniqueid=agent))
    assert (hangup["Cause"], hangup["Cause-txt"]) == ("17", "User busy")
    assert not await sim.hangup(agent)
    with pytest.raises(ValueError, match="no carrier"):
        sim.add_trunk_channel("nope")


async def test_uniqueids_and_local_names_collide_across_servers(sim_factory: SimFactory) -> None:
    one = await sim_factory("10.10.0.1", start_epoch=1795355049)
    two = await sim_factory("10.10.0.2", start_epoch=1795355049)
    first = await one.originate("95551234", duration_s=5)
    second = await two.originate("95551234", duration_s=5)
    assert first == second == "1795355049.0"
    assert one.channels[first].name == two.channels[second].name
    assert one.port != two.port


async def test_cluster_and_serve_cluster() -> None:
    async with SimCluster(2) as cluster:
        assert [s.server_ip for s in cluster.servers] == ["10.10.0.1", "10.10.0.2"]
        a = await cluster["10.10.0.1"].originate("95551234", duration_s=5)
        b = await cluster["10.10.0.2"].originate("95551234", duration_s=5)
        assert a == b  # same boot second, same counters
        cluster["10.10.0.1"].set_carrier_state("alpha", fail_cause=34)
        assert cluster["10.10.0.2"].carriers["alpha"].fail_cause is None
    lines: list[str] = []
    stop = asyncio.Event()
    task = asyncio.create_task(serve_cluster(3, 0, print_fn=lines.append, stop=stop))
    for _ in range(100):
        if len(lines) == 3:
            break
        await asyncio.sleep(0.01)
    assert [line.split()[0] for line in lines] == ["10.10.0.1", "10.10.0.2", "10.10.0.3"]
    assert all(
        re.fullmatch(r"10\.10\.0\.\d 127\.0\.0\.1:\d+ \(login cron/\*\*\*\*\)", x) for x in lines
    )
    assert not any("1234" in line for line in lines)
    port = int(lines[0].split(":")[1].split()[0])
    client = await RawAmiClient.connect("127.0.0.1", port)
    assert (await client.login())["Response"] == "Success"
    await client.close()
    stop.set()
    await asyncio.wait_for(task, 2)


async def test_run_traffic_is_bounded(sim_factory: SimFactory) -> None:
    sim = await sim_factory(max_lines=5, answer_delay_s=0.01)
    traffic = run_traffic(
        sim,
        calls_per_s=100,
        duration_s=0.2,
        prefixes=["9"],
        hold_s=(0.5, 1.0),
        agent_peers=["cc100", "cc101"],
        rng=random.Random(7),
    )
    result = await asyncio.wait_for(traffic, 30)  # it ends by itself; 30 s only ends a hang
    # Bounded by its schedule: at most calls_per_s x duration_s calls, however slow the machine.
    assert 0 < result.attempted <= 20 and result.agents == 2
    assert result.answered + result.failed == result.attempted
    assert result.answered == 5 and result.failed == result.attempted - 5  # 5 lines
    assert sim.trunk_lines_in_use() == 5
    assert sum(1 for ch in sim.channels.values() if ch.kind == "agent") == 2
    with pytest.raises(ValueError):
        await run_traffic(sim, calls_per_s=1, duration_s=1, prefixes=[], hold_s=(1, 2))
