"""The HTTP server over real sockets: the status API, the event stream, the token, the limits.

The daemon here is not serving (no database, no AMI): its live state is written into an
in-process store directly, which is all the web side reads.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from tracking_helpers import make_config
from web_helpers import daemon_with, put_server
from yarl import URL

from balancer.config import HostPort, HttpConfig
from balancer.daemon import Daemon
from balancer.db.url import DatabaseUrl
from balancer.errors import BalancerError
from balancer.live.status import build_status
from balancer.store.base import Health
from balancer.store.memory import MemoryStore
from balancer.web.server import STATIC, TOKEN_COOKIE, WebServer

NO_DB = DatabaseUrl("127.0.0.1", 3306, "x", "x")
TOKEN = "t0ken-for-the-tests-0123456789"
LOCAL = HostPort("127.0.0.1", 0)
ROOT = Path(__file__).resolve().parents[1]


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[Daemon, WebServer]]:
    store = MemoryStore(30)
    daemon = await daemon_with(store)
    server = WebServer(HttpConfig(listen=LOCAL), feed_tick_s=0.05)
    await server.start(daemon)
    yield daemon, server
    await server.close()


async def read_event(response: aiohttp.ClientResponse, timeout: float = 5.0) -> dict[str, Any]:
    """The next `dashboard` event's document from an open event stream."""
    event = ""

    async def one() -> dict[str, Any]:
        nonlocal event
        while True:
            line = (await response.content.readline()).decode()
            if not line:
                raise AssertionError("the stream ended")
            line = line.rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "dashboard":
                doc: dict[str, Any] = json.loads(line[6:])
                return doc

    return await asyncio.wait_for(one(), timeout)


def by_ip(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["server_ip"]: s for s in doc["status"]["servers"]}


async def test_status_api_is_the_status_document(served: tuple[Daemon, WebServer]) -> None:
    daemon, server = served
    async with aiohttp.ClientSession() as client, client.get(server.url + "api/status") as reply:
        assert reply.status == 200
        assert reply.headers["Cache-Control"] == "no-store"
        doc = await reply.json()
    expected = await build_status(daemon.store, "memory://")
    for d in (doc, expected):
        d.pop("generated_at")
        for s in d["servers"]:
            s.pop("last_event_age_s")
    assert doc == expected
    assert [s["trunk_lines"] for s in doc["servers"]] == [1, 2]


async def test_the_page_and_its_files_ship_in_the_package(
    served: tuple[Daemon, WebServer],
) -> None:
    _, server = served
    async with aiohttp.ClientSession() as client:
        async with client.get(server.url) as response:
            assert response.status == 200
            page = await response.text()
            csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "http" not in csp  # nothing from another origin
        for name in ("app.js", "style.css"):
            assert f"/static/{name}" in page
            async with client.get(server.url + f"static/{name}") as response:
                assert response.status == 200
                assert (await response.text()) == (STATIC / name).read_text()
    # nothing the page loads comes from the internet
    for path in STATIC.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text, path
        assert "//cdn" not in text and "googleapis" not in text, path
    # and the wheel carries every file: package data covers the folder
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["balancer"]
    for path in STATIC.iterdir():
        relative = path.relative_to(ROOT / "balancer")
        assert any(relative.match(p) for p in patterns), relative


async def test_the_stream_pushes_changes_and_ends_on_close(
    served: tuple[Daemon, WebServer],
) -> None:
    daemon, server = served
    async with (
        aiohttp.ClientSession() as client,
        client.get(server.url + "api/events") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await read_event(response)
        assert "history" in first and first["history"]["window_s"] == 900
        assert set(by_ip(first)) == {"10.40.0.1", "10.40.0.2"}
        assert first["daemon"]["leader"] is False and first["carriers"]
        # a change in the store is pushed without asking
        await daemon.store.set_drained("10.40.0.2", True)
        doc = first
        while by_ip(doc)["10.40.0.2"]["health"] != "drained":
            doc = await read_event(response)
            assert "history" not in doc  # only the first document carries the history
        await put_server(daemon.store, "10.40.0.1", 1, trunks=1, health=Health.DOWN)
        while by_ip(doc)["10.40.0.1"]["health"] != "down":
            doc = await read_event(response)
        await server.close()
        assert await asyncio.wait_for(response.content.read(), 5) is not None
        assert response.content.at_eof()


async def test_streams_are_bounded_in_number() -> None:
    daemon = await daemon_with(MemoryStore(30))
    server = WebServer(HttpConfig(listen=LOCAL), max_streams=1)
    await server.start(daemon)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(server.url + "api/events") as first:
                await read_event(first)
                async with client.get(server.url + "api/events") as second:
                    assert second.status == 503
            # the first page went away: its place is free again
            for _ in range(50):
                if not server.feed or not server.feed.subscribers:
                    break
                await asyncio.sleep(0.05)
            async with client.get(server.url + "api/events") as again:
                assert again.status == 200
                await read_event(again)
    finally:
        await server.close()


async def test_a_token_guards_every_path() -> None:
    daemon = await daemon_with(MemoryStore(30))
    server = WebServer(HttpConfig(listen=LOCAL, token=TOKEN, token_source="http.token"))
    await server.start(daemon)
    paths = ("", "metrics", "api/status", "api/events", "static/app.js")
    try:
        async with aiohttp.ClientSession() as client:
            for path in paths:
                async with client.get(server.url + path) as response:
                    assert response.status == 401, path
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
                    assert TOKEN not in await response.text()
                wrong = {"Authorization": "Bearer not-the-token-at-all-000"}
                async with client.get(server.url + path, headers=wrong) as response:
                    assert response.status == 401, path
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            for path in ("", "metrics", "api/status", "static/app.js"):
                async with client.get(server.url + path, headers=bearer) as response:
                    assert response.status == 200, path
            # the token in the URL only on the page, and only to set the cookie
            async with client.get(server.url + f"metrics?token={TOKEN}") as response:
                assert response.status == 401
        # unsafe: aiohttp's client keeps no cookie from an IP address otherwise
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            url = server.url + f"?token={TOKEN}"
            async with browser.get(url, allow_redirects=False) as response:
                assert response.status == 303 and response.headers["Location"] == "/"
                cookie = response.headers["Set-Cookie"]
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert browser.cookie_jar.filter_cookies(URL(server.url))[TOKEN_COOKIE].value == TOKEN
            async with browser.get(server.url + "api/events") as response:
                assert response.status == 200
                await read_event(response)
    finally:
        await server.close()


async def test_without_a_token_only_loopback_names_are_answered(
    served: tuple[Daemon, WebServer],
) -> None:
    """A page elsewhere cannot read the dashboard through a name it points at 127.0.0.1."""
    _, server = served
    async with aiohttp.ClientSession() as client:
        for host in ("127.0.0.1", "localhost:8080", "[::1]:9108", "127.0.0.2", "x.localhost"):
            async with client.get(server.url + "api/status", headers={"Host": host}) as reply:
                assert reply.status == 200, host
        for host in ("rebind.example.com", "10.0.0.1:9108", "[2001:db8::1]:80"):
            for path in ("", "api/status", "api/events", "metrics"):
                async with client.get(server.url + path, headers={"Host": host}) as reply:
                    assert reply.status == 403, (host, path)
                    assert "not a loopback name" in await reply.text()
    with_token = WebServer(HttpConfig(listen=LOCAL, token=TOKEN))
    await with_token.start(served[0])
    try:
        headers = {"Host": "dash.example.com", "Authorization": f"Bearer {TOKEN}"}
        url = with_token.url + "api/status"
        async with aiohttp.ClientSession() as client, client.get(url, headers=headers) as reply:
            assert reply.status == 200  # the token is the guard here
    finally:
        await with_token.close()


async def test_no_token_off_loopback_refuses_to_start() -> None:
    daemon = Daemon(make_config(NO_DB), store=MemoryStore())
    server = WebServer(HttpConfig(listen=HostPort("0.0.0.0", 0)))
    with pytest.raises(BalancerError, match="not a loopback address"):
        await server.start(daemon)
    await server.close()
