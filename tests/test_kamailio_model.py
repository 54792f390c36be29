"""The Kamailio model (pure): desired state, weights, what a publish changes; the config."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.config import config_from_dict
from balancer.errors import ConfigError
from balancer.kamailio.model import (
    Desired,
    KamDest,
    ReloadLimiter,
    ServerView,
    SetSpec,
    build_desired,
    parse_list,
    plan_pass,
    reload_reason,
    shares,
    uri_host,
    weights_for,
)

URIS = {f"10.0.0.{i}": f"sip:127.0.0.1:{5060 + i}" for i in range(1, 5)}


def view(i: int, health: str | None = "up", **changes: Any) -> ServerView:
    values: dict[str, Any] = {
        "server_ip": f"10.0.0.{i}",
        "server_id": f"ast{i}",
        "health": health,
        "drained": False,
        "fresh": True,
        "max_trunks": 30,
        "trunk_lines": 0,
        "agent_lines": 0,
        "agent_capacity": 100,
    }
    values.update(changes)
    return ServerView(**values)


def desired(*views: ServerView, previous: Desired | None = None, now: float = 10.0) -> Desired:
    return build_desired(views, [SetSpec(1, "trunks")], URIS, previous, now)


def kam(duid: str, flags: str = "AP", rweight: int = 0, set_id: int = 1, port: int = 0) -> KamDest:
    index = int(duid[-1])
    return KamDest(set_id, URIS[f"10.0.0.{index}"], flags, duid, 0, rweight)


def plan(
    d: Desired, have: dict[Any, KamDest] | None, told: dict[Any, bool] | None = None, **kw: Any
):  # type: ignore[no-untyped-def]
    return plan_pass(
        d,
        have,
        told or {},
        kw.pop("admin", set()),
        algorithm=kw.pop("algorithm", 11),
        probing=kw.pop("probing", True),
        hysteresis=kw.pop("hysteresis", 5),
    )


# --------------------------------------------------------------------------- desired state


def test_down_and_drained_are_inactive_up_active_suspect_held() -> None:
    first = desired(view(1), view(2, "down"), view(3, drained=True), view(4, "suspect"))
    by = {w.duid: w for w in first.all()}
    assert [by[d].active for d in ("ast1", "ast2", "ast3", "ast4")] == [True, False, False, False]
    assert by["ast3"].reason == "drained" and by["ast4"].reason == "held: suspect"
    # A server seen UP that turns SUSPECT keeps its published state (no flap on one lost Ping).
    again = desired(view(1, "suspect"), previous=first, now=11.0)
    assert again.all()[0].active is True and again.all()[0].since == first.all()[0].since
    # Stale live state (nobody tracking it) also holds: fail static.
    stale = desired(view(1, fresh=False), previous=first, now=12.0)
    assert stale.all()[0].active is True and stale.all()[0].reason == "held: live state stale"


def test_since_moves_only_when_the_wish_changes() -> None:
    first = desired(view(1), now=1.0)
    same = desired(view(1, trunk_lines=5), previous=first, now=2.0)
    down = desired(view(1, "down"), previous=same, now=3.0)
    assert [first.all()[0].since, same.all()[0].since, down.all()[0].since] == [1.0, 1.0, 3.0]


def test_spare_by_trunks_or_agents_and_set_members() -> None:
    views = [view(1, trunk_lines=10, agent_lines=90), view(2, max_trunks=5, trunk_lines=9)]
    sets = [SetSpec(1, "trunks"), SetSpec(2, "agents", ("10.0.0.1",))]
    d = build_desired(views, sets, URIS, None, 0.0)
    assert [w.spare for w in d.sets[1]] == [20, 0]  # never negative
    assert [(w.duid, w.spare) for w in d.sets[2]] == [("ast1", 10)]


def test_unusable_duids_and_non_loopback_uris_are_left_out() -> None:
    views = [view(1, server_id="a b"), view(2)]
    uris = {**URIS, "10.0.0.2": "sip:10.0.0.2:5080"}
    d = build_desired(views, [SetSpec(1, "trunks")], uris, None, 0.0, loopback_only=True)
    assert d.all() == []
    assert len(d.skipped) == 2


def test_uri_host() -> None:
    assert uri_host("sip:10.0.0.1:5080") == "10.0.0.1"
    assert uri_host("sip:ast@[::1]:5080;transport=tcp") == "::1"
    assert uri_host("sips:box.example;lr") == "box.example"


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    ("spares", "expected"),
    [
        ([40, 30, 30], [40, 30, 30]),
        ([20, 30, 30], [25, 38, 37]),
        ([1, 1, 1], [34, 33, 33]),
        ([0, 0, 0], [34, 33, 33]),  # all full: spread evenly, not all to one box
        ([1000, 1, 0], [99, 1, 0]),  # a little spare still gets 1 %
        ([5], [100]),
        ([], []),
    ],
)
def test_shares(spares: list[int], expected: list[int]) -> None:
    assert shares(spares) == expected


@given(st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=120))
def test_shares_sum_and_floor(spares: list[int]) -> None:
    out = shares(spares)
    assert len(out) == len(spares)
    assert sum(out) <= 100 and all(0 <= x <= 100 for x in out)
    if len(spares) <= 100:
        assert all(x >= 1 for x, s in zip(out, spares, strict=True) if s > 0)
        assert sum(out) == 100


def test_rweight_keeps_every_share_weight_spreads_over_active_only() -> None:
    d = desired(view(1, trunk_lines=10), view(2, "down"), view(3))
    rel = weights_for(d.all(), 11)
    assert list(rel.values()) == [25, 38, 37]  # Kamailio renormalises over the active itself
    absolute = weights_for(d.all(), 9)
    assert list(absolute.values()) == [40, 0, 60]


# --------------------------------------------------------------------------- Kamailio's list


def test_parse_list_reads_the_jsonrpcs_shape() -> None:
    result = {
        "NRSETS": 1,
        "RECORDS": [
            {
                "SET": {
                    "ID": 1,
                    "TARGETS": [
                        {
                            "DEST": {
                                "URI": "sip:a",
                                "FLAGS": "AP",
                                "ATTRS": {"DUID": "ast1", "RWEIGHT": 40},
                            }
                        },
                        {"DEST": {"URI": "sip:b", "FLAGS": "IX", "ATTRS": {"BODY": "x=1"}}},
                    ],
                }
            }
        ],
    }
    listed = parse_list(result)
    assert listed[(1, "ast1")].rweight == 40 and listed[(1, "ast1")].probing
    assert listed[(1, "?sip:b")].state == "I"  # no duid: kept apart, so a reload fixes it


# --------------------------------------------------------------------------- one publish


def test_first_publish_sets_every_state_and_writes_the_whole_file() -> None:
    d = desired(view(1), view(2, "down"), view(3, drained=True))
    have = {k.key: k for k in (kam("ast1", "IX", 34), kam("ast2", "AP", 33), kam("ast3", "AX", 33))}
    p = plan(d, have)
    assert p.states == [("ap", 1, "ast1"), ("i", 1, "ast2"), ("i", 1, "ast3")]
    assert p.reload_reason is None
    assert p.file_text.splitlines()[-3:] == [
        "1 sip:127.0.0.1:5061 8 0 duid=ast1;rweight=34",
        "1 sip:127.0.0.1:5062 1 0 duid=ast2;rweight=33",
        "1 sip:127.0.0.1:5063 1 0 duid=ast3;rweight=33",
    ]


def test_admin_disabled_is_never_touched_and_written_back_disabled() -> None:
    d = desired(view(1), view(2, "down"))
    have = {k.key: k for k in (kam("ast1", "DX", 50), kam("ast2", "DX", 50))}
    p = plan(d, have, {(1, "ast1"): True})
    assert p.states == []
    assert p.admin_disabled == {(1, "ast1"), (1, "ast2")}
    assert " 4 0 duid=ast1;" in p.file_text and " 4 0 duid=ast2;" in p.file_text
    # While Kamailio cannot be read, the last known admin flags are kept in the file.
    blind = plan(d, None, admin={(1, "ast1")})
    assert " 4 0 duid=ast1;" in blind.file_text and " 1 0 duid=ast2;" in blind.file_text
    # Re-enabled by hand: the balancer's again.
    again = plan(
        d, {k.key: k for k in (kam("ast1", "AP", 50), kam("ast2", "AP", 50))}, admin={(1, "ast1")}
    )
    assert again.admin_disabled == set() and again.states == [("i", 1, "ast2")]


def test_probing_verdict_on_an_active_destination_is_left_to_kamailio() -> None:
    d = desired(view(1), view(2))
    have = {k.key: k for k in (kam("ast1", "IP", 50), kam("ast2", "IX", 50))}
    told = {(1, "ast1"): True, (1, "ast2"): True}
    p = plan(d, have, told)
    # IP: Kamailio's own probing found the SIP side dead: left alone (and kept in the file);
    # IX: not a probing verdict (no P): the balancer's "active" is restored.
    assert p.states == [("ap", 1, "ast2")]
    assert p.verdicts == {(1, "ast1"): "I"}
    assert " 9 0 duid=ast1;" in p.file_text
    # Not told yet (the balancer's first word to this Kamailio): it asserts its own state.
    assert plan(d, have).states == [("ap", 1, "ast1"), ("ap", 1, "ast2")]


def test_inactive_is_reasserted_over_probing_and_loses_the_probing_flag() -> None:
    d = desired(view(1, "down"))
    for flags in ("AP", "TP", "IP", "AX"):
        assert plan(d, {(1, "ast1"): kam("ast1", flags, 100)}).states == [("i", 1, "ast1")]
    assert plan(d, {(1, "ast1"): kam("ast1", "IX", 100)}).states == []


def test_reload_reasons_members_uris_and_hysteresis() -> None:
    d = desired(view(1, trunk_lines=10), view(2))
    weights = weights_for(d.all(), 11)  # 40 / 60
    ok = {(1, "ast1"): kam("ast1", "AP", 43), (1, "ast2"): kam("ast2", "AP", 57)}
    assert reload_reason(d.all(), ok, weights, 11, 5) is None
    assert "more than 2 points" in str(reload_reason(d.all(), ok, weights, 11, 2))
    assert "missing" in str(reload_reason(d.all(), {(1, "ast1"): ok[(1, "ast1")]}, weights, 11, 5))
    extra = {**ok, (1, "ast3"): kam("ast3", "AP", 1)}
    assert "not wanted" in str(reload_reason(d.all(), extra, weights, 11, 5))
    moved = {**ok, (1, "ast2"): KamDest(1, "sip:elsewhere", "AP", "ast2", 0, 57)}
    assert "uri" in str(reload_reason(d.all(), moved, weights, 11, 5))
    # Crossing zero always counts: a full server must stop getting INVITEs.
    full = desired(view(1, trunk_lines=30), view(2))
    zero = weights_for(full.all(), 11)
    near = {(1, "ast1"): kam("ast1", "AP", 2), (1, "ast2"): kam("ast2", "AP", 98)}
    assert "weight 2 -> 0" in str(reload_reason(full.all(), near, zero, 11, 5))


def test_reload_limiter_spaces_reloads() -> None:
    limiter = ReloadLimiter(6)
    assert limiter.allowed(100.0)
    limiter.record(100.0)
    assert not limiter.allowed(109.9) and limiter.next_allowed(105.0) == 110.0
    assert limiter.allowed(110.0)


# --------------------------------------------------------------------------- [kamailio] config


def kamailio_section(**changes: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "endpoints": [
            {"name": "kam1", "url": "http://127.0.0.1:5071/RPC", "list_file": "/tmp/d.list"}
        ],
        "sets": [{"id": 1}],
    }
    section.update(changes)
    return section


def load(section: dict[str, Any]) -> Any:
    return config_from_dict(
        {"database": {"url": "mysql://u:p@127.0.0.1/x"}, "kamailio": section}, env={}
    ).kamailio


def test_kamailio_config_defaults_and_uris() -> None:
    config = load(
        kamailio_section(servers={"10.0.0.11": {"uri": "sip:10.0.0.11:5080"}}, sip_port=5080)
    )
    assert config.algorithm == 11 and config.publish == "leader" and config.probing is True
    assert config.uri("10.0.0.11") == "sip:10.0.0.11:5080"
    assert config.uri("10.0.0.12") == "sip:10.0.0.12:5080"
    assert config_from_dict({"database": {"url": "mysql://u:p@h/x"}}, env={}).kamailio is None


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"algorithm": 4}, "kamailio.algorithm"),
        ({"algorithm": 10}, "kamailio.algorithm"),
        ({"endpoints": []}, "kamailio.endpoints"),
        ({"sets": []}, "kamailio.sets"),
        ({"sets": [{"id": 1}, {"id": 1}]}, "kamailio.sets[1].id"),
        ({"sets": [{"id": 1, "capacity": "lines"}]}, "kamailio.sets[0].capacity"),
        ({"sets": [{"id": 1, "servers": ["ast1"]}]}, "kamailio.sets[0].servers"),
        (
            {"endpoints": [{"name": "k", "url": "ftp://x", "list_file": "/a"}]},
            "kamailio.endpoints[0].url",
        ),
        (
            {"endpoints": [{"name": "k", "url": "http://h:1/RPC", "list_file": "rel"}]},
            "kamailio.endpoints[0].list_file",
        ),
        (
            {"endpoints": [{"name": "k", "url": "http://h:1/RPC"}]},
            "kamailio.endpoints[0].list_file",
        ),
        (
            {
                "endpoints": [
                    {"name": "k", "url": "http://h:1/RPC", "list_file": "/a"},
                    {"name": "k2", "url": "http://h:2/RPC", "list_file": "/a"},
                ]
            },
            "kamailio.endpoints[1].list_file",
        ),
        ({"servers": {"10.0.0.1": {"uri": "10.0.0.1:5080"}}}, "kamailio.servers.10.0.0.1.uri"),
        ({"servers": {"ast1": {"uri": "sip:a"}}}, "kamailio.servers.ast1"),
        ({"poll_interval_s": 2}, "kamailio.poll_interval_s"),
        ({"max_reloads_per_minute": 0}, "kamailio.max_reloads_per_minute"),
        ({"max_reloads_per_minute": 61}, "kamailio.max_reloads_per_minute"),
        ({"weight_hysteresis": 101}, "kamailio.weight_hysteresis"),
        ({"retry_initial_s": 5, "retry_max_s": 1}, "kamailio.retry_max_s"),
        ({"publish": "sometimes"}, "kamailio.publish"),
        ({"sip_port": 0}, "kamailio.sip_port"),
        ({"colour": "red"}, "kamailio.colour"),
    ],
)
def test_kamailio_config_errors_name_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(kamailio_section(**changes))
    assert str(caught.value).startswith(key), str(caught.value)


def test_the_example_config_documents_a_valid_kamailio_section() -> None:
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "config/vici-balancer.example.toml").read_text()
    block = text.split("# ---- [kamailio]")[1].split("# ---- end [kamailio]")[0]
    lines = [line[2:] for line in block.splitlines() if line.startswith("# ")]
    section = tomllib.loads("\n".join(line.split("##")[0] for line in lines))["kamailio"]
    config = load(section)
    assert config.endpoints[0].name == "kam1" and config.sets[0].capacity == "trunks"
    assert config.uri("10.10.0.1") == "sip:10.10.0.1:5080"


def test_weights_are_shared_out_per_set() -> None:
    views = [view(1, trunk_lines=10, agent_lines=4), view(2, agent_lines=1)]
    sets = [SetSpec(1, "trunks"), SetSpec(2, "agents")]
    d = build_desired(views, sets, URIS, None, 0.0)
    p = plan(d, {})
    assert p.weights == {(1, "ast1"): 40, (1, "ast2"): 60, (2, "ast1"): 49, (2, "ast2"): 51}


def test_zero_weights_are_written_first_for_algorithm_9() -> None:
    d = desired(view(1), view(2), view(3, "down"))
    lines = plan(d, {}, algorithm=9).file_text.splitlines()[-3:]
    # Kamailio reverses a set's lines and needs a non-zero weight on the last one.
    assert [line.split()[-1] for line in lines] == [
        "duid=ast3;weight=0",
        "duid=ast1;weight=50",
        "duid=ast2;weight=50",
    ]


def test_rweight_never_leaves_the_active_destinations_all_zero() -> None:
    d = desired(view(1, trunk_lines=30), view(2, trunk_lines=30), view(3, "down"))
    assert list(weights_for(d.all(), 11).values()) == [1, 1, 100]
