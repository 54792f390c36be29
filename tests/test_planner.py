"""Table-driven tests of the pure planner, one group per rule.

"VICIDIAL rule n" is the numbered rule of "The balance (FILL) algorithm VICIdial runs today" in
the shared VICIDIAL.md. Every expected number is worked out by hand in the comment above it.
Unless a test says otherwise, campaigns are active with one live agent and 100 READY leads, and
the shortage is reported by 10.0.0.1, which is not a balance server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

import pytest

from balancer.balance.model import (
    CampaignInfo,
    CampaignPlan,
    DbSnapshot,
    LiveServer,
    Plan,
    ServerInfo,
    SystemSettings,
    TrunkRule,
)
from balancer.balance.planner import plan_cycle
from balancer.config import BalanceConfig
from balancer.store.base import Health

SHORT = "10.0.0.1"  # reports the shortage; not in the servers table unless a test adds it
FAITHFUL = BalanceConfig(mode="faithful")
LIVE = BalanceConfig(mode="live")
FAITHFUL_STAGGERED = BalanceConfig(mode="faithful", staggered=True)
LIVE_STAGGERED = BalanceConfig(mode="live", staggered=True)


def srv(
    ip: str,
    rank: int = 0,
    max_trunks: int = 23,
    offlimits: int = 0,
    *,
    balance: bool = True,
    active: bool = True,
) -> ServerInfo:
    return ServerInfo(
        ip,
        active=active,
        balance_active=balance,
        rank=rank,
        max_trunks=max_trunks,
        offlimits=offlimits,
    )


def snap(
    servers: Iterable[ServerInfo],
    shortages: Mapping[tuple[str, str], int],
    *,
    campaigns: Mapping[str, CampaignInfo] | None = None,
    rules: Iterable[TrunkRule] = (),
    auto: Mapping[tuple[str, str, str], int] | None = None,
    agents: Mapping[str, int] | None = None,
    hopper: Mapping[str, int] | None = None,
    settings: SystemSettings | None = SystemSettings(),  # noqa: B008 (frozen)
) -> DbSnapshot:
    ids = sorted({campaign for campaign, _ in shortages})
    return DbSnapshot(
        taken_at=datetime(2024, 1, 2, 3, 4, 5),
        settings=settings,
        servers={s.server_ip: s for s in servers},
        campaigns=dict(campaigns) if campaigns is not None else {c: CampaignInfo(c) for c in ids},
        shortages=dict(shortages),
        trunk_rules=tuple(rules),
        auto_calls=dict(auto or {}),
        live_agents=dict(agents) if agents is not None else dict.fromkeys(ids, 1),
        hopper_ready=dict(hopper) if hopper is not None else dict.fromkeys(ids, 100),
    )


def up(trunk_lines: int = 0, *, health: Health = Health.UP, drained: bool = False) -> LiveServer:
    return LiveServer(health=health, drained=drained, trunk_lines=trunk_lines)


def all_up(*ips: str) -> dict[str, LiveServer]:
    return {ip: up() for ip in ips}


def camp(plan: Plan, campaign_id: str) -> CampaignPlan:
    (found,) = [c for c in plan.campaigns if c.campaign_id == campaign_id]
    return found


def calls(plan: Plan, campaign_id: str) -> dict[str, int]:
    return {p.server_ip: p.calls for p in camp(plan, campaign_id).placements}


def skips(plan: Plan, campaign_id: str) -> dict[str, str]:
    return {s.server_ip: s.reason for s in camp(plan, campaign_id).skips}


def order(plan: Plan) -> list[str]:
    return [p.server_ip for p in plan.sequence]


# --------------------------------------------------------------------------- rule 1: stop


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        (None, "no system_settings row"),
        (SystemSettings(outbound_autodial_active=False), "outbound_autodial_active"),
        (SystemSettings(disable_auto_dial=True), "disable_auto_dial"),
    ],
)
def test_rule1_autodial_off_stops_without_reset(settings: SystemSettings | None, why: str) -> None:
    # VICIDIAL rule 1: stop before anything else; balance_trunk_fill is left alone.
    s = snap([srv("10.0.0.2")], {("A", SHORT): 5}, settings=settings)
    plan = plan_cycle(s, None, FAITHFUL)
    assert plan.stopped is not None and why in plan.stopped
    assert not plan.reset_fill
    assert plan.campaigns == () and plan.sequence == ()


# --------------------------------------------------------------------------- rule 2: demand


def test_rule2_demand_is_sum_of_shortages_per_campaign() -> None:
    # A is short 3 on .1 and 4 on .4 (both non-balance) -> demand 7; .3 has 23 free -> 7.
    s = snap([srv("10.0.0.3")], {("A", SHORT): 3, ("A", "10.0.0.4"): 4})
    plan = plan_cycle(s, None, FAITHFUL)
    assert camp(plan, "A").demand == 7
    assert calls(plan, "A") == {"10.0.0.3": 7}


@pytest.mark.parametrize(
    ("shortages", "servers", "why"),
    [
        ({}, [srv("10.0.0.3")], "no active campaign"),
        ({("A", SHORT): 0}, [srv("10.0.0.3")], "no active campaign"),  # 0 is no shortage
        ({("A", SHORT): 5}, [srv("10.0.0.3", balance=False)], "balance-active"),
        ({("A", SHORT): 5}, [], "balance-active"),
    ],
)
def test_rule2_no_demand_or_no_balance_server_resets_fill(
    shortages: dict[tuple[str, str], int], servers: list[ServerInfo], why: str
) -> None:
    # VICIDIAL rule 2: every balance_trunk_fill -> 0 and stop.
    plan = plan_cycle(snap(servers, shortages), None, FAITHFUL)
    assert plan.stopped is not None and why in plan.stopped
    assert plan.reset_fill and plan.campaigns == ()


# --------------------------------------------------------------------------- rule 6: active flags


def test_rule6_inactive_or_unknown_campaign_has_no_demand() -> None:
    # A is inactive and Z is not in vicidial_campaigns: no demand at all -> reset (rule 2).
    shortages = {("A", SHORT): 5, ("Z", SHORT): 5}
    campaigns = {"A": CampaignInfo("A", active=False)}
    plan = plan_cycle(snap([srv("10.0.0.3")], shortages, campaigns=campaigns), None, FAITHFUL)
    assert plan.reset_fill and plan.campaigns == ()
    # With an active B beside them only B is planned: 4 calls on .3.
    campaigns = {"A": CampaignInfo("A", active=False), "B": CampaignInfo("B")}
    shortages[("B", SHORT)] = 4
    plan = plan_cycle(snap([srv("10.0.0.3")], shortages, campaigns=campaigns), None, FAITHFUL)
    assert [c.campaign_id for c in plan.campaigns] == ["B"]
    assert calls(plan, "B") == {"10.0.0.3": 4}


def test_rule6_inactive_server_is_not_balance_active() -> None:
    # The only balance server is inactive: no balance-active server -> reset (rule 2).
    plan = plan_cycle(snap([srv("10.0.0.3", active=False)], {("A", SHORT): 5}), None, FAITHFUL)
    assert plan.reset_fill and plan.stopped is not None
    # Beside an active one, the inactive .3 (higher rank) gets nothing, .4 gets all 5.
    servers = [srv("10.0.0.3", rank=9, active=False), srv("10.0.0.4")]
    plan = plan_cycle(snap(servers, {("A", SHORT): 5}), None, FAITHFUL)
    assert calls(plan, "A") == {"10.0.0.4": 5}


# --------------------------------------------------------------------------- rule 3: carry forward


def test_rule3_earlier_campaign_uses_lines_of_later_ones() -> None:
    # .9 rank 1 max 10, .8 rank 0 max 10. A (first) needs 6: .9 -> 6.
    # B needs 6: .9 free = 10 - 6 carried = 4 -> 4; .8 needed 6 - 4 = 2 -> 2.
    servers = [srv("10.0.0.9", rank=1, max_trunks=10), srv("10.0.0.8", max_trunks=10)]
    plan = plan_cycle(snap(servers, {("B", SHORT): 6, ("A", SHORT): 6}), None, FAITHFUL)
    assert [c.campaign_id for c in plan.campaigns] == ["A", "B"]
    assert calls(plan, "A") == {"10.0.0.9": 6}
    assert calls(plan, "B") == {"10.0.0.9": 4, "10.0.0.8": 2}


def test_rule3_carry_forward_also_counts_against_live_trunk_lines() -> None:
    # Live: .9 max 10 with 5 trunk lines in use, no auto calls. A needs 3: free =
    # min(10 - 0, 10 - 5) = 5 -> 3. B needs 6: free = min(10 - 3, 10 - 5 - 3) = 2 -> 2.
    plan = plan_cycle(
        snap([srv("10.0.0.9", max_trunks=10)], {("A", SHORT): 3, ("B", SHORT): 6}),
        {"10.0.0.9": up(trunk_lines=5)},
        LIVE,
    )
    assert calls(plan, "A") == {"10.0.0.9": 3}
    assert calls(plan, "B") == {"10.0.0.9": 2}


def test_rule3_campaigns_in_ascending_campaign_id_order() -> None:
    shortages = {("B", SHORT): 1, ("A", SHORT): 1, ("10", SHORT): 1}
    plan = plan_cycle(snap([srv("10.0.0.3")], shortages), None, FAITHFUL)
    assert [c.campaign_id for c in plan.campaigns] == ["10", "A", "B"]
    assert [p.campaign_id for p in plan.sequence] == ["10", "A", "B"]


# --------------------------------------------------------------------------- rule 4: needed


def test_rule4_needed_is_demand_minus_outbalance_on_any_server() -> None:
    # Demand 10; 4 OUTBALANCE calls of A on .7 -> needed 6. .3 (rank 1) allowed 23, free 23 -> 6.
    servers = [srv("10.0.0.3", rank=1), srv("10.0.0.7")]
    s = snap(servers, {("A", SHORT): 10}, auto={("10.0.0.7", "A", "OUTBALANCE"): 4})
    c = camp(plan_cycle(s, None, FAITHFUL), "A")
    assert (c.demand, c.already_filling, c.needed) == (10, 4, 6)
    assert {p.server_ip: p.calls for p in c.placements} == {"10.0.0.3": 6}


@pytest.mark.parametrize(("outbalance", "needed"), [(3, 0), (5, -2)])
def test_rule4_needed_at_most_zero_places_nothing(outbalance: int, needed: int) -> None:
    # Demand 3 with 3 (or 5) balance calls already up -> needed 0 (or -2): nothing to do.
    s = snap(
        [srv("10.0.0.3")], {("A", SHORT): 3}, auto={("10.0.0.3", "A", "OUTBALANCE"): outbalance}
    )
    plan = plan_cycle(s, None, FAITHFUL)
    c = camp(plan, "A")
    assert c.needed == needed and c.placements == () and c.skips == ()
    assert "nothing needed" in c.note and plan.sequence == ()


def test_rule4_no_candidate_when_every_balance_server_reports_the_shortage() -> None:
    servers = [srv("10.0.0.2"), srv("10.0.0.3")]
    plan = plan_cycle(snap(servers, {("A", "10.0.0.2"): 2, ("A", "10.0.0.3"): 3}), None, FAITHFUL)
    assert plan.stopped is None
    c = camp(plan, "A")
    assert c.needed == 5 and c.placements == () and "no candidate" in c.note
    assert all("reports a shortage" in r for r in skips(plan, "A").values())


def test_rule4_candidates_by_rank_desc_then_server_ip_as_text() -> None:
    # Max 4 each, needed 14. Rank 1 first: .2 -> 4. Then rank 0 by TEXT: '10.10.0.10' <
    # '10.10.0.100' < '10.10.0.9' -> 4, 4, then 14 - 12 = 2 on .9.
    servers = [
        srv("10.10.0.9", max_trunks=4),
        srv("10.10.0.100", max_trunks=4),
        srv("10.10.0.10", max_trunks=4),
        srv("10.10.0.2", rank=1, max_trunks=4),
    ]
    plan = plan_cycle(snap(servers, {("A", SHORT): 14}), None, FAITHFUL)
    assert order(plan) == ["10.10.0.2", "10.10.0.10", "10.10.0.100", "10.10.0.9"]
    assert [p.calls for p in plan.sequence] == [4, 4, 4, 2]


def test_rule4_maximum_limit_caps_the_campaign_on_a_server() -> None:
    # .2 (rank 1) has a MAXIMUM_LIMIT 3 row for A: allowed 3 -> 3; .3 takes 10 - 3 = 7.
    servers = [srv("10.0.0.2", rank=1), srv("10.0.0.3")]
    rules = [TrunkRule("10.0.0.2", "A", dedicated=3, maximum_limit=True)]
    plan = plan_cycle(snap(servers, {("A", SHORT): 10}, rules=rules), None, FAITHFUL)
    assert calls(plan, "A") == {"10.0.0.2": 3, "10.0.0.3": 7}
    # MAXIMUM_LIMIT 0: allowed 0 -> a skip saying so; .3 takes all 10.
    rules = [TrunkRule("10.0.0.2", "A", dedicated=0, maximum_limit=True)]
    plan = plan_cycle(snap(servers, {("A", SHORT): 10}, rules=rules), None, FAITHFUL)
    assert calls(plan, "A") == {"10.0.0.3": 10}
    assert skips(plan, "A")["10.0.0.2"] == "rank 1: allowed 0 (MAXIMUM_LIMIT 0)"


def test_rule4_overflow_allowed_minus_other_campaigns_dedicated_trunks() -> None:
    # .2 max 23: A's own OVERFLOW_ALLOWED 10 does not count; B's 15 (OVERFLOW_ALLOWED) and
    # C's 5 (MAXIMUM_LIMIT) do: allowed = 23 - 0 - 20 = 3 -> 3; .3 takes 10 - 3 = 7.
    servers = [srv("10.0.0.2", rank=1), srv("10.0.0.3")]
    rules = [
        TrunkRule("10.0.0.2", "A", dedicated=10),
        TrunkRule("10.0.0.2", "B", dedicated=15),
        TrunkRule("10.0.0.2", "C", dedicated=5, maximum_limit=True),
    ]
    plan = plan_cycle(snap(servers, {("A", SHORT): 10}, rules=rules), None, FAITHFUL)
    assert calls(plan, "A") == {"10.0.0.2": 3, "10.0.0.3": 7}


def test_rule4_offlimits_reduce_allowed() -> None:
    # .2 max 10, 4 off limits: allowed 6 -> 6; .3 takes 10 - 6 = 4.
    servers = [srv("10.0.0.2", rank=1, max_trunks=10, offlimits=4), srv("10.0.0.3")]
    plan = plan_cycle(snap(servers, {("A", SHORT): 10}), None, FAITHFUL)
    assert calls(plan, "A") == {"10.0.0.2": 6, "10.0.0.3": 4}


def test_rule4_outbalance_already_on_a_server_reduces_allowed() -> None:
    # MAXIMUM_LIMIT 5 on .2 with 3 A balance calls there: allowed 2. Demand 10 - 3 = needed 7.
    # .2: min(7, 2, 23 - 3 = 20) = 2; .3: min(5, 23, 23) = 5.
    servers = [srv("10.0.0.2", rank=1), srv("10.0.0.3")]
    s = snap(
        servers,
        {("A", SHORT): 10},
        rules=[TrunkRule("10.0.0.2", "A", dedicated=5, maximum_limit=True)],
        auto={("10.0.0.2", "A", "OUTBALANCE"): 3},
    )
    assert calls(plan_cycle(s, None, FAITHFUL), "A") == {"10.0.0.2": 2, "10.0.0.3": 5}
    # Without a rule: .2 max 10 with 4 A balance calls, demand 20 -> needed 16.
    # .2: allowed 10 - 4 = 6, free 10 - 4 = 6 -> 6; .3: min(10, 23, 23) = 10.
    servers = [srv("10.0.0.2", rank=1, max_trunks=10), srv("10.0.0.3")]
    s = snap(servers, {("A", SHORT): 20}, auto={("10.0.0.2", "A", "OUTBALANCE"): 4})
    assert calls(plan_cycle(s, None, FAITHFUL), "A") == {"10.0.0.2": 6, "10.0.0.3": 10}


def test_rule4_free_counts_every_auto_call_of_any_campaign_and_type() -> None:
    # .2 max 10 with 3 OUT of B, 2 IN of C, 1 OUT of A: free 4 -> 4; .3 takes 6.
    servers = [srv("10.0.0.2", rank=1, max_trunks=10), srv("10.0.0.3")]
    auto = {
        ("10.0.0.2", "B", "OUT"): 3,
        ("10.0.0.2", "C", "IN"): 2,
        ("10.0.0.2", "A", "OUT"): 1,
    }
    plan = plan_cycle(snap(servers, {("A", SHORT): 10}, auto=auto), None, FAITHFUL)
    assert calls(plan, "A") == {"10.0.0.2": 4, "10.0.0.3": 6}


def test_rule4_negative_free_is_floored_so_no_over_dialing() -> None:
    # .2 (rank 1) max 10 already has 13 calls: VICIdial's free = -3, to_dial = -3, planned = -3,
    # so .3 gets min(5 + 3, 10, 10) = 8 calls for a need of 5. We floor free at 0: .2 -> 0
    # (a skip), .3 -> min(5, 10, 10) = 5.
    servers = [srv("10.0.0.2", rank=1, max_trunks=10), srv("10.0.0.3", max_trunks=10)]
    s = snap(servers, {("A", SHORT): 5}, auto={("10.0.0.2", "B", "OUT"): 13})
    plan = plan_cycle(s, None, FAITHFUL)
    assert calls(plan, "A") == {"10.0.0.3": 5}
    assert skips(plan, "A")["10.0.0.2"] == "rank 1: no free lines (10 max - 13 auto calls)"
    assert plan.total_calls == 5


def test_rule4_without_live_agent_nothing_dialed_but_planned_counts() -> None:
    # Max 4 each, needed 6, no live agent. to_dial: .2 min(6,4,4) = 4, .3 min(2,4,4) = 2,
    # .4 0 (planned 6 already) -- counted although nothing is dialed.
    servers = [
        srv("10.0.0.2", rank=2, max_trunks=4),
        srv("10.0.0.3", rank=1, max_trunks=4),
        srv("10.0.0.4", max_trunks=4),
    ]
    plan = plan_cycle(snap(servers, {("A", SHORT): 6}, agents={}), None, FAITHFUL)
    c = camp(plan, "A")
    assert not c.may_dial and c.placements == () and plan.sequence == ()
    no_agent = "but no live agent that is not PAUSED"
    assert skips(plan, "A") == {
        "10.0.0.2": f"rank 2: allowed 4, free 4, needed 6 -> 4, {no_agent}",
        "10.0.0.3": f"rank 1: allowed 4, free 4, needed 2 -> 2, {no_agent}",
    }
    # 10.0.0.4 comes after the need was covered: counted in the note, not a Skip of its own.
    assert "placing 0 of 6 planned" in c.note
    assert "1 more candidate servers not needed" in c.note


def test_rule4_shallow_hopper_starves_later_servers() -> None:
    # .2 max 6, .3 max 10, needed 10, 4 READY leads. .2: to_dial 6 -> 4 placed (hopper 4);
    # .3: to_dial 10 - 6 = 4 but the hopper is empty -> skip. Total 4.
    servers = [srv("10.0.0.2", rank=1, max_trunks=6), srv("10.0.0.3", max_trunks=10)]
    plan = plan_cycle(snap(servers, {("A", SHORT): 10}, hopper={"A": 4}), None, FAITHFUL)
    assert calls(plan, "A") == {"10.0.0.2": 4}
    assert camp(plan, "A").placements[0].reason.endswith("hopper 4 left -> 4")
    assert "hopper is empty" in skips(plan, "A")["10.0.0.3"]
    # 8 leads: .2 -> 6 (2 left); .3 to_dial 4 -> 2 (the last 2 leads).
    plan = plan_cycle(snap(servers, {("A", SHORT): 10}, hopper={"A": 8}), None, FAITHFUL)
    assert calls(plan, "A") == {"10.0.0.2": 6, "10.0.0.3": 2}


def test_rule4_placement_reason_carries_the_numbers() -> None:
    # .2 rank 5 max 12 with 4 calls of B: allowed 12, free 8; needed 20 -> 8.
    s = snap(
        [srv("10.0.0.2", rank=5, max_trunks=12)],
        {("A", SHORT): 20},
        auto={("10.0.0.2", "B", "OUT"): 4},
    )
    (placement,) = camp(plan_cycle(s, None, FAITHFUL), "A").placements
    assert placement.reason == "rank 5: allowed 12, free 8, needed 20 -> 8"


def test_rule4_zero_call_results_are_skips_never_placements() -> None:
    # .2 has max_trunks 0: allowed 0 - 0 - 0 = 0 -> a skip, not a 0-call placement; .3 -> 2.
    servers = [srv("10.0.0.2", rank=1, max_trunks=0), srv("10.0.0.3")]
    plan = plan_cycle(snap(servers, {("A", SHORT): 2}), None, FAITHFUL)
    assert all(p.calls > 0 for p in plan.sequence)
    assert calls(plan, "A") == {"10.0.0.3": 2}
    assert skips(plan, "A")["10.0.0.2"] == (
        "rank 1: allowed 0 (0 max - 0 offlimits - 0 dedicated to others)"
    )


# --------------------------------------------------------------------------- rule 5: pace


@pytest.mark.parametrize(
    ("cps", "pace"),
    [(0, 25.0), (1, 1000.0), (10, 100.0), (1000, 1.0), (1001, 25.0), (-5, 25.0)],
)
def test_rule5_pace_is_1000_over_calls_per_second_else_25(cps: int, pace: float) -> None:
    settings = SystemSettings(outbound_calls_per_second=cps)
    s = snap([srv("10.0.0.3")], {("A", SHORT): 1}, settings=settings)
    assert plan_cycle(s, None, FAITHFUL).pace_ms == pace


# --------------------------------------------------------------------------- rule 7: staggered


def test_rule7_staggered_deals_round_robin_within_a_tier() -> None:
    # Rank 1: .2, .3; rank 0: .4. Needed 5: normal to_dial .2 = 5 -> gather 5.
    # Deal .2 .3 .2 .3 .2 -> .2: 3, .3: 2; the lower tier gets nothing.
    servers = [srv("10.0.0.2", rank=1), srv("10.0.0.3", rank=1), srv("10.0.0.4")]
    plan = plan_cycle(snap(servers, {("A", SHORT): 5}), None, FAITHFUL_STAGGERED)
    assert order(plan) == ["10.0.0.2", "10.0.0.3", "10.0.0.2", "10.0.0.3", "10.0.0.2"]
    assert all(p.calls == 1 for p in plan.sequence)
    assert calls(plan, "A") == {"10.0.0.2": 3, "10.0.0.3": 2}
    assert "10.0.0.4" not in skips(plan, "A")  # not needed: counted in the note
    assert "1 more candidate servers not needed" in camp(plan, "A").note


def test_rule7_staggered_tiers_and_per_server_caps() -> None:
    # Rank 2: .2 (MAXIMUM_LIMIT 1), .3 (max 5, 3 calls of B: free 2); rank 1: .4, .5 (max 10).
    # Needed 9. to_dial: .2 1, .3 min(8, 5, 2) = 2, .4 min(6, 10, 10) = 6, .5 0 -> gather 9.
    # Rank 2 tier: .2 .3, then .2 is full: .3 -> 3 dealt, tier full.
    # Rank 1 tier: .4 .5 .4 .5 .4 .5 -> the other 6.
    servers = [
        srv("10.0.0.2", rank=2),
        srv("10.0.0.3", rank=2, max_trunks=5),
        srv("10.0.0.4", rank=1, max_trunks=10),
        srv("10.0.0.5", rank=1, max_trunks=10),
    ]
    s = snap(
        servers,
        {("A", SHORT): 9},
        rules=[TrunkRule("10.0.0.2", "A", dedicated=1, maximum_limit=True)],
        auto={("10.0.0.3", "B", "OUT"): 3},
    )
    plan = plan_cycle(s, None, FAITHFUL_STAGGERED)
    assert order(plan) == [
        "10.0.0.2", "10.0.0.3", "10.0.0.3",
        "10.0.0.4", "10.0.0.5", "10.0.0.4", "10.0.0.5", "10.0.0.4", "10.0.0.5",
    ]  # fmt: skip
    assert calls(plan, "A") == {"10.0.0.2": 1, "10.0.0.3": 2, "10.0.0.4": 3, "10.0.0.5": 3}


def test_rule7_staggered_gathers_no_more_than_the_hopper_holds() -> None:
    # As the round-robin case, needed 5 but 3 READY leads: gather 3 -> .2 .3 .2.
    servers = [srv("10.0.0.2", rank=1), srv("10.0.0.3", rank=1)]
    plan = plan_cycle(snap(servers, {("A", SHORT): 5}, hopper={"A": 3}), None, FAITHFUL_STAGGERED)
    assert order(plan) == ["10.0.0.2", "10.0.0.3", "10.0.0.2"]


def test_rule7_staggered_never_deals_to_the_server_reporting_the_shortage() -> None:
    # VICIdial's tier would include .1 (rank 9, short of lines itself). Ours: .2 .3 .2 .3.
    servers = [srv(SHORT, rank=9), srv("10.0.0.2", rank=9), srv("10.0.0.3", rank=9)]
    plan = plan_cycle(snap(servers, {("A", SHORT): 4}), None, FAITHFUL_STAGGERED)
    assert calls(plan, "A") == {"10.0.0.2": 2, "10.0.0.3": 2}
    assert "reports a shortage" in skips(plan, "A")[SHORT]


def test_rule7_staggered_without_live_agent_gathers_nothing() -> None:
    servers = [srv("10.0.0.2"), srv("10.0.0.3")]
    plan = plan_cycle(snap(servers, {("A", SHORT): 4}, agents={"A": 0}), None, FAITHFUL_STAGGERED)
    assert plan.sequence == () and camp(plan, "A").placements == ()
    assert "no live agent" in skips(plan, "A")["10.0.0.2"]


def test_rule7_staggered_live_mode_deals_in_spare_lines_order() -> None:
    # Max 23; trunk lines .2 18 (spare 5), .3 3 (spare 20), .4 10 (spare 13): order .3 .4 .2.
    # Needed 5: to_dial .3 = 5 -> gather 5 -> .3 .4 .2 .3 .4.
    servers = [srv("10.0.0.2"), srv("10.0.0.3"), srv("10.0.0.4")]
    live = {"10.0.0.2": up(18), "10.0.0.3": up(3), "10.0.0.4": up(10)}
    plan = plan_cycle(snap(servers, {("A", SHORT): 5}), live, LIVE_STAGGERED)
    assert order(plan) == ["10.0.0.3", "10.0.0.4", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


def test_rule7_staggered_calls_carry_forward_to_later_campaigns() -> None:
    # Max 3 each. A needs 4: to_dial .2 3, .3 1 -> gather 4 -> .2 .3 .2 .3 (2 each).
    # B needs 4: free .2 = 3 - 2 = 1, .3 = 1 -> to_dial 1 + 1 -> gather 2 -> .2 .3.
    servers = [srv("10.0.0.2", max_trunks=3), srv("10.0.0.3", max_trunks=3)]
    plan = plan_cycle(snap(servers, {("A", SHORT): 4, ("B", SHORT): 4}), None, FAITHFUL_STAGGERED)
    assert calls(plan, "A") == {"10.0.0.2": 2, "10.0.0.3": 2}
    assert calls(plan, "B") == {"10.0.0.2": 1, "10.0.0.3": 1}
    assert [p.campaign_id for p in plan.sequence] == ["A"] * 4 + ["B"] * 2


# --------------------------------------------------------------------------- live mode


def _health_zoo() -> list[ServerInfo]:
    return [srv(f"10.0.0.{n}") for n in range(2, 7)]


def test_live_mode_uses_only_up_servers_that_are_not_drained() -> None:
    # .2 DOWN, .3 SUSPECT, .4 not tracked, .5 UP but drained, .6 UP: only .6 -> 5.
    live = {
        "10.0.0.2": up(health=Health.DOWN),
        "10.0.0.3": up(health=Health.SUSPECT),
        "10.0.0.5": up(drained=True),
        "10.0.0.6": up(),
    }
    plan = plan_cycle(snap(_health_zoo(), {("A", SHORT): 5}), live, LIVE)
    assert calls(plan, "A") == {"10.0.0.6": 5}
    assert skips(plan, "A") == {
        "10.0.0.2": "health down: not UP",
        "10.0.0.3": "health suspect: not UP",
        "10.0.0.4": "no live state (not tracked): not UP",
        "10.0.0.5": "drained by the operator",
    }


def test_faithful_mode_ignores_health_but_never_uses_a_drained_server() -> None:
    # Same servers, needed 100, 23 each in ip order: .2 .3 .4 .6 -> 92; .5 is drained.
    live = {
        "10.0.0.2": up(health=Health.DOWN),
        "10.0.0.3": up(health=Health.SUSPECT),
        "10.0.0.5": up(drained=True),
        "10.0.0.6": up(),
    }
    plan = plan_cycle(snap(_health_zoo(), {("A", SHORT): 100}), live, FAITHFUL)
    assert calls(plan, "A") == dict.fromkeys(["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.6"], 23)
    assert skips(plan, "A")["10.0.0.5"] == "drained by the operator"


def test_live_mode_without_live_state_has_no_candidate() -> None:
    plan = plan_cycle(snap([srv("10.0.0.2")], {("A", SHORT): 5}), None, LIVE)
    c = camp(plan, "A")
    assert plan.stopped is None and c.placements == () and "no candidate" in c.note


def test_live_mode_trunk_lines_cap_free() -> None:
    # .2 max 23 with 2 auto calls but 20 trunk lines on AMI: free = min(21, 3) = 3 -> 3;
    # .3 (rank 0, idle) takes 10 - 3 = 7.
    servers = [srv("10.0.0.2", rank=1), srv("10.0.0.3")]
    s = snap(servers, {("A", SHORT): 10}, auto={("10.0.0.2", "B", "OUT"): 2})
    plan = plan_cycle(s, {"10.0.0.2": up(20), "10.0.0.3": up()}, LIVE)
    assert calls(plan, "A") == {"10.0.0.2": 3, "10.0.0.3": 7}
    assert camp(plan, "A").placements[0].reason == "rank 1: allowed 23, free 3, needed 10 -> 3"
    # The other way round: 15 auto calls, 2 trunk lines: free = min(8, 21) = 8 -> 8, .3 -> 2.
    s = snap(servers, {("A", SHORT): 10}, auto={("10.0.0.2", "B", "OUT"): 15})
    plan = plan_cycle(s, {"10.0.0.2": up(2), "10.0.0.3": up()}, LIVE)
    assert calls(plan, "A") == {"10.0.0.2": 8, "10.0.0.3": 2}


def test_live_mode_orders_a_tier_by_spare_lines() -> None:
    # Rank 1: .10 with 15 trunk lines (spare 8), .9 with 5 (spare 18); rank 0: .3 idle (23).
    # Live: .9 first -> 18, then .10 -> 20 - 18 = 2; rank beats spare, so .3 gets nothing.
    # Faithful ignores trunk lines and keeps TEXT order: .10 first -> all 20.
    servers = [srv("10.10.0.9", rank=1), srv("10.10.0.10", rank=1), srv("10.10.0.3")]
    live = {"10.10.0.9": up(5), "10.10.0.10": up(15), "10.10.0.3": up()}
    s = snap(servers, {("A", SHORT): 20})
    assert order(plan_cycle(s, live, LIVE)) == ["10.10.0.9", "10.10.0.10"]
    assert calls(plan_cycle(s, live, LIVE), "A") == {"10.10.0.9": 18, "10.10.0.10": 2}
    assert calls(plan_cycle(s, live, FAITHFUL), "A") == {"10.10.0.10": 20}


def test_live_mode_equal_spare_lines_fall_back_to_text_order() -> None:
    # Both spare 18: '10.10.0.10' < '10.10.0.9' as text -> .10 takes all 5.
    servers = [srv("10.10.0.9"), srv("10.10.0.10")]
    live = {"10.10.0.9": up(5), "10.10.0.10": up(5)}
    plan = plan_cycle(snap(servers, {("A", SHORT): 5}), live, LIVE)
    assert calls(plan, "A") == {"10.10.0.10": 5}


# --------------------------------------------------------------------------- the plan itself


def test_plan_records_mode_staggered_and_normal_sequence_in_plan_order() -> None:
    servers = [srv("10.0.0.2", rank=1, max_trunks=3), srv("10.0.0.3")]
    s = snap(servers, {("A", SHORT): 4, ("B", SHORT): 2})
    plan = plan_cycle(s, all_up("10.0.0.2", "10.0.0.3"), LIVE)
    assert (plan.mode, plan.staggered) == ("live", False)
    # A: .2 -> 3, .3 -> 1; B: .2 free 0 (skip), .3 -> 2.
    assert plan.sequence == camp(plan, "A").placements + camp(plan, "B").placements
    expected = [("10.0.0.2", 3), ("10.0.0.3", 1), ("10.0.0.3", 2)]
    assert [(p.server_ip, p.calls) for p in plan.sequence] == expected
    stag = plan_cycle(s, all_up("10.0.0.2", "10.0.0.3"), LIVE_STAGGERED)
    assert (stag.mode, stag.staggered) == ("live", True)


def test_same_input_gives_an_identical_plan() -> None:
    servers = [srv("10.0.0.2", rank=1, max_trunks=3), srv("10.0.0.3"), srv("10.0.0.4")]
    s = snap(servers, {("A", SHORT): 4, ("B", SHORT): 2, ("C", "10.0.0.3"): 3})
    for config in (FAITHFUL, LIVE, FAITHFUL_STAGGERED, LIVE_STAGGERED):
        live = all_up("10.0.0.2", "10.0.0.3", "10.0.0.4")
        assert plan_cycle(s, live, config) == plan_cycle(s, live, config)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match=r"balance\.mode"):
        plan_cycle(snap([srv("10.0.0.2")], {("A", SHORT): 1}), None, BalanceConfig(mode="fast"))
