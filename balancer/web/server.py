"""The daemon's one HTTP server (aiohttp, in the daemon's own event loop).

    GET /metrics       Prometheus text format (balancer/ops/metrics.py)
    GET /api/status    the `status --json` document
    GET /api/events    server-sent events: the dashboard document, pushed when it changes
    GET /              the dashboard (static files shipped in the package, no build step)

Requests are bounded: request line and headers in size (aiohttp's parser limits), a whole
request in time (the keep-alive timer runs from the moment a connection opens, so a client that
never finishes its request is cut off), every answer but the event stream in time, and event
streams in number. Off loopback every request needs the token (the config refuses to load
without one): ``Authorization: Bearer <token>``, or once ``/?token=<token>``, which sets an
HttpOnly cookie so the page and its event stream carry it without the token in any later URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Coroutine
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from balancer.config_values import is_loopback
from balancer.db.worker import DbWorker
from balancer.errors import BalancerError
from balancer.ops.metrics import CONTENT_TYPE, EventRate, MetricsSource, render
from balancer.web.feed import Feed, status_document
from balancer.web.settings import HttpConfig

log = logging.getLogger(__name__)
_QUIET = logging.getLogger(f"{__name__}.protocol")
_QUIET.setLevel(logging.CRITICAL)
_QUIET.propagate = False

STATIC = Path(str(resources.files("balancer.web") / "static"))
TOKEN_COOKIE = "vb_token"
STREAM_HEARTBEAT_S = 15.0  # a comment line this often keeps proxies and tunnels from idling out
SECURITY_HEADERS = {
    # Everything the page needs comes from this server: no inline code, nothing from elsewhere.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebServer:
    """Serves the metrics, the status API, the event stream and the dashboard for one daemon."""

    def __init__(
        self,
        http: HttpConfig,
        *,
        db: DbWorker | None = None,  # for the decision log; closed with the server
        max_request_bytes: int = 8192,  # the request line, and each header line
        request_timeout_s: float = 5.0,  # to send a whole request; for any answer but the stream
        max_streams: int = 32,  # dashboard pages connected at once
        sample_interval_s: float = 1.0,
        rate_window_s: float = 10.0,
        feed_tick_s: float = 1.0,
    ) -> None:
        self.http = http
        self.db = db
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.max_streams = max_streams
        self.sample_interval_s = sample_interval_s
        self.feed_tick_s = feed_tick_s
        self.events = EventRate(rate_window_s)
        self.scrapes = 0
        self.feed: Feed | None = None
        self._daemon: MetricsSource | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when configured as 0)."""
        if self._port is None:
            raise BalancerError("http server is not started")
        return self._port

    @property
    def url(self) -> str:
        """http://host:port/ of the dashboard."""
        assert self.http.listen is not None
        host = self.http.listen.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    async def start(self, daemon: MetricsSource) -> None:
        """Listen; BalancerError naming the listen key when that fails or is not allowed."""
        http = self.http
        if http.listen is None:
            raise BalancerError("http.listen: not set")
        key = f"{http.listen_key} {http.listen}"
        if not http.loopback and not http.token:
            raise BalancerError(f"{key}: not a loopback address and no http.token is set")
        self._daemon = daemon
        self.feed = Feed(daemon, self.db, tick_s=self.feed_tick_s)
        runner = web.AppRunner(
            self._app(),
            access_log=None,  # a URL may carry ?token=; requests are not logged
            # aiohttp logs every malformed request with a traceback: anyone who can reach the
            # port could fill the log. They are answered 400; our own errors are logged below.
            logger=_QUIET,
            handle_signals=False,
            shutdown_timeout=1.0,
            keepalive_timeout=self.request_timeout_s,
            max_line_size=self.max_request_bytes,
            max_field_size=self.max_request_bytes,
            max_headers=64,
            # A page that closes its stream is noticed at once (its handler is cancelled), not
            # at the next write: the stream's slot is free again immediately.
            handler_cancellation=True,
        )
        await runner.setup()
        site = web.TCPSite(runner, http.listen.host, http.listen.port, backlog=64)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BalancerError(f"{key}: cannot listen ({exc.strerror or exc})") from None
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._spawn(self._sample_loop(daemon), "http-event-rate")
        self._spawn(self.feed.run(), "dashboard-feed")
        if http.loopback:
            guarded = f", token from {http.token_source}" if http.token else ""
            log.info("http: dashboard and metrics on %s (loopback only%s)", self.url, guarded)
        else:
            log.warning(
                "http: dashboard and metrics on %s: NOT loopback, reachable from the network; "
                "every request must carry the token from %s",
                self.url,
                http.token_source,
            )
        if http.listen_key == "metrics.listen":
            log.warning("metrics.listen is deprecated: rename it to listen under [http]")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """End the event streams, stop listening, stop the background tasks."""
        if self.feed is not None:
            self.feed.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), 3.0)
        db, self.db = self.db, None
        if db is not None:
            await db.close()

    async def _sample_loop(self, daemon: MetricsSource) -> None:
        while True:
            self.events.sample(daemon.tracker.events_total)
            await asyncio.sleep(self.sample_interval_s)

    # ------------------------------------------------------------------ the application

    def _app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._guard],
            client_max_size=self.max_request_bytes,
        )
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._stream)
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", STATIC, follow_symlinks=False, show_index=False)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Token check, a time bound on every answer but the stream, and security headers."""
        http = self.http
        set_cookie = False
        if http.token is None and not _loopback_name(request.headers.get("Host")):
            # Without a token only this machine can connect, but a web page it opens could
            # reach the port through a name that resolves to 127.0.0.1 (DNS rebinding): such
            # a request carries that name as its Host.
            raise web.HTTPForbidden(
                text=f"Host {request.headers['Host']!r} is not a loopback name: open "
                f"http://127.0.0.1:{self.port}/ (through an SSH tunnel from elsewhere)\n"
            )
        if http.token is not None and not _authorized(request, http.token):
            given = request.query.get("token")
            if request.path == "/" and given is not None and _same(given, http.token):
                set_cookie = True
            else:
                raise web.HTTPUnauthorized(
                    text="a token is required (Authorization: Bearer <token>, or open "
                    "/?token=<token> once)\n",
                    headers={"WWW-Authenticate": 'Bearer realm="vici-balancer"'},
                )
        if set_cookie:
            # Take the token out of the address bar (and out of the browser's history).
            response: web.StreamResponse = web.Response(status=303, headers={"Location": "/"})
            response.set_cookie(
                TOKEN_COOKIE, http.token or "", httponly=True, samesite="Strict", path="/"
            )
        elif request.path == "/api/events":
            response = await handler(request)
        else:
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    response = await handler(request)
            except TimeoutError:
                raise web.HTTPServiceUnavailable(text="timed out\n") from None
            except web.HTTPException:
                raise
            except Exception:
                log.exception("http: %s %s failed", request.method, request.path)
                raise web.HTTPInternalServerError(text="failed; see the daemon's log\n") from None
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    def _source(self) -> MetricsSource:
        if self._daemon is None or self.feed is None:
            raise web.HTTPServiceUnavailable(text="not started\n")
        return self._daemon

    async def _metrics(self, request: web.Request) -> web.Response:
        daemon = self._source()
        body = await render(daemon, self.events)
        self.scrapes += 1
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE  # as is: aiohttp would add a charset
        return response

    async def _status(self, request: web.Request) -> web.Response:
        try:
            doc = await status_document(self._source())
        except (BalancerError, TimeoutError) as exc:
            raise web.HTTPServiceUnavailable(
                text=f"the state store did not answer: {exc or 'timeout'}\n"
            ) from None
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self._source()
        assert self.feed is not None
        feed = self.feed
        sub = feed.subscribe(self.max_streams)
        if sub is None:
            raise web.HTTPServiceUnavailable(text="too many dashboard pages connected\n")
        response = web.StreamResponse(
            headers={
                **SECURITY_HEADERS,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # a reverse proxy must not hold events back
            }
        )
        write_timeout = self.request_timeout_s
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")
            await asyncio.wait_for(response.write(await feed.initial()), write_timeout)
            while True:
                try:
                    message = await asyncio.wait_for(sub.queue.get(), STREAM_HEARTBEAT_S)
                except TimeoutError:
                    message = b": keep-alive\n\n"
                if message is None:
                    break
                # A page that stops reading is cut off instead of holding buffers.
                await asyncio.wait_for(response.write(message), write_timeout)
        except (ConnectionError, TimeoutError):
            pass  # the page went away or stalled
        finally:
            feed.unsubscribe(sub)
        return response


def _loopback_name(host: str | None) -> bool:
    """True for a Host header naming this machine (localhost, a loopback IP; any port) or none:
    every browser sends one, so a request without it is no page's."""
    if not host:
        return True
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]").lower()
    return name.endswith(".localhost") or is_loopback(name)


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def _authorized(request: web.Request, token: str) -> bool:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _same(value.strip(), token):
        return True
    cookie = request.cookies.get(TOKEN_COOKIE)
    return cookie is not None and _same(cookie, token)
