"""Agent phone choice and login-flag decisions (pure, table-driven, plus properties)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.agents.choice import (
    VICIDIAL_MODE,
    Assignment,
    PhoneCandidate,
    choose_phone,
)
from balancer.agents.facts import (
    AgentTables,
    Grouping,
    GroupingMode,
    LoginFlagRecord,
    ServerFacts,
    ServerRecord,
    build_facts,
    capacity_of,
    load_of,
)
from balancer.agents.flag_rules import (
    FlagAction,
    FlagSettings,
    decide_login_flags,
    desired_flag,
    flags_document,
    reopen_threshold,
)
from balancer.config import AgentsConfig
from balancer.store.base import ChannelClass, Health, ServerMeta, ServerState

MAX_AGE = 60.0


def server(ip: str, **kw: object) -> ServerFacts:
    base: dict[str, object] = {
        "server_id": "ast" + ip.rsplit(".", 1)[1],
        "health": Health.UP,
        "free_conferences": 5,
        "capacity": 20,
        "max_trunks": 23,
        "updater_age_s": 1.0,
    }
    base.update(kw)
    return ServerFacts(ip, **base)  # type: ignore[arg-type]


def phones(*ips: str) -> list[PhoneCandidate]:
    return [PhoneCandidate(f"10{i}", f"10{i}", ip, i) for i, ip in enumerate(ips)]


def choose(
    facts: list[ServerFacts],
    grouping: Grouping | None = None,
    campaign_agents: dict[str, int] | None = None,
) -> Assignment:
    by_ip = {f.server_ip: f for f in facts}
    return choose_phone(
        phones(*by_ip),
        by_ip,
        updater_max_age_s=MAX_AGE,
        grouping=grouping,
        campaign_agents=campaign_agents,
    )


# --------------------------------------------------------------------------- capacity model


def test_spare_capacity_beats_raw_agent_count() -> None:
    big = server("10.10.0.1", capacity=100, agents=40)  # 0.40
    small = server("10.10.0.2", capacity=10, agents=8)  # 0.80, fewer agents
    result = choose([big, small])
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.1"
    # VICIdial would have picked the small one: fewest agents.
    assert small.agents < big.agents


def test_full_server_is_not_eligible() -> None:
    full = server("10.10.0.1", capacity=10, agents=10)
    big = server("10.10.0.2", capacity=100, agents=90)
    result = choose([full, big])
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.2"
    assert "at agent capacity (10/10)" in result.reason


def test_score_is_the_higher_of_agent_and_trunk_utilisation() -> None:
    busy_trunks = server("10.10.0.1", agents=2, trunk_lines=20, max_trunks=23)  # 0.87
    busy_agents = server("10.10.0.2", agents=10, trunk_lines=0)  # 0.50
    result = choose([busy_trunks, busy_agents])
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.2"
    load = load_of(busy_trunks)
    assert load.score == pytest.approx(20 / 23)
    assert load.agent_util == pytest.approx(0.1)


def test_agent_phones_count_when_above_logged_in_agents() -> None:
    f = server("10.10.0.1", agents=3, agent_phones=7)
    assert load_of(f).agents == 7
    assert load_of(replace(f, agent_phones=1)).agents == 3


def test_zero_capacity_and_zero_trunks() -> None:
    assert load_of(server("10.10.0.1", capacity=0)).agent_util == 1.0
    assert load_of(server("10.10.0.1", max_trunks=0)).trunk_util == 0.0
    assert load_of(server("10.10.0.1", max_trunks=0, trunk_lines=1)).trunk_util == 1.0
    result = choose([server("10.10.0.1", capacity=0)])
    assert result.chosen is None and "at agent capacity (0/0)" in result.reason


def test_capacity_per_server_with_default() -> None:
    config = AgentsConfig(default_capacity=50, capacity={"10.10.0.2": 150})
    assert capacity_of(config, "10.10.0.1") == 50
    assert capacity_of(config, "10.10.0.2") == 150


def test_reason_text() -> None:
    facts = [
        server("10.10.0.1", health=Health.DOWN, health_reason="connection closed"),
        server("10.10.0.2", agents=7, trunk_lines=3),
        server("10.10.0.3", agents=12),
        server("10.10.0.4", agents=15),
    ]
    result = choose(facts)
    assert result.reason == (
        "score 0.35 (agents 7/20, trunks 3/23) — lowest among 3 eligible; "
        "skipped 10.10.0.1: DOWN (connection closed)"
    )


# --------------------------------------------------------------------------- eligibility


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"health": Health.DOWN}, "DOWN"),
        ({"health": Health.SUSPECT}, "SUSPECT"),
        ({"health": None}, "no live state"),
        ({"drained": True}, "DRAINED"),
        ({"active": False}, "server inactive"),
        ({"login_flag": "N"}, "agent logins off by the admin"),
        ({"login_flag": None}, "agent logins off by the admin"),
        ({"free_conferences": 0}, "no free conference"),
        ({"updater_age_s": 61.0}, "server_updater stale (61s > 60s)"),
        ({"agents": 20}, "at agent capacity (20/20)"),
    ],
)
def test_ineligible_server_is_never_chosen(change: dict[str, object], problem: str) -> None:
    bad = server("10.10.0.1", **change)  # emptiest, would win on score
    ok = server("10.10.0.2", agents=15, trunk_lines=20)
    result = choose([bad, ok])
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.2"
    skipped = result.skipped[0]
    assert skipped.phone.server_ip == "10.10.0.1"
    assert any(problem in p for p in skipped.problems), skipped.problems


def test_the_agent_screens_own_checks_apply_in_capacity_mode_too() -> None:
    """No server_updater row, or one the screen finds too old (2 minutes) even when our own
    limit is off; a dead twin; a CONFBRIDGE server's conferences are in vicidial_confbridges."""
    for change, problem in (
        ({"updater_age_s": None}, "no server_updater row"),
        ({"twin_server_ip": "10.10.0.9"}, "twin 10.10.0.9 not live (no server_updater row)"),
        (
            {"twin_server_ip": "10.10.0.9", "twin_updater_age_s": 120.0},
            "twin 10.10.0.9 not live (server_updater 120s old",
        ),
        ({"conf_engine": "CONFBRIDGE"}, "no free conference in vicidial_confbridges"),
    ):
        result = choose([server("10.10.0.1", **change)])
        assert result.chosen is None and problem in result.reason, (change, result.reason)
    f = server("10.10.0.1", updater_age_s=130.0)
    by_ip = {f.server_ip: f}
    result = choose_phone(phones("10.10.0.1"), by_ip, updater_max_age_s=None)
    assert result.chosen is None and "server_updater 130s old" in result.reason
    # Our stricter limit names itself, not the screen's too.
    result = choose_phone(phones("10.10.0.1"), by_ip, updater_max_age_s=MAX_AGE)
    assert result.candidates[0].problems == ("server_updater stale (130s > 60s)",)
    fine = [
        server("10.10.0.1", twin_server_ip="10.10.0.9", twin_updater_age_s=3.0),
        server("10.10.0.2", conf_engine="CONFBRIDGE", free_conferences=0, free_confbridges=2),
        server("10.10.0.3", twin_server_ip="1.2"),  # 4 characters or fewer: no twin
    ]
    for f in fine:
        assert choose([f]).chosen is not None, f


def test_balancer_held_flag_is_not_the_admins() -> None:
    """A 'N' the balancer set (server was full) does not make it ineligible once below capacity."""
    held = server(
        "10.10.0.1", login_flag="N", flag_record=LoginFlagRecord("10.10.0.1", "N"), agents=19
    )
    assert held.admin_login_flag == "Y"
    result = choose([held])
    assert result.chosen is not None
    admin = replace(held, flag_record=None)
    assert choose([admin]).chosen is None


def test_inactive_phone_and_unknown_server() -> None:
    facts = {"10.10.0.1": server("10.10.0.1")}
    result = choose_phone(
        [
            PhoneCandidate("101", "101", "10.10.0.1", 0, active=False),
            PhoneCandidate("102", "102", "10.10.0.9", 1),
        ],
        facts,
        updater_max_age_s=MAX_AGE,
    )
    assert result.chosen is None
    assert result.reason == (
        "no eligible server: 10.10.0.1: phone 101 inactive (phones.active='N'); "
        "10.10.0.9: not in the servers table"
    )


def test_ties_are_deterministic() -> None:
    a = server("10.10.0.9", agents=5)
    b = server("10.10.0.10", agents=5)
    by_ip = {f.server_ip: f for f in (a, b)}
    first = choose_phone(phones("10.10.0.9", "10.10.0.10"), by_ip, updater_max_age_s=MAX_AGE)
    second = choose_phone(phones("10.10.0.10", "10.10.0.9"), by_ip, updater_max_age_s=MAX_AGE)
    # Same score and agents: the alias's own order decides.
    assert first.chosen is not None and first.chosen.phone.server_ip == "10.10.0.9"
    assert second.chosen is not None and second.chosen.phone.server_ip == "10.10.0.10"
    # Same score: fewer agents first.
    c = server("10.10.0.1", capacity=40, agents=10)  # 0.25
    d = server("10.10.0.2", capacity=20, agents=5)  # 0.25
    result = choose([c, d])
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.2"


# --------------------------------------------------------------------------- grouping


def test_one_server_only_stays_with_the_campaign() -> None:
    facts = [server("10.10.0.1", agents=15), server("10.10.0.2", agents=2)]
    grouping = Grouping("CAMP1", GroupingMode.ONE_SERVER_ONLY)
    result = choose(facts, grouping=grouping, campaign_agents={"10.10.0.1": 4})
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.1"
    assert "ONE_SERVER_ONLY: campaign CAMP1 already has 4 agents here" in result.reason
    assert result.grouped
    # Agents on two servers: the one with most of them.
    result = choose(facts, grouping=grouping, campaign_agents={"10.10.0.1": 1, "10.10.0.2": 3})
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.2"


def test_one_server_only_falls_back_when_the_campaign_server_is_down() -> None:
    facts = [server("10.10.0.1", health=Health.DOWN), server("10.10.0.2", agents=2)]
    grouping = Grouping("CAMP1", GroupingMode.ONE_SERVER_ONLY)
    result = choose(facts, grouping=grouping, campaign_agents={"10.10.0.1": 4})
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.2"
    assert "not eligible" in result.reason
    # No agents yet anywhere: by score.
    result = choose(facts[1:], grouping=grouping, campaign_agents={})
    assert result.chosen is not None and "has no agents yet" in result.reason
    assert not result.grouped


def test_cascading_fills_one_server_to_the_limit_then_the_next() -> None:
    facts = [server("10.10.0.1", agents=2), server("10.10.0.2", agents=8)]
    grouping = Grouping("CAMP1", GroupingMode.CASCADING, campaign_limit=3)
    agents: dict[str, int] = {}
    chosen: list[str] = []
    for _ in range(7):
        result = choose(facts, grouping=grouping, campaign_agents=agents)
        assert result.chosen is not None
        ip = result.chosen.phone.server_ip
        chosen.append(ip)
        agents[ip] = agents.get(ip, 0) + 1
    # The emptiest server first, up to 3; then the next; then by score.
    assert chosen[:6] == ["10.10.0.1"] * 3 + ["10.10.0.2"] * 3
    assert "every eligible server has 3+ agents" in result.reason
    no_limit = Grouping("CAMP1", GroupingMode.CASCADING, campaign_limit=0)
    result = choose(facts, grouping=no_limit, campaign_agents={"10.10.0.2": 5})
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.1"


def test_cascading_skips_a_full_or_down_server() -> None:
    facts = [
        server("10.10.0.1", health=Health.DOWN),
        server("10.10.0.2", agents=1),
        server("10.10.0.3", agents=0),
    ]
    grouping = Grouping("C", GroupingMode.CASCADING, campaign_limit=5)
    result = choose(facts, grouping=grouping, campaign_agents={"10.10.0.1": 4, "10.10.0.2": 1})
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.2"
    assert "CASCADING: campaign C has 1/5 agents here" in result.reason and result.grouped
    # system_settings.pllb_grouping_limit: a server with that many agents is not cascaded to.
    capped = replace(grouping, system_limit=1)
    result = choose(facts, grouping=capped, campaign_agents={"10.10.0.1": 4, "10.10.0.2": 1})
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.3"
    assert result.grouped and "CASCADING: campaign C has 0/5 agents here" in result.reason
    result = choose(facts[:2], grouping=capped, campaign_agents={"10.10.0.2": 1})
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.2"
    assert not result.grouped and "or 1+ agents; chose by score" in result.reason


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from([Health.UP, Health.UP, Health.SUSPECT, Health.DOWN, None]),
            st.booleans(),
            st.integers(0, 30),
            st.integers(0, 30),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(list(GroupingMode)),
    st.integers(0, 4),
)
def test_property_never_down_drained_or_full(
    rows: list[tuple[Health | None, bool, int, int, int]], mode: GroupingMode, limit: int
) -> None:
    facts = [
        server(f"10.0.0.{i}", health=h, drained=d, agents=a, trunk_lines=t, free_conferences=c)
        for i, (h, d, a, t, c) in enumerate(rows, start=1)
    ]
    campaign = {f.server_ip: f.agents % 4 for f in facts}
    result = choose(facts, grouping=Grouping("C", mode, limit), campaign_agents=campaign)
    eligible = [f for f in facts if f.health is Health.UP and not f.drained]
    eligible = [f for f in eligible if f.agents < f.capacity and f.free_conferences > 0]
    if not eligible:
        assert result.chosen is None
        return
    assert result.chosen is not None and result.chosen.facts is not None
    chosen = result.chosen.facts
    assert chosen.health is Health.UP and not chosen.drained and chosen.agents < chosen.capacity
    if mode is GroupingMode.DISABLED:
        assert load_of(chosen).score == min(load_of(f).score for f in eligible)
    # Deterministic: the same input gives the same answer.
    again = choose(facts, grouping=Grouping("C", mode, limit), campaign_agents=campaign)
    assert again.chosen is not None and again.chosen.phone == result.chosen.phone


# --------------------------------------------------------------------------- vicidial mode
# VICIdial's agent screen (vicidial.php): walk the logins in order; eligible when the phones row's
# server is active and open for agent logins, has a free conference, a live twin and a live
# server_updater; the campaign's pllb_grouping may force a login; else the fewest non-remote
# agents, a tie going to the later login. Capacity, health and drain are not its business.


def vchoose(
    facts: list[ServerFacts],
    grouping: Grouping | None = None,
    campaign_agents: dict[str, int] | None = None,
    *,
    phone_list: list[PhoneCandidate] | None = None,
    balanced: bool = True,
) -> Assignment:
    by_ip = {f.server_ip: f for f in facts}
    return choose_phone(
        phone_list if phone_list is not None else phones(*by_ip),
        by_ip,
        updater_max_age_s=MAX_AGE,
        grouping=grouping,
        campaign_agents=campaign_agents,
        mode=VICIDIAL_MODE,
        balanced=balanced,
    )


def picked(result: Assignment) -> str | None:
    return None if result.chosen is None else result.chosen.phone.server_ip


@pytest.mark.parametrize(
    ("agents", "expected"),
    [
        ((5, 3, 4), "10.10.0.2"),  # fewest agents
        ((3, 3, 4), "10.10.0.2"),  # a tie: the later login (the screen's `>=`)
        ((2, 3, 2), "10.10.0.3"),  # a tie across a larger count in between
        ((0, 9, 9), "10.10.0.1"),
        ((7, 7, 7), "10.10.0.3"),
    ],
)
def test_vicidial_fewest_agents_and_ties(agents: tuple[int, ...], expected: str) -> None:
    facts = [server(f"10.10.0.{i}", agents=n) for i, n in enumerate(agents, start=1)]
    result = vchoose(facts)
    assert picked(result) == expected and not result.grouped and result.mode == "vicidial"
    assert result.reason.startswith(f"fewest agents: {min(agents)} non-remote agents")


def test_vicidial_tie_is_named_in_the_reason() -> None:
    result = vchoose([server("10.10.0.1", agents=3), server("10.10.0.2", agents=3)])
    assert result.reason == (
        "fewest agents: 3 non-remote agents logged in, among 2 eligible logins "
        "(tied with 100: the later login wins, as in the agent screen)"
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"active": False}, "server inactive (active='N')"),
        ({"login_flag": "N"}, "agent logins off (active_agent_login_server='N')"),
        ({"login_flag": None}, "agent logins off (active_agent_login_server=None)"),
        # The screen sees the flag as it is: a 'N' the balancer holds is a 'N' to it.
        (
            {"login_flag": "N", "flag_record": LoginFlagRecord("10.10.0.1", "N")},
            "agent logins off (active_agent_login_server='N')",
        ),
        ({"free_conferences": 0}, "no free conference in vicidial_conferences"),
        ({"conf_engine": "CONFBRIDGE"}, "no free conference in vicidial_confbridges"),
        ({"twin_server_ip": "10.10.0.9"}, "twin 10.10.0.9 not live (no server_updater row)"),
        (
            {"twin_server_ip": "10.10.0.9", "twin_updater_age_s": 120.0},
            "twin 10.10.0.9 not live (server_updater 120s old (the agent screen wants < 120s))",
        ),
        ({"updater_age_s": None}, "no server_updater row"),
        ({"updater_age_s": 120.0}, "server_updater 120s old (the agent screen wants < 120s)"),
    ],
)
def test_vicidial_skips_what_the_agent_screen_skips(
    change: dict[str, object], problem: str
) -> None:
    bad = server("10.10.0.1", **change)  # emptiest: would win
    # (free confbridges too: after a CONFBRIDGE server the screen looks there, see below)
    ok = server("10.10.0.2", agents=9, free_confbridges=1)
    result = vchoose([bad, ok])
    assert picked(result) == "10.10.0.2"
    assert result.candidates[0].problems[0] == problem
    assert result.reason.endswith(f"; skipped 10.10.0.1: {problem}")


@pytest.mark.parametrize(
    "change",
    [
        {"health": Health.DOWN},
        {"health": None},
        {"drained": True},
        {"agents": 50, "capacity": 20},
        {"trunk_lines": 23},
        {"updater_age_s": 119.0},  # our own 60 s limit is not the screen's
        {"twin_server_ip": "10.10.0.9", "twin_updater_age_s": 119.0},
        {"twin_server_ip": "1.23"},  # 4 characters: too short to name a twin
        {"conf_engine": "CONFBRIDGE", "free_conferences": 0, "free_confbridges": 1},
        {"login_flag": "Y", "flag_record": LoginFlagRecord("10.10.0.1", "N")},  # released
    ],
)
def test_vicidial_ignores_what_the_agent_screen_does_not_know(change: dict[str, object]) -> None:
    f = server("10.10.0.1", **change)
    assert picked(vchoose([f, server("10.10.0.2", agents=99)])) == "10.10.0.1", change


def test_vicidial_confbridge_table_sticks_for_the_rest_of_the_walk() -> None:
    """The screen switches to vicidial_confbridges at a CONFBRIDGE server and never back."""
    meetme = server("10.10.0.1", agents=0, free_conferences=3, free_confbridges=0)
    bridge = server(
        "10.10.0.2", agents=5, conf_engine="CONFBRIDGE", free_conferences=0, free_confbridges=2
    )
    later = server("10.10.0.3", agents=1, free_conferences=3, free_confbridges=0)
    walk = [
        PhoneCandidate("103", "103", "10.10.0.3", 0),
        PhoneCandidate("102", "102", "10.10.0.2", 1),
        PhoneCandidate("101", "101", "10.10.0.1", 2),
    ]
    # In this order 10.10.0.1 comes after the ConfBridge server: looked up in confbridges.
    result = vchoose([meetme, bridge, later], phone_list=walk)
    assert picked(result) == "10.10.0.3"
    by_ip = {c.phone.server_ip: c for c in result.candidates}
    assert by_ip["10.10.0.1"].problems == ("no free conference in vicidial_confbridges",)
    # MEETME servers first: each is looked up in vicidial_conferences.
    assert picked(vchoose([meetme, bridge, later])) == "10.10.0.1"


def test_vicidial_one_server_only_takes_the_first_login_with_the_campaign() -> None:
    facts = [
        server("10.10.0.1", agents=1),
        server("10.10.0.2", agents=9),
        server("10.10.0.3", agents=20),
    ]
    grouping = Grouping("C1", GroupingMode.ONE_SERVER_ONLY)
    # The first eligible server with any of the campaign's agents, not the one with most.
    result = vchoose(facts, grouping, {"10.10.0.2": 1, "10.10.0.3": 15})
    assert picked(result) == "10.10.0.2" and result.grouped
    assert (
        result.reason == "ONE_SERVER_ONLY: the first eligible server with campaign C1's agents (1)"
    )
    # That server ineligible: the next one with the campaign.
    down = [facts[0], replace(facts[1], free_conferences=0), facts[2]]
    assert picked(vchoose(down, grouping, {"10.10.0.2": 1, "10.10.0.3": 15})) == "10.10.0.3"
    # None eligible with the campaign: fewest agents.
    result = vchoose(facts, grouping, {"10.10.0.9": 4})
    assert picked(result) == "10.10.0.1" and not result.grouped
    assert result.reason.startswith("ONE_SERVER_ONLY: no eligible server has campaign C1's agents")


@pytest.mark.parametrize(
    ("campaign", "server_agents", "limits", "expected"),
    [
        ({"10.10.0.2": 3}, (1, 9, 20), (50, 100), "10.10.0.2"),  # campaign here, under both
        ({"10.10.0.2": 3, "10.10.0.3": 1}, (1, 9, 20), (50, 100), "10.10.0.2"),  # the first
        ({"10.10.0.2": 50, "10.10.0.3": 1}, (1, 9, 20), (50, 100), "10.10.0.3"),  # at the limit
        ({"10.10.0.2": 3, "10.10.0.3": 1}, (1, 9, 20), (50, 9), "10.10.0.1"),  # server at 9
        ({"10.10.0.2": 3}, (1, 9, 20), (50, 10), "10.10.0.2"),  # server 9 < 10
        ({}, (4, 2, 3), (50, 100), "10.10.0.2"),  # no campaign agents anywhere: fewest
        ({"10.10.0.2": 3}, (1, 9, 20), (0, 100), "10.10.0.1"),  # limit 0 groups nothing
    ],
)
def test_vicidial_cascading_limits(
    campaign: dict[str, int],
    server_agents: tuple[int, int, int],
    limits: tuple[int, int],
    expected: str,
) -> None:
    facts = [server(f"10.10.0.{i}", agents=n) for i, n in enumerate(server_agents, start=1)]
    grouping = Grouping("C2", GroupingMode.CASCADING, *limits)
    result = vchoose(facts, grouping, campaign)
    assert picked(result) == expected
    grouped = campaign.get(expected, 0) > 0 and expected != "10.10.0.1"
    assert result.grouped is grouped
    if grouped:
        n = campaign[expected]
        assert result.reason.startswith(f"CASCADING: campaign C2 has {n}/{limits[0]} agents here")


def test_vicidial_single_login_and_refusals() -> None:
    lonely = server("10.10.0.1", free_conferences=0, updater_age_s=None)
    # One login, no comma: used as it is, without the walk's checks.
    result = vchoose([lonely], balanced=False)
    assert picked(result) == "10.10.0.1"
    assert result.reason.startswith("a single login: the agent screen uses it as it is")
    result = vchoose([replace(lonely, login_flag="N")], balanced=False)
    assert result.chosen is None and "refuses this single login: agent logins off" in result.reason
    inactive = [PhoneCandidate("101", "101", "10.10.0.1", 0, active=False)]
    result = vchoose([lonely], phone_list=inactive, balanced=False)
    assert result.chosen is None and "phone 101 inactive" in result.reason
    # A list: the screen refuses it unless one phone is active on a server open for logins.
    both_inactive = [
        PhoneCandidate("101", "101", "10.10.0.1", 0, active=False),
        PhoneCandidate("102", "102", "10.10.0.2", 1, active=False),
    ]
    facts = [server("10.10.0.1"), server("10.10.0.2")]
    result = vchoose(facts, phone_list=both_inactive)
    assert result.chosen is None and result.reason.startswith("the agent screen refuses this login")
    # It picks an inactive phone (its walk does not look), and that login then fails.
    mixed = [both_inactive[0], PhoneCandidate("102", "102", "10.10.0.2", 1)]
    result = vchoose([server("10.10.0.1"), server("10.10.0.2", agents=5)], phone_list=mixed)
    assert result.chosen is None
    assert result.reason.startswith("the agent screen would take 101 on 10.10.0.1")
    assert result.reason.endswith("but that phone is inactive (phones.active='N'): its login fails")
    # Nothing eligible.
    result = vchoose([server("10.10.0.1", active=False)])
    assert result.reason == "no eligible login: 10.10.0.1: server inactive (active='N')"


def test_vicidial_reads_one_phones_row_per_login() -> None:
    facts = [server("10.10.0.1", agents=5), server("10.10.0.2", agents=0)]
    rows = [
        PhoneCandidate("101", "101", "10.10.0.1", 0),
        PhoneCandidate("101", "101b", "10.10.0.2", 1),  # a second row of the same login
    ]
    result = vchoose(facts, phone_list=rows)
    assert picked(result) == "10.10.0.1" and len(result.candidates) == 1
    unknown = [PhoneCandidate("109", "109", "10.10.0.9", 0), rows[0]]
    result = vchoose(facts, phone_list=unknown)
    assert picked(result) == "10.10.0.1"
    assert result.candidates[0].problems == ("not in the servers table",)


SERVER_ROWS = st.tuples(
    st.integers(0, 6),  # agents
    st.booleans(),  # active
    st.sampled_from(["Y", "Y", "Y", "N", None]),  # login flag
    st.sampled_from(["MEETME", "MEETME", "CONFBRIDGE"]),
    st.integers(0, 2),  # free vicidial_conferences
    st.integers(0, 2),  # free vicidial_confbridges
    st.sampled_from([None, 1.0, 1.0, 119.0, 120.0, 500.0]),  # server_updater age
    st.sampled_from(["", "", "10.9.9.9"]),  # a twin
    st.integers(0, 3),  # this campaign's agents
    st.sampled_from([Health.UP, Health.DOWN, None]),  # the screen does not look
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(SERVER_ROWS, min_size=1, max_size=7),
    st.sampled_from(list(GroupingMode)),
    st.integers(0, 4),
    st.integers(0, 8),
    st.sampled_from([None, 1.0, 200.0]),  # the twin's server_updater age
    st.randoms(use_true_random=False),
)
def test_property_vicidial_picks_the_fewest_agents_unless_grouped(
    rows: list[tuple[int, bool, str | None, str, int, int, float | None, str, int, Health | None]],
    mode: GroupingMode,
    campaign_limit: int,
    system_limit: int,
    twin_age: float | None,
    rng: object,
) -> None:
    facts = [
        server(
            f"10.0.0.{i}",
            agents=a,
            active=act,
            login_flag=flag,
            conf_engine=engine,
            free_conferences=meetme,
            free_confbridges=bridges,
            updater_age_s=age,
            twin_server_ip=twin,
            twin_updater_age_s=twin_age if twin else None,
            health=health,
        )
        for i, (a, act, flag, engine, meetme, bridges, age, twin, _, health) in enumerate(
            rows, start=1
        )
    ]
    order = list(range(len(facts)))
    rng.shuffle(order)  # type: ignore[attr-defined]
    walk = [
        PhoneCandidate(f"p{i}", f"p{i}", facts[i].server_ip, pos) for pos, i in enumerate(order)
    ]
    campaign = {f.server_ip: row[8] for f, row in zip(facts, rows, strict=True)}
    grouping = Grouping("C", mode, campaign_limit, system_limit)
    by_ip = {f.server_ip: f for f in facts}
    result = choose_phone(
        walk,
        by_ip,
        updater_max_age_s=MAX_AGE,
        grouping=grouping,
        campaign_agents=campaign,
        mode=VICIDIAL_MODE,
    )

    # The oracle: the rule as VICIDIAL.md states it, written out once more.
    eligible: list[ServerFacts] = []
    table = "vicidial_conferences"
    for phone in walk:
        f = by_ip[phone.server_ip]
        if f.conf_engine == "CONFBRIDGE":
            table = "vicidial_confbridges"
        free = f.free_confbridges if table == "vicidial_confbridges" else f.free_conferences
        twin_ok = not f.twin_server_ip or (
            f.twin_updater_age_s is not None and f.twin_updater_age_s < 120
        )
        updater_ok = f.updater_age_s is not None and f.updater_age_s < 120
        if f.active and f.login_flag == "Y" and free > 0 and twin_ok and updater_ok:
            eligible.append(f)
    if not eligible:
        assert result.chosen is None
        return
    assert result.chosen is not None and result.chosen.facts is not None
    chosen = result.chosen.facts
    assert chosen in eligible
    if mode is GroupingMode.ONE_SERVER_ONLY:
        wanted = [f for f in eligible if campaign[f.server_ip] > 0]
    elif mode is GroupingMode.CASCADING:
        wanted = [
            f
            for f in eligible
            if 0 < campaign[f.server_ip] < campaign_limit and f.agents < system_limit
        ]
    else:
        wanted = []
    if wanted:
        # A grouping rule applies: the first eligible login it wants.
        assert result.grouped and chosen == wanted[0]
        return
    assert not result.grouped
    fewest = min(f.agents for f in eligible)
    assert chosen.agents == fewest
    # ...and of those, the last in the walk (the screen's tie rule).
    assert chosen == [f for f in eligible if f.agents == fewest][-1]


# --------------------------------------------------------------------------- build_facts


def test_build_facts_combines_db_and_live_state() -> None:
    tables = AgentTables(
        servers={
            "10.10.0.1": ServerRecord("10.10.0.1", "ast1", "Y", "Y", 30),
            "10.10.0.2": ServerRecord("10.10.0.2", "ast2", "N", "N", 23),
        },
        agents={"10.10.0.1": 4},
        free_conferences={"10.10.0.1": 2},
        updater_ages={"10.10.0.1": 0.5},
        flag_records={"10.10.0.2": LoginFlagRecord("10.10.0.2", "N")},
    )
    state = ServerState(
        "10.10.0.1",
        ServerMeta(server_id="ast1", health=Health.UP),
        counts={ChannelClass.AGENT: 3, ChannelClass.TRUNK: 6},
        fresh=True,
    )
    stale = ServerState("10.10.0.2", ServerMeta(health=Health.UP), fresh=False)
    facts = build_facts(
        tables, [state, stale], {"10.10.0.2"}, AgentsConfig(capacity={"10.10.0.1": 40})
    )
    one, two = facts["10.10.0.1"], facts["10.10.0.2"]
    assert (one.health, one.agents, one.agent_phones, one.trunk_lines) == (Health.UP, 4, 3, 6)
    assert (one.capacity, one.max_trunks, one.free_conferences) == (40, 30, 2)
    assert one.updater_age_s == 0.5 and not one.drained
    assert two.health is None and two.drained and not two.active and two.capacity == 100
    assert two.balancer_holds_flag and two.admin_login_flag == "Y"


# --------------------------------------------------------------------------- login flags

FLAGS = FlagSettings(hysteresis_pct=10.0, settle_s=2.0, updater_max_age_s=MAX_AGE)


def ours(f: ServerFacts) -> ServerFacts:
    return replace(f, login_flag="N", flag_record=LoginFlagRecord(f.server_ip, "N"))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"health": Health.DOWN, "health_reason": "connection closed"}, "DOWN (connection closed)"),
        ({"drained": True}, "DRAINED"),
        ({"drained": True, "health": None}, "DRAINED"),
        ({"agents": 20}, "at agent capacity (20/20)"),
        ({"agent_phones": 21}, "at agent capacity (21/20)"),
        ({"updater_age_s": 90.0}, "server_updater stale (90s > 60s)"),
    ],
)
def test_close_when_down_drained_full_or_stale(change: dict[str, object], reason: str) -> None:
    f = server("10.10.0.1", **change)
    [decision] = decide_login_flags([f], FLAGS, {"10.10.0.1": 100.0})
    assert decision.action is FlagAction.CLOSE and decision.set_to == "N"
    assert decision.reason == reason
    # Already closed by us: nothing more to do.
    assert decide_login_flags([ours(f)], FLAGS, {"10.10.0.1": 100.0}) == []


@pytest.mark.parametrize(
    "change",
    [
        {"health": Health.SUSPECT},
        {"health": None},
        {"active": False, "health": Health.DOWN},
        {"agents": 19},
    ],
)
def test_leave_open_when_suspect_unknown_inactive_or_below_capacity(
    change: dict[str, object],
) -> None:
    assert decide_login_flags([server("10.10.0.1", **change)], FLAGS, {}) == []


def test_admin_n_is_never_touched() -> None:
    for change in ({}, {"health": Health.DOWN}, {"drained": True}, {"agents": 25}):
        f = server("10.10.0.1", login_flag="N", **change)
        assert decide_login_flags([f], FLAGS, {"10.10.0.1": 100.0}) == []
        assert decide_login_flags([f], FLAGS, {"10.10.0.1": 100.0}, final=True) == []


def test_reopen_after_settle_time() -> None:
    f = ours(server("10.10.0.1", agents=3))
    assert decide_login_flags([f], FLAGS, {"10.10.0.1": 1.0}) == []
    [decision] = decide_login_flags([f], FLAGS, {"10.10.0.1": 2.0})
    assert decision.action is FlagAction.REOPEN and decision.set_to == "Y"
    assert decision.reason == "UP, 3/20 agents"
    # Suspect or unknown health: held closed.
    assert decide_login_flags([replace(f, health=Health.SUSPECT)], FLAGS, {}) == []
    assert decide_login_flags([replace(f, health=None)], FLAGS, {"10.10.0.1": 9.0}) == []


def test_capacity_hysteresis() -> None:
    assert reopen_threshold(20, 10) == 18
    assert reopen_threshold(20, 0) == 19
    assert reopen_threshold(5, 10) == 4
    assert reopen_threshold(1, 50) == 0
    assert reopen_threshold(0, 10) == -1
    up = {"10.10.0.1": 60.0}
    # Open at 19/20 stays open; reaching 20 closes; 19 and 18... only 18 re-opens.
    assert decide_login_flags([server("10.10.0.1", agents=19)], FLAGS, up) == []
    [close] = decide_login_flags([server("10.10.0.1", agents=20)], FLAGS, up)
    assert close.action is FlagAction.CLOSE
    held = ours(server("10.10.0.1", agents=19))
    assert decide_login_flags([held], FLAGS, up) == []
    assert desired_flag(held, FLAGS, 60.0) == (None, "19/20 agents, re-opens at 18")
    [reopen] = decide_login_flags([replace(held, agents=18)], FLAGS, up)
    assert reopen.action is FlagAction.REOPEN


def test_final_pass_says_what_is_true_now() -> None:
    held = ours(server("10.10.0.1", agents=19))
    [reopen] = decide_login_flags([held], FLAGS, {}, final=True)
    assert reopen.action is FlagAction.REOPEN
    down = ours(server("10.10.0.2", health=Health.DOWN))
    assert decide_login_flags([down], FLAGS, {}, final=True) == []
    assert decide_login_flags([replace(held, agents=20)], FLAGS, {}, final=True) == []


def test_release_a_record_someone_else_overrode() -> None:
    # An admin re-opened a flag the balancer had closed: forget the record.
    f = server("10.10.0.1", flag_record=LoginFlagRecord("10.10.0.1", "N"))
    [release] = decide_login_flags([f], FLAGS, {"10.10.0.1": 60.0})
    assert release.action is FlagAction.RELEASE and release.set_to is None
    # ...but if it is still DOWN, closing it again replaces the record.
    [close] = decide_login_flags([replace(f, health=Health.DOWN)], FLAGS, {})
    assert close.action is FlagAction.CLOSE
    orphan = LoginFlagRecord("10.10.0.9", "N")
    [gone] = decide_login_flags([], FLAGS, {}, orphan_records=[orphan])
    assert (gone.server_ip, gone.action) == ("10.10.0.9", FlagAction.RELEASE)


def test_flag_changes_are_ordered_by_server() -> None:
    facts = [server(f"10.10.0.{i}", health=Health.DOWN) for i in (3, 1, 2)]
    assert [c.server_ip for c in decide_login_flags(facts, FLAGS, {})] == [
        "10.10.0.1",
        "10.10.0.2",
        "10.10.0.3",
    ]


def test_flags_document_says_which_flags_are_held_and_why() -> None:
    held = replace(
        server("10.10.0.2", agents=19),
        login_flag="N",
        flag_record=LoginFlagRecord(
            "10.10.0.2", "N", "Y", "at agent capacity (20/20)", "2026-01-02 03:04:05"
        ),
    )
    admin = server("10.10.0.3", login_flag="N")  # the admin's own: not ours
    open_ = server("10.10.0.1")
    down = replace(held, server_ip="10.10.0.4", server_id="ast4", health=Health.DOWN)
    doc = flags_document([open_, held, admin, down], FLAGS, {"10.10.0.2": 60.0}, 1000.0)
    assert doc == {
        "version": 1,
        "published_at": 1000.0,
        "held": [
            {
                "server_ip": "10.10.0.2",
                "server_id": "ast2",
                "closed_because": "at agent capacity (20/20)",
                "since": "2026-01-02 03:04:05",
                "restores": "Y",
                "now": "19/20 agents, re-opens at 18",
            },
            {
                "server_ip": "10.10.0.4",
                "server_id": "ast4",
                "closed_because": "at agent capacity (20/20)",
                "since": "2026-01-02 03:04:05",
                "restores": "Y",
                "now": "DOWN",
            },
        ],
        "not_ours": [{"server_ip": "10.10.0.3", "server_id": "ast3", "flag": "N"}],
    }
