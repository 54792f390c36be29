"""Turning a Plan into balance calls on VICIdial's own tables: claimed, written in a safe order,
fenced by the leader's epoch, paced to the CPS limit, repaired after any failure.

Each cycle starts with the repair step (balancer/db/repair.py): whatever a crash, an error or a
former leader left between two writes is finished or undone first. Then, per placement, the
executor claims READY hopper rows in one conditional statement (balancer/db/leads.py), chooses
each lead's carrier (on the event loop, where carrier health lives), and writes each call
(balancer/db/calls.py, the Originate last). Every statement carries the fence; a FenceLost stops
the cycle at once and leaves the rest to the new leader's repair. After the placement, claimed
rows not dialed are put back READY and dialed rows are deleted. A database error stops the cycle
and runs the repair step straight away (and again at the next cycle if that failed too).

Pacing: after every call (the last one too) the executor waits until ``plan.pace_ms`` after the
call's start, so SQL time is part of the pace. Starts are kept on a schedule (start of call n =
start of call n-1 + pace): a sleep that overran is taken off the next wait, so the rate holds
the configured calls per second. A call that starts more than one pace behind its slot (a slow
database) restarts the schedule instead of bursting to catch up.

A call no carrier can take on its planned server may go to another server the plan gives the
same campaign calls, if that server has lines to spare by the planner's own rules; a lead no
carrier can take anywhere stays in the hopper, and the decision log says why.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pymysql

from balancer.balance.fields import claim_marker, dial_prefix
from balancer.balance.headroom import Headroom, HopperPool
from balancer.balance.model import CampaignInfo, DbSnapshot, Placement, Plan, ServerInfo
from balancer.carriers.routing import CallRouter, CarrierPick, NoCarrier, PlacedCall
from balancer.db import leads
from balancer.db.calls import CallResult, CycleContext, write_call
from balancer.db.cycle_log import Decision, details, finish_cycle, log_decisions
from balancer.db.engines import write_path
from balancer.db.fence import FenceLost, LeaderFence
from balancer.db.leads import HopperRow, Lead
from balancer.db.repair import RepairReport, repair
from balancer.db.worker import DbRunner
from balancer.errors import DatabaseError

log = logging.getLogger(__name__)

KIND = "balance"
LOST_LEADERSHIP = "lost leadership: another balancer's epoch holds the lease"
NOT_LEADER = "not the leader: another balancer places calls"
SHUTTING_DOWN = "shutting down: the remaining calls are left to the next cycle"
# Leads in a row no carrier can take before a placement gives up for this cycle.
_UNROUTED_SCAN = 5
_DB_ERRORS = (DatabaseError, pymysql.err.Error)


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
    epoch: int | None = None
    repaired: RepairReport = field(default_factory=RepairReport)

    @property
    def total_placed(self) -> int:
        """Calls placed in this cycle."""
        return len(self.results)


def route_call(
    router: CallRouter | None,
    server: ServerInfo,
    alternates: Sequence[ServerInfo],
    phone_code: str,
    number: str,
) -> tuple[ServerInfo, CarrierPick | None, NoCarrier | None]:
    """(server, carrier) for one number: the planned server first, then the alternates.

    No carrier anywhere gives a NoCarrier naming each server's problem. A number the routes do
    not cover (or routing bypassed) is not routed: the planned server, the campaign's prefix.
    A router that raises fails closed (no carrier: the lead is kept, never dialed on a guess).
    """
    if router is None:
        return server, None, None
    problems: list[str] = []
    route_name = ""
    for candidate in (server, *alternates):
        try:
            decision = router.choose(candidate.server_ip, phone_code, number)
        except Exception as exc:
            log.error("carrier choice failed (%s): lead kept", exc)
            return server, None, NoCarrier("", f"carrier choice failed: {exc}")
        if decision is None:
            return server, None, None
        if isinstance(decision, CarrierPick):
            return candidate, decision, None
        route_name = decision.route
        problems.append(
            f"{candidate.server_ip}: {decision.reason}" if alternates else decision.reason
        )
    return server, None, NoCarrier(route_name, " | ".join(problems))


class _Run:
    """One execution of a plan: what its calls share and what they produced."""

    def __init__(
        self,
        cycle: CycleContext,
        fence: LeaderFence,
        clock: Callable[[], float],
        claims: Callable[[], int],
    ) -> None:
        self.cycle = cycle
        self.claims = claims  # the next claim's sequence number (per process, across cycles)
        self.fence = fence
        self.clock = clock
        self.started = clock()
        self.slot: float | None = None  # when the next call is due to start
        self.report = ExecutionReport(cycle.cycle_id, epoch=fence.epoch)
        self.decisions: list[Decision] = []
        self.pools: dict[str, HopperPool] = {}
        # (campaign, planned server) -> hopper_ids no carrier could take from there this cycle
        self.unrouted: dict[tuple[str, str], set[int]] = {}
        self.headroom: Headroom | None = None
        self.needs_repair = False

    def marker(self) -> str:
        """A claim marker no other claim alive at the same time has."""
        return claim_marker(self.cycle.now, self.fence.epoch, self.claims())

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

    def stop(self, why: str) -> None:
        if self.report.stopped is None:
            self.report.stopped = why

    def record(self, placement: Placement, result: CallResult, index: int) -> None:
        """Count a placed call and log it."""
        key = (placement.campaign_id, result.server_ip)
        self.report.results.append(result)
        self.report.placed[key] = self.report.placed.get(key, 0) + 1
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
            "placed", reason, *key, lead_id=result.lead_id, info=info, carrier_id=result.carrier_id
        )

    def short(self, key: tuple[str, str], calls: int) -> None:
        """Note planned calls that were not placed."""
        if calls > 0:
            self.report.short[key] = self.report.short.get(key, 0) + calls


class Executor:
    """Places a plan's calls, then stores the cycle's fills and its decision log."""

    def __init__(
        self,
        db: DbRunner,
        *,
        fence: Callable[[], LeaderFence | None],
        on_fence_lost: Callable[[], None] = lambda: None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        dst: Callable[[datetime], bool] | None = None,
        clock: Callable[[], float] | None = None,
        router: CallRouter | None = None,
        transactional: bool | None = None,
        host_server_ip: str = "",
    ) -> None:
        """Write through ``db`` under the lease ``fence()`` returns (None: not the leader);
        ``router`` chooses each call's carrier (None: the campaign's dial prefix, as VICIdial);
        ``transactional`` (None: found from the tables' engines) adds a transaction per call;
        ``host_server_ip`` is this host's own server_ip for the VDACnote ('' -> the target's)."""
        self.db = db
        self.fence = fence
        self.on_fence_lost = on_fence_lost
        self.clock = clock  # seconds, monotonic; None: the event loop's clock
        self.sleep = sleep
        self.dst = dst or local_dst
        self.router = router
        self.transactional = transactional
        self.host_server_ip = host_server_ip
        self._claims = itertools.count(1)
        self._stop_requested = False
        self._wake: asyncio.Event | None = None

    def request_stop(self) -> None:
        """Stop deciding: finish the call in flight, settle the hopper, store what was placed.

        The cycle in progress ends at its next call boundary (a pacing wait ends at once); the
        daemon asks this at shutdown instead of cancelling the cycle, so no claimed lead waits
        for a repair step.
        """
        self._stop_requested = True
        if self._wake is not None:
            self._wake.set()

    async def _pause(self, seconds: float) -> None:
        """The pacing wait, cut short by a stop request."""
        if self._stop_requested:
            return
        wake = self._wake
        if wake is None:
            await self.sleep(seconds)
            return
        sleeping = asyncio.ensure_future(self.sleep(seconds))
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeping, woken):
                task.cancel()

    async def execute(self, plan: Plan, snapshot: DbSnapshot, cycle_id: str) -> ExecutionReport:
        """Repair, place every call of ``plan.sequence`` in order, then finish and log."""
        loop = asyncio.get_running_loop()
        now = snapshot.taken_at
        fence = self.fence()
        clock = self.clock or loop.time
        if fence is None:
            report = ExecutionReport(cycle_id, stopped=NOT_LEADER)
            return report
        context = CycleContext(
            now=now,
            dst=self.dst(now),
            cycle_id=cycle_id,
            host_server_ip=self.host_server_ip,
            limit_24hour=snapshot.settings is not None and snapshot.settings.call_limit_24hour,
        )
        run = _Run(context, fence, clock, lambda: next(self._claims))
        self._wake = asyncio.Event()
        if self._stop_requested:
            run.stop(SHUTTING_DOWN)
        if self.transactional is None:
            try:
                self.transactional = (await self.db.run(write_path)).transactional
            except _DB_ERRORS as exc:
                return self._failed(run, f"reading the tables' engines: {exc}")
        for campaign_id, ids in snapshot.hopper_ids.items():
            run.pools[campaign_id] = HopperPool(ids)
        if self.router is not None:
            run.headroom = Headroom(plan, snapshot)
        if not await self._repair(run, snapshot):
            return run.report
        if plan.stopped:
            run.decide("stopped", plan.stopped)
        for campaign_plan in plan.campaigns:
            for skip in campaign_plan.skips:
                run.decide("skipped", skip.reason, skip.campaign_id, skip.server_ip)
        pace_s = max(plan.pace_ms, 0.0) / 1000
        for index, placement in enumerate(plan.sequence):
            await self._place(run, placement, index, snapshot, pace_s)
        report = run.report
        if report.stopped is not None and report.stopped != LOST_LEADERSHIP:
            left = sum(report.short.values())
            run.decide("stopped", report.stopped, info=details(calls_not_placed=left))
        if run.needs_repair and report.stopped != LOST_LEADERSHIP:
            await self._repair(run, snapshot)
        await self._finish(plan, run)
        report.duration_s = run.clock() - run.started
        return report

    def _failed(self, run: _Run, message: str) -> ExecutionReport:
        log.error("cycle %s: %s; nothing placed", run.cycle.cycle_id, message)
        run.report.errors.append(message)
        run.stop(f"database error: {message}")
        return run.report

    def _lost(self, run: _Run) -> None:
        if run.report.stopped != LOST_LEADERSHIP:
            log.warning("cycle %s: %s; no further writes", run.cycle.cycle_id, LOST_LEADERSHIP)
        run.report.stopped = LOST_LEADERSHIP
        self.on_fence_lost()

    async def _repair(self, run: _Run, snapshot: DbSnapshot) -> bool:
        """The repair step; False when the cycle cannot go on (fence lost, database down)."""
        fence = run.fence
        try:
            found = await self.db.run(
                functools.partial(repair, fence=fence, servers=snapshot.servers, dst=self.dst)
            )
        except FenceLost:
            self._lost(run)
            return False
        except _DB_ERRORS as exc:
            message = f"repair step: {exc}"
            log.error("cycle %s: %s", run.cycle.cycle_id, message)
            run.report.errors.append(message)
            run.stop(f"database error: {exc}")
            return False
        run.needs_repair = False
        rep = run.report.repaired
        for target, source, outcome, why in (
            (rep.finished, found.finished, "repaired", "placed call's lead updated by repair"),
            (rep.undone, found.undone, "repaired", "claimed, never dialed: back to READY"),
        ):
            target.extend(source)
            for lead_id in source:
                run.decide(outcome, why, lead_id=lead_id)
        rep.cleared.extend(found.cleared)
        rep.retries_undone.extend(found.retries_undone)
        rep.retries_confirmed.extend(found.retries_confirmed)
        return True

    async def _claim(
        self, run: _Run, campaign_id: str, server_ip: str, want: int
    ) -> list[tuple[HopperRow, Lead]] | None:
        """Claim up to ``want`` leads for a placement; [] when none is left that this server may
        take; None when the write failed (the cycle is stopped)."""
        pool = run.pools.setdefault(campaign_id, HopperPool(()))
        refused = run.unrouted.get((campaign_id, server_ip), set())
        while True:
            candidates = pool.next(want, refused)
            if not candidates:
                return []
            marker = run.marker()
            fence = run.fence
            try:
                got = await self.db.run(
                    functools.partial(
                        leads.claim,
                        fence=fence,
                        campaign_id=campaign_id,
                        candidates=candidates,
                        marker=marker,
                    ),
                    idempotent=False,
                )
            except FenceLost:
                self._lost(run)
                return None
            except _DB_ERRORS as exc:
                self._error(run, f"claiming leads of {campaign_id}: {exc}")
                return None
            pool.drop(got.taken)
            pool.hold(h.hopper_id for h, _ in got.leads)
            if got.orphans:
                pool.hold(h.hopper_id for h in got.orphans)
                if not await self._fenced(run, leads.delete_claimed, got.orphans):
                    return None
                pool.drop(h.hopper_id for h in got.orphans)
                for hopper in got.orphans:
                    log.warning(
                        "campaign %s: hopper row %d names lead %d, which is not in vicidial_list;"
                        " row deleted",
                        campaign_id,
                        hopper.hopper_id,
                        hopper.lead_id,
                    )
                    run.report.orphans_deleted += 1
                    reason = "hopper row's lead not in vicidial_list: row deleted"
                    run.decide("orphan_deleted", reason, campaign_id, "", hopper.lead_id)
            if got.leads:
                return got.leads

    async def _fenced(
        self,
        run: _Run,
        step: Callable[..., int],
        rows: Sequence[HopperRow],
    ) -> bool:
        """One fenced hopper statement over our rows; False (cycle stopped) when it failed."""
        if not rows:
            return True
        fence = run.fence
        try:
            await self.db.run(lambda c: step(c, fence, rows), idempotent=False)
        except FenceLost:
            self._lost(run)
            return False
        except _DB_ERRORS as exc:
            self._error(run, f"updating the hopper: {exc}")
            return False
        return True

    def _error(self, run: _Run, message: str) -> None:
        log.error("cycle %s: %s; cycle stopped (repair follows)", run.cycle.cycle_id, message)
        run.report.errors.append(message)
        run.stop(f"database error: {message}")
        run.needs_repair = True

    async def _place(
        self, run: _Run, placement: Placement, index: int, snapshot: DbSnapshot, pace_s: float
    ) -> None:
        """One placement's calls, each paced; stops early on an empty hopper, error or fence."""
        report = run.report
        key = (placement.campaign_id, placement.server_ip)
        pool = run.pools.get(placement.campaign_id)
        if report.stopped is not None or pool is None or pool.exhausted:
            run.short(key, placement.calls)  # the exhaustion was logged when it happened
            return
        server = snapshot.servers.get(placement.server_ip)
        campaign = snapshot.campaigns.get(placement.campaign_id)
        if server is None or campaign is None:
            missing = "server" if server is None else "campaign"
            run.decide("skipped", f"{missing} not in the snapshot; placement dropped", *key)
            run.short(key, placement.calls)
            return
        batch: deque[tuple[HopperRow, Lead]] = deque()
        held: list[HopperRow] = []  # claimed by this placement and not dialed
        dialed: list[HopperRow] = []
        placed = 0
        streak = 0  # leads in a row no carrier could take
        try:
            while placed < placement.calls and report.stopped is None:
                if self._stop_requested:
                    run.stop(SHUTTING_DOWN)
                    break
                if not batch:
                    got = await self._claim(
                        run, placement.campaign_id, placement.server_ip, placement.calls - placed
                    )
                    if got is None:
                        break
                    if not got:
                        if pool.exhausted:
                            why = f"hopper exhausted after {placed} of {placement.calls} calls"
                        else:
                            why = (
                                "no lead left in the hopper that a carrier can take here;"
                                f" placed {placed} of {placement.calls} calls"
                            )
                        run.decide("short", why, *key)
                        break
                    batch.extend(got)
                    held.extend(hopper for hopper, _ in got)
                hopper, lead = batch.popleft()
                outcome = await self._call(
                    run, placement, index, server, campaign, hopper, lead, pace_s
                )
                if outcome is False and run.needs_repair:
                    held.remove(hopper)  # part of it may be written: the repair step decides
                if outcome is None:  # no carrier: the lead stays in the hopper
                    streak += 1
                    if streak >= _UNROUTED_SCAN:
                        why = f"{streak} leads in a row no carrier can take"
                        run.decide("short", f"{why}; placed {placed} of {placement.calls}", *key)
                        break
                    continue
                streak = 0
                if outcome is False:
                    break
                held.remove(hopper)
                dialed.append(hopper)
                pool.drop([hopper.hopper_id])  # dialed: never a candidate again
                placed += 1
                assert run.slot is not None
                run.slot += pace_s
                await self._pause(max(0.0, run.slot - run.clock()))
        finally:
            await self._settle(run, pool, held, dialed)
        run.short(key, placement.calls - placed)

    async def _call(
        self,
        run: _Run,
        placement: Placement,
        index: int,
        server: ServerInfo,
        campaign: CampaignInfo,
        hopper: HopperRow,
        lead: Lead,
        pace_s: float,
    ) -> bool | None:
        """Route and write one call: True placed, None no carrier, False the cycle stopped."""
        number = leads.dialed_number(lead, hopper.alt_dial or "MAIN", campaign.auto_alt_dial)
        alternates = []
        if run.headroom is not None:
            ips = run.headroom.alternates(placement.campaign_id, placement.server_ip)
            alternates = [run.headroom.snapshot.servers[ip] for ip in ips]
        target, pick, refusal = route_call(self.router, server, alternates, lead.phone_code, number)
        if refusal is not None:
            run.unrouted.setdefault((placement.campaign_id, placement.server_ip), set()).add(
                hopper.hopper_id
            )
            run.report.unrouted += 1
            info = details(route=refusal.route, hopper_id=hopper.hopper_id, why=refusal.reason)
            reason = f"no carrier can take it; lead stays in the hopper: {refusal.reason}"
            run.decide(
                "no_carrier", reason, placement.campaign_id, placement.server_ip, lead.lead_id, info
            )
            return None
        prefix = (
            pick.dial_prefix
            if pick is not None
            else dial_prefix(lead.list_dial_prefix, campaign.dial_prefix)
        )
        dial_string = prefix + ("" if campaign.omit_phone_code else lead.phone_code) + number
        started = run.clock()
        if run.slot is None or started - run.slot > pace_s:
            run.slot = started  # first call, or too far behind: no catch-up burst
        write = functools.partial(
            write_call,
            fence=run.fence,
            hopper=hopper,
            lead=lead,
            server=target,
            campaign=campaign,
            cycle=run.cycle,
            dial_string=dial_string,
            number=number,
            transactional=bool(self.transactional),
            carrier_id=pick.carrier_id if pick is not None else "",
            route=pick.route if pick is not None else "",
        )
        key = (placement.campaign_id, placement.server_ip)
        try:
            result = await self.db.run(write, idempotent=False)
        except FenceLost:
            self._lost(run)
            return False
        except _DB_ERRORS as exc:
            self._error(run, f"placing a call for {key[0]} on {target.server_ip}: {exc}")
            return False
        run.record(placement, result, index)
        if target.server_ip != placement.server_ip and run.headroom is not None:
            run.headroom.moved(placement.campaign_id, placement.server_ip, target.server_ip)
        if self.router is not None and result.carrier_id:
            self.router.placed(
                PlacedCall(
                    caller_code=result.caller_code,
                    lead_id=result.lead_id,
                    campaign=campaign,
                    server=target,
                    carrier_id=result.carrier_id,
                    route=result.route,
                    phone_code=result.phone_code,
                    number=result.phone_number,
                    alt_dial=result.alt_dial,
                    placed_at=run.cycle.now.replace(microsecond=0),
                )
            )
        if not result.lead_updated:
            self._lost(run)
        return True

    async def _settle(
        self, run: _Run, pool: HopperPool, held: list[HopperRow], dialed: list[HopperRow]
    ) -> None:
        """After a placement: dialed rows deleted, the rest put back READY (while we lead)."""
        if run.report.stopped == LOST_LEADERSHIP:
            return  # not ours to write any more: the new leader's repair settles them
        # A held row may be INCALL too: its write finished while the cycle was being cancelled.
        await self._fenced(run, leads.delete_dialed, [*dialed, *held])
        if await self._fenced(run, leads.unclaim, held):
            pool.release(h.hopper_id for h in held)

    async def _finish(self, plan: Plan, run: _Run) -> None:
        """Store the fills and call dates, then the decision log (both fenced)."""
        report, cycle, fence, decisions = run.report, run.cycle, run.fence, run.decisions
        if report.stopped == LOST_LEADERSHIP:
            return
        placed_by_campaign: dict[str, int] = {}
        for (campaign_id, _), count in report.placed.items():
            placed_by_campaign[campaign_id] = placed_by_campaign.get(campaign_id, 0) + count
        fills = {
            c.campaign_id: c.already_filling + placed_by_campaign.get(c.campaign_id, 0)
            for c in plan.campaigns
        }
        lists_used = {r.list_id for r in report.results}
        campaigns_used = {r.campaign_id for r in report.results}
        if plan.reset_fill or fills or lists_used:
            try:
                await self.db.run(
                    lambda conn: finish_cycle(
                        conn, fence, fills, plan.reset_fill, lists_used, campaigns_used, cycle.now
                    ),
                    idempotent=False,
                )
            except _DB_ERRORS as exc:
                message = f"storing balance_trunk_fill and call dates: {exc}"
                log.error("cycle %s: %s", cycle.cycle_id, message)
                report.errors.append(message)
        if not decisions:
            return
        try:
            report.decisions_logged = await self.db.run(
                lambda conn: log_decisions(conn, decisions, fence), idempotent=False
            )
        except FenceLost:
            self._lost(run)
        except _DB_ERRORS as exc:
            message = f"writing {len(decisions)} rows to vb_decision_log: {exc}"
            log.error("cycle %s: %s", cycle.cycle_id, message)
            report.errors.append(message)
