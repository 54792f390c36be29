"""Dashboard benchmark: what the HTTP side costs the daemon and the browser with 50 servers.

A daemon (not serving: no AMI, no database) over a real Redis store holding ``--servers``
servers with 5-40 trunk lines each, two carriers configured, and a full 15-minute line history
(180 points). Figures, one JSON line each:
  - server side, per call, ``--runs`` runs after 3 warm-ups (p50/p99 nearest-rank):
      baseline: `build_status` alone (the `status --json` document, what /api/status answers);
      ours: the whole dashboard document (`Feed.build`: status + carriers + placed calls), the
      first message a page gets (with the history) and one /metrics render;
  - bytes to keep one page current for a simulated minute (one tick per second): ours, pushed on
    change, for a quiet cluster (nothing changes) and a busy one (a server's lines change every
    second), against the baseline a page would need without the push: polling /api/status
    every second;
  - the browser: Debian's headless Chromium renders the page while the store changes every
    200 ms for ``--browser-s`` seconds; the page's own counters give renders and ms per render.
Only loopback is used: Redis from VB_BENCH_REDIS_URL (default redis://127.0.0.1:6379/14), keys
under a prefix of their own, removed afterwards. Usage:
  python bench/dashboard.py [--servers 50] [--runs 200] [--browser-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import chromium, js  # the tests' Chromium launcher

from balancer.config import (
    CarrierConfig,
    Config,
    DatabaseConfig,
    HostPort,
    HttpConfig,
    RedisConfig,
)
from balancer.daemon import Daemon
from balancer.db.url import DatabaseUrl
from balancer.live.status import build_status
from balancer.ops.metrics import render
from balancer.store.base import Channel, ChannelClass, Health, ServerMeta
from balancer.store.redis import RedisStore
from balancer.web.feed import Feed, Subscriber
from balancer.web.server import WebServer

PREFIX = "vbbenchdash:"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def timed(fn: Callable[[], Awaitable[Any]], runs: int) -> dict[str, float]:
    for _ in range(3):
        await fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - started) * 1000)
    return {
        "runs": runs,
        "p50_ms": round(pct(samples, 0.5), 3),
        "p99_ms": round(pct(samples, 0.99), 3),
    }


async def put(store: RedisStore, ip: str, n: int, trunks: int) -> None:
    await store.set_meta(
        ip,
        ServerMeta(
            server_id=f"ast{n}",
            address=f"127.0.0.1:{5000 + n}",
            health=Health.UP,
            last_event_at=time.time(),
            rtt_ms=0.4,
            max_trunks=48,
        ),
    )
    carriers = ("alpha", "beta")
    channels = [
        Channel(f"{n}.{i}", f"SIP/{carriers[i % 2]}-{i:08x}", ChannelClass.TRUNK, carriers[i % 2])
        for i in range(trunks)
    ]
    await store.replace_channels(ip, channels)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", type=int, default=50)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--browser-s", type=float, default=10.0)
    args = parser.parse_args()
    url = os.environ.get("VB_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    rng = random.Random(16)
    config = Config(
        database=DatabaseConfig(DatabaseUrl("127.0.0.1", 3306, "x", "x"), "bench"),
        redis=RedisConfig(url=url, key_prefix=PREFIX, state_ttl_s=600),
        carriers=(CarrierConfig("alpha", "7"), CarrierConfig("beta", "8")),
    )
    store = RedisStore(url, PREFIX)
    ips = [f"10.50.{n // 250}.{n % 250 + 1}" for n in range(args.servers)]
    daemon = Daemon(config, store=store)
    common = {"bench": "dashboard", "servers": args.servers}
    try:
        await store.touch_daemon(daemon.name, 600)
        for n, ip in enumerate(ips, start=1):
            await put(store, ip, n, rng.randint(5, 40))
            daemon.tracker.add_server(ip, ServerMeta(server_id=f"ast{n}", max_trunks=48))
        feed = Feed(daemon, None)
        now = time.time()
        for k in range(180):  # a full 15-minute history, as after 15 minutes of running
            feed.history.add(now - 900 + 5 * k, {ip: rng.randint(5, 40) for ip in ips})

        status_ms = await timed(lambda: build_status(store, "bench"), args.runs)
        print(
            json.dumps({**common, "figure": "baseline: status document (/api/status)", **status_ms})
        )
        build_ms = await timed(lambda: feed.build(time.time()), args.runs)
        print(json.dumps({**common, "figure": "ours: dashboard document (one push)", **build_ms}))
        first = await feed.initial()
        first_ms = await timed(feed.initial, args.runs)
        print(
            json.dumps(
                {
                    **common,
                    "figure": "ours: first message (with history)",
                    **first_ms,
                    "bytes": len(first),
                }
            )
        )
        metrics = await render(daemon)
        metrics_ms = await timed(lambda: render(daemon), args.runs)
        print(
            json.dumps(
                {**common, "figure": "ours: /metrics render", **metrics_ms, "bytes": len(metrics)}
            )
        )

        # one simulated minute, one tick per second, a page connected
        status_bytes = len(json.dumps(await build_status(store, "bench")))
        for busy in (False, True):
            sub = Subscriber(asyncio.Queue(1000))
            feed.subscribers = {sub}
            start = time.time()
            feed.history = replace_history(feed, start)
            for second in range(60):
                if busy:
                    n = second % len(ips)
                    await put(store, ips[n], n + 1, rng.randint(5, 40))
                await feed.tick(start + second)
            pushed = []
            kind = "busy" if busy else "quiet"
            while not sub.queue.empty():
                message = sub.queue.get_nowait()
                assert message is not None
                pushed.append(len(message))
            print(
                json.dumps(
                    {
                        **common,
                        "figure": f"ours: pushed in a minute, {kind} cluster",
                        "messages": len(pushed),
                        "bytes": sum(pushed),
                    }
                )
            )
        feed.subscribers = set()
        print(
            json.dumps(
                {
                    **common,
                    "figure": "baseline: polling /api/status every second for a minute",
                    "messages": 60,
                    "bytes": 60 * status_bytes,
                }
            )
        )
        await browser(daemon, ips, args.browser_s, common, rng)
    finally:
        for ip in ips:
            await store.forget_server(ip)
        await store.close()


def replace_history(feed: Feed, start: float) -> Any:
    """A fresh history whose last point is just before ``start`` (so points fall due every 5 s)."""
    history = type(feed.history)(feed.history.window_s, feed.history.step_s)
    history.add(start - 1, {})
    return history


async def browser(
    daemon: Daemon, ips: list[str], seconds: float, common: dict[str, Any], rng: random.Random
) -> None:
    server = WebServer(HttpConfig(listen=HostPort("127.0.0.1", 0)), feed_tick_s=0.2)
    await server.start(daemon)
    assert server.feed is not None
    now = time.time()
    for k in range(180):
        server.feed.history.add(now - 900 + 5 * k, {ip: rng.randint(5, 40) for ip in ips})
    store = daemon.store
    try:
        with tempfile.TemporaryDirectory() as profile, chromium(Path(profile)) as driver:
            await asyncio.to_thread(driver.get, server.url)
            rows = "return document.querySelectorAll('#servers tr[data-server-ip]').length"
            deadline = time.monotonic() + 20
            while await js(driver, rows) != len(ips):
                assert time.monotonic() < deadline, "the page never listed every server"
                await asyncio.sleep(0.1)
            await js(driver, "window.vbRenderStats = {renders: 0, totalMs: 0, maxMs: 0}")
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                assert isinstance(store, RedisStore)
                await put(store, ips[n % len(ips)], n % len(ips) + 1, rng.randint(5, 40))
                n += 1
                await asyncio.sleep(0.2)
            stats = await js(driver, "return window.vbRenderStats")
    finally:
        await server.close()
    renders = int(stats["renders"])
    print(
        json.dumps(
            {
                **common,
                "figure": "browser: Chromium renders a pushed document (full history)",
                "seconds": seconds,
                "renders": renders,
                "mean_ms": round(stats["totalMs"] / max(1, renders), 2),
                "max_ms": round(stats["maxMs"], 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
