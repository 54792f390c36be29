"""Balance engine end to end: real MariaDB (VICIdial's stock engines, and InnoDB) + Redis,
simulated servers that execute the vicidial_manager rows (VICIdial's per-server command
sender), the real daemon."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import replace

import pytest
import pytest_asyncio
from conftest import both_engines, execute, fetchall
from tracking_helpers import eventually, health_is, make_config, running

from balancer.config import BalanceConfig, Config
from balancer.daemon import Daemon, rebalance_once
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.errors import DatabaseError
from balancer.sim.seed import SeedCampaign, SeedServer, seed_campaigns, seed_servers
from balancer.sim.sender import CommandSender
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health

IPS = ("10.10.0.1", "10.10.0.2", "10.10.0.3")


@pytest.fixture(params=["stock", "innodb"])
def database_url(request: pytest.FixtureRequest) -> DatabaseUrl:
    """Every test here runs on VICIdial's MyISAM/MEMORY tables and on InnoDB copies."""
    return both_engines(request)


@pytest_asyncio.fixture
async def cluster(database_url: DatabaseUrl) -> AsyncIterator[list[SimAsterisk]]:
    """Three simulated servers, each with VICIdial's command sender running against the DB."""
    async with AsyncExitStack() as stack:
        sims = []
        for ip in IPS:
            sim = SimAsterisk(ip, max_lines=100, call_duration_s=120)
            await sim.start()
            stack.push_async_callback(sim.stop)
            sender = CommandSender(sim, database_url, poll_interval_s=0.05)
            await sender.start()
            stack.push_async_callback(sender.stop)
            sims.append(sim)
        yield sims


def balance_config(
    database_url: DatabaseUrl, redis_url: str, prefix: str = "vbbal:", **balance: object
) -> Config:
    config = make_config(database_url, redis_url=redis_url, prefix=prefix)
    settings = {"enabled": True, "cycle_interval_s": 0.3, "lock_ttl_s": 1.5, **balance}
    return replace(config, balance=BalanceConfig(**settings))  # type: ignore[arg-type]


def seed(db: Connection, sims: list[SimAsterisk], max_trunks: int = 10, **camp: object) -> None:
    seed_servers(db, [SeedServer(s.server_ip, s.host, s.port, max_trunks=max_trunks) for s in sims])
    campaign = {"campaign_id": "CAMPA", "leads": 30, "agents_on": IPS[0], "shortages": {IPS[0]: 8}}
    campaign.update(camp)
    seed_campaigns(db, [SeedCampaign(**campaign)], calls_per_second=100)  # type: ignore[arg-type]


def outbalance_by_server(db: Connection) -> dict[str, int]:
    rows = fetchall(
        db,
        "SELECT server_ip, COUNT(*) AS n FROM vicidial_auto_calls WHERE call_type = 'OUTBALANCE'"
        " GROUP BY server_ip",
    )
    return {str(r["server_ip"]): int(r["n"]) for r in rows}  # type: ignore[call-overload]


def assert_consistent(db: Connection, *, settled: bool = True) -> None:
    """No lead dialed twice, no Originate without its call row, no lead left claimed.

    While a daemon runs (``settled=False``) a placement may be in flight: its rows are claimed
    by our marker, and a call row may still be waiting for its Originate.
    """
    calls = fetchall(db, "SELECT lead_id, callerid FROM vicidial_auto_calls")
    leads = [r["lead_id"] for r in calls]
    assert len(leads) == len(set(leads)), "a lead was dialed twice"
    manager = [r["callerid"] for r in fetchall(db, "SELECT callerid FROM vicidial_manager")]
    assert len(manager) == len(set(manager)), "an Originate was queued twice"
    call_codes = {r["callerid"] for r in calls}
    assert set(manager) <= call_codes, "an Originate without its vicidial_auto_calls row"
    claimed = fetchall(
        db, "SELECT lead_id, status, user FROM vicidial_hopper WHERE status <> 'READY'"
    )
    if settled:
        assert call_codes == set(manager), "call rows and manager rows disagree"
        assert claimed == [], f"leads left claimed: {claimed}"
    else:
        assert all(str(r["user"]).startswith("VB") for r in claimed), claimed
    dialed = {r["lead_id"] for r in calls}
    ready = {
        r["lead_id"]
        for r in fetchall(db, "SELECT lead_id FROM vicidial_hopper WHERE status = 'READY'")
    }
    assert not dialed & ready, "a dialed lead is READY in the hopper again"


async def test_shortage_filled_on_the_other_servers_and_converges(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    seed(db, cluster)
    daemon = Daemon(balance_config(database_url, redis_db))
    async with running(daemon):

        async def filled() -> bool:
            return sum(outbalance_by_server(db).values()) >= 8

        await eventually(filled, timeout=15)
        await asyncio.sleep(1.0)  # several more cycles: nothing more is placed
        by_server = outbalance_by_server(db)
        assert sum(by_server.values()) == 8  # exactly the shortage, never more
        assert IPS[0] not in by_server  # the server reporting the shortage gets none
        # Every Originate was executed by its server's command sender and is a live call there.

        async def executed() -> bool:
            rows = fetchall(db, "SELECT status FROM vicidial_manager")
            return len(rows) == 8 and all(r["status"] == "SENT" for r in rows)

        await eventually(executed, timeout=5)
        for sim in cluster[1:]:
            assert sim.trunk_lines_in_use() == by_server.get(sim.server_ip, 0)
        assert cluster[0].trunk_lines_in_use() == 0
        fill = fetchall(db, "SELECT balance_trunk_fill FROM vicidial_campaign_stats")
        assert fill == [{"balance_trunk_fill": 8}]
        # What status shows per server: the OUTBALANCE calls the database holds.
        assert daemon.cycle is not None and daemon.last_cycle is not None
        summary = daemon.cycle.summary(daemon.last_cycle)
        shown = {s["server_ip"]: s["outbalance_calls"] for s in summary["servers"]}  # type: ignore[index, union-attr]
        assert shown == {ip: by_server.get(ip, 0) for ip in IPS}
    assert_consistent(db)


async def test_server_killed_mid_run_receives_nothing_after_down(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    seed(db, cluster, max_trunks=30, leads=60, shortages={IPS[0]: 4})
    daemon = Daemon(balance_config(database_url, redis_db))
    async with running(daemon):
        await eventually(lambda: _placed_at_least(db, 4), timeout=15)
        await cluster[2].stop()
        await eventually(lambda: health_is(daemon.store, IPS[2], Health.DOWN), timeout=3)
        down_at = fetchall(db, "SELECT NOW(6) AS t")[0]["t"]
        execute(
            db,
            "UPDATE vicidial_campaign_server_stats SET local_trunk_shortage = 20,"
            " update_time = NOW()",
        )
        await eventually(lambda: _placed_at_least(db, 20), timeout=15)
        late = fetchall(
            db,
            "SELECT COUNT(*) AS n FROM vicidial_manager WHERE server_ip = %s AND entry_date > %s",
            IPS[2],
            down_at,
        )
        assert late[0]["n"] == 0
    assert_consistent(db)


async def _placed_at_least(db: Connection, n: int) -> bool:
    return sum(outbalance_by_server(db).values()) >= n


async def test_two_daemons_place_no_call_twice_and_standby_takes_over(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    seed(db, cluster, max_trunks=40, leads=40, shortages={IPS[0]: 10})
    config = balance_config(database_url, redis_db)
    first, second = Daemon(config), Daemon(config)
    async with running(first), running(second):
        await eventually(lambda: _placed_at_least(db, 10), timeout=15)
        leaders = [d for d in (first, second) if d.leadership.leading]
        assert len(leaders) == 1
        leader = leaders[0]
        leader_epoch = leader.leadership.epoch
        standby = second if leader is first else first
        assert_consistent(db, settled=False)
        # The leader loses its database (renewals fail) without releasing its lease: the standby
        # takes over once it expires by the database's clock.
        leader.leadership.db = _DeadDb()  # type: ignore[assignment]

        async def standby_leads() -> bool:
            return standby.leadership.leading

        await eventually(standby_leads, timeout=10 * config.balance.lock_ttl_s)
        assert not leader.leadership.leading
        assert standby.leadership.epoch == (leader_epoch or 0) + 1
        execute(
            db,
            "UPDATE vicidial_campaign_server_stats SET local_trunk_shortage = 25,"
            " update_time = NOW()",
        )
        await eventually(lambda: _placed_at_least(db, 25), timeout=15)
        await asyncio.sleep(0.8)
        assert sum(outbalance_by_server(db).values()) == 25
    assert_consistent(db)


class _DeadDb:
    """A database connection that no longer answers (for the leader's lease renewals)."""

    async def run(self, fn: Callable[..., object], idempotent: bool = True) -> object:
        raise DatabaseError("database unreachable (test)")


async def test_db_connection_killed_mid_cycle_leaves_nothing_half_written(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    seed(db, cluster, max_trunks=40, leads=40, shortages={IPS[0]: 30})
    execute(db, "UPDATE system_settings SET outbound_calls_per_second = 10")  # 100 ms per call
    daemon = Daemon(balance_config(database_url, redis_db))
    async with running(daemon):
        await eventually(lambda: _placed_at_least(db, 3), timeout=15)
        own = fetchall(db, "SELECT CONNECTION_ID() AS id")[0]["id"]
        victims = fetchall(
            db,
            "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> %s",
            database_url.database,
            own,
        )
        for row in victims:
            execute(db, f"KILL {int(row['id'])}")  # type: ignore[call-overload]
        # The daemon carries on with a new connection and finishes the job.
        await eventually(lambda: _placed_at_least(db, 30), timeout=20)
    assert_consistent(db)
    assert sum(outbalance_by_server(db).values()) == 30


async def test_rebalance_once_dry_run_writes_nothing_then_places(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    seed(db, cluster)
    config = balance_config(database_url, redis_db, prefix="vboneshot:")
    dry = await rebalance_once(config, dry_run=True)
    assert dry.report is None and dry.skipped and dry.plan.total_calls == 8
    assert fetchall(db, "SELECT COUNT(*) AS n FROM vicidial_manager") == [{"n": 0}]
    real = await rebalance_once(config)
    assert real.report is not None and real.report.total_placed == 8
    assert sum(outbalance_by_server(db).values()) == 8
    again = await rebalance_once(config)  # already filling: nothing more
    assert again.report is not None and again.report.total_placed == 0
    assert_consistent(db)


async def test_an_outdated_schema_is_named_with_its_fix_at_start_up(
    db: Connection, database_url: DatabaseUrl, redis_db: str
) -> None:
    execute(db, "DELETE FROM vb_schema_version WHERE version > 1")
    try:
        daemon = Daemon(balance_config(database_url, redis_db))
        with pytest.raises(DatabaseError, match=r"schema version 1, this balancer needs \d+: run"):
            await daemon.serve(asyncio.Event())
    finally:
        from balancer.db import schema

        conn_versions = range(2, schema.SCHEMA_VERSION + 1)
        for version in conn_versions:
            execute(db, "INSERT IGNORE INTO vb_schema_version (version) VALUES (%s)", version)


async def test_a_faithful_one_shot_opens_no_ami_session(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    seed(db, cluster)
    faithful = balance_config(database_url, redis_db, prefix="vbfaith:", mode="faithful")
    dry = await rebalance_once(faithful, dry_run=True)
    assert dry.plan.total_calls == 8 and dry.report is None
    real = await rebalance_once(faithful)  # no routes: VICIdial's arithmetic needs no AMI
    assert real.report is not None and real.report.total_placed == 8
    assert [sim.logins for sim in cluster] == [0, 0, 0]
    live = balance_config(database_url, redis_db, prefix="vbfaith:")
    await rebalance_once(live, dry_run=True)  # live mode needs the lines: it tracks briefly
    assert all(sim.logins >= 1 for sim in cluster)
    assert_consistent(db)


async def test_status_shows_every_server_the_breakers_and_the_leader(
    db: Connection, database_url: DatabaseUrl, redis_db: str, cluster: list[SimAsterisk]
) -> None:
    from balancer.config import CarrierConfig, RouteConfig
    from balancer.live.status import build_status, render_table
    from balancer.store.factory import open_store

    seed(db, cluster)
    execute(
        db,
        "INSERT INTO servers (server_id, server_ip, active, active_asterisk_server)"
        " VALUES ('old9', '10.10.0.9', 'N', 'Y')",
    )
    config = replace(
        balance_config(database_url, redis_db, prefix="vbstat:"),
        carriers=(CarrierConfig("alpha", "9"),),
        routes=(RouteConfig("default", (("alpha",),)),),
    )
    daemon = Daemon(config)
    async with running(daemon):
        await daemon.store.set_drained("10.10.0.8", True)  # drained ahead of time, never tracked

        async def complete() -> bool:
            doc = await build_status(daemon.store, "test")
            ips = [s["server_ip"] for s in doc["servers"]]
            return (
                ips == [*IPS, "10.10.0.8", "10.10.0.9"]
                and doc["balance"] is not None
                and bool(doc["carriers"])
            )

        await eventually(complete, timeout=20)
        doc = await build_status(daemon.store, "test")
    by_ip = {s["server_ip"]: s for s in doc["servers"]}
    assert by_ip["10.10.0.9"]["health"] == "untracked"
    assert by_ip["10.10.0.9"]["health_reason"] == "servers.active is not 'Y'"
    assert by_ip["10.10.0.8"]["health"] == "drained" and by_ip["10.10.0.8"]["trunk_lines"] is None
    assert doc["totals"]["servers"] == 5 and doc["totals"]["up"] == 3
    assert doc["balance"]["leader"] == {"name": daemon.name, "epoch": 1}
    carriers = {(c["carrier"], c["server_ip"]) for c in doc["carriers"]}
    assert ("alpha", None) in carriers  # carrier-wide, then each server it has been used on
    assert {ip for _, ip in carriers} <= {None, *IPS}
    text = render_table(doc)
    assert f"leader {daemon.name} epoch 1" in text and "UNTRACKED" in text
    assert "alpha" in next(line for line in text.splitlines() if line.startswith("alpha"))
    store = open_store(config.redis)  # and from another process's point of view: the same
    try:
        assert [s["server_ip"] for s in (await build_status(store, "x"))["servers"]] == [
            *IPS,
            "10.10.0.8",
            "10.10.0.9",
        ]
    finally:
        await store.close()
