"""Detection benchmark: how soon the live view follows a server's failure and its recovery.

The real daemon (`Daemon.serve`: AMI sessions -> tracker -> Redis, and the login-flag keeper ->
MariaDB) watches simulated Asterisk servers on loopback with the production defaults of [ami],
[health] and [agents] (Ping every 1 s, each given 0.5 s, 2 misses; reconnect ceiling 0.5 s
doubling to 30 s; reconcile every 30 s; a login-flag pass every second). It is observed from
outside, as a reader would see it: Redis polled every 10 ms (one pipeline for every server),
`servers.active_agent_login_server` every 20 ms. Faults, at a random phase of the Ping cycle:
  - closed: the server's process ends (connections closed, then refused; calls gone, no Hangup);
  - hung: the server stops as under SIGSTOP (nothing read or written, new connections get no
    banner; on resume it answers what waited), see `SimAsterisk.set_paused`.
Figures, each p50/p99/max (nearest rank) over its trials, with its goal:
  closed -> DOWN; hung -> SUSPECT; hung -> DOWN, also from the last answered Ping (the hard
  bound: interval x misses + timeout = 2.5 s); recovery -> UP after an outage of --outage-s;
  a flapping server (six 1 s outages in a row): answering again -> UP per outage; lost events
  healed on reconnect (calls that vanished with a crashed server) and by the reconcile snapshot
  (channels changed with no events sent, connection kept); the login flag closed after a fault
  and reopened after recovery; leader takeover: two `Daemon.serve()` in child processes on one
  database, the leader SIGKILLed at a random moment -> the other's `daemon.leadership.leading`.
Anchors in the same run, observing the same deaths of the same servers ("anchor" servers, dead
for --anchor-dead-s):
  - VICIdial's phone-login rule: each server's updater writes server_updater.last_update every
    second while the server lives; the rule trusts a row up to 120 s old (checked every 0.5 s);
  - Kamailio's dispatcher at the seed's settings: a probe every 15 s (ds_ping_interval=15), each
    given 5 s (tm fr_timer=5000), 3 failures in a row -> inactive (ds_probing_threshold=3), one
    answer -> active again. The probe connects to the server's port and awaits any reply to a
    request (as OPTIONS: any 2xx-4xx reply counts); a refused connection fails at once, which is
    if anything kinder to Kamailio than UDP OPTIONS to a dead host.

Prints one JSON line per figure. Usage:
  python bench/detect.py [--trial-servers 10] [--rounds 5] [--outage-s 4] [--flap-servers 2]
                         [--flap-sequences 3] [--event-servers 6] [--anchor-servers 10]
                         [--anchor-dead-s 130] [--takeovers 8] [--no-anchors] [--seed 1]
About 3 minutes with the anchors (VICIdial's rule alone needs 2 minutes per death), ~1.5 without.
Only loopback is used: MariaDB from VB_BENCH_DATABASE_URL (default
mysql://vbtest:vbtest@127.0.0.1:3306/vb_bench_detect; it and <name>_lease are created, seeded
and dropped), Redis from VB_BENCH_REDIS_URL (default redis://127.0.0.1:6379/14; keys under a
per-run prefix, deleted after).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis as redis_lib
import redis.asyncio as aioredis
from scratch import bench_database_url, scratch_databases

from balancer.config import (
    AmiConfig,
    BalanceConfig,
    Config,
    DatabaseConfig,
    HealthConfig,
    RedisConfig,
)
from balancer.daemon import Daemon
from balancer.db.connection import Connection, connect
from balancer.db.url import DatabaseUrl, parse_database_url
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health
from balancer.store.keys import Keys
from balancer.store.redis import RedisStore

DEFAULT_DB = "mysql://vbtest:vbtest@127.0.0.1:3306/vb_bench_detect"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
REDIS_POLL_S = 0.01
FLAG_POLL_S = 0.02
CHANNEL_POLL_S = 0.01
WAIT_S = 60.0  # a figure that does not happen within this is reported as missing
# The anchors, at the settings the issue names.
VICIDIAL_MAX_AGE_S = 120
VICIDIAL_UPDATE_S = 1.0
VICIDIAL_CHECK_S = 0.5
KAMAILIO_INTERVAL_S = 15.0
KAMAILIO_TIMEOUT_S = 5.0
KAMAILIO_THRESHOLD = 3
CHILD_ENV = "VB_DETECT_LEASE_CHILD"

HEALTH = HealthConfig()  # production defaults: the figures are about them
AMI = AmiConfig(address_policy="telnet_host")  # defaults, but dial each sim's loopback port


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def figure(
    name: str, samples: list[float], goal_s: float | None, goal: str, **extra: Any
) -> dict[str, Any]:
    """One JSON figure: p50/p99/max of ``samples`` and whether p99 meets ``goal_s``."""
    out: dict[str, Any] = {"bench": "detect", "figure": name, "n": len(samples)}
    if samples:
        out.update(
            p50_s=round(nearest_rank(samples, 0.50), 3),
            p99_s=round(nearest_rank(samples, 0.99), 3),
            max_s=round(max(samples), 3),
        )
    out["goal"] = goal
    if goal_s is not None:
        out["met"] = bool(samples) and nearest_rank(samples, 0.99) <= goal_s
    out.update(extra)
    return out


# --------------------------------------------------------------------------- observers


class RedisWatch:
    """Polls Redis as a reader would and keeps every server's health changes with their time.

    One pipeline of HGETs of the health field (the key names from balancer.store.keys) every
    10 ms: cheap enough not to slow down the process it measures.
    """

    def __init__(self, url: str, prefix: str, ips: list[str]) -> None:
        self.client: aioredis.Redis = aioredis.Redis.from_url(url)
        self.keys = Keys(prefix)
        self.ips = ips
        self.health: dict[str, Health] = {}
        self.changes: dict[str, list[tuple[float, Health]]] = {}
        self.polls = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            async with self.client.pipeline(transaction=False) as pipe:
                for ip in self.ips:
                    pipe.hget(self.keys.meta(ip), "health")
                values = await pipe.execute()
            seen = time.monotonic()  # the write landed before the read returned
            for ip, value in zip(self.ips, values, strict=True):
                if not value:
                    continue
                health = Health(value.decode())
                if self.health.get(ip) is not health:
                    self.health[ip] = health
                    self.changes.setdefault(ip, []).append((seen, health))
            self.polls += 1
            await asyncio.sleep(REDIS_POLL_S)

    async def first(self, ip: str, health: Health, since: float) -> float | None:
        """When ``ip`` was first seen ``health`` after ``since`` (None: not within WAIT_S)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for at, seen in self.changes.get(ip, []):
                if at >= since and seen is health:
                    return at
            await asyncio.sleep(REDIS_POLL_S / 2)
        return None


class LoopLag:
    """How late this process's event loop wakes up: the measuring process's own noise."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            asked = time.monotonic()
            await asyncio.sleep(0.01)
            self.samples.append(time.monotonic() - asked - 0.01)


class DbPoller:
    """A thread running ``poll`` on its own autocommit connection every ``period_s``."""

    def __init__(self, url: DatabaseUrl, name: str, period_s: float) -> None:
        self.url = url
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        conn = connect(self.url)
        try:
            while not self._stop.is_set():
                with conn.cursor() as cur:
                    self.poll(cur)
                self._stop.wait(self.period_s)
        finally:
            conn.close()

    def poll(self, cur: Any) -> None:
        raise NotImplementedError


class FlagWatch(DbPoller):
    """Reads `servers.active_agent_login_server` every 20 ms and keeps each change's time."""

    def __init__(self, url: DatabaseUrl) -> None:
        super().__init__(url, "flag-watch", FLAG_POLL_S)
        self.flags: dict[str, str] = {}
        self.changes: dict[str, list[tuple[float, str]]] = {}

    def poll(self, cur: Any) -> None:
        cur.execute("SELECT server_ip, active_agent_login_server FROM servers")
        rows = cur.fetchall()
        seen = time.monotonic()
        for ip, flag in rows:
            if self.flags.get(ip) != flag:
                self.flags[ip] = flag
                self.changes.setdefault(ip, []).append((seen, flag))

    async def first(self, ip: str, flag: str, since: float) -> float | None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for at, seen in list(self.changes.get(ip, [])):
                if at >= since and seen == flag:
                    return at
            await asyncio.sleep(FLAG_POLL_S / 2)
        return None


@dataclass
class Node:
    """One simulated server, and whether it lives (its VICIdial updater runs only while it does)."""

    sim: SimAsterisk
    group: str
    alive: bool = True

    @property
    def ip(self) -> str:
        return self.sim.server_ip

    async def kill(self, kind: str) -> float:
        """The server dies now; returns when."""
        at = time.monotonic()
        self.alive = False
        if kind == "closed":
            await self.sim.stop()
        else:
            self.sim.set_paused(True)
        return at

    async def revive(self, kind: str) -> float:
        """The server answers again; returns when."""
        if kind == "closed":
            await self.sim.start()
        else:
            self.sim.set_paused(False)
        self.alive = True
        return time.monotonic()


class VicidialAnchor(DbPoller):
    """Each server's updater (server_updater every second while alive) and VICIdial's rule
    (a server is eligible for phone logins while its row is at most 120 s old)."""

    def __init__(self, url: DatabaseUrl, nodes: list[Node]) -> None:
        super().__init__(url, "vicidial", VICIDIAL_CHECK_S)
        self.nodes = nodes
        self.eligible: dict[str, bool] = {}
        self.changes: dict[str, list[tuple[float, bool]]] = {}
        self._last_update = 0.0

    def poll(self, cur: Any) -> None:
        now = time.monotonic()
        if now - self._last_update >= VICIDIAL_UPDATE_S:
            self._last_update = now
            for node in self.nodes:
                if node.alive:
                    cur.execute(
                        "UPDATE server_updater SET last_update = NOW() WHERE server_ip = %s",
                        (node.ip,),
                    )
        cur.execute(
            "SELECT server_ip, last_update >= NOW() - INTERVAL %s SECOND FROM server_updater",
            (VICIDIAL_MAX_AGE_S,),
        )
        rows = cur.fetchall()
        seen = time.monotonic()
        for ip, fresh in rows:
            if self.eligible.get(ip) != bool(fresh):
                self.eligible[ip] = bool(fresh)
                self.changes.setdefault(ip, []).append((seen, bool(fresh)))

    def first(self, ip: str, eligible: bool, since: float) -> float | None:
        for at, seen in self.changes.get(ip, []):
            if at >= since and seen is eligible:
                return at
        return None


class KamailioAnchor:
    """Dispatcher probing: every 15 s each destination gets a probe with 5 s to answer."""

    def __init__(self, nodes: list[Node], rng: random.Random) -> None:
        self.nodes = nodes
        self.offset_s = rng.uniform(0, KAMAILIO_INTERVAL_S)  # the timer's phase is arbitrary
        self.first_tick_at = time.monotonic() + self.offset_s
        self.active: dict[str, bool] = {n.ip: True for n in nodes}
        self.failures: dict[str, int] = {n.ip: 0 for n in nodes}
        self.changes: dict[str, list[tuple[float, bool]]] = {n.ip: [] for n in nodes}

    async def run(self, stop: asyncio.Event) -> None:
        """Probe every destination at each tick of a fixed 15 s timer until stopped."""
        probes: set[asyncio.Task[None]] = set()
        self.first_tick_at = time.monotonic() + self.offset_s
        tick = 0
        while True:
            with contextlib.suppress(TimeoutError):
                due = self.first_tick_at + tick * KAMAILIO_INTERVAL_S - time.monotonic()
                await asyncio.wait_for(stop.wait(), max(0.0, due))
            if stop.is_set():
                break
            for node in self.nodes:
                task = asyncio.create_task(self._probe(node))
                probes.add(task)
                task.add_done_callback(probes.discard)
            tick += 1
        for task in list(probes):
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    def next_tick_after(self, at: float) -> float:
        """When the timer fires next after ``at``."""
        ticks = max(0, math.ceil((at - self.first_tick_at) / KAMAILIO_INTERVAL_S))
        return self.first_tick_at + ticks * KAMAILIO_INTERVAL_S

    async def _probe(self, node: Node) -> None:
        answered = await probe(node.sim.host, node.sim.port)
        done = time.monotonic()
        ip = node.ip
        if answered:
            self.failures[ip] = 0
            if not self.active[ip]:
                self.active[ip] = True
                self.changes[ip].append((done, True))
            return
        self.failures[ip] += 1
        if self.active[ip] and self.failures[ip] >= KAMAILIO_THRESHOLD:
            self.active[ip] = False
            self.changes[ip].append((done, False))

    def first(self, ip: str, active: bool, since: float) -> float | None:
        for at, seen in self.changes.get(ip, []):
            if at >= since and seen is active:
                return at
        return None


async def probe(host: str, port: int) -> bool:
    """One OPTIONS-like probe: any reply to a request within the transaction timeout."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(KAMAILIO_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
            await reader.readline()  # the banner
            writer.write(b"Action: Ping\r\nActionID: probe\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")  # "Permission denied" is a reply too (a 4xx)
        return True
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# --------------------------------------------------------------------------- the run


@dataclass
class Results:
    samples: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    by_flap: dict[int, list[float]] = field(default_factory=dict)

    def add(self, name: str, start: float, end: float | None) -> None:
        if end is None:
            self.missing[name] = self.missing.get(name, 0) + 1
        else:
            self.samples.setdefault(name, []).append(end - start)


@dataclass
class Run:
    args: argparse.Namespace
    url: DatabaseUrl
    daemon: Daemon
    watch: RedisWatch
    flags: FlagWatch
    reader: RedisStore
    rng: random.Random
    results: Results = field(default_factory=Results)


async def exact(run: Run, node: Node) -> float | None:
    """When the store's channels of ``node`` were first exactly the simulator's (None: never)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        channels = await run.reader.channels(node.ip)
        seen = time.monotonic()
        if set(channels) == set(node.sim.channels):
            return seen
        await asyncio.sleep(CHANNEL_POLL_S)
    return None


async def trial_worker(run: Run, node: Node) -> None:
    """Rounds of: a fault at a random phase, an outage, the recovery; both kinds in turn."""
    r = run.results
    for _ in range(run.args.rounds):
        for kind in ("closed", "hung"):
            await asyncio.sleep(run.rng.uniform(0.0, HEALTH.heartbeat_interval_s))
            if kind == "closed":
                for i in range(2):
                    await node.sim.originate(f"9312555{i:04d}", duration_s=600)
                await exact(run, node)
            session = run.daemon.fabric.sessions[node.ip]
            died = await node.kill(kind)
            down = await run.watch.first(node.ip, Health.DOWN, died)
            r.add(f"{kind} -> DOWN", died, down)
            if kind == "hung":
                r.add("hung -> SUSPECT", died, await run.watch.first(node.ip, Health.SUSPECT, died))
                last = session.last_heartbeat_at
                if down is not None and last is not None:
                    r.add("last answered Ping -> DOWN in Redis", last, down)
                    if session.health_reason.startswith("no answer to"):
                        # The session's own decision: no store write, no polling in it.
                        r.add(
                            "last answered Ping -> DOWN in the session",
                            last,
                            session.health_changed_at,
                        )
            r.add(f"{kind} -> login flag N", died, await run.flags.first(node.ip, "N", died))
            await asyncio.sleep(max(0.0, died + run.args.outage_s - time.monotonic()))
            answers = await node.revive(kind)
            up = await run.watch.first(node.ip, Health.UP, answers)
            r.add(f"answers again -> UP ({kind})", answers, up)
            if up is None:
                continue
            if kind == "closed":
                r.add("lost events healed on reconnect (UP -> exact)", up, await exact(run, node))
            r.add("UP -> login flag Y", up, await run.flags.first(node.ip, "Y", up))


async def flap_worker(run: Run, node: Node) -> None:
    """Sequences of six short outages: each recovery must be as quick as the first."""
    for _ in range(run.args.flap_sequences):
        for flap in range(6):
            died = await node.kill("closed")
            await run.watch.first(node.ip, Health.DOWN, died)
            await asyncio.sleep(max(0.0, died + 1.0 - time.monotonic()))
            answers = await node.revive("closed")
            up = await run.watch.first(node.ip, Health.UP, answers)
            run.results.add("flapping: answers again -> UP", answers, up)
            if up is not None:
                run.results.by_flap.setdefault(flap + 1, []).append(up - answers)
            await asyncio.sleep(0.5)  # it lives half a second, then fails again
        await asyncio.sleep(3.0)


async def events_worker(run: Run, node: Node, until: float) -> None:
    """Lost events on a live connection: healed by the next reconcile snapshot."""
    for i in range(2):
        await node.sim.originate(f"9312556{i:04d}", duration_s=3600)
    await exact(run, node)
    n = 0
    reconcile = run.daemon.config.ami.reconcile_interval_s
    while time.monotonic() + 2 * reconcile + 2 < until:
        await asyncio.sleep(run.rng.uniform(0.0, reconcile))  # a random phase of the reconcile
        node.sim.suppress_events(True)
        lost = time.monotonic()
        victim = next(iter(node.sim.channels), None)
        if victim is not None:
            await node.sim.hangup(victim)
        n += 1
        await node.sim.originate(f"9312557{n:04d}", duration_s=3600)
        healed = await exact(run, node)
        node.sim.suppress_events(False)
        run.results.add("lost events healed by reconcile", lost, healed)


@dataclass
class AnchorDeaths:
    """The anchor servers' deaths, watched by ours, VICIdial's rule and Kamailio's probing."""

    died: dict[str, tuple[str, float]] = field(default_factory=dict)  # ip -> (kind, when)
    answered: dict[str, float] = field(default_factory=dict)


async def anchor_worker(
    run: Run, node: Node, kind: str, deaths: AnchorDeaths, kamailio: KamailioAnchor, phase: float
) -> None:
    """One death at ``phase`` (0..1) of Kamailio's probe cycle, watched by all three."""
    tick = kamailio.next_tick_after(time.monotonic() + 1.0)
    await asyncio.sleep(max(0.0, tick + phase * KAMAILIO_INTERVAL_S - time.monotonic()))
    died = await node.kill(kind)
    deaths.died[node.ip] = (kind, died)
    down = await run.watch.first(node.ip, Health.DOWN, died)
    run.results.add(f"anchor {kind}: ours DOWN", died, down)
    run.results.add(
        f"anchor {kind}: ours login flag N", died, await run.flags.first(node.ip, "N", died)
    )
    await asyncio.sleep(max(0.0, died + run.args.anchor_dead_s - time.monotonic()))
    answers = await node.revive(kind)
    deaths.answered[node.ip] = answers
    session = run.daemon.fabric.sessions[node.ip]
    logins = session.logins

    async def logged_in() -> float | None:
        # The AMI side alone: UP in the store may also wait for a fresh server_updater.
        deadline = time.monotonic() + WAIT_S
        while session.logins == logins and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return time.monotonic() if session.logins > logins else None

    login_at, up_at = await asyncio.gather(
        logged_in(), run.watch.first(node.ip, Health.UP, answers)
    )
    run.results.add(f"anchor {kind}: ours logged in again", answers, login_at)
    run.results.add(f"anchor {kind}: ours UP again", answers, up_at)
    run.results.add(
        f"anchor {kind}: ours login flag Y again",
        answers,
        await run.flags.first(node.ip, "Y", answers),
    )
    # Kamailio needs up to one probe interval to see it back.
    await asyncio.sleep(KAMAILIO_INTERVAL_S + KAMAILIO_TIMEOUT_S + 1)


# --------------------------------------------------------------------------- leader takeover


async def takeover_trials(
    url: DatabaseUrl, redis_url: str, prefix: str, trials: int, rng: random.Random
) -> list[float]:
    """SIGKILL the leader of two `Daemon.serve()` processes; time until the other leads."""
    # The child reads it from its environment: a password never shows in a process list.
    spec = json.dumps({"database": url.unmasked(), "redis": redis_url, "prefix": prefix})
    children: list[Child] = []
    takeovers: list[float] = []
    try:
        children.append(await Child.spawn(spec))
        await children[0].wait_leading()
        children.append(await Child.spawn(spec))
        for _ in range(trials):
            leader = next(c for c in children if c.leading)
            standby = next(c for c in children if c is not leader)
            await standby.wait_ready()
            # A random moment of the leader's renewal cycle.
            await asyncio.sleep(2.0 + rng.uniform(0.0, BalanceConfig().lock_ttl_s))
            killed = time.monotonic()
            leader.proc.send_signal(signal.SIGKILL)
            await leader.proc.wait()
            children.remove(leader)
            leads = await standby.wait_leading()
            if leads is not None:
                takeovers.append(leads - killed)
            children.append(await Child.spawn(spec))
    finally:
        for child in children:
            if child.proc.returncode is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in children:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 15)
            if child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()
    return takeovers


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    leading: bool = False
    ready_at: float | None = None
    leading_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def spawn(cls, spec: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--lease-child",
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, CHILD_ENV: spec},
        )
        child = cls(proc)
        child.reader_task = asyncio.create_task(child._read())
        return child

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            report = json.loads(line)
            if "ready" in report:
                self.ready_at = float(report["ready"])
            else:
                self.leading = bool(report["leading"])
                if self.leading:
                    self.leading_at = float(report["t"])
            self.changed.set()
            self.changed = asyncio.Event()

    async def _wait(self, check: Callable[[], float | None]) -> float | None:
        deadline = time.monotonic() + WAIT_S
        while (value := check()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.returncode is not None:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return value

    async def wait_ready(self) -> float | None:
        return await self._wait(lambda: self.ready_at)

    async def wait_leading(self) -> float | None:
        return await self._wait(lambda: self.leading_at if self.leading else None)


async def lease_child() -> None:
    """A daemon in its own process, reporting each change of `daemon.leadership.leading`."""
    spec = json.loads(os.environ[CHILD_ENV])
    url = parse_database_url(spec["database"])
    config = Config(
        database=DatabaseConfig(url, "bench"),
        redis=RedisConfig(url=spec["redis"], key_prefix=spec["prefix"]),
        ami=AMI,
    )
    daemon = Daemon(config)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    def report(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    async def watch() -> None:
        await daemon.ready.wait()
        report(ready=time.monotonic())
        leading = False
        while not stop.is_set():
            if daemon.leadership.leading is not leading:
                leading = daemon.leadership.leading
                report(t=time.monotonic(), leading=leading)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        await daemon.serve(stop, balance=True)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# --------------------------------------------------------------------------- setup and report


def seed(conn: Connection, nodes: list[Node]) -> None:
    with conn.cursor() as cur:
        for n, node in enumerate(nodes, 1):
            cur.execute(
                "INSERT INTO servers (server_id, server_ip, active, active_asterisk_server,"
                " active_agent_login_server, telnet_host, telnet_port, ASTmgrUSERNAME,"
                " ASTmgrSECRET, max_vicidial_trunks, asterisk_version)"
                " VALUES (%s, %s, 'Y', 'Y', 'Y', %s, %s, 'cron', '1234', 100, '18.21.0')",
                (f"ast{n}", node.ip, node.sim.host, node.sim.port),
            )
            cur.execute(
                "INSERT INTO server_updater (server_ip, last_update) VALUES (%s, NOW())",
                (node.ip,),
            )


async def bench(
    args: argparse.Namespace, url: DatabaseUrl, lease_url: DatabaseUrl, redis_url: str
) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    prefix = f"vbbench:detect:{os.getpid()}:"
    groups = [
        ("trial", args.trial_servers),
        ("flap", args.flap_servers),
        ("events", args.event_servers),
    ]
    if args.anchors:
        groups.append(("anchor", args.anchor_servers))
    nodes: list[Node] = []
    for group, count in groups:
        for _ in range(count):
            ip = f"10.20.{len(nodes) // 250}.{len(nodes) % 250 + 1}"
            nodes.append(Node(SimAsterisk(ip, call_duration_s=600), group))
    for node in nodes:
        await node.sim.start()
    conn = connect(url)
    seed(conn, nodes)
    conn.close()
    config = Config(
        database=DatabaseConfig(url, "bench"),
        redis=RedisConfig(url=redis_url, key_prefix=prefix),
        ami=AMI,
        health=HEALTH,
        balance=BalanceConfig(enabled=False),
    )
    daemon = Daemon(config)
    reader = RedisStore(redis_url, prefix, config.redis.state_ttl_s)
    watch = RedisWatch(redis_url, prefix, [n.ip for n in nodes])
    lag = LoopLag()
    flags = FlagWatch(url)
    run = Run(args, url, daemon, watch, flags, reader, rng)
    anchor_nodes = [n for n in nodes if n.group == "anchor"]
    vicidial = VicidialAnchor(url, nodes)
    kamailio = KamailioAnchor(anchor_nodes, rng)
    stop = asyncio.Event()
    serving = asyncio.create_task(daemon.serve(stop, balance=False))
    watching = asyncio.create_task(watch.run(stop))
    lagging = asyncio.create_task(lag.run(stop))
    flags.start()
    vicidial.start()
    probing = asyncio.create_task(kamailio.run(stop))
    deaths = AnchorDeaths()
    takeovers: list[float] = []
    started = time.monotonic()
    try:
        for node in nodes:
            await watch.first(node.ip, Health.UP, 0.0)
        await asyncio.sleep(3.0)  # heartbeats established, first flag pass done
        window_end = time.monotonic() + (
            KAMAILIO_INTERVAL_S + args.anchor_dead_s if args.anchors else 60.0
        )
        work: list[Awaitable[Any]] = []
        work += [trial_worker(run, n) for n in nodes if n.group == "trial"]
        work += [flap_worker(run, n) for n in nodes if n.group == "flap"]
        work += [events_worker(run, n, window_end) for n in nodes if n.group == "events"]
        # Each kind's deaths spread evenly over Kamailio's probe cycle (stratified), so that a
        # handful of them stands for every phase, not for a lucky or an unlucky one.
        for offset, kind in enumerate(("closed", "hung")):
            dying = anchor_nodes[offset::2]
            work += [
                anchor_worker(
                    run, n, kind, deaths, kamailio, (j + rng.uniform(0.0, 1.0)) / len(dying)
                )
                for j, n in enumerate(dying)
            ]

        async def lease() -> None:
            takeovers.extend(
                await takeover_trials(lease_url, redis_url, prefix + "lease:", args.takeovers, rng)
            )

        work.append(lease())
        await asyncio.gather(*work)
    finally:
        stop.set()
        await serving
        await watching
        await lagging
        await probing
        await watch.client.aclose()
        flags.stop()
        vicidial.stop()
        await reader.close()
        for node in nodes:
            await node.sim.stop()
    elapsed = time.monotonic() - started
    return report(run, vicidial, kamailio, deaths, takeovers, elapsed, lag.samples)


def report(
    run: Run,
    vicidial: VicidialAnchor,
    kamailio: KamailioAnchor,
    deaths: AnchorDeaths,
    takeovers: list[float],
    elapsed: float,
    lag: list[float],
) -> list[dict[str, Any]]:
    s, args = run.results.samples, run.args
    bound = HEALTH.heartbeat_interval_s * HEALTH.heartbeat_misses + HEALTH.heartbeat_timeout_s
    settle = HEALTH.heartbeat_interval_s * HEALTH.heartbeat_misses
    reconcile = run.daemon.config.ami.reconcile_interval_s
    ttl = BalanceConfig().lock_ttl_s
    by_flap = sorted(run.results.by_flap.items())
    outage = {"outage_s": args.outage_s}
    # (figure, goal in seconds for p99, the goal in words, extra fields)
    goals: list[tuple[str, float, str, dict[str, Any]]] = [
        ("closed -> DOWN", 1.0, "<= 1 s (DOWN at once)", {}),
        (
            "hung -> SUSPECT",
            1.5 + 0.1,
            "<= interval + timeout = 1.5 s (+ the store write and 10 ms polling)",
            {},
        ),
        ("hung -> DOWN", 3.0, "<= 3 s with margin", {}),
        (
            "last answered Ping -> DOWN in the session",
            bound + 0.01,
            f"<= interval x misses + timeout = {bound:g} s wherever the hang falls"
            " (+ 10 ms of timer precision)",
            {},
        ),
        (
            "last answered Ping -> DOWN in Redis",
            bound + 0.1,
            f"<= {bound:g} s + the store write and 10 ms polling",
            {},
        ),
        (
            "answers again -> UP (closed)",
            args.outage_s,
            "<= the outage so far (the backoff ceiling follows it)",
            outage,
        ),
        ("answers again -> UP (hung)", 1.0, "<= 1 s (the waiting login is answered)", outage),
        (
            "flapping: answers again -> UP",
            1.1,
            "<= ~1 s after each 1 s outage, no growth (was 0.95 -> 30 s)",
            {
                "p50_by_flap_s": {k: round(nearest_rank(v, 0.5), 3) for k, v in by_flap},
                "max_by_flap_s": {k: round(max(v), 3) for k, v in by_flap},
            },
        ),
        ("lost events healed on reconnect (UP -> exact)", 1.0, "<= 1 s (the login snapshot)", {}),
        (
            "lost events healed by reconcile",
            reconcile + 1.0,
            f"<= ami.reconcile_interval_s + 1 = {reconcile + 1:g} s",
            {},
        ),
        ("closed -> login flag N", 1.0 + 1.5, "<= DOWN + one keeper pass (1 s + its work)", {}),
        (
            "hung -> login flag N",
            bound + 1.5,
            f"<= {bound:g} s + one keeper pass (1 s + its work)",
            {},
        ),
        (
            "UP -> login flag Y",
            settle + 1.5,
            f"<= settle ({settle:g} s UP) + one keeper pass (1 s + its work)",
            {},
        ),
    ]
    out = [
        figure(name, s.get(name, []), goal_s, goal, **extra) for name, goal_s, goal, extra in goals
    ]
    out.append(
        figure(
            "leader takeover after SIGKILL",
            takeovers,
            ttl * 4 / 3,
            f"<= balance.lock_ttl_s + one standby retry (ttl/3) = {ttl * 4 / 3:.2f} s",
            lock_ttl_s=ttl,
        )
    )
    if deaths.died:
        for kind in ("closed", "hung"):
            ips = [ip for ip, (k, _) in deaths.died.items() if k == kind]
            dead_vici, dead_kam, back_vici, back_kam = [], [], [], []
            missing = 0
            for ip in ips:
                died = deaths.died[ip][1]
                v, k = vicidial.first(ip, False, died), kamailio.first(ip, False, died)
                missing += (v is None) + (k is None)
                if v is not None:
                    dead_vici.append(v - died)
                if k is not None:
                    dead_kam.append(k - died)
                answered = deaths.answered.get(ip)
                if answered is not None:
                    bv, bk = vicidial.first(ip, True, answered), kamailio.first(ip, True, answered)
                    if bv is not None:
                        back_vici.append(bv - answered)
                    if bk is not None:
                        back_kam.append(bk - answered)
            out += [
                figure(
                    f"anchor {kind}: ours DOWN",
                    s.get(f"anchor {kind}: ours DOWN", []),
                    None,
                    "same deaths as below",
                ),
                figure(
                    f"anchor {kind}: ours login flag N",
                    s.get(f"anchor {kind}: ours login flag N", []),
                    None,
                    "agents stop being sent there",
                ),
                figure(
                    f"anchor {kind}: VICIdial login rule sees it dead",
                    dead_vici,
                    None,
                    f"server_updater older than {VICIDIAL_MAX_AGE_S} s",
                ),
                figure(
                    f"anchor {kind}: Kamailio dispatcher marks it inactive",
                    dead_kam,
                    None,
                    "OPTIONS every 15 s, 5 s timeout, 3 misses",
                ),
                figure(
                    f"anchor {kind}: ours logged in again",
                    s.get(f"anchor {kind}: ours logged in again", []),
                    None,
                    f"AMI side, after {args.anchor_dead_s:g} s dead (backoff at its cap)",
                ),
                figure(
                    f"anchor {kind}: ours UP again",
                    s.get(f"anchor {kind}: ours UP again", []),
                    None,
                    f"after {args.anchor_dead_s:g} s dead",
                ),
                figure(
                    f"anchor {kind}: ours login flag Y again",
                    s.get(f"anchor {kind}: ours login flag Y again", []),
                    None,
                    f"after {args.anchor_dead_s:g} s dead",
                ),
                figure(
                    f"anchor {kind}: VICIdial login rule trusts it again",
                    back_vici,
                    None,
                    "next server_updater write",
                ),
                figure(
                    f"anchor {kind}: Kamailio marks it active again",
                    back_kam,
                    None,
                    "next answered probe",
                ),
            ]
    for name, count in sorted(run.results.missing.items()):
        out.append(
            {
                "bench": "detect",
                "figure": name,
                "missing": count,
                "note": f"not seen within {WAIT_S:g} s",
            }
        )
    out.append(
        {
            "bench": "detect",
            "figure": "run",
            "elapsed_s": round(elapsed, 1),
            "servers": len(run.watch.health),
            "redis_polls": run.watch.polls,
            # How late this process's loop woke up (the daemon, the simulators and the observers
            # share it): a floor under every figure above.
            "loop_lag_p50_ms": round(nearest_rank(lag, 0.5) * 1000, 1) if lag else None,
            "loop_lag_p99_ms": round(nearest_rank(lag, 0.99) * 1000, 1) if lag else None,
            "loop_lag_max_ms": round(max(lag) * 1000, 1) if lag else None,
            "settings": {
                "heartbeat_interval_s": HEALTH.heartbeat_interval_s,
                "heartbeat_misses": HEALTH.heartbeat_misses,
                "heartbeat_timeout_s": HEALTH.heartbeat_timeout_s,
                "reconnect_initial_s": AMI.reconnect_initial_s,
                "reconnect_max_s": AMI.reconnect_max_s,
                "reconcile_interval_s": reconcile,
                "lock_ttl_s": BalanceConfig().lock_ttl_s,
            },
        }
    )
    return out


def delete_keys(redis_url: str, prefix: str) -> None:
    client = redis_lib.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trial-servers", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=5, help="closed + hung faults per trial server"
    )
    parser.add_argument(
        "--outage-s", type=float, default=4.0, help="trial servers stay dead this long"
    )
    parser.add_argument("--flap-servers", type=int, default=2)
    parser.add_argument("--flap-sequences", type=int, default=3, help="runs of six 1 s outages")
    parser.add_argument("--event-servers", type=int, default=6)
    parser.add_argument("--anchor-servers", type=int, default=10)
    parser.add_argument("--anchor-dead-s", type=float, default=130.0)
    parser.add_argument("--takeovers", type=int, default=8)
    parser.add_argument("--no-anchors", dest="anchors", action="store_false")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lease-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lease_child:
        asyncio.run(lease_child())
        return
    if args.anchors and args.anchor_dead_s <= VICIDIAL_MAX_AGE_S + 2:
        raise SystemExit(f"--anchor-dead-s must exceed {VICIDIAL_MAX_AGE_S + 2} s")
    url = bench_database_url(DEFAULT_DB)
    lease_url = url.with_database(f"{url.database}_lease")
    redis_url = os.environ.get("VB_BENCH_REDIS_URL", DEFAULT_REDIS)
    prefix = f"vbbench:detect:{os.getpid()}:"
    try:
        with scratch_databases("bench/detect.py", url, lease_url):
            for line in asyncio.run(bench(args, url, lease_url, redis_url)):
                print(json.dumps(line), flush=True)
    finally:
        delete_keys(redis_url, prefix)


if __name__ == "__main__":
    main()
