"""Leader election: exactly one balancer places calls; the others track and stand by.

The lease is a row in the VICIdial database (``vb_leader``, balancer/db/fence.py), the one store
every VICIdial process already depends on: a standby takes it once it has expired by the
database's clock, which bumps its epoch. The leader renews it every third of its TTL. What keeps
two leaders apart is not this loop but the fence: every balance write carries "epoch = mine" in
the same statement, so a leader that was paused, partitioned or slow writes nothing once a
standby took over. That works with ``memory://`` too (several daemons, a cron one-shot beside a
daemon): Redis is only the shared live view, never the lock.

With Redis down the leader keeps its lease (it lives in the database), but its balance cycle
stops placing calls: the live line counts and the operators' drain flags are in Redis, and
dialing without them could send calls to a drained or full server. It resumes when Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from balancer.db import fence as lease
from balancer.db.fence import BALANCE_LEASE, LeaderFence
from balancer.db.worker import DbWorker
from balancer.errors import BalancerError

log = logging.getLogger(__name__)


class Leadership:
    """Holds and renews the database lease for one process; `fence` is what its writes carry."""

    def __init__(self, db: DbWorker, name: str, ttl_s: float, lease_name: str = BALANCE_LEASE):
        self.db = db
        self.ttl_s = ttl_s
        self.lease_name = lease_name
        self.token = f"{name}/{uuid.uuid4().hex[:12]}"[:100]
        self.fence: LeaderFence | None = None
        self.changes = 0
        self.terms = 0  # leaderships taken (a new epoch each)

    @property
    def leading(self) -> bool:
        """True while this process holds the lease (as of its last renewal)."""
        return self.fence is not None

    @property
    def epoch(self) -> int | None:
        return None if self.fence is None else self.fence.epoch

    async def try_acquire(self) -> bool:
        """Take or renew the lease once; a database error means we do not lead for now."""
        try:
            epoch = await self.db.run(
                lambda conn: lease.take(conn, self.token, self.ttl_s, self.lease_name)
            )
        except BalancerError as exc:
            epoch = None
            if self.leading:
                log.error("leader lease cannot be renewed (%s): standing down", exc)
        self._set(None if epoch is None else LeaderFence(self.lease_name, epoch))
        return self.leading

    def lost(self) -> None:
        """A fenced write found another epoch: stop deciding at once (the next renewal agrees)."""
        self._set(None)

    def _set(self, fence: LeaderFence | None) -> None:
        was = self.fence
        if (was is None) != (fence is None) or (was and fence and was.epoch != fence.epoch):
            self.changes += 1
            if fence is not None:
                self.terms += 1
                log.info("became leader (%s, epoch %d)", self.token, fence.epoch)
            else:
                log.info("no longer leader (%s)", self.token)
        self.fence = fence

    async def check(self) -> bool:
        """True only if the database still holds our epoch (a read; writes carry the fence)."""
        fence = self.fence
        if fence is None:
            return False
        try:
            return await self.db.run(lambda conn: lease.holds(conn, fence))
        except BalancerError:
            return False

    async def run(self, stop: asyncio.Event) -> None:
        """Renew (or try to take) the lease every third of its TTL until stopped; then release."""
        try:
            while not stop.is_set():
                await self.try_acquire()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.ttl_s / 3)
        finally:
            await self.release()

    async def release(self) -> None:
        """Let the lease expire now so that a standby need not wait for it."""
        fence = self.fence
        if fence is None:
            return
        self._set(None)
        try:
            await self.db.run(lambda conn: lease.release(conn, fence, self.token))
            log.info("leader lease released (%s, epoch %d)", self.token, fence.epoch)
        except BalancerError as exc:
            log.error("leader lease release failed (%s); it expires by itself", exc)
