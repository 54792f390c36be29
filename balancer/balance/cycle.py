"""One balance cycle: DB snapshot + live state -> plan (pure) -> fenced execution.

The daemon runs it every `balance.cycle_interval_s`; `rebalance --once` runs the very same
`BalanceCycle.run` once (with `dry_run` it plans and writes nothing).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from balancer.balance.executor import NOT_LEADER, ExecutionReport, Executor
from balancer.balance.model import OUTBALANCE, DbSnapshot, LiveServer, Plan
from balancer.balance.planner import plan_cycle
from balancer.config import Config
from balancer.db.snapshot import read_snapshot
from balancer.db.worker import DbWorker
from balancer.store.base import ChannelClass, Health, StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CycleResult:
    """What one cycle saw, decided and did."""

    cycle_id: str
    snapshot: DbSnapshot
    plan: Plan
    report: ExecutionReport | None  # None when nothing was executed
    skipped: str | None  # why the plan was not executed (dry run, not the leader)
    seconds: float


async def live_view(store: StateStore) -> dict[str, LiveServer]:
    """The store's servers as planner input; a server whose state went stale counts as DOWN."""
    view: dict[str, LiveServer] = {}
    for state in await store.servers():
        health = state.meta.health if state.fresh else Health.DOWN
        view[state.server_ip] = LiveServer(
            health=health, drained=state.drained, trunk_lines=state.count(ChannelClass.TRUNK)
        )
    # A drained server the tracker has not published yet is still drained.
    for server_ip in await store.drained():
        if server_ip not in view:
            view[server_ip] = LiveServer(health=Health.DOWN, drained=True)
    return view


class BalanceCycle:
    """Reads, plans and (when leading) executes one cycle at a time."""

    def __init__(self, config: Config, store: StateStore, db: DbWorker, executor: Executor) -> None:
        """Read through ``db``; ``executor`` writes under its lease (it knows whether we lead)."""
        self.config = config
        self.store = store
        self.db = db
        self.executor = executor
        self.cycles = 0
        self.calls_placed = 0
        self.live: dict[str, LiveServer] = {}  # the live view the last cycle planned with
        self._recent: deque[tuple[float, str, int]] = deque()  # (monotonic, campaign, calls)

    def _cycle_id(self) -> str:
        self.cycles += 1
        return f"{datetime.now():%Y%m%d%H%M%S}-{self.cycles}"

    async def run(self, *, dry_run: bool = False) -> CycleResult:
        """One cycle. Executes only when not a dry run and this process holds the lease."""
        started = time.monotonic()
        cycle_id = self._cycle_id()
        balance = self.config.balance
        snapshot = await self.db.run(lambda conn: read_snapshot(conn, balance))
        # Faithful mode ignores health and line counts but still honours operators' drain flags.
        self.live = await live_view(self.store)
        plan = plan_cycle(snapshot, self.live, balance)
        skipped: str | None = None
        report: ExecutionReport | None = None
        if dry_run:
            skipped = "dry run: nothing written"
        elif self.executor.fence() is None:
            skipped = NOT_LEADER
        else:
            report = await self.executor.execute(plan, snapshot, cycle_id)
            self.calls_placed += report.total_placed
            now = time.monotonic()
            for (campaign_id, _), count in report.placed.items():
                self._recent.append((now, campaign_id, count))
        seconds = time.monotonic() - started
        if report is not None and report.total_placed:
            log.info(
                "cycle %s: %d calls placed in %.2fs (%s)",
                cycle_id,
                report.total_placed,
                seconds,
                report.stopped or "complete",
            )
        return CycleResult(cycle_id, snapshot, plan, report, skipped, seconds)

    def summary(self, result: CycleResult) -> dict[str, object]:
        """What `status` shows about balancing: per server and per campaign, after this cycle."""
        cutoff = time.monotonic() - 60.0
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        last_minute: dict[str, int] = {}
        for _, campaign_id, count in self._recent:
            last_minute[campaign_id] = last_minute.get(campaign_id, 0) + count
        placed = result.report.placed if result.report is not None else {}
        snapshot = result.snapshot
        dedicated: dict[str, int] = {}
        for rule in snapshot.trunk_rules:
            dedicated[rule.server_ip] = dedicated.get(rule.server_ip, 0) + rule.dedicated
        # OUTBALANCE calls per server, already there plus placed now: one pass over each source.
        outbalance_on: dict[str, int] = {}
        for (ip, _, kind), n in snapshot.auto_calls.items():
            if kind == OUTBALANCE:
                outbalance_on[ip] = outbalance_on.get(ip, 0) + n
        for (_, ip), n in placed.items():
            outbalance_on[ip] = outbalance_on.get(ip, 0) + n
        servers = []
        for server_ip, server in sorted(snapshot.servers.items()):
            outbalance = outbalance_on.get(server_ip, 0)
            servers.append(
                {
                    "server_ip": server_ip,
                    "balance_active": server.active and server.balance_active,
                    "rank": server.rank,
                    "allowed_for_balance": max(
                        0, server.max_trunks - server.offlimits - dedicated.get(server_ip, 0)
                    ),
                    "outbalance_calls": outbalance,
                }
            )
        campaigns = []
        for campaign in result.plan.campaigns:
            done = sum(n for (c, _), n in placed.items() if c == campaign.campaign_id)
            campaigns.append(
                {
                    "campaign_id": campaign.campaign_id,
                    "shortage": campaign.demand,
                    "filling": campaign.already_filling + done,
                    "placed_last_minute": last_minute.get(campaign.campaign_id, 0),
                }
            )
        return {
            "cycle_id": result.cycle_id,
            "mode": result.plan.mode,
            "stopped": result.plan.stopped,
            "skipped": result.skipped,
            "servers": servers,
            "campaigns": campaigns,
        }
