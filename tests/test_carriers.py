"""Carrier health from AMI events, the tracker's listener hook, per-call failover (its event side,
the recorded Asterisk session, and `replace_call` on MariaDB), and `vici-balancer routes`."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import balance_seed as seed
import pytest
from balance_seed import EXAMPLE_NOW
from click.testing import CliRunner
from conftest import execute, fetchall

from balancer.ami.codec import MessageReader
from balancer.balance.model import CampaignInfo, ServerInfo
from balancer.carriers.failover import FailedCall, Failover
from balancer.carriers.health import CarrierHealth
from balancer.carriers.routing import BreakerState, CarrierPick, NoCarrier, PlacedCall
from balancer.carriers.view import render_routes
from balancer.cli.app import main
from balancer.config import (
    CarrierConfig,
    HealthConfig,
    RedisConfig,
    RouteConfig,
    RoutingConfig,
)
from balancer.db.calls import CallResult
from balancer.db.connection import Connection
from balancer.db.fence import FenceLost, LeaderFence
from balancer.db.records import CarrierRow
from balancer.db.retries import RetrySkipped, replace_call
from balancer.db.worker import DbWorker
from balancer.live.tracker import TRACKED_EVENTS, Classifier, Tracker
from balancer.store.base import Channel, ChannelClass, ServerMeta
from balancer.store.memory import MemoryStore
from balancer.store.redis import RedisStore

A, B, C = "10.0.0.1", "10.0.0.2", "10.0.0.3"
CODE = "V1221354560000100001"
SETTINGS = RoutingConfig(failure_threshold=3, window_s=60, min_calls=10, cool_down_s=30)
CARRIERS = (
    CarrierConfig("alpha", "7", max_lines_per_server=2),
    CarrierConfig("beta", "8", trunk_names=("beta-trunk",)),
)
ROUTES = (RouteConfig("default", (("alpha",), ("beta",))),)
RECORDING = Path(__file__).parent / "data" / "asterisk22-originate-session.txt"


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def make(
    carriers: Sequence[CarrierConfig] = CARRIERS,
    routes: Sequence[RouteConfig] = ROUTES,
    settings: RoutingConfig = SETTINGS,
    rows: Sequence[CarrierRow] | None = None,
) -> tuple[CarrierHealth, Clock]:
    clock = Clock()
    health = CarrierHealth(carriers, routes, settings, clock=clock, rng=random.Random(3))
    if rows is None:
        rows = [CarrierRow(c.id, "0.0.0.0", "SIP", "") for c in carriers]
    health.update_registry({"beta-trunk": "beta"}, rows, (A, B, C))
    return health, clock


class Feed:
    """Sends the events the simulator emits for trunk calls to a CarrierHealth."""

    def __init__(self, health: CarrierHealth) -> None:
        self.health = health
        self.seq = 0

    def channel(self, carrier: str) -> Channel:
        self.seq += 1
        return Channel(
            f"1.{self.seq}", f"SIP/{carrier}-{self.seq:08x}", ChannelClass.TRUNK, carrier
        )

    def new(self, ip: str, carrier: str, code: str = "") -> Channel:
        channel = self.channel(carrier)
        event = {"Event": "Newchannel", "Uniqueid": channel.uniqueid, "Channel": channel.name}
        if code:
            event["CallerIDName"] = code
        self.health.on_channel_event(ip, event, channel)
        return channel

    def hangup(
        self, ip: str, channel: Channel, cause: int, state: str = "0", code: str = ""
    ) -> None:
        event = {
            "Event": "Hangup",
            "Uniqueid": channel.uniqueid,
            "Channel": channel.name,
            "Cause": str(cause),
            "ChannelState": state,
            "CallerIDName": code or "<unknown>",
        }
        self.health.on_channel_event(ip, event, channel)

    def fail(self, ip: str, carrier: str, cause: int, times: int = 1) -> None:
        for _ in range(times):
            self.hangup(ip, self.new(ip, carrier), cause)

    def answer(self, ip: str, channel: Channel) -> None:
        event = {
            "Event": "DialEnd",
            "DestChannel": channel.name,
            "DestUniqueid": channel.uniqueid,
            "DialStatus": "ANSWER",
        }
        self.health.on_channel_event(ip, event, channel)

    def peer(self, ip: str, peer: str, status: str) -> None:
        event = {"Event": "PeerStatus", "Peer": f"SIP/{peer}", "PeerStatus": status}
        self.health.on_channel_event(ip, event, None)


CAMPAIGN = CampaignInfo("CAMP1", dial_timeout=30)


def placed(ip: str, carrier: str, code: str = CODE, retry_of: str | None = None) -> PlacedCall:
    return PlacedCall(
        code,
        100001,
        CAMPAIGN,
        ServerInfo(ip),
        carrier,
        "default",
        "1",
        "3125550001",
        "MAIN",
        EXAMPLE_NOW,
        retry_of,
    )


def chosen(health: CarrierHealth, ip: str) -> str:
    pick = health.choose(ip, "1", "3125550001")
    assert isinstance(pick, CarrierPick), pick
    return pick.carrier_id


# --------------------------------------------------------------------------- the tracker hook


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, Channel | None]] = []
        self.replaced: list[tuple[str, list[str]]] = []

    def on_channel_event(
        self, server_ip: str, event: Mapping[str, str], channel: Channel | None
    ) -> None:
        self.events.append((server_ip, event["Event"], channel))

    def on_channels_replaced(self, server_ip: str, channels: Sequence[Channel]) -> None:
        self.replaced.append((server_ip, sorted(c.uniqueid for c in channels)))


class Broken(Recorder):
    def on_channel_event(
        self, server_ip: str, event: Mapping[str, str], channel: Channel | None
    ) -> None:
        raise RuntimeError("listener bug")


async def test_tracker_hands_classified_events_to_listeners() -> None:
    assert {"DialEnd", "PeerStatus", "ContactStatus", "Registry", "Hangup"} <= set(TRACKED_EVENTS)
    tracker = Tracker(MemoryStore(), HealthConfig())
    tracker.classifier = Classifier({"alpha": "alpha"})
    tracker.add_server(A, ServerMeta())
    broken, recorder = Broken(), Recorder()
    tracker.add_listener(broken)
    tracker.add_listener(recorder)
    tracker.on_event(A, {"Event": "Newchannel", "Uniqueid": "1.1", "Channel": "SIP/alpha-01"})
    tracker.on_event(A, {"Event": "VarSet", "Uniqueid": "1.1"})
    tracker.on_event(
        A,
        {"Event": "DialEnd", "DestChannel": "SIP/alpha-01", "DestUniqueid": "1.1"},
    )
    tracker.on_event(A, {"Event": "PeerStatus", "Peer": "SIP/alpha", "PeerStatus": "Reachable"})
    tracker.on_event(A, {"Event": "Hangup", "Uniqueid": "1.1", "Channel": "SIP/alpha-01"})
    tracker.on_event("10.9.9.9", {"Event": "PeerStatus"})  # not a watched server
    trunk = Channel("1.1", "SIP/alpha-01", ChannelClass.TRUNK, "alpha")
    assert recorder.events == [
        (A, "Newchannel", trunk),
        (A, "DialEnd", trunk),
        (A, "PeerStatus", None),
        (A, "Hangup", trunk),
    ]
    assert tracker.listener_errors == 4  # the broken one never took the session down
    assert tracker.events_total == 2  # the carrier events are not channel events
    # a snapshot: listeners get the set it leaves, with events during it replayed
    tracker.request_snapshot(A)
    tracker.on_event(A, {"Event": "Newchannel", "Uniqueid": "1.3", "Channel": "SIP/alpha-03"})
    tracker.on_event(A, {"Event": "Hangup", "Uniqueid": "1.2", "Channel": "SIP/alpha-02"})
    items = [
        {"Uniqueid": "1.2", "Channel": "SIP/alpha-02"},
        {"Uniqueid": "1.4", "Channel": "SIP/alpha-04"},
    ]
    await tracker.apply_snapshot(A, items)
    assert recorder.replaced == [(A, ["1.3", "1.4"])]


# --------------------------------------------------------------------------- lines


def test_lines_follow_trunk_channels_renames_and_snapshots() -> None:
    health, _ = make()
    feed = Feed(health)
    one, two = feed.new(A, "alpha"), feed.new(A, "beta")
    feed.new(B, "alpha")
    assert health.lines("alpha", A) == (1, 0) and health.lines("beta", A) == (1, 0)
    feed.hangup(A, one, 16, state="6")
    assert health.lines("alpha", A) == (0, 0)
    renamed = Channel(two.uniqueid, "SIP/alpha-99", ChannelClass.TRUNK, "alpha")
    health.on_channel_event(A, {"Event": "Rename", "Uniqueid": two.uniqueid}, renamed)
    assert health.lines("alpha", A) == (1, 0) and health.lines("beta", A) == (0, 0)
    health.on_channels_replaced(
        A,
        [
            Channel("9.1", "SIP/beta-trunk-1", ChannelClass.TRUNK, "beta"),
            Channel("9.2", "SIP/beta-trunk-2", ChannelClass.TRUNK, "beta"),
            Channel("9.3", "Local/1@default-1;1", ChannelClass.LOCAL, None),
        ],
    )
    assert health.lines("alpha", A) == (0, 0) and health.lines("beta", A) == (2, 0)
    assert health.lines("alpha", B) == (1, 0)


# --------------------------------------------------------------------------- breakers from causes


def test_cause_34_on_one_server_opens_that_server_only() -> None:
    health, _ = make()
    Feed(health).fail(A, "alpha", 34, times=3)
    assert health.state("alpha", A) is BreakerState.OPEN
    assert health.state("alpha") is BreakerState.CLOSED  # one server's trouble
    assert chosen(health, A) == "beta"
    assert chosen(health, B) == "alpha"
    states = health.states()  # what the metrics read
    assert ("alpha", A, "open") in states and ("alpha", None, "closed") in states
    why = health.unavailable("alpha", A)
    assert why == f"open on {A} (3 consecutive trunk failures)"


def test_failures_on_two_servers_open_the_carrier_everywhere() -> None:
    health, _ = make()
    feed = Feed(health)
    feed.fail(A, "alpha", 38, times=2)
    feed.fail(B, "alpha", 27)
    assert health.state("alpha", A) is BreakerState.CLOSED  # 2 in a row only
    assert health.state("alpha") is BreakerState.OPEN  # 3 in a row, from 2 servers
    assert chosen(health, C) == "beta"


def test_busy_and_no_answer_keep_a_carrier_in_rotation() -> None:
    health, _ = make()
    feed = Feed(health)
    for cause in (17, 19, 16, 28) * 20:
        feed.fail(A, "alpha", cause)
        feed.fail(B, "alpha", cause)
    assert health.state("alpha", A) is BreakerState.CLOSED
    assert health.state("alpha") is BreakerState.CLOSED
    assert chosen(health, A) == "alpha"
    doc = health.document()
    alpha = next(c for c in doc["carriers"] if c["id"] == "alpha")
    assert alpha["failure_ratio"] == 0.0 and alpha["calls_in_window"] == 160


def test_an_answered_call_is_one_success() -> None:
    health, _ = make()
    feed = Feed(health)
    feed.fail(A, "alpha", 34, times=2)
    channel = feed.new(A, "alpha")
    feed.answer(A, channel)
    feed.hangup(A, channel, 16, state="6")  # the end of that same call: not counted again
    feed.fail(A, "alpha", 34, times=2)
    assert health.state("alpha", A) is BreakerState.CLOSED
    assert health.breakers["alpha"].calls_in_window() == 5


def test_unreachable_peer_opens_at_once_and_reachable_probes_it_back() -> None:
    health, _ = make()
    feed = Feed(health)
    feed.peer(A, "alpha", "Unreachable")
    assert health.state("alpha", A) is BreakerState.OPEN
    assert chosen(health, A) == "beta" and chosen(health, B) == "alpha"
    feed.peer(A, "alpha", "Reachable")
    assert health.state("alpha", A) is BreakerState.HALF_OPEN
    channels = []
    for n in range(2):  # probe_calls = 2
        assert chosen(health, A) == "alpha"
        code = f"V{n:019d}"
        health.placed(placed(A, "alpha", code))
        channels.append(feed.new(A, "alpha", code))
    assert chosen(health, A) == "beta"  # both probes in flight
    for channel in channels:
        feed.answer(A, channel)
    assert health.state("alpha", A) is BreakerState.CLOSED
    assert chosen(health, A) == "beta"  # alpha is at its cap of 2 with the probes' calls
    feed.hangup(A, channels[0], 16, state="6")
    assert chosen(health, A) == "alpha"


def test_contact_status_and_registry_name_their_carrier() -> None:
    health, _ = make()
    contact = {
        "Event": "ContactStatus",
        "ContactStatus": "Unreachable",
        "AOR": "beta-trunk",
        "EndpointName": "beta-trunk",
    }
    health.on_channel_event(B, contact, None)
    assert health.state("beta", B) is BreakerState.OPEN
    registry = {"Event": "Registry", "Username": "alpha", "Domain": "x", "Status": "Rejected"}
    health.on_channel_event(B, registry, None)
    assert health.state("alpha", B) is BreakerState.OPEN
    pick = health.choose(B, "1", "3125550001")
    assert isinstance(pick, NoCarrier)
    assert "Registry Rejected" in pick.reason and "ContactStatus Unreachable" in pick.reason
    health.on_channel_event(B, {**contact, "ContactStatus": "Reachable"}, None)
    assert health.state("beta", B) is BreakerState.HALF_OPEN
    health.on_channel_event(B, {**registry, "Status": "Request Sent"}, None)  # no verdict
    assert health.state("alpha", B) is BreakerState.OPEN
    health.on_channel_event(B, {**registry, "Status": "Registered"}, None)
    assert health.state("alpha", B) is BreakerState.HALF_OPEN


# --------------------------------------------------------------------------- caps and availability


def test_line_cap_counts_reservations_until_the_channel_appears() -> None:
    health, clock = make()
    feed = Feed(health)
    for n in range(2):
        assert chosen(health, A) == "alpha"
        health.placed(placed(A, "alpha", f"V{n:019d}"))
    assert health.lines("alpha", A) == (0, 2)
    assert chosen(health, A) == "beta"  # cap 2: the reservations count
    first = feed.new(A, "alpha", f"V{0:019d}")  # its channel: a line, no longer a reservation
    assert health.lines("alpha", A) == (1, 1)
    assert chosen(health, A) == "beta"
    feed.hangup(A, first, 17, code=f"V{0:019d}")
    assert chosen(health, A) == "alpha"
    clock.now += 30 + 10 + 1  # the second call's dial timeout (and margin) passed unseen
    health.choose(A, "1", "3125550001")
    assert health.lines("alpha", A) == (0, 0)


def test_availability_from_carrier_rows_and_config() -> None:
    rows = [CarrierRow("alpha", A, "SIP", ""), CarrierRow("beta", "0.0.0.0", "SIP", "")]
    health, _ = make(rows=rows)
    assert health.available_on("alpha") == {A} and health.available_on("beta") is None
    assert chosen(health, A) == "alpha" and chosen(health, B) == "beta"
    assert health.unavailable("alpha", B) == f"not available on {B}"
    carriers = (replace(CARRIERS[0], servers=(B,)), CARRIERS[1])
    health, _ = make(carriers=carriers, rows=rows)
    assert chosen(health, B) == "alpha" and chosen(health, A) == "beta"
    health, _ = make(rows=[])  # no active row, no servers configured: nowhere
    pick = health.choose(A, "1", "3125550001")
    assert isinstance(pick, NoCarrier) and "not available on" in pick.reason


def test_bypass_and_unmatched_numbers_keep_the_campaign_prefix() -> None:
    health, _ = make(settings=replace(SETTINGS, bypass_balance_calls=True))
    assert health.choose(A, "1", "3125550001") is None
    us_only = (RouteConfig("us", (("alpha",),), phone_codes=("1",)),)
    health, _ = make(routes=us_only)
    assert health.choose(A, "44", "2079460000") is None
    assert isinstance(health.choose(A, "1", "3125550001"), CarrierPick)
    health, _ = make(routes=())
    assert health.choose(A, "1", "3125550001") is None


def test_reconfigure_keeps_the_state_of_kept_carriers() -> None:
    health, _ = make()
    Feed(health).fail(A, "alpha", 34, times=3)
    gamma = CarrierConfig("gamma", "6", servers=(A,))
    health.reconfigure((*CARRIERS, gamma), (RouteConfig("d", (("alpha", "gamma"),)),), SETTINGS)
    assert health.state("alpha", A) is BreakerState.OPEN
    assert chosen(health, A) == "gamma"
    health.reconfigure((gamma,), (RouteConfig("d", (("gamma",),)),), SETTINGS)
    assert "alpha" not in health.breakers


# --------------------------------------------------------------------------- failover, events


def failover_of(health: CarrierHealth, fence: LeaderFence | None = None) -> Failover:
    """A failover leading with ``fence`` (one that never leads without it)."""
    return Failover(SETTINGS, health, fence=lambda: fence, now=lambda: EXAMPLE_NOW)


def hangup_event(code: str, cause: int, state: str = "0") -> dict[str, str]:
    return {
        "Event": "Hangup",
        "Uniqueid": "1.1",
        "Channel": "Local/713125550001@default-00000000;1",
        "CallerIDName": code,
        "Cause": str(cause),
        "ChannelState": state,
    }


def local_leg_hangup(code: str, cause: int, leg: int, state: str = "0") -> dict[str, str]:
    """A Hangup of one Local leg of a balance call (no trunk channel): what a real Asterisk
    whose carrier sits behind Local/ emits."""
    return {
        "Event": "Hangup",
        "Uniqueid": f"9.{leg}",
        "Channel": f"Local/713125550001@default-00000000;{leg}",
        "CallerIDName": code,
        "Cause": str(cause),
        "ChannelState": state,
    }


def test_the_balancers_own_calls_feed_the_breakers_once_per_call_without_trunk_channels() -> None:
    health, _ = make()
    codes = [f"V00000000000000000{n:02d}" for n in range(1, 4)]
    for code in codes:
        health.placed(placed(A, "alpha", code))
    for code in codes:
        # both Local legs hang up with the carrier's cause: counted once per call
        health.on_channel_event(A, local_leg_hangup(code, 34, 2), None)
        health.on_channel_event(A, local_leg_hangup(code, 34, 1), None)
    trunk = health._trunk("alpha", A).breaker
    assert trunk.calls_in_window() == 3
    assert health.state("alpha", A) is BreakerState.OPEN  # 3 consecutive trunk failures
    assert chosen(health, A) == "beta"  # later calls go straight to the next carrier
    # a busy or answered call counts for the carrier, and never twice with its trunk leg
    health2, _ = make()
    health2.placed(placed(B, "alpha", "V0000000000000000042"))
    feed = Feed(health2)
    line = feed.new(B, "alpha", code="V0000000000000000042")
    health2.on_channel_event(
        B,
        {"Event": "DialEnd", "DialStatus": "ANSWER", "DestCallerIDName": "V0000000000000000042"},
        line,
    )
    feed.hangup(B, line, 16, state="6", code="V0000000000000000042")
    health2.on_channel_event(B, local_leg_hangup("V0000000000000000042", 16, 1, state="6"), None)
    assert health2._trunk("alpha", B).breaker.calls_in_window() == 1
    assert health2.lines("alpha", B) == (0, 0)


def test_only_trunk_failures_before_answer_are_queued_once() -> None:
    health, _ = make()
    failover = failover_of(health)
    health.placed(placed(A, "alpha", "V0000000000000000001"))
    health.placed(placed(A, "alpha", "V0000000000000000002"))
    health.placed(placed(A, "alpha", "V0000000000000000003"))
    health.placed(placed(A, "alpha", "V0000000000000000004"))
    assert len(failover.calls) == 4
    failover.on_channel_event(A, hangup_event("V0000000000000000001", 17), None)  # busy
    failover.on_channel_event(A, hangup_event("V0000000000000000002", 34, state="6"), None)
    failover.on_channel_event(
        A,
        {"Event": "DialEnd", "DialStatus": "ANSWER", "DestCallerIDName": "V0000000000000000003"},
        None,
    )
    failover.on_channel_event(A, hangup_event("V0000000000000000003", 34), None)
    failover.on_channel_event(B, hangup_event("V0000000000000000004", 34), None)  # other server
    assert not failover.pending
    failover.on_channel_event(A, hangup_event("V0000000000000000004", 34), None)
    failover.on_channel_event(A, hangup_event("V0000000000000000004", 34), None)  # its ;2 leg
    assert [f.cause for f in failover.pending] == [34]
    assert not failover.calls


def test_the_recorded_session_carries_the_caller_code_on_every_leg() -> None:
    """Asterisk 22: the Originate's Callerid name is on every Hangup; a failure's Cause too."""
    received = [line[3:] for line in RECORDING.read_text().split("\n") if line.startswith("<<")]
    data = ("\r\n".join(received) + "\r\n").replace("smoke", CODE).encode()
    events = [m for m in MessageReader().feed(data) if "Event" in m]
    health, _ = make()
    failover = failover_of(health)
    tracker = Tracker(MemoryStore(), HealthConfig())
    tracker.add_server(A, ServerMeta())
    tracker.add_listener(health)
    tracker.add_listener(failover)
    originates = [
        i
        for i, e in enumerate(events)
        if e.get("Event") == "Newchannel" and e.get("Channel", "").endswith(";1")
    ]
    assert len(originates) == 3  # answered 5551234, congested 7123, answered 5550000
    queued: list[FailedCall] = []
    for n, start in enumerate(originates):
        end = originates[n + 1] if n + 1 < len(originates) else len(events)
        health.placed(placed(A, "alpha", CODE))
        for event in events[start:end]:
            tracker.on_event(A, dict(event))
        queued.extend(failover.pending)
        failover.pending.clear()
    assert [f.cause for f in queued] == [34]  # only the congested call, once
    hangups = [e for e in events if e.get("Event") == "Hangup"]
    assert hangups and all(e["CallerIDName"] == CODE for e in hangups)


# --------------------------------------------------------------------------- replace_call


async def first_call(db: Connection, health: CarrierHealth) -> tuple[CallResult, PlacedCall]:
    seed.example(db)
    snap = seed.snapshot(db)
    server, campaign = snap.servers["10.10.0.1"], snap.campaigns["CAMP1"]
    plan = seed.one_placement("CAMP1", "10.10.0.1")
    [result] = (await seed.run_plan(db, plan, router=health)).results
    assert isinstance(result, CallResult)
    call = PlacedCall(
        result.caller_code,
        result.lead_id,
        campaign,
        server,
        result.carrier_id,
        result.route,
        result.phone_code,
        result.phone_number,
        result.alt_dial,
        EXAMPLE_NOW,
    )
    return result, call


def test_replace_call_re_places_a_lead_once_on_the_next_carrier(db: Connection) -> None:
    health, _ = make()
    health.update_registry({}, [CarrierRow(c.id, "0.0.0.0", "SIP", "") for c in CARRIERS], ())
    result, call = asyncio.run(first_call(db, health))
    assert result.carrier_id == "alpha" and result.dial_string == "713125550001"
    beta = CarrierPick("beta", "8", "default", 1)
    old = seed.take_lease(db)
    execute(db, "UPDATE vb_leader SET expires_at = NOW(6) - INTERVAL 1 SECOND")
    fence = seed.take_lease(db, "new-leader")
    with pytest.raises(FenceLost):
        replace_call(db, old, call, beta, "alpha", 34)
    assert fetchall(db, "SELECT COUNT(*) AS n FROM vb_call_retries") == [{"n": 0}]
    retry = replace_call(db, fence, call, beta, "alpha", 34)
    assert isinstance(retry, CallResult)
    assert retry.dial_string == "813125550001" and retry.caller_code != call.caller_code
    assert retry.caller_code.endswith("0000100001")  # same lead
    manager = fetchall(db, "SELECT callerid, cmd_line_d FROM vicidial_manager ORDER BY man_id")
    assert manager == [
        {"callerid": call.caller_code, "cmd_line_d": "Channel: Local/713125550001@default"},
        {"callerid": retry.caller_code, "cmd_line_d": "Channel: Local/813125550001@default"},
    ]
    # the dead call's row is replaced by the retry's; the lead is still dialed once
    calls = fetchall(db, "SELECT callerid, lead_id, call_type FROM vicidial_auto_calls")
    assert calls == [{"callerid": retry.caller_code, "lead_id": 100001, "call_type": "OUTBALANCE"}]
    lead = seed.one(db, "SELECT status, called_count FROM vicidial_list")
    assert lead == {"status": "NEW", "called_count": 1}  # the number was never reached
    assert seed.count(db, "vicidial_dial_log") == 2
    retries = fetchall(db, "SELECT * FROM vb_call_retries")
    assert [
        (r["caller_code"], r["retry_caller_code"], r["hangup_cause"], r["state"]) for r in retries
    ] == [(call.caller_code, retry.caller_code, 34, "placed")]
    # never twice, and never a retry of the retry
    assert replace_call(db, fence, call, beta, "alpha", 34) == RetrySkipped(
        "the lead has another call in progress (" + retry.caller_code + ")"
    )
    execute(db, "DELETE FROM vicidial_auto_calls")  # (VICIdial cleaned the retry's row up)
    assert replace_call(db, fence, call, beta, "alpha", 34) == RetrySkipped(
        "already re-placed once (vb_call_retries)"
    )
    again = replace(call, caller_code=retry.caller_code)
    assert replace_call(db, fence, again, beta, "alpha", 34) == RetrySkipped(
        "the failed call was itself a retry (vb_call_retries)"
    )
    assert seed.count(db, "vicidial_manager") == 2


async def test_failover_retries_once_and_logs_every_decision(
    db: Connection, database_url: Any
) -> None:

    health, _ = make()
    _, call = await first_call(db, health)
    failover = failover_of(health, seed.take_lease(db))
    health.placed(call)  # what the executor does after the commit
    Feed(health).fail("10.10.0.1", "alpha", 34, times=3)
    worker = DbWorker(database_url)
    stop = asyncio.Event()
    runner = asyncio.create_task(failover.run(stop, worker))
    try:
        failover.on_channel_event("10.10.0.1", hangup_event(call.caller_code, 34), None)
        for _ in range(200):
            if failover.retried:
                break
            await asyncio.sleep(0.01)
        assert failover.retried == 1
        retry_code = fetchall(db, "SELECT retry_caller_code AS c FROM vb_call_retries")[0]["c"]
        # the retry fails as well: it is not re-placed again
        failover.on_channel_event("10.10.0.1", hangup_event(str(retry_code), 38), None)
        for _ in range(200):
            if failover.not_retried:
                break
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await runner
        await worker.close()
    rows = fetchall(
        db,
        "SELECT kind, outcome, carrier_id, reason FROM vb_decision_log WHERE kind = 'failover'"
        " ORDER BY id",
    )
    assert [(r["kind"], r["outcome"], r["carrier_id"]) for r in rows] == [
        ("failover", "retried", "beta"),
        ("failover", "not_retried", "beta"),
    ]
    assert "at most one" in str(rows[1]["reason"])
    assert seed.count(db, "vicidial_manager") == 2


async def _until(check: Any, what: str) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached: {what}")


async def test_a_new_leader_re_places_the_failed_calls_of_the_old_one(
    db: Connection, database_url: Any
) -> None:
    """The standby never saw the call being placed: it heard the failure, and once it leads it
    finds the call in the database and re-places it."""
    old_health, _ = make()
    _, call = await first_call(db, old_health)  # placed by the old leader
    standby_health, _ = make()
    standby_health.update_registry(
        {}, [CarrierRow(c.id, "0.0.0.0", "SIP", "") for c in CARRIERS], ()
    )
    fence: list[LeaderFence] = []
    failover = Failover(
        SETTINGS,
        standby_health,
        fence=lambda: fence[0] if fence else None,
        now=lambda: EXAMPLE_NOW,
    )
    failover.snapshot = lambda: seed.snapshot(db)
    # the old leader dies; its call fails on alpha while the standby is not leading yet
    failover.on_channel_event("10.10.0.1", hangup_event(call.caller_code, 34), None)
    assert [u[1] for u in failover.unknown] == [call.caller_code]
    execute(db, "UPDATE vb_leader SET expires_at = NOW(6) - INTERVAL 1 SECOND")
    fence.append(seed.take_lease(db, "the-standby"))
    worker = DbWorker(database_url)
    stop = asyncio.Event()
    runner = asyncio.create_task(failover.run(stop, worker))
    try:
        await _until(lambda: failover.retried == 1, "the retry")
    finally:
        stop.set()
        await runner
        await worker.close()
    assert failover.adopted == 1
    [retry] = fetchall(db, "SELECT * FROM vb_call_retries")
    assert (retry["caller_code"], retry["failed_carrier"], retry["retry_carrier"]) == (
        call.caller_code,
        "alpha",
        "beta",
    )
    assert retry["state"] == "placed"
    manager = fetchall(db, "SELECT callerid, cmd_line_d FROM vicidial_manager ORDER BY man_id")
    assert manager[-1] == {
        "callerid": retry["retry_caller_code"],
        "cmd_line_d": "Channel: Local/813125550001@default",
    }
    [logged] = fetchall(db, "SELECT outcome, epoch FROM vb_decision_log WHERE kind = 'failover'")
    assert logged == {"outcome": "retried", "epoch": fence[0].epoch}
    # VICIdial's own calls (not OUTBALANCE) and unknown codes are never adopted
    failover.on_channel_event("10.10.0.1", hangup_event("V0101000000000000042", 34), None)
    assert failover.retried == 1


async def test_a_retry_moves_to_another_server_when_no_carrier_is_left_on_its_own(
    db: Connection, database_url: Any
) -> None:
    carriers = (
        CarrierConfig("alpha", "7"),
        CarrierConfig("beta", "8", servers=("10.10.0.2",)),  # not on 10.10.0.1
    )
    health, _ = make(carriers=carriers)
    seed.server(db, "10.10.0.2", ext_context="other")
    _, call = await first_call(db, health)
    failover = failover_of(health, seed.take_lease(db))
    snap = seed.snapshot(db)
    failover.alternates = lambda failed: [snap.servers["10.10.0.2"]]
    health.placed(call)
    worker = DbWorker(database_url)
    stop = asyncio.Event()
    runner = asyncio.create_task(failover.run(stop, worker))
    try:
        failover.on_channel_event("10.10.0.1", hangup_event(call.caller_code, 34), None)
        await _until(lambda: failover.retried == 1, "the retry")
    finally:
        stop.set()
        await runner
        await worker.close()
    last = fetchall(db, "SELECT server_ip, cmd_line_c FROM vicidial_manager ORDER BY man_id")[-1]
    assert last == {"server_ip": "10.10.0.2", "cmd_line_c": "Context: other"}
    [moved] = fetchall(db, "SELECT server_ip, callerid FROM vicidial_auto_calls")
    assert moved["server_ip"] == "10.10.0.2"  # the lead's one call in progress moved with it
    [logged] = fetchall(db, "SELECT reason, details FROM vb_decision_log WHERE kind = 'failover'")
    assert "on 10.10.0.2 (no carrier left on 10.10.0.1)" in str(logged["reason"])
    assert '"moved_to":"10.10.0.2"' in str(logged["details"])


# --------------------------------------------------------------------------- `routes`


def test_render_routes_shows_states_ratio_lines_and_changes() -> None:
    health, _ = make()
    feed = Feed(health)
    feed.fail(A, "alpha", 34, times=3)
    feed.new(B, "alpha")
    doc = health.document()
    text = render_routes(doc, now=doc["generated_at"] + 5)
    assert "default  default  alpha > beta" in text
    lines = text.splitlines()
    row = next(line for line in lines if A in line and "OPEN" in line)
    assert "1.00" in row and "0/2" in row and "3 consecutive trunk failures" in row
    assert "(5s ago)" in row
    assert any(B in line and "CLOSED" in line and "1/2" in line for line in lines)
    assert json.loads(json.dumps(doc)) == doc


def run_cli(args: list[str], env: dict[str, str]) -> Any:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def write_config(tmp_path: Path, redis_url: str, routes: str = "") -> Path:
    path = tmp_path / "vb.toml"
    path.write_text(
        f"""
[database]
url = "mysql://u:p@127.0.0.1:3306/asterisk"
[redis]
url = "{redis_url}"
key_prefix = "vbroutes:"
[[carriers]]
id = "alpha"
dial_prefix = "7"
max_lines_per_server = 2
[[carriers]]
id = "beta"
dial_prefix = "8"
[[routes]]
name = "default"
carriers = ["alpha", "beta"]
{routes}
"""
    )
    return path


def test_routes_without_a_shared_store_shows_config_and_exits_1(tmp_path: Path) -> None:
    result = run_cli(["--config", str(write_config(tmp_path, "memory://")), "routes"], {})
    assert result.exit_code == 1
    assert "alpha > beta" in result.output and "UNKNOWN" in result.output
    assert "memory://" in result.output


def test_routes_bad_route_exits_2_naming_it(tmp_path: Path) -> None:
    extra = '[[routes]]\nname = "uk"\nphone_codes = ["44"]\ncarriers = ["alpha", "zeta"]\n'
    path = write_config(tmp_path, "memory://", extra)
    result = run_cli(["--config", str(path), "routes"], {})
    assert result.exit_code == 2
    assert "routes[1].carriers: unknown carrier 'zeta' in route 'uk'" in result.output


async def test_routes_reads_what_the_leader_published(tmp_path: Path, redis_db: str) -> None:
    health, _ = make()
    Feed(health).fail(A, "alpha", 34, times=3)
    store = RedisStore(redis_db, "vbroutes:", 10)
    try:
        await health.publish(store, 30)
    finally:
        await store.close()
    path = write_config(tmp_path, redis_db)
    result = await asyncio.to_thread(run_cli, ["--config", str(path), "routes", "--json"], {})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    alpha = next(c for c in doc["carriers"] if c["id"] == "alpha")
    server = next(s for s in alpha["servers"] if s["server_ip"] == A)
    assert (server["state"], server["failure_ratio"]) == ("open", 1.0)
    assert doc["problems"] == [] and doc["live"] is True
    empty = RedisConfig(redis_db, "vbnothing:")
    path2 = tmp_path / "other.toml"
    path2.write_text(path.read_text().replace("vbroutes:", empty.key_prefix))
    result = await asyncio.to_thread(run_cli, ["--config", str(path2), "routes"], {})
    assert result.exit_code == 1 and "no daemon has published" in result.output
