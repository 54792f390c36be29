"""Retention: our own tables stay bounded while the daemon runs for months.

`vb_decision_log` grows by about one row per balance call plus the skips (at 10 calls/s close to
a million rows a day) and `vb_call_retries` by one row per re-placed call. The leader prunes
them every ``interval_s`` by age (and the decision log also by row count), in batches of
``batch_rows`` on a connection of its own — never the cycle's and never the lease's, so pruning
can delay neither a call nor a renewal. VICIdial's own tables are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pymysql

from balancer.db import retention as sql
from balancer.db.worker import DbRunner
from balancer.errors import BalancerError
from balancer.ops.retention_settings import RetentionConfig

log = logging.getLogger(__name__)


@dataclass
class RetentionStats:
    """What pruning did so far (for the metrics and the shutdown line)."""

    pruned: dict[str, int] = field(default_factory=dict)  # table -> rows deleted
    passes: int = 0
    failures: int = 0
    last_pass_at: float | None = None  # epoch seconds


class Retention:
    """Prunes our growing tables in small batches while this process leads."""

    def __init__(
        self,
        config: RetentionConfig,
        db: DbRunner,
        is_leader: Callable[[], bool],
        *,
        wall: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.is_leader = is_leader
        self.stats = RetentionStats()
        self._wall = wall or time.time

    async def prune_once(self, now: datetime | None = None) -> dict[str, int]:
        """One pass over every table (cutoffs from ``now``, default the database's clock); the
        rows it deleted per table."""
        config = self.config
        if now is None:
            now = await self.db.run(sql.database_now)
        deleted: dict[str, int] = {}
        jobs: list[tuple[str, Callable[..., int]]] = []
        if config.decision_log_days:
            cutoff = now - timedelta(days=config.decision_log_days)
            jobs.append(
                (
                    sql.DECISIONS.table,
                    functools.partial(sql.prune_older, target=sql.DECISIONS, cutoff=cutoff),
                )
            )
        if config.decision_log_max_rows:
            jobs.append(
                (
                    sql.DECISIONS.table,
                    functools.partial(sql.prune_beyond, max_rows=config.decision_log_max_rows),
                )
            )
        if config.call_retries_days:
            cutoff = now - timedelta(days=config.call_retries_days)
            jobs.append(
                (
                    sql.RETRIES.table,
                    functools.partial(sql.prune_older, target=sql.RETRIES, cutoff=cutoff),
                )
            )
        for table, job in jobs:
            while True:
                n = await self.db.run(functools.partial(job, batch_rows=config.batch_rows))
                deleted[table] = deleted.get(table, 0) + n
                if n < config.batch_rows:
                    break
                await asyncio.sleep(0)  # between batches: let everyone else at the database
        for table, n in deleted.items():
            self.stats.pruned[table] = self.stats.pruned.get(table, 0) + n
        self.stats.passes += 1
        self.stats.last_pass_at = self._wall()
        if any(deleted.values()):
            log.info("retention: pruned %s", ", ".join(f"{t} {n}" for t, n in deleted.items() if n))
        return deleted

    async def run(self, stop: asyncio.Event) -> None:
        """Prune every interval_s while leading, until stopped."""
        while not stop.is_set():
            if self.is_leader():
                try:
                    await self.prune_once()
                except (BalancerError, pymysql.err.Error) as exc:
                    self.stats.failures += 1
                    log.error(
                        "retention: pruning failed (%s); next pass in %.0fs",
                        exc,
                        self.config.interval_s,
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.interval_s)
