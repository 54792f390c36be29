"""Property tests of the pure planner: random small clusters, both modes, with/without staggering.

Whatever the input: never above a server's lines, never to a server that may not take calls,
never more than needed or than the hopper holds (a lead twice), never to the server reporting
the shortage, and the same input always gives the same plan.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.balance.model import (
    CampaignInfo,
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

# Text order differs from numeric order here on purpose ('10.10.0.10' < '10.10.0.9').
IPS = ["10.10.0.9", "10.10.0.10", "10.10.0.100", "10.10.0.2", "9.0.0.1", "10.10.0.11"]
CAMPAIGNS = ["A", "B", "C", "D", "E"]
KINDS = ["OUT", "IN", "OUTBALANCE"]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[DbSnapshot, dict[str, LiveServer] | None]:
    """Up to 6 servers and 5 campaigns with random load, rules, demand and live state.

    Hypothesis draws small values often, so each draw's smallest value is the ordinary case
    (active, balance-active, a shortage, lines, leads, an agent, UP, not drained).
    """
    ips = draw(st.lists(st.sampled_from(IPS), min_size=1, max_size=6, unique=True))
    servers = {
        ip: ServerInfo(
            ip,
            active=draw(st.integers(0, 9)) < 9,
            balance_active=draw(st.integers(0, 4)) < 4,
            rank=draw(st.integers(0, 2)),
            max_trunks=draw(st.sampled_from([23, *range(31)])),
            offlimits=draw(st.integers(0, 8)),
        )
        for ip in ips
    }
    campaign_ids = draw(st.lists(st.sampled_from(CAMPAIGNS), min_size=1, max_size=5, unique=True))
    campaigns = {c: CampaignInfo(c, active=draw(st.integers(0, 9)) < 9) for c in campaign_ids}
    any_ip = st.sampled_from([*ips, "10.0.0.1"])  # also a server not in the servers table
    any_campaign = st.sampled_from([*campaign_ids, "Z"])  # "Z" is not in vicidial_campaigns
    # Short of lines mostly on 10.0.0.1, so that most campaigns have candidates.
    short_ip = st.sampled_from(["10.0.0.1"] * len(ips) + ips)
    short_campaign = st.sampled_from([*campaign_ids, *campaign_ids, "Z"])
    shortage = st.sampled_from([6, *range(1, 26), 0])
    shortages = draw(
        st.dictionaries(st.tuples(short_campaign, short_ip), shortage, min_size=1, max_size=8)
    )
    rules = draw(
        st.lists(
            st.builds(TrunkRule, any_ip, any_campaign, st.integers(0, 25), st.booleans()),
            max_size=6,
        )
    )
    auto = draw(
        st.dictionaries(
            st.tuples(any_ip, any_campaign, st.sampled_from(KINDS)),
            st.integers(0, 20),
            max_size=10,
        )
    )
    settings_row = draw(
        st.sampled_from(
            [SystemSettings()] * 8
            + [None, SystemSettings(disable_auto_dial=True), SystemSettings(True, False, 0)]
        )
    )
    snapshot = DbSnapshot(
        taken_at=datetime(2024, 1, 2, 3, 4, 5),
        settings=settings_row,
        servers=servers,
        campaigns=campaigns,
        shortages=shortages,
        trunk_rules=tuple(rules),
        auto_calls=auto,
        live_agents={c: draw(st.sampled_from([1, 0, 2, 3])) for c in campaign_ids},
        hopper_ready={
            c: draw(st.sampled_from([20, *range(31)]))
            for c in campaign_ids
            if draw(st.integers(0, 9)) < 9
        },
    )
    if draw(st.integers(0, 9)) == 9:
        return snapshot, None
    live = {
        ip: LiveServer(
            draw(st.sampled_from([Health.UP, Health.UP, Health.UP, Health.SUSPECT, Health.DOWN])),
            drained=draw(st.integers(0, 5)) == 5,
            trunk_lines=draw(st.integers(0, 35)),
        )
        for ip in ips
        if draw(st.integers(0, 9)) < 9  # now and then a server the tracker does not know
    }
    return snapshot, live


CONFIGS = [
    BalanceConfig(mode=mode, staggered=staggered)
    for mode in ("live", "faithful")
    for staggered in (False, True)
]


def _per_server(plan: Plan) -> Counter[str]:
    total: Counter[str] = Counter()
    for campaign in plan.campaigns:
        for p in campaign.placements:
            total[p.server_ip] += p.calls
    return total


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-staggered={c.staggered}")
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(cluster=clusters())
def test_plan_invariants(
    cluster: tuple[DbSnapshot, dict[str, LiveServer] | None], config: BalanceConfig
) -> None:
    snapshot, live = cluster
    plan = plan_cycle(snapshot, live, config)
    live_mode = config.mode == "live"
    view = live or {}
    assert (plan.mode, plan.staggered) == (config.mode, config.staggered)

    # (a) never above a server's lines: auto calls, and in live mode AMI trunk lines too.
    for ip, n in _per_server(plan).items():
        server = snapshot.servers[ip]
        assert n <= max(0, server.max_trunks - snapshot.auto_calls_on(ip))
        if live_mode:
            assert n <= max(0, server.max_trunks - view[ip].trunk_lines)

    for campaign in plan.campaigns:
        info = snapshot.campaigns[campaign.campaign_id]
        assert info.active  # an inactive campaign has no demand
        hopper = snapshot.hopper_ready.get(campaign.campaign_id, 0)
        # (c) never more than needed, never more leads than READY rows (no lead twice).
        assert campaign.planned <= max(0, campaign.needed)
        assert campaign.planned <= hopper
        if not campaign.may_dial:
            assert campaign.planned == 0
        seen: set[str] = set()
        for p in campaign.placements:
            ip = p.server_ip
            assert p.calls > 0 and ip not in seen  # aggregated per server, no empty placements
            seen.add(ip)
            server = snapshot.servers[ip]
            # (b) only active, balance-active, not drained; in live mode only UP.
            assert server.active and server.balance_active
            assert not (ip in view and view[ip].drained)
            if live_mode:
                assert view[ip].health is Health.UP
            # (d) never on a server reporting the shortage for this campaign.
            assert snapshot.shortages.get((campaign.campaign_id, ip), 0) <= 0
            # MAXIMUM_LIMIT still caps the campaign there (staggered dealing included).
            caps = [
                r.dedicated
                for r in snapshot.trunk_rules
                if r.maximum_limit and (r.server_ip, r.campaign_id) == (ip, campaign.campaign_id)
            ]
            if caps:
                assert p.calls <= max(0, min(caps) - snapshot.outbalance(campaign.campaign_id, ip))

    # (f) the sequence places exactly the planned calls; staggered means one call at a time.
    sequence: Counter[tuple[str, str]] = Counter()
    for p in plan.sequence:
        assert p.calls > 0
        sequence[p.campaign_id, p.server_ip] += p.calls
        if config.staggered:
            assert p.calls == 1
    planned = Counter(
        {(p.campaign_id, p.server_ip): p.calls for c in plan.campaigns for p in c.placements}
    )
    assert sequence == planned
    assert plan.total_calls == sum(c.planned for c in plan.campaigns)

    # (e) deterministic, also when the snapshot's dicts and rules come in another order.
    assert plan_cycle(snapshot, live, config) == plan
    shuffled = DbSnapshot(
        taken_at=snapshot.taken_at,
        settings=snapshot.settings,
        servers=dict(reversed(snapshot.servers.items())),
        campaigns=dict(reversed(snapshot.campaigns.items())),
        shortages=dict(reversed(snapshot.shortages.items())),
        trunk_rules=tuple(reversed(snapshot.trunk_rules)),
        auto_calls=dict(reversed(snapshot.auto_calls.items())),
        live_agents=dict(reversed(snapshot.live_agents.items())),
        hopper_ready=dict(reversed(snapshot.hopper_ready.items())),
    )
    shuffled_live = None if live is None else dict(reversed(live.items()))
    assert plan_cycle(shuffled, shuffled_live, config) == plan


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(clusters(), st.sampled_from(["live", "faithful"]))
def test_staggered_places_what_normal_mode_places_but_spread(
    cluster: tuple[DbSnapshot, dict[str, LiveServer] | None], mode: str
) -> None:
    snapshot, live = cluster
    # Staggered gathers min(sum of to_dial, hopper) and deals all of it; normal mode places
    # min(to_dial, hopper left) server by server, the same total. Only the first campaign is
    # compared: later ones see lines carried forward from a different spread.
    normal = plan_cycle(snapshot, live, BalanceConfig(mode=mode))
    staggered = plan_cycle(snapshot, live, BalanceConfig(mode=mode, staggered=True))
    assert normal.stopped == staggered.stopped
    if normal.campaigns:
        assert normal.campaigns[0].planned == staggered.campaigns[0].planned
