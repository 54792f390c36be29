"""Routing, pure: cause classes, route matching, weighted choice, the breaker; a property test
over CarrierHealth: a chosen carrier is always matched, healthy and under its cap."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.balance.model import CampaignInfo, ServerInfo
from balancer.carriers.health import CarrierHealth
from balancer.carriers.routing import (
    Breaker,
    BreakerState,
    CarrierPick,
    NoCarrier,
    Outcome,
    PlacedCall,
    RouteTable,
    choose_carrier,
    classify_cause,
)
from balancer.config import CarrierConfig, RouteConfig, RoutingConfig
from balancer.db.records import CarrierRow
from balancer.store.base import Channel, ChannelClass


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


SETTINGS = RoutingConfig(
    failure_threshold=3, failure_ratio=0.5, window_s=60, min_calls=10, cool_down_s=30
)
CARRIERS = {
    "alpha": CarrierConfig("alpha", "7"),
    "beta": CarrierConfig("beta", "8"),
    "gamma": CarrierConfig("gamma", "6"),
}


def route(name: str, *tiers: tuple[str, ...], **kw: Any) -> RouteConfig:
    return RouteConfig(name=name, tiers=tuple(tiers), **kw)


# --------------------------------------------------------------------------- causes


@pytest.mark.parametrize(
    ("cause", "outcome"),
    [
        *[(c, Outcome.TRUNK_FAILURE) for c in (34, 38, 27, 102, 41, 42, 58, 127)],
        *[(c, Outcome.CALLED_PARTY) for c in (16, 17, 19, 28)],
        *[(c, Outcome.AMBIGUOUS) for c in (1, 18, 21)],
        (20, Outcome.OTHER),
        (0, Outcome.OTHER),
    ],
)
def test_causes_are_classified_as_in_design(cause: int, outcome: Outcome) -> None:
    assert classify_cause(cause) is outcome


# --------------------------------------------------------------------------- routes


def test_longest_match_wins_then_the_first_listed() -> None:
    us = route("us", ("alpha",), phone_codes=("1",))
    chicago = route("chicago", ("beta",), phone_codes=("1",), prefixes=("312", "773"))
    anywhere_44 = route("uk-by-prefix", ("gamma",), prefixes=("44",))
    default = route("default", ("alpha", "beta"))
    table = RouteTable([default, us, chicago, anywhere_44])
    assert table.match("1", "3125550001") is chicago  # 1 + 312: four digits
    assert table.match("1", "7735550001") is chicago
    assert table.match("1", "2125550001") is us
    assert table.match("44", "2079460000") is default
    assert table.match("52", "4412345") is anywhere_44  # prefix only, any phone code
    # a tie in length goes to the route listed first
    a = route("a", ("alpha",), prefixes=("55",))
    b = route("b", ("beta",), phone_codes=("5",), prefixes=("5",))
    assert RouteTable([a, b]).match("5", "55") is b  # same length: the phone_code one
    c = route("c", ("gamma",), prefixes=("55",))
    assert RouteTable([a, c]).match("", "551") is a


def test_no_default_route_means_no_match() -> None:
    table = RouteTable([route("us", ("alpha",), phone_codes=("1",))])
    assert table.match("44", "2079460000") is None
    assert not RouteTable([])


def test_first_usable_tier_and_reasons() -> None:
    r = route("r", ("alpha",), ("beta", "gamma"))
    rng = random.Random(1)
    assert choose_carrier(r, CARRIERS, lambda c: None, rng) == CarrierPick("alpha", "7", "r", 0)
    down = {"alpha": "open on 10.0.0.2 (3 consecutive trunk failures)"}
    pick = choose_carrier(r, CARRIERS, down.get, rng)
    assert isinstance(pick, CarrierPick) and pick.tier == 1
    assert pick.carrier_id in ("beta", "gamma")
    none = choose_carrier(r, CARRIERS, lambda c: f"{c} is down", rng)
    assert isinstance(none, NoCarrier)
    assert none.reason.startswith("route 'r': alpha: alpha is down; beta: beta is down")
    excluded = choose_carrier(r, CARRIERS, lambda c: None, rng, exclude=("alpha",))
    assert isinstance(excluded, CarrierPick) and excluded.carrier_id != "alpha"


def test_weights_share_traffic_among_equals() -> None:
    r = route("r", ("alpha", "beta"), weights={"alpha": 3, "beta": 1})
    rng = random.Random(42)
    picks = Counter(
        p.carrier_id
        for p in (choose_carrier(r, CARRIERS, lambda c: None, rng) for _ in range(4000))
        if isinstance(p, CarrierPick)
    )
    assert 0.70 < picks["alpha"] / 4000 < 0.80
    # the same seed gives the same sequence: choices can be replayed
    one = [choose_carrier(r, CARRIERS, lambda c: None, random.Random(7)) for _ in range(3)]
    two = [choose_carrier(r, CARRIERS, lambda c: None, random.Random(7)) for _ in range(3)]
    assert one == two


# --------------------------------------------------------------------------- breaker


def test_consecutive_trunk_failures_open_it() -> None:
    clock = Clock()
    breaker = Breaker(SETTINGS, clock)
    assert not breaker.record(Outcome.TRUNK_FAILURE)
    assert not breaker.record(Outcome.TRUNK_FAILURE)
    assert breaker.record(Outcome.TRUNK_FAILURE)
    assert breaker.state is BreakerState.OPEN and not breaker.allows()
    assert breaker.reason == "3 consecutive trunk failures"


def test_a_success_breaks_the_streak_and_other_causes_do_not_count() -> None:
    breaker = Breaker(SETTINGS, Clock())
    for outcome in (Outcome.TRUNK_FAILURE, Outcome.TRUNK_FAILURE, Outcome.CALLED_PARTY) * 3:
        breaker.record(outcome)
    assert breaker.state is BreakerState.CLOSED
    breaker.record(Outcome.OTHER)  # cause 20 and friends: not judged
    assert breaker.calls_in_window() == 9


def test_called_party_outcomes_never_open_it() -> None:
    breaker = Breaker(SETTINGS, Clock())
    for _ in range(500):
        breaker.record(Outcome.CALLED_PARTY)
    assert breaker.state is BreakerState.CLOSED and breaker.failure_ratio() == 0.0


def test_failure_ratio_over_the_window() -> None:
    clock = Clock()
    breaker = Breaker(SETTINGS, clock)
    # alternating failures never make 3 in a row, but 6/11 > 0.5 once min_calls is reached
    for i in range(11):
        breaker.record(Outcome.TRUNK_FAILURE if i % 2 == 0 else Outcome.ANSWERED)
        clock.advance(1)
    assert breaker.state is BreakerState.OPEN
    assert breaker.reason.startswith("trunk failure ratio 6/11")


def test_old_outcomes_leave_the_window() -> None:
    clock = Clock()
    breaker = Breaker(SETTINGS, clock)
    for _ in range(5):
        breaker.record(Outcome.TRUNK_FAILURE)
        breaker.record(Outcome.ANSWERED)
    clock.advance(61)
    assert breaker.calls_in_window() == 0 and breaker.failure_ratio() == 0.0


def test_ambiguous_causes_judged_by_rate_only() -> None:
    breaker = Breaker(SETTINGS, Clock())
    for _ in range(9):
        breaker.record(Outcome.AMBIGUOUS)
    assert breaker.state is BreakerState.CLOSED  # below min_calls: no streak for ambiguous
    breaker.record(Outcome.AMBIGUOUS)
    assert breaker.state is BreakerState.OPEN and "ambiguous" in breaker.reason


def test_half_open_probes_close_it_again() -> None:
    clock = Clock()
    breaker = Breaker(SETTINGS, clock)
    for _ in range(3):
        breaker.record(Outcome.TRUNK_FAILURE)
    clock.advance(29)
    assert not breaker.allows()
    clock.advance(1)
    assert breaker.allows() and breaker.state is BreakerState.HALF_OPEN
    breaker.probe_started()
    assert breaker.allows()
    breaker.probe_started()
    assert not breaker.allows()  # probe_calls = 2 in flight
    breaker.record(Outcome.ANSWERED)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(Outcome.CALLED_PARTY)  # busy still proves the trunk works
    assert breaker.state is BreakerState.CLOSED and breaker.allows()
    assert breaker.calls_in_window() == 0  # a fresh start
    assert not breaker.record(Outcome.TRUNK_FAILURE)


def test_a_failed_probe_opens_it_for_another_cool_down() -> None:
    clock = Clock()
    breaker = Breaker(SETTINGS, clock)
    for _ in range(3):
        breaker.record(Outcome.TRUNK_FAILURE)
    clock.advance(30)
    assert breaker.allows()
    breaker.probe_started()
    assert breaker.record(Outcome.TRUNK_FAILURE)
    assert breaker.state is BreakerState.OPEN and breaker.reason.startswith("probe failed")
    clock.advance(10)
    assert not breaker.allows()


def test_a_lost_probe_frees_its_slot_after_a_cool_down() -> None:
    clock = Clock()
    breaker = Breaker(SETTINGS, clock)
    for _ in range(3):
        breaker.record(Outcome.TRUNK_FAILURE)
    clock.advance(30)
    for _ in range(2):
        assert breaker.allows()
        breaker.probe_started()
    assert not breaker.allows()
    clock.advance(31)
    assert breaker.allows()


def test_hold_and_release() -> None:
    clock = Clock()
    breaker = Breaker(SETTINGS, clock)
    assert breaker.hold("PeerStatus Unreachable")
    clock.advance(1000)
    assert not breaker.allows()  # held: no cool-down
    assert breaker.release("PeerStatus Reachable: probing")
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allows()
    assert not breaker.release("again")


def test_spread_needs_failures_from_two_sources() -> None:
    breaker = Breaker(SETTINGS, Clock(), spread=2)
    for _ in range(10):
        breaker.record(Outcome.TRUNK_FAILURE, "10.0.0.1")
    assert breaker.state is BreakerState.CLOSED  # one server's trouble only
    breaker.record(Outcome.TRUNK_FAILURE, "10.0.0.2")
    assert breaker.state is BreakerState.OPEN


# --------------------------------------------------------------------------- property


SERVERS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
PROPERTY_CARRIERS = (
    CarrierConfig("alpha", "7", max_lines_per_server=2),
    CarrierConfig("beta", "8", max_lines_per_server=3, servers=("10.0.0.1", "10.0.0.2")),
    CarrierConfig("gamma", "6", max_lines_per_server=4),
    CarrierConfig("delta", "5"),  # in no route
)
PROPERTY_ROUTES = (
    RouteConfig("us", (("alpha",), ("beta", "gamma")), phone_codes=("1",), weights={"beta": 2}),
    RouteConfig("chicago", (("beta",), ("alpha",)), phone_codes=("1",), prefixes=("312",)),
    RouteConfig("default", (("gamma", "alpha"),)),
)
CAMPAIGN = CampaignInfo("C1", dial_timeout=30)

call_action = st.tuples(
    st.just("call"),
    st.sampled_from(SERVERS),
    st.sampled_from(["1", "44"]),
    st.sampled_from(["3125550000", "2125550000", "7000"]),
)
action = st.one_of(
    call_action,
    call_action,
    call_action,
    st.tuples(
        st.just("hangup"),
        st.sampled_from(SERVERS),
        st.sampled_from(["alpha", "beta", "gamma"]),
        st.sampled_from([16, 17, 19, 34, 38, 1, 20]),
        st.integers(1, 4),
    ),
    st.tuples(
        st.just("peer"),
        st.sampled_from(SERVERS),
        st.sampled_from(["alpha", "beta", "gamma"]),
        st.sampled_from(["Reachable", "Unreachable"]),
    ),
    st.tuples(st.just("time"), st.floats(0, 40)),
    st.tuples(st.just("answer"), st.sampled_from(SERVERS)),
)


def _hangup_event(uid: str, cause: int) -> dict[str, str]:
    return {"Event": "Hangup", "Uniqueid": uid, "Cause": str(cause), "ChannelState": "0"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(action, min_size=10, max_size=80), st.integers(0, 2**16))
def test_a_chosen_carrier_is_matched_healthy_and_under_its_cap(
    actions: list[tuple[Any, ...]], seed: int
) -> None:
    clock = Clock()
    health = CarrierHealth(
        PROPERTY_CARRIERS, PROPERTY_ROUTES, SETTINGS, clock=clock, rng=random.Random(seed)
    )
    rows = [CarrierRow(c, "0.0.0.0", "SIP", "") for c in ("alpha", "gamma")]
    health.update_registry({}, rows, SERVERS)
    live: dict[str, list[tuple[str, str]]] = {ip: [] for ip in SERVERS}  # answered trunk legs
    seq = 0
    for step in actions:
        seq += 1
        kind = step[0]
        if kind == "hangup":
            _, ip, carrier, cause, repeat = step
            for n in range(repeat):
                uid = f"h.{seq}.{n}"
                channel = Channel(uid, f"SIP/{carrier}-{seq:08x}", ChannelClass.TRUNK, carrier)
                health.on_channel_event(ip, {"Event": "Newchannel", "Uniqueid": uid}, channel)
                health.on_channel_event(ip, _hangup_event(uid, cause), channel)
        elif kind == "peer":
            _, ip, carrier, status = step
            event = {"Event": "PeerStatus", "Peer": f"SIP/{carrier}", "PeerStatus": status}
            health.on_channel_event(ip, event, None)
        elif kind == "time":
            clock.advance(step[1])
        elif kind == "answer" and live[step[1]]:
            uid, carrier = live[step[1]].pop()
            channel = Channel(uid, f"SIP/{carrier}-x", ChannelClass.TRUNK, carrier)
            health.on_channel_event(step[1], {"Event": "Hangup", "Uniqueid": uid}, channel)
        elif kind == "call":
            _, ip, code, number = step
            expected = health.table.match(code, number)
            before = {
                c.id: (health.unavailable(c.id, ip), health.lines(c.id, ip))
                for c in PROPERTY_CARRIERS
            }
            choice = health.choose(ip, code, number)
            assert expected is not None  # there is a default route
            if isinstance(choice, NoCarrier):
                assert all(before[c][0] is not None for c in expected.carriers)
                continue
            assert isinstance(choice, CarrierPick)
            config = {c.id: c for c in PROPERTY_CARRIERS}[choice.carrier_id]
            # matched: a carrier of the number's own route, from its first usable tier
            assert choice.route == expected.name and choice.carrier_id in expected.carriers
            first_usable = next(
                i
                for i, tier in enumerate(expected.tiers)
                if any(before[c][0] is None for c in tier)
            )
            assert choice.tier == first_usable
            # healthy: available on the server, neither breaker open, peer reachable
            assert before[choice.carrier_id][0] is None
            assert health.state(choice.carrier_id) is not BreakerState.OPEN
            assert health.state(choice.carrier_id, ip) is not BreakerState.OPEN
            assert not health.trunks[(choice.carrier_id, ip)].problems
            available = health.available_on(choice.carrier_id)
            assert available is None or ip in available
            # under its cap
            lines, reserved = before[choice.carrier_id][1]
            cap = config.max_lines_per_server
            assert cap == 0 or lines + reserved < cap
            code_ = f"V{seq:019d}"
            health.placed(
                PlacedCall(
                    code_,
                    seq,
                    CAMPAIGN,
                    ServerInfo(ip),
                    choice.carrier_id,
                    choice.route,
                    code,
                    number,
                    "MAIN",
                    datetime(2025, 1, 1),
                )
            )
            # its trunk channel appears and is answered: a live line, reservation released
            uid = f"c.{seq}"
            channel = Channel(
                uid, f"SIP/{choice.carrier_id}-{seq:08x}", ChannelClass.TRUNK, choice.carrier_id
            )
            health.on_channel_event(
                ip, {"Event": "Newchannel", "Uniqueid": uid, "CallerIDName": code_}, channel
            )
            live[ip].append((uid, choice.carrier_id))
        # invariant: never above a cap, counting reservations
        for config in PROPERTY_CARRIERS:
            for ip in SERVERS:
                lines, reserved = health.lines(config.id, ip)
                if config.max_lines_per_server:
                    assert lines + reserved <= config.max_lines_per_server
