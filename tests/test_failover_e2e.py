"""Carrier routing and failover end to end: the real daemon (Redis, MariaDB), simulated Asterisk
servers whose carriers fail, and VICIdial's command sender executing every Originate.
The daemon wires it: CarrierHealth and Failover listen to the tracker, the registry refresh feeds
them carrier rows, the executor routes every call, failover re-places trunk failures, and the
leader publishes carrier state for `vici-balancer routes`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import pytest_asyncio
from conftest import execute, fetchall
from fixtures_sim import start_cluster
from tracking_helpers import eventually, health_is, make_config, running

from balancer.carriers.routing import BreakerState
from balancer.config import BalanceConfig, CarrierConfig, Config, RouteConfig, RoutingConfig
from balancer.daemon import Daemon
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.sim.model import SimCarrier
from balancer.sim.seed import SeedCampaign, SeedServer, seed_campaigns, seed_servers
from balancer.sim.sender import CommandSender
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health
from balancer.store.keys import ROUTES_DOCUMENT

IPS = ("10.20.0.1", "10.20.0.2", "10.20.0.3")
SHORT, S2, S3 = IPS  # SHORT reports the shortage, so the calls go to S2 and S3
PREFIX = {"7": "alpha", "8": "beta", "6": "gamma"}
SIM_CARRIERS = [SimCarrier(name, prefix) for prefix, name in PREFIX.items()]
_CHANNEL = re.compile(r"Channel: Local/(\d)\d*@")


@pytest_asyncio.fixture
async def cluster(database_url: DatabaseUrl) -> AsyncIterator[list[SimAsterisk]]:
    """Three simulated servers with carriers alpha (7), beta (8), gamma (6), each with its
    command sender."""
    async with AsyncExitStack() as stack:
        sims = []
        for ip in IPS:
            sim = SimAsterisk(ip, carriers=SIM_CARRIERS, call_duration_s=120, answer_delay_s=0.02)
            await sim.start()
            stack.push_async_callback(sim.stop)
            sender = CommandSender(sim, database_url, poll_interval_s=0.02)
            await sender.start()
            stack.push_async_callback(sender.stop)
            sims.append(sim)
        yield sims


def routing_config(
    database_url: DatabaseUrl,
    redis_url: str,
    *,
    route: tuple[tuple[str, ...], ...] = (("alpha",), ("beta",)),
    caps: dict[str, int] | None = None,
    **routing: Any,
) -> Config:
    config = make_config(database_url, redis_url=redis_url, prefix="vbroute:")
    caps = caps or {}
    carriers = (
        # alpha: from its vicidial_server_carriers row ('0.0.0.0' = every server)
        CarrierConfig("alpha", "7", max_lines_per_server=caps.get("alpha", 0)),
        CarrierConfig("beta", "8", max_lines_per_server=caps.get("beta", 0), servers=IPS),
        CarrierConfig("gamma", "6", servers=IPS),
    )
    settings = {"cool_down_s": 0.6, "probe_calls": 2, "failure_threshold": 3, **routing}
    return replace(
        config,
        balance=BalanceConfig(enabled=True, cycle_interval_s=0.3, lock_ttl_s=1.5),
        carriers=carriers,
        routes=(RouteConfig("default", route),),
        routing=RoutingConfig(**settings),
    )


def seed(
    db: Connection, sims: list[SimAsterisk], shortage: int, max_trunks: int = 40, cps: int = 20
) -> None:
    seed_servers(db, [SeedServer(s.server_ip, s.host, s.port, max_trunks=max_trunks) for s in sims])
    campaign = SeedCampaign("CAMPR", leads=60, agents_on=SHORT, shortages={SHORT: shortage})
    seed_campaigns(db, [campaign], calls_per_second=cps)
    execute(
        db,
        "INSERT INTO vicidial_server_carriers (carrier_id, carrier_name, protocol, dialplan_entry,"
        " server_ip, active) VALUES ('alpha', 'Alpha', 'SIP', %s, '0.0.0.0', 'Y')",
        "exten => _7X.,1,Dial(SIP/${EXTEN:1}@alpha,,tTo)",
    )


def only_balance_on(db: Connection, server_ip: str) -> None:
    execute(
        db,
        "UPDATE servers SET vicidial_balance_active = IF(server_ip = %s, 'Y', 'N')",
        server_ip,
    )


def set_shortage(db: Connection, shortage: int) -> None:
    execute(
        db,
        "UPDATE vicidial_campaign_server_stats SET local_trunk_shortage = %s, update_time = NOW()",
        shortage,
    )


def originates(db: Connection) -> list[dict[str, Any]]:
    """Every Originate queued, in order, with its carrier (from the dial prefix)."""
    rows = fetchall(
        db, "SELECT man_id, server_ip, callerid, cmd_line_d FROM vicidial_manager ORDER BY man_id"
    )
    for row in rows:
        match = _CHANNEL.match(str(row["cmd_line_d"]))
        row["carrier"] = PREFIX.get(match.group(1), "?") if match else "?"
    return rows


def retries(db: Connection) -> list[dict[str, Any]]:
    return fetchall(db, "SELECT * FROM vb_call_retries ORDER BY retried_at, caller_code")


def failover_decisions(db: Connection) -> list[dict[str, Any]]:
    return fetchall(
        db,
        "SELECT outcome, carrier_id, reason, details FROM vb_decision_log WHERE kind = 'failover'",
    )


def assert_one_live_call_per_lead(db: Connection, *, settled: bool = False) -> None:
    """One call in progress per lead; no lead left claimed (while the daemon runs, a placement
    may be in flight: its rows carry our claim marker until it ends)."""
    calls = fetchall(db, "SELECT lead_id FROM vicidial_auto_calls")
    leads = [r["lead_id"] for r in calls]
    assert len(leads) == len(set(leads)), "a lead has two calls in progress"
    claimed = fetchall(db, "SELECT lead_id, user FROM vicidial_hopper WHERE status <> 'READY'")
    if not settled:
        claimed = [r for r in claimed if not str(r["user"]).startswith("VB")]
    assert claimed == [], f"leads left claimed: {claimed}"


async def wait_up(daemon: Daemon) -> None:
    for ip in IPS:
        await eventually(lambda ip=ip: health_is(daemon.store, ip, Health.UP), timeout=5)


async def test_cause_34_moves_traffic_within_a_cycle_and_probes_restore_the_carrier(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    seed(db, cluster, shortage=10)
    for sim in cluster:
        sim.set_carrier_state("alpha", fail_cause=34)
    daemon = Daemon(routing_config(database_url, redis_db))
    async with running(daemon):

        async def alpha_open() -> bool:
            return any(
                daemon.carrier_health.state("alpha", ip) is BreakerState.OPEN for ip in (S2, S3)
            )

        await eventually(alpha_open, timeout=15)
        mark = max(r["man_id"] for r in originates(db))  # type: ignore[type-var]

        async def filled() -> bool:
            live = fetchall(db, "SELECT COUNT(*) AS n FROM vicidial_auto_calls")[0]["n"]
            return live == 10 and not daemon.failover.pending

        await eventually(filled, timeout=15)
        await asyncio.sleep(0.5)
        rows = originates(db)
        alpha = [r for r in rows if r["carrier"] == "alpha"]
        # traffic moved at once: at most the one call already being written went to alpha
        assert len([r for r in alpha if r["man_id"] > mark]) <= 1
        assert 3 <= len(alpha) < 10
        # each alpha call failed with 34 and was re-placed once, on beta, on its server
        done = {r["caller_code"]: r for r in retries(db)}
        assert set(done) == {r["callerid"] for r in alpha}
        by_code = {r["callerid"]: r for r in rows}
        for original, retry in done.items():
            again = by_code[retry["retry_caller_code"]]
            assert (again["carrier"], again["server_ip"]) == (
                "beta",
                by_code[original]["server_ip"],
            )
            assert (retry["failed_carrier"], retry["retry_carrier"], retry["hangup_cause"]) == (
                "alpha",
                "beta",
                34,
            )
        outcomes = [d["outcome"] for d in failover_decisions(db)]
        assert outcomes == ["retried"] * len(alpha)
        assert_one_live_call_per_lead(db)
        assert sum(sim.trunk_lines_in_use("beta") for sim in cluster) == 10

        # the carrier recovers: after the cool-down, probes go through and close the breaker
        for sim in cluster:
            sim.set_carrier_state("alpha", fail_cause=None)
        await asyncio.sleep(0.7)
        only_balance_on(db, S2)  # the server whose breaker opened gets the next calls
        set_shortage(db, 16)

        async def recovered() -> bool:
            late = [r for r in originates(db) if r["man_id"] > mark + 1 and r["carrier"] == "alpha"]
            return (
                daemon.carrier_health.state("alpha", S2) is BreakerState.CLOSED and len(late) >= 3
            )

        await eventually(recovered, timeout=15)
        doc = await daemon.store.get_document(ROUTES_DOCUMENT)
        assert doc is not None and '"id": "alpha"' in doc


async def test_unreachable_carrier_is_skipped_at_once_until_it_is_reachable_again(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    seed(db, cluster, shortage=0)
    only_balance_on(db, S2)
    daemon = Daemon(routing_config(database_url, redis_db))
    async with running(daemon):
        await wait_up(daemon)
        for sim in cluster:
            sim.set_carrier_state("alpha", reachable=False)

        async def held() -> bool:
            return all(daemon.carrier_health.state("alpha", ip) is BreakerState.OPEN for ip in IPS)

        await eventually(held, timeout=5)
        set_shortage(db, 6)
        await eventually(lambda: _live_calls(db, 6), timeout=15)
        assert {r["carrier"] for r in originates(db)} == {"beta"}  # not one call lost on alpha
        assert retries(db) == []
        for sim in cluster:
            sim.set_carrier_state("alpha", reachable=True)

        async def probing() -> bool:
            return all(
                daemon.carrier_health.state("alpha", ip) is not BreakerState.OPEN for ip in IPS
            )

        await eventually(probing, timeout=5)
        set_shortage(db, 12)
        await eventually(lambda: _live_calls(db, 12), timeout=15)

        async def closed() -> bool:
            return daemon.carrier_health.state("alpha", S2) is BreakerState.CLOSED

        await eventually(closed, timeout=5)
        carriers = [r["carrier"] for r in originates(db)]
        assert carriers[:6] == ["beta"] * 6 and "alpha" in carriers[6:]
        assert_one_live_call_per_lead(db)


async def _live_calls(db: Connection, n: int) -> bool:
    return fetchall(db, "SELECT COUNT(*) AS n FROM vicidial_auto_calls")[0]["n"] == n


async def test_a_carrier_failing_only_busy_or_no_answer_stays_in_rotation(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    seed(db, cluster, shortage=8)
    for sim in cluster:
        sim.set_carrier_state("alpha", fail_cause=17)
    daemon = Daemon(routing_config(database_url, redis_db))
    async with running(daemon):
        await eventually(lambda: _live_calls(db, 8), timeout=15)
        for sim in cluster:
            sim.set_carrier_state("alpha", fail_cause=19)
        set_shortage(db, 14)
        await eventually(lambda: _live_calls(db, 14), timeout=15)

        async def all_judged() -> bool:
            return daemon.carrier_health.breakers["alpha"].calls_in_window() >= 14

        await eventually(all_judged, timeout=5)
        assert {r["carrier"] for r in originates(db)} == {"alpha"}
        assert daemon.carrier_health.state("alpha") is BreakerState.CLOSED
        for ip in (S2, S3):
            assert daemon.carrier_health.state("alpha", ip) is BreakerState.CLOSED
        assert retries(db) == [] and failover_decisions(db) == []


async def test_line_caps_hold_under_load(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    # 24 calls as fast as the rate allows, over two servers with 12 lines each; alpha may use 3
    # lines per server: the calls committed before their channel appears must count too.
    seed(db, cluster, shortage=24, max_trunks=12, cps=500)
    config = routing_config(database_url, redis_db, caps={"alpha": 3})
    daemon = Daemon(config)
    peak = {ip: 0 for ip in IPS}
    sampling = True

    async def sample() -> None:
        while sampling:
            for sim in cluster:
                peak[sim.server_ip] = max(peak[sim.server_ip], sim.trunk_lines_in_use("alpha"))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        async with running(daemon):
            await eventually(lambda: _live_calls(db, 24), timeout=15)
            await asyncio.sleep(0.5)
    finally:
        sampling = False
        await sampler
    rows = originates(db)
    for ip in (S2, S3):
        mine = [r["carrier"] for r in rows if r["server_ip"] == ip]
        assert mine.count("alpha") == 3 and mine.count("beta") == 9
    assert max(peak.values()) == 3
    assert all(sim.trunk_lines_in_use("alpha") == 3 for sim in cluster[1:])
    assert_one_live_call_per_lead(db, settled=True)


async def test_retry_happens_once_and_only_for_trunk_failures(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    # alpha is congested, beta's network is out of order, gamma's called parties are busy.
    seed(db, cluster, shortage=10)
    for sim in cluster:
        sim.set_carrier_state("alpha", fail_cause=34)
        sim.set_carrier_state("beta", fail_cause=38)
        sim.set_carrier_state("gamma", fail_cause=17)
    config = routing_config(
        database_url, redis_db, route=(("alpha",), ("beta",), ("gamma",)), cool_down_s=60
    )
    daemon = Daemon(config)
    async with running(daemon):

        async def settled() -> bool:
            gamma = [r for r in originates(db) if r["carrier"] == "gamma"]
            return len(gamma) >= 3 and not daemon.failover.pending

        await eventually(settled, timeout=20)
        await asyncio.sleep(0.8)  # outcomes still on their way
        rows = originates(db)
        by_code = {r["callerid"]: r for r in rows}
        done = retries(db)
        originals = {r["caller_code"] for r in done}
        retry_codes = {r["retry_caller_code"] for r in done}
        assert len(originals) == len(done)  # at most one retry per call
        assert not originals & retry_codes  # a retry is never retried
        assert {by_code[c]["carrier"] for c in originals} <= {"alpha", "beta"}  # trunk failures
        assert all(by_code[c]["carrier"] != "gamma" for c in originals)  # busy: never
        for retry in done:
            again = by_code[retry["retry_caller_code"]]
            assert again["carrier"] != by_code[retry["caller_code"]]["carrier"]
        # every first attempt on a failing trunk was re-placed, or the log says why not
        decisions = failover_decisions(db)
        explained = {
            str(d["details"]).split('"caller_code":"')[1][:20]
            for d in decisions
            if d["outcome"] == "not_retried"
        }
        for row in rows:
            code = row["callerid"]
            if row["carrier"] in ("alpha", "beta") and code not in retry_codes:
                assert code in originals or code in explained, row
        # retries that failed too were not retried again, and the log says so
        failed_retries = [c for c in retry_codes if by_code[c]["carrier"] in ("alpha", "beta")]
        again = [d for d in decisions if "at most one" in str(d["reason"])]
        assert failed_retries and len(again) == len(failed_retries)
        assert [d["outcome"] for d in decisions].count("retried") == len(done)
        assert_one_live_call_per_lead(db)


async def test_local_only_calls_open_the_breaker_and_later_calls_skip_the_carrier(
    db: Connection, database_url: DatabaseUrl, redis_db: str
) -> None:
    """A dialplan that reaches its carriers through Local/ only (no trunk channel is ever
    created, as on a real Asterisk set up that way): the breaker learns from the balancer's own
    calls, each counted once, and later calls go straight to the next carrier."""
    local = [SimCarrier(name, prefix, local_only=True) for prefix, name in PREFIX.items()]
    async with AsyncExitStack() as stack:
        sims = await start_cluster(
            stack,
            database_url,
            IPS,
            poll_interval_s=0.02,
            carriers=local,
            call_duration_s=120,
            answer_delay_s=0.02,
        )
        for sim in sims:
            sim.set_carrier_state("alpha", fail_cause=34)
        seed(db, sims, shortage=12)
        daemon = Daemon(routing_config(database_url, redis_db, retry_failed_calls=False))
        async with running(daemon):

            async def alpha_open() -> bool:
                return any(
                    daemon.carrier_health.state("alpha", ip) is BreakerState.OPEN for ip in (S2, S3)
                )

            await eventually(alpha_open, timeout=20)
            assert all(sim.trunk_lines_in_use() == 0 for sim in sims)  # no trunk channel at all
            mark = max(int(str(r["man_id"])) for r in originates(db))
            opened = next(
                ip
                for ip in (S2, S3)
                if daemon.carrier_health.state("alpha", ip) is BreakerState.OPEN
            )
            breaker = daemon.carrier_health._trunk("alpha", opened).breaker

            async def once_per_call() -> bool:  # the calls still ringing report in turn
                alpha = [
                    r
                    for r in originates(db)
                    if r["carrier"] == "alpha" and r["server_ip"] == opened
                ]
                return breaker.calls_in_window() == len(alpha)

            await eventually(once_per_call, timeout=20)
            only_balance_on(db, opened)
            set_shortage(db, 24)

            async def more() -> bool:
                return sum(1 for r in originates(db) if int(str(r["man_id"])) > mark) >= 5

            await eventually(more, timeout=20)
            later = [
                r
                for r in originates(db)
                if int(str(r["man_id"])) > mark and r["server_ip"] == opened
            ]
            assert later and all(r["carrier"] == "beta" for r in later), later
