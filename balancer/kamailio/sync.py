"""The daemon's Kamailio task: the live view in, the desired dispatcher state out to every endpoint.

Reads only the state store's view (health, drain flags, live line counts: what `status` shows)
every ``kamailio.poll_interval_s``, builds the desired state and offers it to one
`EndpointPublisher` per endpoint, each on its own thread. Publishes a small document for
`status` and `vici-balancer kamailio` (other processes) under ``kamailio:<daemon name>``.

Until every server has been seen once (or a startup grace has passed) nothing is published: a
fresh daemon sees every server DOWN until its first AMI login, and must not empty Kamailio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from balancer.ami.session import LOOPBACK_ONLY_ENV
from balancer.config import Config
from balancer.errors import BalancerError
from balancer.kamailio.model import Desired, ServerView, SetSpec, build_desired
from balancer.kamailio.publisher import EndpointPublisher, LagObserver
from balancer.store.base import ChannelClass, ServerState, StateStore
from balancer.store.keys import kamailio_document

log = logging.getLogger(__name__)

DOCUMENT_VERSION = 1


def server_view(state: ServerState, config: Config) -> ServerView:
    """One store entry as the Kamailio model sees it."""
    agents = config.agents
    return ServerView(
        server_ip=state.server_ip,
        server_id=state.meta.server_id,
        health=str(state.meta.health) if state.meta.health else None,
        drained=state.drained,
        fresh=state.fresh,
        max_trunks=state.meta.max_trunks,
        trunk_lines=state.count(ChannelClass.TRUNK),
        agent_lines=state.count(ChannelClass.AGENT),
        agent_capacity=agents.capacity.get(state.server_ip, agents.default_capacity),
    )


class KamailioSync:
    """Keeps every configured Kamailio in step with the live view until stopped."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        name: str,
        *,
        is_leader: Callable[[], bool] | None = None,
        lag: LagObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert config.kamailio is not None
        self.config = config
        self.kamailio = config.kamailio
        self.store = store
        self.name = name
        self.is_leader = is_leader if self.kamailio.publish == "leader" else None
        self.clock = clock
        self.publishers = [
            EndpointPublisher(endpoint, self.kamailio, lag=lag, clock=clock)
            for endpoint in self.kamailio.endpoints
        ]
        self.sets = [SetSpec(s.id, s.capacity, s.servers) for s in self.kamailio.sets]
        self.desired: Desired | None = None
        self.settled = False
        self.store_errors = 0
        self._seen: set[str] = set()
        health = config.health
        self.startup_grace_s = config.ami.connect_timeout_s + health.heartbeat_interval_s * (
            health.heartbeat_misses + 1
        )
        self._started_at = clock()
        self._warned: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """The watch loop and one publisher task per endpoint, until ``stop``."""
        async with asyncio.TaskGroup() as group:
            for publisher in self.publishers:
                group.create_task(publisher.run(stop), name=f"kamailio-{publisher.endpoint.name}")
            group.create_task(self._watch(stop), name="kamailio-watch")

    async def _watch(self, stop: asyncio.Event) -> None:
        next_document = 0.0
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("kamailio: watch tick failed (carrying on)")
            now = self.clock()
            if now >= next_document:
                next_document = now + 1.0
                await self._publish_document()
            try:
                await asyncio.wait_for(stop.wait(), self.kamailio.poll_interval_s)
            except TimeoutError:
                continue

    async def tick(self) -> Desired | None:
        """Read the live view once and offer the desired state (None when not publishing)."""
        leading = self.is_leader is None or self.is_leader()
        for publisher in self.publishers:
            if leading:
                publisher.resume()
            else:
                publisher.pause()
        if not leading:
            return None
        try:
            states = await self.store.servers()
        except BalancerError as exc:
            # Fail static: Kamailio keeps what it has; no view is no reason to empty it.
            self.store_errors += 1
            if self.store_errors == 1 or self.store_errors % 100 == 0:
                log.error("kamailio: no live view (%d times so far): %s", self.store_errors, exc)
            return None
        views = [server_view(state, self.config) for state in states]
        for view in views:
            if view.health == "up":
                self._seen.add(view.server_ip)
        if not self.settled:
            in_grace = self.clock() - self._started_at < self.startup_grace_s
            if in_grace and not all(v.server_ip in self._seen for v in views):
                return None
            self.settled = True
        uris = {v.server_ip: self.kamailio.uri(v.server_ip) for v in views}
        desired = build_desired(
            views,
            self.sets,
            uris,
            self.desired,
            self.clock(),
            loopback_only=bool(os.environ.get(LOOPBACK_ONLY_ENV)),
        )
        for problem in desired.skipped:
            if problem not in self._warned:
                self._warned.add(problem)
                log.warning("kamailio: destination left out: %s", problem)
        self.desired = desired
        for publisher in self.publishers:
            publisher.offer(desired)
        return desired

    def document(self) -> dict[str, Any]:
        """What `status` and `vici-balancer kamailio` show of this daemon's publishing."""
        desired = self.desired
        sets = []
        for spec in self.kamailio.sets:
            wanted = desired.sets.get(spec.id, ()) if desired else ()
            sets.append(
                {
                    "id": spec.id,
                    "capacity": spec.capacity,
                    "destinations": [
                        {
                            "duid": w.duid,
                            "server_ip": w.server_ip,
                            "uri": w.uri,
                            "active": w.active,
                            "spare": w.spare,
                            "reason": w.reason,
                        }
                        for w in wanted
                    ],
                }
            )
        return {
            "version": DOCUMENT_VERSION,
            "daemon": self.name,
            "generated_at": round(time.time(), 3),
            "algorithm": self.kamailio.algorithm,
            "publish": self.kamailio.publish,
            "publishing": self.is_leader is None or self.is_leader(),
            "settled": self.settled,
            "skipped": list(desired.skipped) if desired else [],
            "sets": sets,
            "endpoints": [p.document() for p in self.publishers],
        }

    async def _publish_document(self) -> None:
        ttl = max(3.0, self.config.redis.state_ttl_s)
        try:
            text = json.dumps(self.document())
            await self.store.put_document(kamailio_document(self.name), text, ttl)
        except BalancerError as exc:
            log.debug("kamailio: cannot publish the document: %s", exc)
