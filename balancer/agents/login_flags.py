"""Keeps `servers.active_agent_login_server` in step with health, drain and agent capacity.

VICIdial's agent screen only sends agents to servers whose flag is 'Y': this flag is the lever
by which the balancer steers logins it does not choose itself. The keeper closes the
flag of a server that is DOWN, DRAINED, has a stale server_updater or is at agent capacity, and
re-opens it once the server has been UP for a settle time and is below capacity by the
hysteresis margin. It re-opens only flags it closed itself (vb_login_flags), so an
administrator's own 'N' is never touched. On stop it makes one last pass without settle time or
margin, so the flags it leaves behind say what is true at that moment. After each pass it
publishes the flags it holds closed, and why, for `status` (LOGIN_FLAGS_DOCUMENT).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from balancer.agents.facts import AgentTables, ServerFacts, build_facts
from balancer.agents.flag_rules import (
    FlagChange,
    FlagSettings,
    decide_login_flags,
    flags_document,
)
from balancer.config import Config
from balancer.db import agents as db_agents
from balancer.db.connection import Connection
from balancer.db.worker import DbWorker
from balancer.errors import BalancerError
from balancer.store.base import Health, StateStore
from balancer.store.keys import LOGIN_FLAGS_DOCUMENT

log = logging.getLogger(__name__)


def flag_settings(config: Config) -> FlagSettings:
    """The decision thresholds from the configuration."""
    health = config.health
    return FlagSettings(
        hysteresis_pct=config.agents.hysteresis_pct,
        settle_s=health.heartbeat_interval_s * health.heartbeat_misses,
        updater_max_age_s=health.server_updater_max_age_s if health.check_server_updater else None,
    )


class LoginFlagKeeper:
    """Periodically reconciles the login flags with the live truth (one DB round per pass)."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        db: DbWorker,
        *,
        is_leader: Callable[[], bool] | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.db = db
        self.settings = flag_settings(config)
        # With several daemons, only the leader needs to act (the writes are safe either way).
        self.is_leader = is_leader
        self.interval_s = interval_s or config.health.heartbeat_interval_s
        self.clock = clock
        self.wall_clock = wall_clock
        # A fresh daemon reports every server DOWN until its first login: until a server has
        # been seen UP, or this grace has passed, its DOWN means "not known yet".
        health = config.health
        beats = health.heartbeat_interval_s * (health.heartbeat_misses + 1)
        self.startup_grace_s = config.ami.connect_timeout_s + beats
        self._started_at = clock()
        self._seen_up: set[str] = set()
        self._up_since: dict[str, float] = {}
        self._led_last_pass = False
        self.passes = 0
        self.changes_applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every interval until ``stop``; then one final pass."""
        if not self.config.agents.manage_login_flags:
            log.info("login flags: agents.manage_login_flags is off; not managing them")
            return
        while True:
            try:
                await self.reconcile_once()
            except BalancerError as exc:
                log.error("login flag pass failed (the keeper carries on): %s", exc)
            except Exception:
                log.exception("login flag pass failed (the keeper carries on)")
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                continue
            break
        if self.is_leader is None or self._led_last_pass:
            try:
                await asyncio.wait_for(self.reconcile_once(final=True), 5.0)
            except Exception:
                log.exception("login flags: final pass failed")

    async def reconcile_once(self, *, final: bool = False) -> list[FlagChange]:
        """One pass: read the store and the DB, decide, apply; returns the changes applied."""
        leading = self.is_leader is None or self.is_leader()
        if not final:
            self._led_last_pass = leading
        if not leading:
            return []
        states = await self.store.servers()
        drained = await self.store.drained()
        tables: AgentTables = await self.db.run(db_agents.read_flag_tables)
        facts = build_facts(tables, states, drained, self.config.agents)
        now = self.clock()
        in_grace = now - self._started_at < self.startup_grace_s
        healthy_for: dict[str, float] = {}
        for ip, f in list(facts.items()):
            if f.health is Health.UP:
                self._seen_up.add(ip)
                since = self._up_since.setdefault(ip, now)
                healthy_for[ip] = now - since
            else:
                self._up_since.pop(ip, None)
            if f.health is Health.DOWN and in_grace and ip not in self._seen_up:
                facts[ip] = replace(f, health=None)
        orphans = [r for ip, r in tables.flag_records.items() if ip not in tables.servers]
        decided = decide_login_flags(
            facts.values(), self.settings, healthy_for, final=final, orphan_records=orphans
        )
        self.passes += 1
        applied: list[FlagChange] = []
        for change in decided:
            if await self._apply(change):
                applied.append(change)
        if applied:
            # Show the flags as they are now, after this pass's writes.
            tables = await self.db.run(db_agents.read_flag_tables)
            facts = build_facts(tables, states, drained, self.config.agents)
        await self._publish(facts.values(), healthy_for)
        return applied

    async def _publish(self, facts: Iterable[ServerFacts], healthy_for: dict[str, float]) -> None:
        doc = flags_document(facts, self.settings, healthy_for, self.wall_clock())
        # Outlives a few passes, so `status` still sees it between them; gone soon after a stop.
        ttl = max(3 * self.interval_s, self.config.redis.state_ttl_s)
        try:
            await self.store.put_document(LOGIN_FLAGS_DOCUMENT, json.dumps(doc), ttl)
        except BalancerError as exc:
            log.error("login flags: cannot publish them for status: %s", exc)

    async def _apply(self, change: FlagChange) -> bool:
        def write(conn: Connection) -> bool:
            return db_agents.apply_flag_change(conn, change)

        try:
            done = await self.db.run(write, idempotent=False)
        except BalancerError as exc:
            log.error("login flag %s %s failed: %s", change.action, change.server_ip, exc)
            return False
        if done:
            self.changes_applied += 1
            log.info(
                "login flag %s: %s -> %s (%s)",
                change.server_ip,
                change.action,
                change.set_to or "forgotten",
                change.reason,
            )
        return done
