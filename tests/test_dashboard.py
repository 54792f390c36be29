"""The dashboard in a real browser: Debian's headless Chromium against a running daemon.

Three simulated Asterisk servers with VICIdial's command sender, real MariaDB and Redis, the
daemon balancing and serving HTTP on loopback. The page must follow the cluster by itself (the
daemon pushes over server-sent events): every server listed, a breaker opened by cause-34
failures, decisions with reasons, `drain` from the command line, and a server killed in the
simulator turning DOWN, all without a reload. It ends with the screenshot the README shows.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import struct
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest_asyncio
from browser import chromium, js, until
from conftest import execute
from fixtures_sim import start_cluster
from prometheus_client.parser import text_string_to_metric_families
from selenium.webdriver.common.by import By
from tracking_helpers import eventually, health_is, make_config, running
from web_helpers import daemon_with, put_server

from balancer.carriers.routing import BreakerState
from balancer.config import (
    BalanceConfig,
    CarrierConfig,
    Config,
    HostPort,
    HttpConfig,
    RouteConfig,
    RoutingConfig,
)
from balancer.daemon import Daemon
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.sim.model import SimCarrier
from balancer.sim.seed import SeedCampaign, SeedServer, seed_campaigns, seed_servers
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health
from balancer.store.memory import MemoryStore
from balancer.web.server import WebServer

IPS = ("10.30.0.1", "10.30.0.2", "10.30.0.3")
SHORT, S2, S3 = IPS  # SHORT reports the shortage, so the balance calls go to S2 and S3
PREFIX = "vbdash:"
VICI = [sys.executable, "-m", "balancer.cli"]
# Set to a path (the README's image is docs/dashboard.png) to keep the screenshot there.
SCREENSHOT_ENV = "VB_DASHBOARD_SCREENSHOT"


@pytest_asyncio.fixture
async def cluster(database_url: DatabaseUrl) -> AsyncIterator[list[SimAsterisk]]:
    """Three simulated servers with carriers alpha (7) and beta (8) and their command senders."""
    carriers = [SimCarrier("alpha", "7"), SimCarrier("beta", "8")]
    async with AsyncExitStack() as stack:
        yield await start_cluster(
            stack, database_url, IPS, carriers=carriers, call_duration_s=300, answer_delay_s=0.02
        )


def dashboard_config(database_url: DatabaseUrl, redis_url: str) -> Config:
    config = make_config(database_url, redis_url=redis_url, prefix=PREFIX)
    return replace(
        config,
        balance=BalanceConfig(enabled=True, cycle_interval_s=0.5, lock_ttl_s=3.0),
        carriers=(CarrierConfig("alpha", "7"), CarrierConfig("beta", "8", servers=IPS)),
        routes=(RouteConfig("default", (("alpha",), ("beta",))),),
        # a breaker that opens stays open for the whole test
        routing=RoutingConfig(failure_threshold=3, cool_down_s=300.0),
        http=HttpConfig(listen=HostPort("127.0.0.1", 0)),
    )


def seed(db: Connection, sims: list[SimAsterisk]) -> None:
    seed_servers(
        db,
        [
            SeedServer(s.server_ip, s.host, s.port, server_id=f"dial{n}", max_trunks=24)
            for n, s in enumerate(sims, start=1)
        ],
    )
    campaign = SeedCampaign("CAMPD", leads=40, agents_on=SHORT, shortages={SHORT: 8})
    seed_campaigns(db, [campaign], calls_per_second=20)
    execute(
        db,
        "INSERT INTO vicidial_server_carriers (carrier_id, carrier_name, protocol, dialplan_entry,"
        " server_ip, active) VALUES ('alpha', 'Alpha', 'SIP', %s, '0.0.0.0', 'Y')",
        "exten => _7X.,1,Dial(SIP/${EXTEN:1}@alpha,,tTo)",
    )


def cli_config(tmp_path: Path, database_url: DatabaseUrl, redis_url: str) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(
        f'[database]\nurl = "{database_url.unmasked()}"\n'
        f'[redis]\nurl = "{redis_url}"\nkey_prefix = "{PREFIX}"\n'
    )
    return path


async def cli(config: Path, *args: str) -> str:
    """Run the real command line in another process; its output."""
    env = {**os.environ, "VICI_BALANCER_LOOPBACK_ONLY": "1"}
    done = await asyncio.to_thread(
        subprocess.run,
        [*VICI, "--config", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def row(ip: str, expression: str) -> str:
    """JS: ``expression`` over the server's row ``r`` (false while the row is missing)."""
    return (
        f"const r = document.querySelector('#servers tr[data-server-ip=\"{ip}\"]');"
        f" return !!r && ({expression});"
    )


def shown_health(ip: str, health: str) -> str:
    return row(
        ip,
        f"r.dataset.health === '{health}'"
        f" && r.querySelector('.badge.health').textContent === '{health.upper()}'",
    )


async def full_page_png(driver: Any) -> bytes:
    """The whole page, not only the window (Chromium's own capture, over DevTools)."""
    size = await js(
        driver,
        "const e = document.documentElement;"
        " return [Math.max(e.scrollWidth, window.innerWidth), e.scrollHeight]",
    )
    shot = await asyncio.to_thread(
        driver.execute_cdp_cmd,
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
        },
    )
    return base64.b64decode(shot["data"])


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_the_page_follows_the_cluster_without_a_reload(
    tmp_path: Path,
    db: Connection,
    database_url: DatabaseUrl,
    redis_db: str,
    cluster: list[SimAsterisk],
) -> None:
    seed(db, cluster)
    for sim in cluster:
        sim.set_carrier_state("alpha", fail_cause=34)  # congestion: a trunk failure
    daemon = Daemon(dashboard_config(database_url, redis_db))
    async with running(daemon):
        assert daemon.http is not None and daemon.http.feed is not None
        feed = daemon.http.feed
        feed.history.step_s = 1.0  # a chart with some points within the test
        feed.decisions_every_s = 0.5
        url = daemon.http.url
        for ip in IPS:
            await eventually(lambda ip=ip: health_is(daemon.store, ip, Health.UP), timeout=10)
        with chromium(tmp_path / "profile") as driver:
            await asyncio.to_thread(driver.get, url)
            assert await js(driver, "return document.title") == "vici-balancer"

            # every server is listed, with its id, UP
            for ip in IPS:
                await until(driver, shown_health(ip, "up"), f"{ip} UP")
            ids = await js(
                driver,
                "return [...document.querySelectorAll('#servers tr[data-server-ip]')]"
                ".map(r => r.querySelector('.sid').textContent).sort()",
            )
            assert ids == ["dial1", "dial2", "dial3"]
            assert await until(driver, row(S2, "r.textContent.includes('/ 24')"), "max trunks")
            # Everything below must arrive over the stream: a reload would lose this marker.
            await js(driver, "window.vbSamePage = 'yes'")

            # cause-34 failures open alpha's breaker on a server the calls went to
            async def alpha_open() -> bool:
                return any(
                    daemon.carrier_health.state("alpha", ip) is BreakerState.OPEN for ip in IPS
                )

            await eventually(alpha_open, timeout=20)
            opened = next(
                ip for ip in IPS if daemon.carrier_health.state("alpha", ip) is BreakerState.OPEN
            )
            chip = (
                f'const c = document.querySelector(\'#carriers tr[data-carrier="alpha"]'
                f' .chip[data-server="{opened}"]\');'
                " return !!c && c.dataset.state === 'open' && c.textContent.includes('OPEN')"
            )
            await until(driver, chip, f"alpha's breaker OPEN on {opened}")
            reason = await js(
                driver,
                f"return document.querySelector('#carriers .chip[data-server=\"{opened}\"]')"
                ".textContent",
            )
            assert "trunk failures" in reason

            # the balance calls are on the page: decisions with reasons, calls per server
            await until(
                driver,
                "return document.querySelectorAll('#decisions tbody tr[data-kind]').length > 0",
                "decisions from vb_decision_log",
            )
            kinds = await js(
                driver,
                "return [...document.querySelectorAll('#decisions tr[data-kind]')]"
                ".map(r => r.dataset.kind)",
            )
            assert {"balance", "failover"} & set(kinds), kinds
            await until(
                driver,
                "return document.querySelector('#campaigns tr[data-campaign=\"CAMPD\"]')",
                "the campaign of the last cycle",
            )

            # `drain` from the command line (another process, through Redis) shows
            config = cli_config(tmp_path, database_url, redis_db)
            await cli(config, "drain", S2, "--reason", "maintenance")
            await until(driver, shown_health(S2, "drained"), f"{S2} DRAINED")
            await cli(config, "undrain", S2)
            await until(driver, shown_health(S2, "up"), f"{S2} UP again")

            # a server killed in the simulator turns DOWN
            await cluster[2].stop()
            await until(driver, shown_health(S3, "down"), f"{S3} DOWN")
            assert await js(driver, "return document.querySelector('#t-up').textContent") == (
                "2 / 3"
            )
            assert await js(driver, "return window.vbSamePage") == "yes"

            # /metrics, as Prometheus reads it, agrees
            metrics_url = url + "metrics"
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(metrics_url, timeout=5).read().decode()
            )
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

            def sample(name: str, **labels: str) -> float:
                found = [
                    v
                    for (n, ls), v in samples.items()
                    if n == name and set(labels.items()) <= set(ls)
                ]
                assert len(found) == 1, (name, labels, found)
                return found[0]

            p = "vici_balancer_"
            assert sample(p + "server_health", server_ip=S3, state="down") == 1
            assert sample(p + "server_health", server_ip=SHORT, state="up") == 1
            breaker = {"carrier": "alpha", "server_ip": opened}
            assert sample(p + "carrier_breaker_state", **breaker, state="open") == 1
            assert sample(p + "carrier_breaker_state", **breaker, state="closed") == 0
            assert sample(p + "leader") == 1
            # ... and so does the page: this daemon leads, under the database lease's epoch
            epoch = daemon.leadership.epoch
            assert epoch is not None
            await until(
                driver,
                f"return document.querySelector('#role').textContent === 'leader · epoch {epoch}'",
                f"the leader badge with epoch {epoch}",
            )

            # the screenshot for the README: three servers, one of them down
            await until(
                driver,
                row(SHORT, "document.querySelectorAll('#servers tr[data-server-ip]').length===3"),
                "three rows",
            )
            if os.environ.get(SCREENSHOT_ENV):
                await asyncio.sleep(2.5)  # a few more chart points for the README
            png = await full_page_png(driver)
    shot = tmp_path / "dashboard.png"
    shot.write_bytes(png)
    width, _ = png_size(png)
    assert width >= 1000
    keep = os.environ.get(SCREENSHOT_ENV)
    if keep:
        shutil.copyfile(shot, keep)


async def test_fifty_servers_behind_a_token(tmp_path: Path) -> None:
    """50 servers stay usable (no sideways scrolling, filter, sort), and the token opens the page
    once through the address bar, then travels as a cookie with the page and its stream."""
    store = MemoryStore(60)
    daemon = await daemon_with(store, 50)
    await put_server(store, "10.40.0.17", 17, trunks=2, health=Health.DOWN)
    token = "dashboard-token-0123456789"
    server = WebServer(HttpConfig(listen=HostPort("127.0.0.1", 0), token=token))
    await server.start(daemon)
    try:
        with chromium(tmp_path / "profile") as driver:
            await asyncio.to_thread(driver.get, server.url)
            assert "token is required" in await js(driver, "return document.body.innerText")
            await asyncio.to_thread(driver.get, server.url + f"?token={token}")
            assert await js(driver, "return location.href") == server.url  # token gone
            count = "return document.querySelectorAll('#servers tr[data-server-ip]').length"
            await until(driver, f"{count} === 50", "50 server rows")
            await until(
                driver, "return document.getElementById('stream').textContent === 'live'", "live"
            )
            # problems first: the DOWN server heads the list
            first = "return document.querySelector('#servers tr[data-server-ip]').dataset.serverIp"
            assert await js(driver, first) == "10.40.0.17"
            overflow = "return document.documentElement.scrollWidth - window.innerWidth"
            assert await js(driver, overflow) <= 0, "the page scrolls sideways at 1360 px"
            await asyncio.to_thread(driver.find_element(By.ID, "filter").send_keys, "10.40.0.4")
            visible = (
                "return [...document.querySelectorAll('#servers tr[data-server-ip]')]"
                ".filter(r => !r.hidden).map(r => r.dataset.serverIp)"
            )
            shown = await js(driver, visible)
            assert sorted(shown) == ["10.40.0.4", *(f"10.40.0.{n}" for n in range(40, 50))]
            await js(
                driver,
                "const s = document.getElementById('sort');"
                " s.value = 'load'; s.dispatchEvent(new Event('change'))",
            )
            assert (await js(driver, visible))[0] == "10.40.0.49"  # the most lines first
    finally:
        await server.close()
