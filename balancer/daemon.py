"""The daemon: registry refresh, one AMI session per server, channel tracking, state publishing.

Layering: `vici-balancer run` → `lifecycle.run(config)` → `Daemon.serve()`. Tests call `serve()`
directly with a stop event. Every task is held in a TaskGroup; nothing is fire-and-forget.
`rebalance_once` is the same cycle run once (for cron).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from balancer.agents.login_flags import LoginFlagKeeper
from balancer.ami.fabric import Fabric
from balancer.balance.cycle import BalanceCycle, CycleResult
from balancer.balance.executor import Executor
from balancer.balance.leader import Leadership
from balancer.balance.model import ServerInfo
from balancer.carriers.failover import Failover
from balancer.carriers.health import CarrierHealth
from balancer.carriers.routing import PlacedCall
from balancer.config import Config
from balancer.db import queries, records, schema
from balancer.db.connection import Connection
from balancer.db.worker import DbWorker
from balancer.errors import AmiError, BalancerError
from balancer.kamailio.sync import KamailioSync
from balancer.live.registry import Registry, WatchedServer, trunk_names
from balancer.live.tracker import TRACKED_EVENTS, Classifier, Tracker
from balancer.ops.metrics import KAMAILIO_LAG_BUCKETS_S, CycleStats, Histogram
from balancer.ops.retention import Retention
from balancer.store.base import Health, ServerMeta, StateStore
from balancer.store.factory import open_store
from balancer.store.keys import BALANCE_SUMMARY, SERVERS_DOCUMENT
from balancer.store.memory import MemoryStore
from balancer.web.server import WebServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSnapshot:
    """What one registry refresh reads from the database (four queries, one round on the worker)."""

    servers: list[records.ServerRow]
    carriers: list[records.CarrierRow]
    phones: dict[str, set[str]]
    updater_ages: dict[str, float]


def read_cluster(conn: Connection) -> ClusterSnapshot:
    """The registry's inputs, read on the DB worker thread."""
    return ClusterSnapshot(
        servers=queries.load_servers(conn),
        carriers=queries.load_carriers(conn),
        phones=queries.load_phone_extensions(conn),
        updater_ages=queries.load_updater_ages(conn),
    )


@dataclass
class Counters:
    """Totals for the shutdown summary line."""

    started_at: float = field(default_factory=time.monotonic)
    registry_refreshes: int = 0
    registry_failures: int = 0
    snapshots: int = 0
    snapshot_failures: int = 0


def event_filters() -> tuple[str, ...]:
    """AMI Filter whitelist: only the events the tracker uses cross the wire (Asterisk 13+)."""
    # \s ends the name, so "Hangup" does not also let "HangupRequest" through.
    return (f"Event: ({'|'.join(TRACKED_EVENTS)})\\s",)


class Daemon:
    """Tracks every server of the cluster into the state store until stopped."""

    def __init__(self, config: Config, store: StateStore | None = None) -> None:
        self.config = config
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._own_store = store is None
        self.store = store if store is not None else open_store(config.redis)
        self.registry = Registry(config.ami)
        self.tracker = Tracker(self.store, config.health)
        self.fabric = Fabric(config.ami, config.health, self.tracker, event_filters())
        self.counters = Counters()
        self.watched: dict[str, WatchedServer] = {}
        self.ready = asyncio.Event()  # set after the first registry refresh
        db_url, timeout = config.database.url, config.database.connect_timeout_s
        # Registry refresh, login flags and the leader lease share one connection and thread;
        # the cycle's writes get their own: a slow cycle never delays the lease renewal or the
        # registry, and shutdown can wait for exactly the write in flight.
        self._db = DbWorker(db_url, timeout)
        self._balance_db = DbWorker(db_url, timeout)
        self.leadership = Leadership(self._db, self.name, config.balance.lock_ttl_s)
        # Pruning runs on a connection of its own: it never delays a cycle or a lease renewal.
        self._retention_db = DbWorker(db_url, timeout)
        self.retention = Retention(
            config.retention, self._retention_db, lambda: self.leadership.leading
        )
        # Carrier health hears events before failover does: failover asks it for the next carrier.
        self.carrier_health = CarrierHealth(config.carriers, config.routes, config.routing)
        self.failover = Failover(
            config.routing,
            self.carrier_health,
            fence=lambda: self.leadership.fence,
            on_fence_lost=self.leadership.lost,
        )
        self.failover.snapshot = lambda: (
            None if self.last_cycle is None else self.last_cycle.snapshot
        )
        self.failover.alternates = self._retry_servers
        self.failover.host_server_ip = config.balance.host_server_ip
        self.tracker.add_listener(self.carrier_health)
        self.tracker.add_listener(self.failover)
        self.cycle: BalanceCycle | None = None
        self.last_cycle: CycleResult | None = None
        self.keeper: LoginFlagKeeper | None = None
        self.cycle_stats = CycleStats()
        self.http: WebServer | None = None  # metrics, status API and dashboard
        self.reloads = 0
        # [kamailio]: the dispatcher follows the live view (reads the store, like status).
        self.kamailio: KamailioSync | None = None
        self.kamailio_lag = Histogram(KAMAILIO_LAG_BUCKETS_S)

    async def serve(self, stop: asyncio.Event | None = None, balance: bool | None = None) -> None:
        """Run until ``stop`` is set (or the task is cancelled), then shut down in order.

        ``balance`` (default: the config's balance.enabled) adds leader election and the cycle.
        """
        stop = stop or asyncio.Event()
        balance = self.config.balance.enabled if balance is None else balance
        if balance:
            # an outdated schema of our own tables is named with its fix, before anything runs
            try:
                await self._db.run(schema.require_current)
            except BalancerError:
                for worker in (self._db, self._balance_db, self._retention_db):
                    await worker.close()
                raise
        executor = Executor(
            self._balance_db,
            fence=lambda: self.leadership.fence,
            on_fence_lost=self.leadership.lost,
            router=self.carrier_health,
            host_server_ip=self.config.balance.host_server_ip,
        )
        self.cycle = BalanceCycle(self.config, self.store, self._balance_db, executor)
        log.info(
            "daemon %s starting: database %s, state %s",
            self.name,
            self.config.database.url,
            "memory://" if self.config.redis.is_memory else self.config.redis.url.split("@")[-1],
        )
        try:
            if self.config.http.listen is not None:
                # Its own DB connection (for the decision log): the dashboard never queues
                # behind the registry refresh or a cycle's writes.
                db = self.config.database
                self.http = WebServer(self.config.http, db=DbWorker(db.url, db.connect_timeout_s))
                await self.http.start(self)
            async with asyncio.TaskGroup() as group:
                group.create_task(self.tracker.run_flusher(stop), name="flusher")
                group.create_task(self._registry_loop(stop), name="registry")
                group.create_task(self._snapshot_loop(stop), name="snapshots")
                group.create_task(self._reconcile_loop(stop), name="reconcile")
                group.create_task(self._heartbeat_loop(stop), name="heartbeat")
                group.create_task(
                    self.carrier_health.run_publisher(
                        self.store, stop, (lambda: self.leadership.leading) if balance else None
                    ),
                    name="carrier-health",
                )
                if balance:
                    group.create_task(self.failover.run(stop, self._balance_db), name="failover")
                    group.create_task(self._balance_loop(stop), name="balance")
                    group.create_task(self.leadership.run(stop), name="leader")
                    group.create_task(self.retention.run(stop), name="retention")
                # Only the leader writes login flags when balancing; a tracking-only daemon
                # (manage_login_flags on) keeps them itself. Its last pass runs at shutdown.
                self.keeper = LoginFlagKeeper(
                    self.config,
                    self.store,
                    self._db,
                    is_leader=(lambda: self.leadership.leading) if balance else None,
                )
                group.create_task(self.keeper.run(stop), name="login-flags")
                if self.config.kamailio is not None:
                    self.kamailio = KamailioSync(
                        self.config,
                        self.store,
                        self.name,
                        is_leader=(lambda: self.leadership.leading) if balance else None,
                        lag=self.kamailio_lag,
                    )
                    group.create_task(self.kamailio.run(stop), name="kamailio")
                await stop.wait()
        finally:
            await self._shutdown()

    def _retry_servers(self, call: PlacedCall) -> list[ServerInfo]:
        """Where a failed call may be re-placed when no carrier is left on its own server: the
        other active, balance-active servers that are UP, not drained and have trunk lines to
        spare by the last cycle's live view, most spare lines first."""
        if self.cycle is None or self.last_cycle is None:
            return []
        live = self.cycle.live
        spare: list[tuple[int, str, ServerInfo]] = []
        for ip, server in self.last_cycle.snapshot.servers.items():
            view = live.get(ip)
            if (
                ip == call.server_ip
                or view is None
                or not (server.active and server.balance_active)
            ):
                continue
            if view.health is not Health.UP or view.drained:
                continue
            free = server.max_trunks - server.offlimits - view.trunk_lines
            if free > 0:
                spare.append((-free, ip, server))
        return [server for _, _, server in sorted(spare)]

    async def reload(self, new: Config) -> list[str]:
        """Apply a new configuration without dropping AMI sessions (SIGHUP).

        Routes, carriers, caps, intervals, health and balance settings apply at once (sessions
        pick up new AMI timeouts on their next connection); a server whose address or credentials
        changed is reconnected by the registry refresh that follows. The database and Redis
        settings need a restart: the running ones are kept and the returned notes say so.
        """
        notes: list[str] = []
        if new.database != self.config.database:
            notes.append("[database] changes need a restart; the running settings are kept")
            new = replace(new, database=self.config.database)
        if new.http != self.config.http:
            notes.append("[http] changes need a restart; the running listener is kept")
            new = replace(new, http=self.config.http)
        if new.redis != self.config.redis:
            notes.append("[redis] changes need a restart; the running settings are kept")
            new = replace(new, redis=self.config.redis)
        if new.kamailio != self.config.kamailio:
            notes.append("[kamailio] changes need a restart; the running settings are kept")
            new = replace(new, kamailio=self.config.kamailio)
        self.config = new
        self.registry.ami = new.ami
        self.tracker.health_config = new.health
        self.fabric.ami, self.fabric.health = new.ami, new.health
        for session in self.fabric.sessions.values():
            session.ami, session.health_config = new.ami, new.health
        if self.cycle is not None:
            self.cycle.config = new
            self.cycle.executor.host_server_ip = new.balance.host_server_ip
        self.failover.host_server_ip = new.balance.host_server_ip
        if self.keeper is not None:
            self.keeper.config = new
        self.leadership.ttl_s = new.balance.lock_ttl_s
        self.carrier_health.reconfigure(new.carriers, new.routes, new.routing)
        self.failover.routing = new.routing
        self.retention.config = new.retention
        self.reloads += 1
        await self.refresh_registry()
        return notes

    async def _shutdown(self) -> None:
        if self.http is not None:
            await self.http.close()
        # Order: deciding stopped with the balance task (the TaskGroup above); the transaction
        # in flight finishes on its worker thread; the lease was released by the leader task;
        # then AMI sessions close and the rest is flushed.
        await self._balance_db.close()
        await self._retention_db.close()
        await self.leadership.release()
        for server_ip, session in (await self.fabric.close()).items():
            self.tracker.set_reconnects(server_ip, session.reconnects)  # the final count
        with contextlib.suppress(TimeoutError, BalancerError):
            await asyncio.wait_for(self.tracker.flush(), 2.0)
        await self._db.close()
        if self._own_store:
            await self.store.close()
        log.info(
            "daemon %s stopped after %.0fs: %d servers watched, %d events, %d reconnects, "
            "%d snapshots (%d failed), %d registry refreshes (%d failed), %d store errors, "
            "%d balance cycles, %d calls placed, %d leadership changes",
            self.name,
            time.monotonic() - self.counters.started_at,
            len(self.watched),
            self.tracker.events_total,
            self.fabric.reconnects,
            self.counters.snapshots,
            self.counters.snapshot_failures,
            self.counters.registry_refreshes,
            self.counters.registry_failures,
            self.tracker.store_errors,
            self.cycle.cycles if self.cycle else 0,
            self.cycle.calls_placed if self.cycle else 0,
            self.leadership.changes,
        )

    # ------------------------------------------------------------------ loops

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> bool:
        """Sleep unless stopped first; True when it is time to stop."""
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _every(
        self,
        stop: asyncio.Event,
        interval_s: Callable[[], float],
        work: Callable[[], Awaitable[None]],
        what: str,
    ) -> None:
        """Run ``work`` now and then every ``interval_s()`` (read each time, so a reload applies)
        until stopped; failures are only logged."""
        while True:
            try:
                await work()
            except Exception:
                log.exception("%s failed (the daemon carries on)", what)
            if await self._sleep(stop, interval_s()):
                return

    async def _registry_loop(self, stop: asyncio.Event) -> None:
        async def refresh() -> None:
            try:
                await self.refresh_registry()
            finally:
                self.ready.set()

        await self._every(
            stop, lambda: self.config.ami.registry_refresh_s, refresh, "registry refresh"
        )

    async def refresh_registry(self) -> None:
        """Re-read the servers table and bring sessions and tracking in step with it."""
        try:
            cluster = await self._db.run(read_cluster)
        except BalancerError as exc:
            self.counters.registry_failures += 1
            log.error("registry refresh failed, keeping %d servers: %s", len(self.watched), exc)
            return
        self.counters.registry_refreshes += 1
        names = trunk_names(self.config.carriers, cluster.carriers)
        self.tracker.classifier = Classifier(names, cluster.phones)
        watched = self.registry.watched(cluster.servers)
        for server_ip in set(self.watched) - set(watched):
            self.tracker.remove_server(server_ip)
            try:
                await self.store.forget_server(server_ip)
            except BalancerError as exc:
                log.error("cannot forget server %s in the store: %s", server_ip, exc)
        for server_ip, server in watched.items():
            self.tracker.add_server(
                server_ip,
                ServerMeta(
                    server_id=server.server_id,
                    address=server.endpoint.address,
                    max_trunks=server.max_trunks,
                ),
            )
            self.tracker.set_updater_age(server_ip, cluster.updater_ages.get(server_ip))
        self.watched = watched
        self.carrier_health.update_registry(names, cluster.carriers, watched)
        await self.fabric.sync({ip: w.endpoint for ip, w in watched.items()})
        await self._publish_servers(cluster.servers)

    async def _publish_servers(self, rows: list[records.ServerRow]) -> None:
        """Every servers row, tracked or not and why not, for `status` (which reads only the
        store): a server the registry does not watch is still listed."""
        untracked = self.registry.untracked(rows)
        doc = [
            {
                "server_ip": row.server_ip,
                "server_id": row.server_id,
                "active": row.active,
                "active_asterisk_server": row.active_asterisk_server,
                "active_agent_login_server": row.active_agent_login_server,
                "tracked": row.server_ip in self.watched,
                "why_untracked": untracked.get(row.server_ip),
            }
            for row in rows
        ]
        ttl = max(3 * self.config.ami.registry_refresh_s, self.config.redis.state_ttl_s)
        try:
            await self.store.put_document(SERVERS_DOCUMENT, json.dumps(doc), ttl)
        except BalancerError as exc:
            log.error("cannot publish the servers document: %s", exc)

    async def settled(self, timeout_s: float) -> None:
        """Wait (at most timeout_s) until every watched server was snapshotted or failed once."""
        deadline = time.monotonic() + timeout_s
        await asyncio.wait_for(self.ready.wait(), timeout_s)
        while time.monotonic() < deadline:
            pending = [
                ip
                for ip, session in self.fabric.sessions.items()
                if ip not in self.tracker.snapshotted
                and session.attempts <= 1
                and session.failures == 0
            ]
            if not pending:
                break
            await asyncio.sleep(0.02)
        await self.tracker.flush()

    async def _snapshot_loop(self, stop: asyncio.Event) -> None:
        pending: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                request = asyncio.ensure_future(self.tracker.next_snapshot_request())
                stopped = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait(
                    {request, stopped}, return_when=asyncio.FIRST_COMPLETED
                )
                stopped.cancel()
                if request not in done:
                    request.cancel()
                    break
                task = asyncio.create_task(self._snapshot(request.result()))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _snapshot(self, server_ip: str) -> None:
        try:
            items = await self.fabric.snapshot(server_ip)
        except AmiError as exc:
            self.counters.snapshot_failures += 1
            self.tracker.cancel_snapshot(server_ip)
            log.debug("snapshot of %s failed: %s", server_ip, exc)
            return
        self.counters.snapshots += 1
        await self.tracker.apply_snapshot(server_ip, items)

    async def _balance_loop(self, stop: asyncio.Event) -> None:
        """Run a cycle every cycle_interval_s while leading. A stop ends the cycle at its next
        call boundary: the call in flight is finished, claimed leads not dialed go back to READY
        and the calls placed are stored, so nothing waits for a repair step."""
        assert self.cycle is not None
        cycle = self.cycle
        while not stop.is_set():
            if self.leadership.leading:
                work = asyncio.create_task(cycle.run(), name="balance-cycle")
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not work.done():
                    cycle.executor.request_stop()
                    await asyncio.gather(work, return_exceptions=True)
                    if not work.cancelled() and work.exception() is None:
                        self.last_cycle = work.result()
                    return
                if work.exception() is not None:
                    log.error("balance cycle failed: %s", work.exception())
                else:
                    self.last_cycle = work.result()
                    self.cycle_stats.observe(self.last_cycle)
                    await self._publish_summary(cycle, self.last_cycle)
            if await self._sleep(stop, self.config.balance.cycle_interval_s):
                return

    async def _publish_summary(self, cycle: BalanceCycle, result: CycleResult) -> None:
        ttl = max(3 * self.config.balance.cycle_interval_s, self.config.redis.state_ttl_s)
        try:
            summary = cycle.summary(result)
            summary["leader"] = {"name": self.name, "epoch": self.leadership.epoch}
            await self.store.put_document(BALANCE_SUMMARY, json.dumps(summary), ttl)
        except BalancerError as exc:
            log.error("cannot publish the balance summary: %s", exc)

    async def _reconcile_loop(self, stop: asyncio.Event) -> None:
        async def reconcile() -> None:
            for server_ip, session in self.fabric.sessions.items():
                if session.connected:
                    self.tracker.request_snapshot(server_ip)

        if not await self._sleep(stop, self.config.ami.reconcile_interval_s):
            await self._every(
                stop, lambda: self.config.ami.reconcile_interval_s, reconcile, "reconcile"
            )

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        async def beat() -> None:
            for server_ip, session in self.fabric.sessions.items():
                self.tracker.set_reconnects(server_ip, session.reconnects)
            await self.tracker.publish_meta()
            try:
                await self.store.touch_daemon(self.name, self.config.redis.state_ttl_s)
            except BalancerError as exc:
                log.error("state store heartbeat failed: %s", exc)

        def interval() -> float:
            return min(self.config.health.heartbeat_interval_s, self.config.redis.state_ttl_s / 3)

        await self._every(stop, interval, beat, "heartbeat")


async def rebalance_once(config: Config, *, dry_run: bool = False) -> CycleResult:
    """Exactly one cycle of the daemon's own code (for cron), then exit.

    Live state comes from the shared store when a daemon keeps it fresh there. Otherwise this
    process tracks the servers briefly itself (into a private in-process store) — but only when
    the cycle needs live state: live mode, or carrier routing for calls it will place. A
    faithful-mode plan (a dry run, or a real one without routes) uses VICIdial's own arithmetic
    and opens no AMI session at all. Unless it is a dry run it must hold the leader lease like
    any daemon, so a cron one-shot and a running daemon never both place calls.
    """
    store = open_store(config.redis)
    tracking: Daemon | None = None
    stop = asyncio.Event()
    serving: asyncio.Task[None] | None = None
    db = DbWorker(config.database.url, config.database.connect_timeout_s)
    name = f"oneshot:{socket.gethostname()}:{os.getpid()}"
    leadership = Leadership(db, name, config.balance.lock_ttl_s)
    try:
        live_store = store
        routes_calls = bool(config.routes) and not config.routing.bypass_balance_calls
        needs_live = config.balance.mode == "live" or (routes_calls and not dry_run)
        if not dry_run:
            await db.run(schema.require_current)
        if needs_live and (config.redis.is_memory or not await store.daemons()):
            tracking = Daemon(config, store=MemoryStore(config.redis.state_ttl_s))
            serving = asyncio.create_task(tracking.serve(stop, balance=False))
            settle_s = config.ami.connect_timeout_s + 2 * config.ami.action_timeout_s
            try:
                await tracking.settled(settle_s)
            except TimeoutError:
                log.warning("not every server answered within %.0fs; planning anyway", settle_s)
            live_store = tracking.store
        if not dry_run:
            await leadership.try_acquire()
        # Carrier health is known only when this process tracked the servers itself; beside a
        # running daemon the calls keep the campaign's dial prefix (that daemon routes its own).
        router = tracking.carrier_health if tracking is not None else None
        executor = Executor(
            db,
            fence=lambda: leadership.fence,
            on_fence_lost=leadership.lost,
            router=router,
            host_server_ip=config.balance.host_server_ip,
        )
        return await BalanceCycle(config, live_store, db, executor).run(dry_run=dry_run)
    finally:
        await leadership.release()
        await db.close()
        if serving is not None:
            stop.set()
            await serving
        await store.close()
