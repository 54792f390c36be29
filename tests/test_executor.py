"""The executor on a real MariaDB, with VICIdial's stock engines and on InnoDB: pacing on an
injected clock, fencing, stops, bookkeeping, and one end-to-end run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Collection, Iterator
from typing import Any

import balance_seed as seed
import pytest
from conftest import both_engines, execute, fetchall
from fixtures_sim import SimFactory

from balancer.balance.executor import LOST_LEADERSHIP, NOT_LEADER, ExecutionReport, Executor
from balancer.balance.model import CampaignPlan, DbSnapshot, Placement, Plan, Skip
from balancer.carriers.routing import CarrierPick, NoCarrier, PlacedCall
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.db.worker import DbWorker
from balancer.sim import CommandSender


@pytest.fixture(params=["stock", "innodb"])
def database_url(request: pytest.FixtureRequest) -> DatabaseUrl:
    """Every test here runs on VICIdial's MyISAM/MEMORY tables and on InnoDB copies."""
    return both_engines(request)


@pytest.fixture
async def worker(database_url: DatabaseUrl) -> AsyncIterator[DbWorker]:
    """The executor's DB worker thread with its own connection."""
    db = DbWorker(database_url)
    yield db
    await db.close()


class FakeSleep:
    """Records every pause instead of waiting; ``clock`` moves on by the pauses (and overruns)
    only, so a schedule can be checked exactly, however slow the machine is."""

    def __init__(self, overrun_s: float = 0.0) -> None:
        self.pauses: list[float] = []
        self.overruns = [overrun_s]  # the last value repeats
        self.slept = 0.0
        self.on_pause: dict[int, Any] = {}  # after the n-th pause (1-based): call this

    async def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)
        overrun = self.overruns.pop(0) if len(self.overruns) > 1 else self.overruns[0]
        self.slept += seconds + overrun
        hook = self.on_pause.get(len(self.pauses))
        if hook is not None:
            hook()

    def clock(self) -> float:
        """The time spent in fake sleeps: SQL takes no time on this clock."""
        return self.slept


def make_plan(
    sequence: list[tuple[str, str, int]],
    *,
    pace_ms: float = 0.0,
    filling: dict[str, int] | None = None,
    skips: tuple[Skip, ...] = (),
    staggered: bool = False,
) -> Plan:
    """A plan built by hand (no planner): placements in order, one CampaignPlan per campaign."""
    placements = tuple(Placement(c, s, n, f"fill {n} on {s}") for c, s, n in sequence)
    filling = filling or {}
    campaign_ids = sorted({c for c, _, _ in sequence} | set(filling))
    campaigns = tuple(
        CampaignPlan(
            campaign_id=c,
            demand=99,
            already_filling=filling.get(c, 0),
            needed=99 - filling.get(c, 0),
            may_dial=True,
            placements=tuple(p for p in placements if p.campaign_id == c),
            skips=tuple(s for s in skips if s.campaign_id == c),
        )
        for c in campaign_ids
    )
    return Plan("live", staggered, campaigns=campaigns, pace_ms=pace_ms, sequence=placements)


def cluster(db: Connection, leads: int, *, campaigns: tuple[str, ...] = ("CAMP1",)) -> None:
    """Servers 10.10.0.1 and 10.10.0.2, the campaigns (with their stats rows, as VICIdial
    creates them), list 101 and ``leads`` leads each."""
    seed.server(db, "10.10.0.1", vicidial_balance_rank=1)
    seed.server(db, "10.10.0.2")
    for index, camp in enumerate(campaigns):
        seed.campaign(db, camp)
        seed.insert(db, "vicidial_campaign_stats", campaign_id=camp)
        seed.leads(db, leads, camp, first=1 + index * 1000)
    seed.lead_list(db, 101)


def decisions(db: Connection) -> list[dict[str, Any]]:
    return fetchall(db, "SELECT * FROM vb_decision_log ORDER BY id")


def hopper_statuses(db: Connection) -> dict[int, tuple[str, Any]]:
    rows = fetchall(db, "SELECT lead_id, status, user FROM vicidial_hopper")
    return {int(str(r["lead_id"])): (str(r["status"]), r["user"]) for r in rows}


async def run(
    worker: DbWorker, db: Connection, plan: Plan, **kwargs: Any
) -> tuple[ExecutionReport, DbSnapshot]:
    snap = seed.snapshot(db)
    kwargs.setdefault("dst", lambda _now: False)
    if "fence" not in kwargs:
        held = seed.take_lease(db)
        kwargs["fence"] = lambda: held
    executor = Executor(worker, **kwargs)
    return await executor.execute(plan, snap, "cycle-1"), snap


def take_over(db: Connection) -> None:
    """Another balancer takes the lease over (the current one expired)."""
    execute(db, "UPDATE vb_leader SET expires_at = NOW(6) - INTERVAL 1 SECOND")
    seed.take_lease(db, "the-other-balancer")


def fills(db: Connection) -> dict[str, int]:
    rows = fetchall(db, "SELECT campaign_id, balance_trunk_fill FROM vicidial_campaign_stats")
    return {str(r["campaign_id"]): int(str(r["balance_trunk_fill"])) for r in rows}


async def test_pacing_holds_the_rate_after_every_call(worker: DbWorker, db: Connection) -> None:
    cluster(db, 20)
    sleep = FakeSleep()
    plan = make_plan(
        [("CAMP1", "10.10.0.1", 12), ("CAMP1", "10.10.0.2", 8)], pace_ms=1000, filling={"CAMP1": 2}
    )
    report, snap = await run(worker, db, plan, sleep=sleep, clock=sleep.clock)
    assert report.stopped is None and report.errors == []
    assert report.placed == {("CAMP1", "10.10.0.1"): 12, ("CAMP1", "10.10.0.2"): 8}
    assert report.total_placed == 20
    # one pause after every call, the last one too: the pace minus the call's own time (which
    # is none on this clock), so the starts keep the schedule exactly
    assert sleep.pauses == [1.0] * 20
    assert report.duration_s == pytest.approx(20.0)
    by_server = fetchall(
        db, "SELECT server_ip, COUNT(*) AS n FROM vicidial_manager GROUP BY server_ip"
    )
    assert {str(r["server_ip"]): int(str(r["n"])) for r in by_server} == {
        "10.10.0.1": 12,
        "10.10.0.2": 8,
    }
    # bookkeeping: fill = already filling + placed, call dates = the cycle's timestamp
    assert fills(db) == {"CAMP1": 22}
    assert seed.one(db, "SELECT list_lastcalldate FROM vicidial_lists")["list_lastcalldate"] == (
        snap.taken_at
    )
    calldate = seed.one(db, "SELECT campaign_calldate FROM vicidial_campaigns")
    assert calldate["campaign_calldate"] == snap.taken_at
    logged = decisions(db)
    assert [d["outcome"] for d in logged] == ["placed"] * 20
    assert report.decisions_logged == 20
    first = logged[0]
    assert (first["kind"], first["cycle_id"], first["campaign_id"]) == (
        "balance",
        "cycle-1",
        "CAMP1",
    )
    assert (first["server_ip"], first["lead_id"], first["reason"]) == (
        "10.10.0.1",
        1,
        "fill 12 on 10.10.0.1",
    )
    assert json.loads(first["details"])["caller_code"] == report.results[0].caller_code


async def test_pacing_takes_overruns_off_the_next_wait(worker: DbWorker, db: Connection) -> None:
    cluster(db, 10)
    sleep = FakeSleep(overrun_s=0.2)  # every sleep wakes up 0.2 s late
    plan = make_plan([("CAMP1", "10.10.0.1", 10)], pace_ms=1000)
    report, _ = await run(worker, db, plan, sleep=sleep, clock=sleep.clock)
    assert report.total_placed == 10
    # 10 calls take 10 paces (+ the last overrun), not 10 x 1.2 s
    assert report.duration_s == pytest.approx(10.2)
    assert sleep.pauses[0] == 1.0 and sleep.pauses[1:] == pytest.approx([0.8] * 9)


async def test_pacing_never_bursts_after_a_stall(worker: DbWorker, db: Connection) -> None:
    cluster(db, 5)
    sleep = FakeSleep()
    sleep.overruns = [0.0, 5.0, 0.0]  # the second wait overruns by five paces
    plan = make_plan([("CAMP1", "10.10.0.1", 5)], pace_ms=1000)
    report, _ = await run(worker, db, plan, sleep=sleep, clock=sleep.clock)
    assert report.total_placed == 5
    # after the stall the schedule restarts: full waits, no back-to-back calls to catch up
    assert sleep.pauses == [1.0] * 5


async def test_zero_pace_still_yields(worker: DbWorker, db: Connection) -> None:
    cluster(db, 3)
    sleep = FakeSleep()
    report, _ = await run(worker, db, make_plan([("CAMP1", "10.10.0.1", 3)]), sleep=sleep)
    assert report.total_placed == 3 and sleep.pauses == [0.0, 0.0, 0.0]


async def test_a_takeover_mid_cycle_stops_it_and_leaves_the_rest_to_repair(
    worker: DbWorker, db: Connection
) -> None:
    cluster(db, 10)
    sleep = FakeSleep()
    sleep.on_pause[5] = lambda: take_over(db)  # after the fifth call
    plan = make_plan([("CAMP1", "10.10.0.1", 8), ("CAMP1", "10.10.0.2", 2)])
    report, snap = await run(worker, db, plan, sleep=sleep)
    assert report.stopped == LOST_LEADERSHIP
    assert report.errors == []  # not an error: another balancer leads now
    assert report.placed == {("CAMP1", "10.10.0.1"): 5}
    assert report.short == {("CAMP1", "10.10.0.1"): 3, ("CAMP1", "10.10.0.2"): 2}
    assert len(sleep.pauses) == 5
    assert seed.count(db, "vicidial_manager") == 5
    assert seed.count(db, "vicidial_auto_calls") == 5
    # the old leader wrote nothing more: no fill, no decision, its claimed rows as they were
    assert fills(db) == {"CAMP1": 0}
    assert decisions(db) == []
    statuses = hopper_statuses(db)
    assert sorted(s for s, _ in statuses.values()) == ["INCALL"] * 5 + ["QUEUE"] * 3 + ["READY"] * 2
    # the new leader's repair settles them: dialed rows go, the others are READY again
    new = seed.take_lease(db, "the-other-balancer")
    from balancer.db.repair import repair

    found = repair(db, new, snap.servers, lambda _now: False)
    assert sorted(found.cleared) == [1, 2, 3, 4, 5] and sorted(found.undone) == [6, 7, 8]
    assert hopper_statuses(db) == {lead: ("READY", "") for lead in (6, 7, 8)} | {
        9: ("READY", None),
        10: ("READY", None),
    }
    assert seed.count(db, "vicidial_list", "status = 'NEW' AND called_count = 0") == 5


async def test_without_the_lease_nothing_is_written(worker: DbWorker, db: Connection) -> None:
    cluster(db, 2)
    plan = make_plan([("CAMP1", "10.10.0.1", 2)])
    report, _ = await run(worker, db, plan, fence=lambda: None, sleep=FakeSleep())
    assert report.stopped == NOT_LEADER and report.total_placed == 0
    assert seed.count(db, "vicidial_manager") == 0 and decisions(db) == []
    assert hopper_statuses(db) == {1: ("READY", None), 2: ("READY", None)}


async def test_exhausted_hopper_stops_only_that_campaign(worker: DbWorker, db: Connection) -> None:
    cluster(db, 3, campaigns=("CAMP1", "CAMP2"))
    skip = Skip("CAMP2", "10.10.0.2", "no free lines")
    plan = make_plan(
        [("CAMP1", "10.10.0.1", 5), ("CAMP1", "10.10.0.2", 2), ("CAMP2", "10.10.0.1", 2)],
        skips=(skip,),
    )
    report, _ = await run(worker, db, plan, sleep=FakeSleep())
    assert report.stopped is None
    assert report.placed == {("CAMP1", "10.10.0.1"): 3, ("CAMP2", "10.10.0.1"): 2}
    assert report.short == {("CAMP1", "10.10.0.1"): 2, ("CAMP1", "10.10.0.2"): 2}
    assert fills(db) == {"CAMP1": 3, "CAMP2": 2}
    rows = [(d["outcome"], d["campaign_id"], d["server_ip"], d["reason"]) for d in decisions(db)]
    assert rows[0] == ("skipped", "CAMP2", "10.10.0.2", "no free lines")
    assert ("short", "CAMP1", "10.10.0.1", "hopper exhausted after 3 of 5 calls") in rows
    assert [r[0] for r in rows].count("placed") == 5


async def test_orphans_are_logged(worker: DbWorker, db: Connection) -> None:
    cluster(db, 1)
    seed.hopper(db, 999, priority=9)
    report, _ = await run(worker, db, make_plan([("CAMP1", "10.10.0.1", 1)]), sleep=FakeSleep())
    assert report.total_placed == 1 and report.orphans_deleted == 1
    orphan = [d for d in decisions(db) if d["outcome"] == "orphan_deleted"]
    assert [(d["campaign_id"], d["lead_id"]) for d in orphan] == [("CAMP1", 999)]


@pytest.fixture
def failing_third_lead(db: Connection) -> Iterator[None]:
    """vicidial_dial_log refuses lead 3: the third call fails mid-transaction."""
    execute(
        db,
        "CREATE TRIGGER vb_test_fail_lead3 BEFORE INSERT ON vicidial_dial_log FOR EACH ROW"
        " BEGIN IF NEW.lead_id = 3 THEN"
        " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; END IF; END",
    )
    try:
        yield
    finally:
        execute(db, "DROP TRIGGER IF EXISTS vb_test_fail_lead3")


async def test_database_error_stops_the_cycle(
    worker: DbWorker, db: Connection, failing_third_lead: None
) -> None:
    cluster(db, 6)
    plan = make_plan([("CAMP1", "10.10.0.1", 5)], filling={"CAMP1": 1})
    report, _ = await run(worker, db, plan, sleep=FakeSleep())
    assert report.stopped is not None and report.stopped.startswith("database error")
    assert len(report.errors) == 1 and "injected failure" in report.errors[0]
    assert report.placed == {("CAMP1", "10.10.0.1"): 2}
    # lead 3's call was cut after its first write: the repair step undid it at once
    assert report.repaired.undone == [3]
    assert hopper_statuses(db) == {lead: ("READY", "") for lead in (3, 4, 5)} | {6: ("READY", None)}
    assert seed.count(db, "vicidial_manager") == 2
    assert seed.count(db, "vicidial_auto_calls") == 2
    assert fills(db) == {"CAMP1": 3}  # what was placed is still recorded
    assert decisions(db)[-1]["outcome"] == "repaired"
    assert "stopped" in [d["outcome"] for d in decisions(db)]


async def test_reset_fill(worker: DbWorker, db: Connection) -> None:
    seed.campaign(db, "CAMP1")
    seed.insert(db, "vicidial_campaign_stats", campaign_id="CAMP1", balance_trunk_fill=7)
    plan = Plan(
        "live", False, stopped="no active campaign reports a trunk shortage", reset_fill=True
    )
    report, _ = await run(worker, db, plan)
    assert report.total_placed == 0 and report.stopped is None and report.errors == []
    assert fills(db) == {"CAMP1": 0}
    assert [(d["outcome"], d["reason"]) for d in decisions(db)] == [
        ("stopped", "no active campaign reports a trunk shortage")
    ]


async def test_stopped_plan_without_reset_writes_no_fill(worker: DbWorker, db: Connection) -> None:
    seed.insert(db, "vicidial_campaign_stats", campaign_id="CAMP1", balance_trunk_fill=7)
    report, _ = await run(worker, db, Plan("live", False, stopped="autodial is off"))
    assert report.total_placed == 0
    assert fills(db) == {"CAMP1": 7}
    assert [d["outcome"] for d in decisions(db)] == ["stopped"]


async def test_staggered_sequence(worker: DbWorker, db: Connection) -> None:
    cluster(db, 5)
    order = ["10.10.0.1", "10.10.0.2", "10.10.0.1", "10.10.0.2", "10.10.0.1"]
    plan = make_plan([("CAMP1", ip, 1) for ip in order], staggered=True)
    report, _ = await run(worker, db, plan, sleep=FakeSleep())
    assert [r.server_ip for r in report.results] == order
    assert [r.lead_id for r in report.results] == [1, 2, 3, 4, 5]
    assert report.placed == {("CAMP1", "10.10.0.1"): 3, ("CAMP1", "10.10.0.2"): 2}


async def test_unknown_server_in_plan_is_skipped(worker: DbWorker, db: Connection) -> None:
    cluster(db, 2)
    plan = make_plan([("CAMP1", "10.10.0.9", 1), ("CAMP1", "10.10.0.1", 1)])
    report, _ = await run(worker, db, plan, sleep=FakeSleep())
    assert report.placed == {("CAMP1", "10.10.0.1"): 1}
    assert report.short == {("CAMP1", "10.10.0.9"): 1}
    assert decisions(db)[0]["reason"] == "server not in the snapshot; placement dropped"


async def test_end_to_end_with_simulated_servers(
    worker: DbWorker, db: Connection, database_url: DatabaseUrl, sim_factory: SimFactory
) -> None:
    """Plan -> executor -> vicidial_manager -> each server's command sender -> its Asterisk."""
    ips = ("10.10.0.1", "10.10.0.2")
    sims = {ip: await sim_factory(ip, answer_delay_s=0.01, call_duration_s=30) for ip in ips}
    cluster(db, 10)
    plan = make_plan([("CAMP1", "10.10.0.1", 6), ("CAMP1", "10.10.0.2", 4)], pace_ms=1)
    report, _ = await run(worker, db, plan)
    assert report.total_placed == 10 and report.errors == []

    senders = [CommandSender(sim, database_url, poll_interval_s=0.02) for sim in sims.values()]
    for sender in senders:
        await sender.start()
    try:
        # until every Originate was sent AND its call answered or failed (a row is SENT a moment
        # before its call starts); the deadline (30 s) only ends a hung test
        for _ in range(1500):
            if sum(s.answered + s.failed for s in senders) >= 10:
                break
            await asyncio.sleep(0.02)
        for sender in senders:
            await sender.wait_idle()
    finally:
        for sender in senders:
            await sender.stop()

    rows = fetchall(db, "SELECT man_id, server_ip, status FROM vicidial_manager")
    assert {str(r["status"]) for r in rows} == {"SENT"} and len(rows) == 10
    for sender, ip in zip(senders, ips, strict=True):
        mine = sorted(int(str(r["man_id"])) for r in rows if r["server_ip"] == ip)
        assert sorted(sender.executed_ids) == mine
        assert (sender.answered, sender.failed) == (len(mine), 0)
    for ip, sim in sims.items():
        expected = sorted(r.dial_string for r in report.results if r.server_ip == ip)
        assert sim.originates == len(expected)
        locals_ = [ch for ch in sim.channels.values() if ch.name.endswith(";1")]
        dialed = sorted(ch.name.split("/", 1)[1].split("@", 1)[0] for ch in locals_)
        assert dialed == expected
        trunks = [ch for ch in sim.channels.values() if ch.kind == "trunk"]
        assert len(trunks) == len(expected) == sim.trunk_lines_in_use("alpha")
        # the Originate's caller ID reached the trunk leg: campaign_cid as number, code as name
        assert {ch.cid_num for ch in trunks} == {"0000000000"}
        codes = {r.caller_code for r in report.results if r.server_ip == ip}
        assert {ch.cid_name for ch in trunks} == codes


async def test_a_takeover_after_the_last_call_stores_no_fill(
    worker: DbWorker, db: Connection
) -> None:
    cluster(db, 2)
    sleep = FakeSleep()
    sleep.on_pause[2] = lambda: take_over(db)
    report, _ = await run(worker, db, make_plan([("CAMP1", "10.10.0.1", 2)]), sleep=sleep)
    assert report.total_placed == 2 and report.stopped == LOST_LEADERSHIP
    assert fills(db) == {"CAMP1": 0} and decisions(db) == []


# --------------------------------------------------------------------------- carrier routing

BETA = CarrierPick("beta", "8", "default", 1)


class FakeRouter:
    """Answers by (server, number); remembers what was committed."""

    def __init__(
        self,
        default: CarrierPick | NoCarrier | None = BETA,
        by_number: dict[str, CarrierPick | NoCarrier] | None = None,
        by_server: dict[str, CarrierPick | NoCarrier] | None = None,
        fail: bool = False,
    ) -> None:
        self.default = default
        self.by_number = by_number or {}
        self.by_server = by_server or {}
        self.fail = fail
        self.asked: list[tuple[str, str, str]] = []
        self.committed: list[PlacedCall] = []

    def choose(
        self, server_ip: str, phone_code: str, number: str, exclude: Collection[str] = ()
    ) -> CarrierPick | NoCarrier | None:
        self.asked.append((server_ip, phone_code, number))
        if self.fail:
            raise RuntimeError("router bug")
        if number in self.by_number:
            return self.by_number[number]
        return self.by_server.get(server_ip, self.default)

    def placed(self, call: PlacedCall) -> None:
        self.committed.append(call)


def no_carrier(why: str) -> NoCarrier:
    return NoCarrier("default", f"route 'default': {why}")


async def test_every_call_gets_its_carrier_and_the_log_names_it(
    worker: DbWorker, db: Connection
) -> None:
    cluster(db, 3)
    router = FakeRouter()
    report, _ = await run(
        worker, db, make_plan([("CAMP1", "10.10.0.1", 3)]), sleep=FakeSleep(), router=router
    )
    assert report.total_placed == 3
    assert all(r.dial_string.startswith("81312555") for r in report.results)
    assert [c.carrier_id for c in router.committed] == ["beta"] * 3
    call = router.committed[0]
    assert (call.lead_id, call.server_ip, call.phone_code, call.number) == (
        1,
        "10.10.0.1",
        "1",
        "3125550001",
    )
    assert call.caller_code == report.results[0].caller_code and call.retry_of is None
    placed = [d for d in decisions(db) if d["outcome"] == "placed"]
    assert {d["carrier_id"] for d in placed} == {"beta"}
    assert json.loads(str(placed[0]["details"]))["route"] == "default"


async def test_leads_no_carrier_can_take_stay_in_the_hopper_and_are_logged(
    worker: DbWorker, db: Connection
) -> None:
    cluster(db, 5)
    router = FakeRouter(by_number={"3125550001": no_carrier("alpha: open; beta: at its cap")})
    plan = make_plan([("CAMP1", "10.10.0.1", 2), ("CAMP1", "10.10.0.2", 2)])
    report, _ = await run(worker, db, plan, sleep=FakeSleep(), router=router)
    assert sorted(r.lead_id for r in report.results) == [2, 3, 4, 5]
    # asked once per planned server, then passed over there for the rest of the cycle
    assert report.unrouted == 2
    assert hopper_statuses(db) == {1: ("READY", "")}  # back as VICIdial's hopper writes it
    rows = [d for d in decisions(db) if d["outcome"] == "no_carrier"]
    assert [(d["lead_id"], d["server_ip"]) for d in rows] == [(1, "10.10.0.1"), (1, "10.10.0.2")]
    assert "lead stays in the hopper" in str(rows[0]["reason"])
    assert "alpha: open; beta: at its cap" in str(rows[0]["reason"])


async def test_a_call_moves_to_another_planned_server_with_lines_to_spare(
    worker: DbWorker, db: Connection
) -> None:
    cluster(db, 5)
    router = FakeRouter(by_server={"10.10.0.1": no_carrier("alpha: open on 10.10.0.1")})
    plan = make_plan([("CAMP1", "10.10.0.1", 2), ("CAMP1", "10.10.0.2", 1)])
    report, _ = await run(worker, db, plan, sleep=FakeSleep(), router=router)
    assert report.placed == {("CAMP1", "10.10.0.2"): 3}
    assert report.short == {}
    moved = [d for d in decisions(db) if str(d["reason"]).startswith("no carrier on 10.10.0.1")]
    assert len(moved) == 2 and {d["server_ip"] for d in moved} == {"10.10.0.2"}
    assert fills(db) == {"CAMP1": 3}


async def test_no_move_to_a_server_without_spare_lines(worker: DbWorker, db: Connection) -> None:
    cluster(db, 5)
    execute(db, "UPDATE servers SET max_vicidial_trunks = 1 WHERE server_ip = '10.10.0.2'")
    router = FakeRouter(by_server={"10.10.0.1": no_carrier("alpha: open on 10.10.0.1")})
    plan = make_plan([("CAMP1", "10.10.0.1", 2), ("CAMP1", "10.10.0.2", 1)])
    report, _ = await run(worker, db, plan, sleep=FakeSleep(), router=router)
    assert report.placed == {("CAMP1", "10.10.0.2"): 1}  # its one planned line, no more
    assert report.short == {("CAMP1", "10.10.0.1"): 2}
    assert seed.count(db, "vicidial_hopper", "status = 'READY'") == 4


async def test_a_broken_router_fails_closed(worker: DbWorker, db: Connection) -> None:
    cluster(db, 2)
    router = FakeRouter(fail=True)
    report, _ = await run(
        worker, db, make_plan([("CAMP1", "10.10.0.1", 2)]), sleep=FakeSleep(), router=router
    )
    assert report.total_placed == 0 and report.errors == []
    assert seed.count(db, "vicidial_manager") == 0
    assert {s for s, _ in hopper_statuses(db).values()} == {"READY"}
    reasons = [str(d["reason"]) for d in decisions(db) if d["outcome"] == "no_carrier"]
    assert reasons and all("carrier choice failed: router bug" in r for r in reasons)
