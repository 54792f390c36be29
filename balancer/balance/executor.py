"""Turning a Plan into balance calls: one fenced transaction per call, paced to the CPS limit.

Each call runs `place_call` on the DbWorker's thread. Right before its COMMIT the worker thread
asks the leader fence, which is async and lives on the event loop, so the check is handed back to
the loop and awaited from the thread: a leader that lost its lease cannot commit a call. After
every call (the last one too) the executor waits until ``plan.pace_ms`` after the call's start,
so SQL time is part of the pace. Starts are kept on a schedule (start of call n = start of call
n-1 + pace): a sleep that overran (asyncio wakes up to a millisecond late, a lot at 200 calls/s)
is taken off the next wait, so the rate holds the configured calls per second. A call that
starts more than one pace behind its slot (a slow transaction) restarts the schedule instead of
bursting to catch up: the rate never exceeds the limit.

With a call router (carrier routing, balancer/carriers/health.py) every call's carrier is chosen
inside its transaction, on the event loop like the fence (carrier health lives there). A call no
carrier can take on its planned server may go to another server the plan gives the same
campaign calls, if that server has lines to spare by the planner's own rules; a lead no carrier
can take anywhere stays in the hopper, and the decision log says why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

import pymysql

from balancer.balance.model import DbSnapshot, Placement, Plan
from balancer.balance.rules import Counts, allowed_lines, free_lines
from balancer.carriers.routing import CallRouter, CarrierPick, NoCarrier, PlacedCall
from balancer.db.calls import (
    CallResult,
    Chooser,
    CycleContext,
    Unrouted,
    UnroutedLead,
    place_call,
)
from balancer.db.cycle_log import Decision, details, finish_cycle, log_decisions
from balancer.db.worker import DbWorker
from balancer.errors import DatabaseError

log = logging.getLogger(__name__)

KIND = "balance"
LOST_LEADERSHIP = "lost leadership: fencing check failed before commit"
T = TypeVar("T")


def local_dst(moment: datetime) -> bool:
    """Whether daylight saving time is in effect at ``moment`` in this host's local time zone."""
    return time.localtime(moment.timestamp()).tm_isdst > 0


@dataclass
class ExecutionReport:
    """What the executor did with one plan."""

    cycle_id: str
    placed: dict[tuple[str, str], int] = field(default_factory=dict)  # (campaign, server) -> n
    results: list[CallResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stopped: str | None = None  # why the cycle ended before the plan did
    short: dict[tuple[str, str], int] = field(default_factory=dict)  # planned but not placed
    orphans_deleted: int = 0
    unrouted: int = 0  # leads left in the hopper because no carrier could take them
    decisions_logged: int = 0
    duration_s: float = 0.0

    @property
    def total_placed(self) -> int:
        """Calls placed in this cycle."""
        return len(self.results)


class Fence:
    """The async fence called from the DB worker thread; remembers a refusal."""

    def __init__(
        self,
        fence: Callable[[], Awaitable[bool]] | None,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
    ) -> None:
        self._fence = fence
        self._loop = loop
        self._timeout_s = timeout_s
        self.refused = False

    def check(self) -> bool:
        """True when we may commit (runs on the worker thread; blocks on the loop's answer)."""
        if self._fence is None:
            return True
        fence = self._fence

        async def ask() -> bool:
            return await fence()

        future = asyncio.run_coroutine_threadsafe(ask(), self._loop)
        try:
            allowed = bool(future.result(self._timeout_s))
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.error("fencing check gave no answer within %.1fs: not committing", self._timeout_s)
            allowed = False
        except Exception as exc:  # a broken fence must fail closed, whatever it raised
            log.error("fencing check failed (%s): not committing", exc)
            allowed = False
        if not allowed:
            self.refused = True
        return allowed


def on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., T], timeout_s: float
) -> Callable[..., T]:
    """``fn`` callable from a worker thread: it runs on ``loop`` and the thread waits for it."""

    def call(*args: object) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    return call


def loop_chooser(loop: asyncio.AbstractEventLoop, router: CallRouter, timeout_s: float) -> Chooser:
    """The router's choice as place_call asks it from the worker thread; fails closed."""
    choose = on_loop(loop, router.choose, timeout_s)

    def chooser(server_ip: str, phone_code: str, number: str) -> CarrierPick | NoCarrier | None:
        try:
            result: CarrierPick | NoCarrier | None = choose(server_ip, phone_code, number)
        except concurrent.futures.TimeoutError:
            log.error("carrier choice gave no answer within %.1fs: lead kept", timeout_s)
            return NoCarrier("", f"carrier choice gave no answer within {timeout_s:g}s")
        except Exception as exc:  # a broken chooser must not dial on a guess
            log.error("carrier choice failed (%s): lead kept", exc)
            return NoCarrier("", f"carrier choice failed: {exc}")
        return result

    return chooser


class _Headroom:
    """Lines a server has left for one more call of a campaign this cycle, by the planner's own
    rules (allowed and free lines from the snapshot, with every call planned this cycle counted):
    where a call no carrier can take on its planned server may go instead."""

    def __init__(self, plan: Plan, snapshot: DbSnapshot) -> None:
        self.snapshot = snapshot
        self.counts = Counts.of(snapshot)
        self.planned: dict[tuple[str, str], int] = {}
        self.on_server: dict[str, int] = {}
        self.servers: dict[str, list[str]] = {}  # campaign -> its servers in plan order
        for campaign in plan.campaigns:
            for placement in campaign.placements:
                key = (placement.campaign_id, placement.server_ip)
                self.planned[key] = self.planned.get(key, 0) + placement.calls
                ip = placement.server_ip
                self.on_server[ip] = self.on_server.get(ip, 0) + placement.calls
                order = self.servers.setdefault(placement.campaign_id, [])
                if ip not in order:
                    order.append(ip)

    def spare(self, campaign_id: str, server_ip: str) -> int:
        server = self.snapshot.servers.get(server_ip)
        if server is None:
            return 0
        allowed, _ = allowed_lines(self.counts, server, campaign_id)
        free, _ = free_lines(self.counts, server, None, False, self.on_server.get(server_ip, 0))
        return min(allowed - self.planned.get((campaign_id, server_ip), 0), free)

    def alternates(self, campaign_id: str, server_ip: str) -> list[str]:
        """The campaign's other planned servers with a line to spare, in plan order."""
        return [
            ip
            for ip in self.servers.get(campaign_id, ())
            if ip != server_ip and self.spare(campaign_id, ip) > 0
        ]

    def moved(self, campaign_id: str, from_ip: str, to_ip: str) -> None:
        """One planned call went to ``to_ip`` instead of ``from_ip``."""
        for ip, step in ((from_ip, -1), (to_ip, 1)):
            key = (campaign_id, ip)
            self.planned[key] = self.planned.get(key, 0) + step
            self.on_server[ip] = self.on_server.get(ip, 0) + step


class _Run:
    """One execution of a plan: what its calls share and what they produced."""

    def __init__(self, cycle: CycleContext, fence: Fence, clock: Callable[[], float]) -> None:
        self.cycle = cycle
        self.fence = fence
        self.clock = clock
        self.started = clock()
        self.slot: float | None = None  # when the next call is due to start
        self.report = ExecutionReport(cycle.cycle_id)
        self.decisions: list[Decision] = []
        self.exhausted: set[str] = set()  # campaigns whose hopper ran dry this cycle
        # (campaign, planned server) -> hopper_ids no carrier could take from there this cycle
        self.unrouted: dict[tuple[str, str], set[int]] = {}
        self.chooser: Chooser | None = None
        self.headroom: _Headroom | None = None

    def decide(
        self,
        outcome: str,
        reason: str,
        campaign_id: str = "",
        server_ip: str = "",
        lead_id: int | None = None,
        info: str | None = None,
        carrier_id: str = "",
    ) -> None:
        """Queue one decision-log row."""
        self.decisions.append(
            Decision(
                # the database's clock: the snapshot's NOW() plus the time spent since
                decided_at=self.cycle.now + timedelta(seconds=self.clock() - self.started),
                cycle_id=self.cycle.cycle_id,
                kind=KIND,
                campaign_id=campaign_id,
                lead_id=lead_id,
                server_ip=server_ip,
                carrier_id=carrier_id,
                outcome=outcome,
                reason=reason,
                details=info,
            )
        )

    def orphans(self, campaign_id: str, lead_ids: Collection[int]) -> None:
        for lead_id in lead_ids:
            self.report.orphans_deleted += 1
            reason = "hopper row's lead not in vicidial_list: row deleted"
            self.decide("orphan_deleted", reason, campaign_id, "", lead_id)

    def no_carrier(self, campaign_id: str, server_ip: str, leads: Collection[UnroutedLead]) -> None:
        """Log leads no carrier could take (they stay in the hopper; passed over this cycle)."""
        skipped = self.unrouted.setdefault((campaign_id, server_ip), set())
        for lead in leads:
            skipped.add(lead.hopper_id)
            self.report.unrouted += 1
            info = details(route=lead.route, hopper_id=lead.hopper_id, why=lead.reason)
            reason = f"no carrier can take it; lead stays in the hopper: {lead.reason}"
            self.decide("no_carrier", reason, campaign_id, server_ip, lead.lead_id, info)

    def record(self, placement: Placement, result: CallResult, index: int) -> None:
        """Count a placed call and log it (and any orphan hopper row it cleared)."""
        key = (placement.campaign_id, result.server_ip)
        self.report.results.append(result)
        self.report.placed[key] = self.report.placed.get(key, 0) + 1
        self.orphans(placement.campaign_id, result.orphans_deleted)
        self.no_carrier(placement.campaign_id, placement.server_ip, result.unrouted)
        reason = placement.reason
        if result.server_ip != placement.server_ip:
            reason = f"no carrier on {placement.server_ip}: moved here ({reason})"
        info = details(
            caller_code=result.caller_code,
            man_id=result.man_id,
            auto_call_id=result.auto_call_id,
            dial_string=result.dial_string,
            cid_type=result.cid_type,
            sequence=index,
            **({"route": result.route} if result.route else {}),
        )
        self.decide(
            "placed",
            reason,
            *key,
            lead_id=result.lead_id,
            info=info,
            carrier_id=result.carrier_id,
        )

    def short(self, key: tuple[str, str], calls: int) -> None:
        """Note planned calls that were not placed."""
        if calls > 0:
            self.report.short[key] = self.report.short.get(key, 0) + calls


class Executor:
    """Places a plan's calls, then stores the cycle's fills and its decision log."""

    def __init__(
        self,
        db: DbWorker,
        *,
        fence: Callable[[], Awaitable[bool]] | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        dst: Callable[[datetime], bool] | None = None,
        fence_timeout_s: float = 2.0,
        clock: Callable[[], float] | None = None,
        router: CallRouter | None = None,
    ) -> None:
        """Write through ``db``; ``fence`` is asked before every commit (None: always allowed);
        ``router`` chooses each call's carrier (None: the campaign's dial prefix, as VICIdial)."""
        self.db = db
        self.clock = clock  # seconds, monotonic; None: the event loop's clock
        self.fence = fence
        self.sleep = sleep
        self.dst = dst or local_dst
        self.fence_timeout_s = fence_timeout_s
        self.router = router

    async def execute(self, plan: Plan, snapshot: DbSnapshot, cycle_id: str) -> ExecutionReport:
        """Place every call of ``plan.sequence`` in order, then finish the cycle and log it."""
        loop = asyncio.get_running_loop()
        now = snapshot.taken_at
        run = _Run(
            CycleContext(now=now, dst=self.dst(now), cycle_id=cycle_id),
            Fence(self.fence, loop, self.fence_timeout_s),
            self.clock or loop.time,
        )
        if self.router is not None:
            run.chooser = loop_chooser(loop, self.router, self.fence_timeout_s)
            run.headroom = _Headroom(plan, snapshot)
        if plan.stopped:
            run.decide("stopped", plan.stopped)
        for campaign_plan in plan.campaigns:
            for skip in campaign_plan.skips:
                run.decide("skipped", skip.reason, skip.campaign_id, skip.server_ip)
        pace_s = max(plan.pace_ms, 0.0) / 1000
        for index, placement in enumerate(plan.sequence):
            await self._place(run, placement, index, snapshot, pace_s)
        report = run.report
        if report.stopped is not None:
            # what the stop left undone, as one row rather than one per call
            left = sum(report.short.values())
            run.decide("stopped", report.stopped, info=details(calls_not_placed=left))
        await self._finish(plan, run)
        report.duration_s = run.clock() - run.started
        return report

    async def _place(
        self, run: _Run, placement: Placement, index: int, snapshot: DbSnapshot, pace_s: float
    ) -> None:
        """One placement's calls, each paced; stops early on an empty hopper, error or fence."""
        report = run.report
        key = (placement.campaign_id, placement.server_ip)
        if report.stopped is not None or placement.campaign_id in run.exhausted:
            run.short(key, placement.calls)
            return
        server = snapshot.servers.get(placement.server_ip)
        campaign = snapshot.campaigns.get(placement.campaign_id)
        if server is None or campaign is None:
            missing = "server" if server is None else "campaign"
            run.decide("skipped", f"{missing} not in the snapshot; placement dropped", *key)
            run.short(key, placement.calls)
            return
        placed = 0
        for _ in range(placement.calls):
            call_started = run.clock()
            if run.slot is None or call_started - run.slot > pace_s:
                run.slot = call_started  # first call, or too far behind: no catch-up burst
            alternates = (
                [
                    snapshot.servers[ip]
                    for ip in run.headroom.alternates(placement.campaign_id, placement.server_ip)
                ]
                if run.headroom is not None
                else []
            )
            call = functools.partial(
                place_call,
                server=server,
                campaign=campaign,
                cycle=run.cycle,
                before_commit=run.fence.check,
                route=run.chooser,
                alternates=alternates,
                skip=frozenset(run.unrouted.get(key, ())),
            )
            try:
                result = await self.db.run(call, idempotent=False)
            except (DatabaseError, pymysql.err.Error) as exc:
                message = f"placing a call for {key[0]} on {key[1]}: {exc}"
                log.error(
                    "cycle %s: %s; cycle stopped (the call rolled back)",
                    run.cycle.cycle_id,
                    message,
                )
                report.errors.append(message)
                report.stopped = f"database error: {exc}"
                break
            if isinstance(result, Unrouted):
                run.orphans(placement.campaign_id, result.orphans_deleted)
                run.no_carrier(placement.campaign_id, placement.server_ip, result.leads)
                if result.exhausted:  # from this server: another may still route them
                    why = "no lead left in the hopper that a carrier can take here"
                else:
                    why = f"{len(result.leads)} leads in a row no carrier can take"
                reason = f"{why}; placed {placed} of {placement.calls} calls"
                run.decide("short", reason, *key)
                break
            if result is None:
                if run.fence.refused:
                    report.stopped = LOST_LEADERSHIP
                    log.warning(
                        "cycle %s: %s; no further calls", run.cycle.cycle_id, LOST_LEADERSHIP
                    )
                else:
                    run.exhausted.add(placement.campaign_id)
                    reason = f"hopper exhausted after {placed} of {placement.calls} calls"
                    run.decide("short", reason, *key)
                break
            placed += 1
            run.record(placement, result, index)
            if result.server_ip != placement.server_ip and run.headroom is not None:
                run.headroom.moved(placement.campaign_id, placement.server_ip, result.server_ip)
            if self.router is not None and result.carrier_id:
                self.router.placed(
                    PlacedCall(
                        caller_code=result.caller_code,
                        lead_id=result.lead_id,
                        campaign=campaign,
                        server=snapshot.servers.get(result.server_ip, server),
                        carrier_id=result.carrier_id,
                        route=result.route,
                        phone_code=result.phone_code,
                        number=result.phone_number,
                        alt_dial=result.alt_dial,
                        placed_at=run.cycle.now.replace(microsecond=0),
                    )
                )
            run.slot += pace_s
            await self.sleep(max(0.0, run.slot - run.clock()))
        run.short(key, placement.calls - placed)

    async def _finish(self, plan: Plan, run: _Run) -> None:
        """Store the fills and call dates (fenced), then the decision log."""
        report, cycle, fence, decisions = run.report, run.cycle, run.fence, run.decisions
        placed_by_campaign: dict[str, int] = {}
        for (campaign_id, _), count in report.placed.items():
            placed_by_campaign[campaign_id] = placed_by_campaign.get(campaign_id, 0) + count
        fills = {
            c.campaign_id: c.already_filling + placed_by_campaign.get(c.campaign_id, 0)
            for c in plan.campaigns
        }
        lists_used = {r.list_id for r in report.results}
        campaigns_used = {r.campaign_id for r in report.results}
        wants_finish = plan.reset_fill or fills or lists_used
        if wants_finish and not fence.refused:
            try:
                stored = await self.db.run(
                    lambda conn: finish_cycle(
                        conn,
                        fills,
                        plan.reset_fill,
                        lists_used,
                        campaigns_used,
                        cycle.now,
                        fence.check,
                    ),
                    idempotent=False,
                )
                if not stored:
                    report.stopped = report.stopped or LOST_LEADERSHIP
                    run.decide("stopped", f"{LOST_LEADERSHIP}: balance_trunk_fill not stored")
            except (DatabaseError, pymysql.err.Error) as exc:
                message = f"storing balance_trunk_fill and call dates: {exc}"
                log.error("cycle %s: %s", cycle.cycle_id, message)
                report.errors.append(message)
        if not decisions:
            return
        try:
            report.decisions_logged = await self.db.run(
                lambda conn: log_decisions(conn, decisions), idempotent=False
            )
        except (DatabaseError, pymysql.err.Error) as exc:
            message = f"writing {len(decisions)} rows to vb_decision_log: {exc}"
            log.error("cycle %s: %s", cycle.cycle_id, message)
            report.errors.append(message)
