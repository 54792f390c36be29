"""The metrics HTTP server: ``GET /metrics`` for one daemon (asyncio; never blocks the loop).

It answers GET (and HEAD) /metrics with 200, any other path with 404, any other method with 405,
and a request it cannot parse with 400. Requests are bounded in size, time and concurrency, and
each connection is closed after its answer, so a broken or slow client cannot hold the event loop
or the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from balancer.config import HostPort
from balancer.errors import BalancerError
from balancer.ops.metrics import CONTENT_TYPE, EventRate, MetricsSource, render

log = logging.getLogger(__name__)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class MetricsServer:
    """Serves ``GET /metrics`` for one daemon on a TCP address (asyncio; never blocks the loop)."""

    def __init__(
        self,
        address: HostPort,
        *,
        max_request_bytes: int = 8192,
        request_timeout_s: float = 5.0,
        max_connections: int = 32,
        sample_interval_s: float = 1.0,
        rate_window_s: float = 10.0,
    ) -> None:
        self.address = address
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.sample_interval_s = sample_interval_s
        self.events = EventRate(rate_window_s)
        self.scrapes = 0
        self._daemon: MetricsSource | None = None
        self._server: asyncio.Server | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The port listened on (the real one when configured as 0)."""
        if self._server is None or not self._server.sockets:
            raise BalancerError("metrics server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, daemon: MetricsSource) -> None:
        """Listen on the address; BalancerError naming metrics.listen when that fails."""
        self._daemon = daemon
        try:
            self._server = await asyncio.start_server(
                self._handle, self.address.host, self.address.port, limit=self.max_request_bytes
            )
        except OSError as exc:
            raise BalancerError(
                f"metrics.listen {self.address}: cannot listen ({exc.strerror or exc})"
            ) from None
        self._sampler = asyncio.create_task(self._sample_loop(daemon), name="metrics-sampler")
        log.info("metrics on http://%s/metrics", HostPort(self.address.host, self.port))

    async def close(self) -> None:
        """Stop listening, end open connections and the sampler."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        if self._sampler is not None:
            tasks.append(self._sampler)
            self._sampler = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _sample_loop(self, daemon: MetricsSource) -> None:
        while True:
            self.events.sample(daemon.tracker.events_total)
            await asyncio.sleep(self.sample_interval_s)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            if len(self._connections) > self.max_connections:
                await self._respond(writer, 503, "too many connections\n")
                return
            status, body, head = await self._answer(reader)
            if status:
                await self._respond(writer, status, body, head_only=head)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled: nothing to answer
        except Exception:
            log.exception("metrics: request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._connections.discard(task)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bool]:
        """(status, body, head only) for one request; status 0 means close without answering."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_timeout_s)
        except asyncio.LimitOverrunError:
            return 431, "request too large\n", False
        except asyncio.IncompleteReadError:
            return 0, "", False  # closed before a whole request arrived
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "bad request\n", False
        method, target, _ = parts
        path = target.split("?", 1)[0]
        if path != "/metrics":
            return 404, "not found: try /metrics\n", False
        if method not in ("GET", "HEAD"):
            return 405, "method not allowed\n", False
        if self._daemon is None:
            return 503, "not started\n", False
        try:
            body = await render(self._daemon, self.events)
        except Exception:
            log.exception("metrics: rendering failed")
            return 500, "rendering failed; see the daemon's log\n", False
        self.scrapes += 1
        return 200, body, method == "HEAD"

    async def _respond(
        self, writer: asyncio.StreamWriter, status: int, body: str, *, head_only: bool = False
    ) -> None:
        payload = body.encode("utf-8")
        content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
        headers = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(payload)}",
            "Connection: close",
        ]
        if status == 405:
            headers.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(payload)
        await asyncio.wait_for(writer.drain(), self.request_timeout_s)
