"""Leader election: exactly one balancer places calls; the others track and stand by.

The lease lives in the state store (a Redis key with a TTL; in process for memory://). The leader
renews it every third of its TTL; a standby takes it within one TTL after the leader dies. Every
write is fenced: the executor asks `check()` right before each commit, so a leader that lost its
lease (paused process, network split) cannot place a call after a standby took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from balancer.errors import BalancerError
from balancer.store.base import StateStore

log = logging.getLogger(__name__)


class Leadership:
    """Holds, renews and fences the leader lease for one process."""

    def __init__(self, store: StateStore, name: str, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.token = f"{name}/{uuid.uuid4().hex[:12]}"
        self.leading = False
        self.changes = 0

    async def try_acquire(self) -> bool:
        """Take or renew the lease once; a store error means we do not lead."""
        try:
            leading = await self.store.acquire_lease(self.token, self.ttl_s)
        except BalancerError as exc:
            leading = False
            if self.leading:
                log.error("leader lease cannot be renewed (%s): standing down", exc)
        if leading != self.leading:
            self.changes += 1
            log.info("%s leader (%s)", "became" if leading else "no longer", self.token)
        self.leading = leading
        return leading

    async def check(self) -> bool:
        """Fencing: True only if the lease is ours right now (asked before every write)."""
        try:
            return await self.store.holds_lease(self.token)
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
        """Give the lease up so that a standby need not wait for it to expire."""
        if self.leading:
            self.leading = False
            try:
                await self.store.release_lease(self.token)
                log.info("leader lease released (%s)", self.token)
            except BalancerError as exc:
                log.error("leader lease release failed (%s); it expires by itself", exc)
