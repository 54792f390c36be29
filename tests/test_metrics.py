"""Prometheus metrics: a daemon tracking simulated servers into real Redis, scraped over real HTTP.

The exposition is read back with prometheus_client's own text parser (what Prometheus-compatible
tooling reads), so the tests check the format, not substrings of it.
"""

from __future__ import annotations

import asyncio
import math
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from tracking_helpers import eventually, health_is, make_config, running, seed_phones, seed_server

from balancer.balance.executor import ExecutionReport
from balancer.config import HostPort, HttpConfig
from balancer.daemon import Daemon
from balancer.db.calls import CallResult
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.errors import BalancerError
from balancer.ops.metrics import (
    CONTENT_TYPE,
    EventRate,
    Histogram,
    bucket_bound,
    render,
)
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health, ServerMeta
from balancer.store.memory import MemoryStore
from balancer.store.redis import RedisStore
from balancer.web.server import WebServer

NO_DB = DatabaseUrl("127.0.0.1", 3306, "x", "x")
P = "vici_balancer_"

# --------------------------------------------------------------------------- reading it back


@dataclass
class Family:
    name: str  # as exposed: counters keep their _total
    kind: str
    samples: list[tuple[str, dict[str, str], float]]

    def value(self, **labels: str) -> float:
        """The one sample whose labels include ``labels``."""
        found = [v for _, ls, v in self.samples if all(ls.get(k) == x for k, x in labels.items())]
        assert len(found) == 1, f"{self.name}{labels}: {len(found)} samples in {self.samples}"
        return found[0]


def parse(text: str) -> dict[str, Family]:
    """Families by their exposed name, from prometheus_client's parser; checks our naming."""
    families: dict[str, Family] = {}
    for family in text_string_to_metric_families(text):
        # The parser strips a counter's _total from the family name (OpenMetrics style).
        name = family.name + "_total" if family.type == "counter" else family.name
        assert name.startswith(P), name
        assert family.documentation, f"{name}: no HELP"
        assert name not in families, f"{name} twice"
        samples = [(s.name, dict(s.labels), float(s.value)) for s in family.samples]
        for sample_name, _, _ in samples:
            if family.type == "histogram":
                assert sample_name in {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                assert sample_name == name, (sample_name, name)
        families[name] = Family(name, family.type, samples)
    return families


# --------------------------------------------------------------------------- HTTP helpers


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str


async def http(port: int, raw: bytes, timeout: float = 5.0, eof: bool = False) -> Reply | None:
    """Send raw bytes (then EOF if asked), read to EOF; None when the server closed unanswered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if eof:
            writer.write_eof()
        data = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return None
    finally:
        writer.close()
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if not raw.startswith(b"HEAD "):
        assert int(headers["content-length"]) == len(body)
    return Reply(status, headers, body.decode("utf-8"))


async def get(port: int, path: str = "/metrics") -> Reply:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    reply = await http(port, request.encode())
    assert reply is not None
    return reply


async def scrape(port: int) -> dict[str, Family]:
    reply = await get(port)
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == CONTENT_TYPE
    return parse(reply.body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_asyncio.fixture
async def sims() -> AsyncIterator[list[SimAsterisk]]:
    servers = [SimAsterisk(f"10.10.0.{i}", call_duration_s=60) for i in (1, 2)]
    for sim in servers:
        await sim.start()
    yield servers
    for sim in servers:
        await sim.stop()


class FakeCarrierHealth:
    """The interface metrics expects from the carrier-health engine."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str | None, str]] = []

    def states(self) -> list[tuple[str, str | None, str]]:
        return self.rows


def placed_call(server_ip: str, n: int) -> CallResult:
    return CallResult(n, 1, f"V{n}", n, n, server_ip, "CAMP1", "9", "Local/9@default", "LIST_CID")


# --------------------------------------------------------------------------- end to end


async def test_scrape_tracking_daemon_over_http(
    db: Connection, database_url: DatabaseUrl, redis_db: str, sims: list[SimAsterisk]
) -> None:
    for sim in sims:
        seed_server(db, sim, max_trunks=23)
        seed_phones(db, sim.server_ip, ["101"])
    daemon = Daemon(make_config(database_url, redis_url=redis_db, prefix="vbm:"))
    stats = daemon.cycle_stats
    breakers = FakeCarrierHealth()
    # The real engine stays wired in; only the breaker states metrics read are scripted.
    daemon.carrier_health.states = breakers.states  # type: ignore[method-assign]
    server = WebServer(HttpConfig(listen=HostPort("127.0.0.1", 0)), sample_interval_s=0.05)
    async with running(daemon):
        await server.start(daemon)
        try:
            for sim in sims:
                await eventually(lambda s=sim: health_is(daemon.store, s.server_ip, Health.UP))
            await sims[0].originate("93125550001")
            await sims[0].originate("93125550002")
            sims[1].add_agent_channel("101")

            families: dict[str, Family] = {}

            async def lines_seen() -> bool:
                nonlocal families
                families = await scrape(server.port)
                lines = families.get(P + "server_lines")
                return (
                    lines is not None
                    and lines.value(server_ip="10.10.0.1", **{"class": "trunk"}) == 2
                    and lines.value(server_ip="10.10.0.2", **{"class": "agent"}) == 1
                )

            await eventually(lines_seen)
            f = families
            assert f[P + "server_lines"].kind == "gauge"
            trunk = {"class": "trunk"}
            assert (
                f[P + "server_lines"].value(server_ip="10.10.0.1", server_id="ast1", **trunk) == 2
            )
            assert f[P + "server_carrier_lines"].value(server_ip="10.10.0.1", carrier="alpha") == 2
            assert f[P + "server_max_trunks"].value(server_ip="10.10.0.2") == 23
            for ip in ("10.10.0.1", "10.10.0.2"):
                health = f[P + "server_health"]
                assert health.value(server_ip=ip, state="up") == 1
                assert health.value(server_ip=ip, state="suspect") == 0
                assert health.value(server_ip=ip, state="down") == 0
                assert f[P + "server_ami_connected"].value(server_ip=ip) == 1
                assert f[P + "server_ami_reconnects_total"].value(server_ip=ip) == 0
                assert f[P + "server_drained"].value(server_ip=ip) == 0
                assert 0 <= f[P + "server_ami_rtt_seconds"].value(server_ip=ip) < 1
            assert f[P + "server_ami_reconnects_total"].kind == "counter"
            assert f[P + "events_total"].value() >= 3
            assert f[P + "events_per_second"].kind == "gauge"
            assert f[P + "leader"].value() == 0
            assert f[P + "state_store_up"].value() == 1
            assert f[P + "servers_watched"].value() == 2
            assert f[P + "up"].value() == 1
            assert f[P + "info"].value(store="redis", mode="live") == 1
            assert P + "carrier_breaker_state" not in f  # no breaker reports a state yet

            # a dropped AMI connection counts as a reconnect of that server only
            await sims[1].drop_clients()

            async def reconnected() -> bool:
                nonlocal families
                families = await scrape(server.port)
                reconnects = families[P + "server_ami_reconnects_total"]
                connected = families[P + "server_ami_connected"]
                return (
                    reconnects.value(server_ip="10.10.0.2") >= 1
                    and connected.value(server_ip="10.10.0.2") == 1
                )

            await eventually(reconnected)
            assert families[P + "server_ami_reconnects_total"].value(server_ip="10.10.0.1") == 0

            # leadership, cycles, calls placed and breakers
            assert await daemon.leadership.try_acquire()
            stats.observe_seconds(0.03)
            report = ExecutionReport("c1")
            report.results.extend([placed_call("10.10.0.1", 1), placed_call("10.10.0.1", 2)])
            report.results.append(placed_call("10.10.0.2", 3))
            stats.observe(SimpleNamespace(seconds=0.7, report=report, skipped=None))  # type: ignore[arg-type]
            breakers.rows = [("alpha", "10.10.0.1", "open"), ("beta", None, "closed")]
            f = await scrape(server.port)
            assert f[P + "leader"].value() == 1
            hist = f[P + "cycle_duration_seconds"]
            assert hist.kind == "histogram"
            assert hist.value(le="0.05") == 1 and hist.value(le="0.5") == 1
            assert hist.value(le="1") == 2 and hist.value(le="+Inf") == 2
            count = [v for n, _, v in hist.samples if n.endswith("_count")]
            total = [v for n, _, v in hist.samples if n.endswith("_sum")]
            assert count == [2] and math.isclose(total[0], 0.73)
            placed = f[P + "calls_placed_total"]
            assert placed.value(server_ip="10.10.0.1", carrier="") == 2
            assert placed.value(server_ip="10.10.0.2", carrier="") == 1
            breaker = f[P + "carrier_breaker_state"]
            assert breaker.value(carrier="alpha", server_ip="10.10.0.1", state="open") == 1
            assert breaker.value(carrier="alpha", server_ip="10.10.0.1", state="closed") == 0
            assert breaker.value(carrier="beta", server_ip="", state="closed") == 1
            await daemon.leadership.release()
            assert (await scrape(server.port))[P + "leader"].value() == 0

            # a standard client agrees
            url = f"http://127.0.0.1:{server.port}/metrics"
            with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == CONTENT_TYPE
                assert P + "server_lines" in parse(response.read().decode())
        finally:
            await server.close()


# --------------------------------------------------------------------------- HTTP edges


@pytest_asyncio.fixture
async def idle_server() -> AsyncIterator[tuple[Daemon, WebServer]]:
    """An HTTP server over a daemon that is not serving (no database needed)."""
    daemon = Daemon(make_config(NO_DB), store=MemoryStore())
    http_config = HttpConfig(listen=HostPort("127.0.0.1", 0))
    server = WebServer(http_config, max_request_bytes=1024, request_timeout_s=1)
    await server.start(daemon)
    yield daemon, server
    await server.close()


async def test_other_paths_404_other_methods_405(
    idle_server: tuple[Daemon, WebServer],
) -> None:
    _, server = idle_server
    for path in ("/metricsx", "/favicon.ico", "/metrics/", "/static/../server.py", "/api"):
        reply = await get(server.port, path)
        assert reply.status == 404, path
    close = "Host: 127.0.0.1\r\nConnection: close\r\n"
    post = await http(
        server.port, f"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n{close}\r\n".encode()
    )
    assert post is not None and post.status == 405
    assert set(post.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    head = await http(server.port, f"HEAD /metrics HTTP/1.1\r\n{close}\r\n".encode())
    assert head is not None and head.status == 200 and head.body == ""
    assert int(head.headers["content-length"]) > 0
    query = await get(server.port, "/metrics?name[]=x")
    assert query.status == 200


async def test_garbage_and_stalled_clients_do_not_kill_the_server(
    idle_server: tuple[Daemon, WebServer],
) -> None:
    _, server = idle_server
    stalled = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    stalled[0][1].write(b"GET /metr")  # half a request, then nothing
    garbage = await http(server.port, b"\x00\xff\xfe nonsense\r\n\r\n")
    assert garbage is not None and garbage.status == 400
    oversized = await http(server.port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 5000)
    assert oversized is None or oversized.status in (400, 431)
    early_close = await http(
        server.port, b"GET /metrics HTT", eof=True
    )  # EOF before a whole request
    assert early_close is None
    # the stalled connections do not hold anyone up ...
    assert (await scrape(server.port))[P + "up"].value() == 1
    # ... and are cut off after the request timeout
    for reader, writer in stalled:
        assert await asyncio.wait_for(reader.read(), 3) in (b"",)
        writer.close()
    assert (await scrape(server.port))[P + "up"].value() == 1
    assert server.scrapes >= 2


async def test_busy_port_names_the_listen_key(idle_server: tuple[Daemon, WebServer]) -> None:
    daemon, server = idle_server
    taken = HostPort("127.0.0.1", server.port)
    for key in ("http.listen", "metrics.listen"):
        other = WebServer(HttpConfig(listen=taken, listen_key=key))
        with pytest.raises(BalancerError, match=rf"{key} 127\.0\.0\.1:{server.port}"):
            await other.start(daemon)
        await other.close()


async def test_store_down_still_answers_without_line_metrics() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "vbm:")
    daemon = Daemon(make_config(NO_DB), store=store)
    daemon.tracker.add_server("10.10.0.9", ServerMeta(server_id="ast9", max_trunks=5))
    try:
        families = parse((await render(daemon)).decode())
    finally:
        await store.close()
    assert families[P + "state_store_up"].value() == 0
    assert P + "server_lines" not in families
    assert families[P + "server_health"].value(server_ip="10.10.0.9", state="down") == 1
    assert families[P + "server_max_trunks"].value(server_ip="10.10.0.9") == 5


# --------------------------------------------------------------------------- units


async def test_label_values_are_escaped() -> None:
    daemon = Daemon(make_config(NO_DB), store=MemoryStore())
    weird = 'a"b\\c\nd'
    daemon.tracker.add_server("10.10.0.7", ServerMeta(server_id=weird))
    text = (await render(daemon)).decode()
    assert 'server_id="a\\"b\\\\c\\nd"' in text
    families = parse(text)
    assert families[P + "server_lines"].value(server_id=weird, **{"class": "trunk"}) == 0


def test_bucket_bounds_keep_their_spelling() -> None:
    assert [bucket_bound(b) for b in (0.01, 0.25, 1.0, 60.0, math.inf)] == [
        "0.01",
        "0.25",
        "1",
        "60",
        "+Inf",
    ]


def test_histogram_buckets_are_cumulative() -> None:
    hist = Histogram((0.1, 1.0, 10.0))
    for value in (0.05, 0.1, 0.5, 20.0):
        hist.observe(value)
    assert hist.cumulative() == [(0.1, 2), (1.0, 3), (10.0, 3), (math.inf, 4)]
    assert hist.count == 4 and math.isclose(hist.sum, 20.65)
    with pytest.raises(ValueError):
        Histogram(())


def test_event_rate_rolls_over_its_window() -> None:
    now = [0.0]
    rate = EventRate(window_s=10, clock=lambda: now[0])
    rate.sample(0)
    assert rate.rate() == 0.0
    for second in range(1, 21):
        now[0] = float(second)
        rate.sample(second * 100)
    assert rate.rate() == pytest.approx(100.0)
    for second in range(21, 31):  # the flow stops: the rate falls within the window
        now[0] = float(second)
        rate.sample(2000)
    assert rate.rate() == pytest.approx(0.0)
    now[0] = 31.0
    rate.sample(5)  # a restarted counter never yields a negative rate
    assert rate.rate() == 0.0


async def test_urllib_sees_404() -> None:
    daemon = Daemon(make_config(NO_DB), store=MemoryStore())
    server = WebServer(HttpConfig(listen=HostPort("127.0.0.1", 0)))
    await server.start(daemon)
    try:
        url = f"http://127.0.0.1:{server.port}/nope"
        with pytest.raises(urllib.error.HTTPError) as info:
            await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)
        assert info.value.code == 404
        info.value.close()
    finally:
        await server.close()
