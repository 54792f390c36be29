"""Agent phone choice and login-flag decisions (pure, table-driven, plus properties)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.agents.choice import (
    AgentTables,
    Assignment,
    FlagAction,
    FlagSettings,
    Grouping,
    GroupingMode,
    LoginFlagRecord,
    PhoneCandidate,
    ServerFacts,
    ServerRecord,
    build_facts,
    capacity_of,
    choose_phone,
    decide_login_flags,
    desired_flag,
    load_of,
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


def test_missing_updater_row_is_judged_by_ami_alone() -> None:
    result = choose([server("10.10.0.1", updater_age_s=None)])
    assert result.chosen is not None


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


def test_cascading_fills_one_server_to_the_limit_then_the_next() -> None:
    facts = [server("10.10.0.1", agents=2), server("10.10.0.2", agents=8)]
    grouping = Grouping("CAMP1", GroupingMode.CASCADING, cascade_limit=3)
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
    no_limit = Grouping("CAMP1", GroupingMode.CASCADING, cascade_limit=0)
    result = choose(facts, grouping=no_limit, campaign_agents={"10.10.0.2": 5})
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.1"


def test_cascading_skips_a_full_or_down_server() -> None:
    facts = [
        server("10.10.0.1", health=Health.DOWN),
        server("10.10.0.2", agents=1),
        server("10.10.0.3", agents=0),
    ]
    grouping = Grouping("C", GroupingMode.CASCADING, cascade_limit=5)
    result = choose(facts, grouping=grouping, campaign_agents={"10.10.0.1": 4, "10.10.0.2": 1})
    assert result.chosen is not None and result.chosen.phone.server_ip == "10.10.0.2"
    assert "CASCADING: campaign C has 1/5 agents here" in result.reason


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
    if mode is GroupingMode.NONE:
        assert load_of(chosen).score == min(load_of(f).score for f in eligible)
    # Deterministic: the same input gives the same answer.
    again = choose(facts, grouping=Grouping("C", mode, limit), campaign_agents=campaign)
    assert again.chosen is not None and again.chosen.phone == result.chosen.phone


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
