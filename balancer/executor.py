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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pymysql

from balancer.db.calls import (
    CallResult,
    CycleContext,
    Decision,
    details,
    finish_cycle,
    log_decisions,
    place_call,
)
from balancer.db.worker import DbWorker
from balancer.errors import DatabaseError
from balancer.snapshot import DbSnapshot, Placement, Plan

log = logging.getLogger(__name__)

KIND = "balance"
LOST_LEADERSHIP = "lost leadership: fencing check failed before commit"


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
    decisions_logged: int = 0
    duration_s: float = 0.0

    @property
    def total_placed(self) -> int:
        """Calls placed in this cycle."""
        return len(self.results)


class _Fence:
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


class _Run:
    """One execution of a plan: what its calls share and what they produced."""

    def __init__(self, cycle: CycleContext, fence: _Fence, clock: Callable[[], float]) -> None:
        self.cycle = cycle
        self.fence = fence
        self.clock = clock
        self.started = clock()
        self.slot: float | None = None  # when the next call is due to start
        self.report = ExecutionReport(cycle.cycle_id)
        self.decisions: list[Decision] = []
        self.exhausted: set[str] = set()  # campaigns whose hopper ran dry this cycle

    def decide(
        self,
        outcome: str,
        reason: str,
        campaign_id: str = "",
        server_ip: str = "",
        lead_id: int | None = None,
        info: str | None = None,
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
                outcome=outcome,
                reason=reason,
                details=info,
            )
        )

    def record(self, placement: Placement, result: CallResult, index: int) -> None:
        """Count a placed call and log it (and any orphan hopper row it cleared)."""
        key = (placement.campaign_id, placement.server_ip)
        self.report.results.append(result)
        self.report.placed[key] = self.report.placed.get(key, 0) + 1
        for lead_id in result.orphans_deleted:
            self.report.orphans_deleted += 1
            reason = "hopper row's lead not in vicidial_list: row deleted"
            self.decide("orphan_deleted", reason, placement.campaign_id, "", lead_id)
        info = details(
            caller_code=result.caller_code,
            man_id=result.man_id,
            auto_call_id=result.auto_call_id,
            dial_string=result.dial_string,
            cid_type=result.cid_type,
            sequence=index,
        )
        self.decide("placed", placement.reason, *key, lead_id=result.lead_id, info=info)

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
    ) -> None:
        """Write through ``db``; ``fence`` is asked before every commit (None: always allowed)."""
        self.db = db
        self.clock = clock  # seconds, monotonic; None: the event loop's clock
        self.fence = fence
        self.sleep = sleep
        self.dst = dst or local_dst
        self.fence_timeout_s = fence_timeout_s

    async def execute(self, plan: Plan, snapshot: DbSnapshot, cycle_id: str) -> ExecutionReport:
        """Place every call of ``plan.sequence`` in order, then finish the cycle and log it."""
        loop = asyncio.get_running_loop()
        now = snapshot.taken_at
        run = _Run(
            CycleContext(now=now, dst=self.dst(now), cycle_id=cycle_id),
            _Fence(self.fence, loop, self.fence_timeout_s),
            self.clock or loop.time,
        )
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
        call = functools.partial(
            place_call,
            server=server,
            campaign=campaign,
            cycle=run.cycle,
            before_commit=run.fence.check,
        )
        placed = 0
        for _ in range(placement.calls):
            call_started = run.clock()
            if run.slot is None or call_started - run.slot > pace_s:
                run.slot = call_started  # first call, or too far behind: no catch-up burst
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
