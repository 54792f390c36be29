"""Simulated Asterisk fixtures and a raw-socket AMI test client (imported by conftest.py).

Fixtures:
  sim_factory  await sim_factory(server_ip="10.10.0.1", **SimAsterisk kwargs) -> started SimAsterisk
  sim          one started SimAsterisk (10.10.0.1, defaults)
  ami_connect  await ami_connect(sim, login=True, events=None) -> RawAmiClient (closed at teardown)
Helper:
  start_cluster(stack, database_url, ips, **SimAsterisk kwargs) -> started servers, each with
               VICIdial's command sender running against the database (stopped by the stack)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any, Protocol

import pytest

from balancer.ami.codec import Message, MessageReader, encode
from balancer.db.url import DatabaseUrl
from balancer.errors import AmiProtocolError
from balancer.sim import SimAsterisk
from balancer.sim.sender import CommandSender

__all__ = ["RawAmiClient", "SimFactory", "ami_connect", "sim", "sim_factory", "start_cluster"]

Headers = Mapping[str, str | Sequence[str]]


class RawAmiClient:
    """A minimal AMI client on asyncio streams and our MessageReader, for driving the simulator."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_message_bytes: int = 65536,
    ) -> None:
        """Start reading from an open connection (use ``RawAmiClient.connect``)."""
        self.reader = reader
        self.writer = writer
        self.parser = MessageReader(max_message_bytes=max_message_bytes)
        self.raw = bytearray()  # every byte received
        self.messages: list[Message] = []  # every message, in order
        self.events: list[Message] = []
        self.responses: dict[str, Message] = {}  # first response per ActionID
        self.error: AmiProtocolError | None = None
        self.closed = False  # EOF or error on the socket
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls, host: str, port: int, *, within_s: float = 2.0, max_message_bytes: int = 65536
    ) -> RawAmiClient:
        """Connect and wait for the banner."""
        assert host in ("127.0.0.1", "::1", "localhost"), "tests only connect to loopback"
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within_s)
        client = cls(reader, writer, max_message_bytes=max_message_bytes)
        await client._wait(lambda: client.parser.banner, within_s, "banner")
        return client

    @property
    def banner(self) -> str | None:
        """The banner line."""
        return self.parser.banner

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.raw += data
                try:
                    messages = self.parser.feed(data)
                except AmiProtocolError as exc:
                    self.error = exc
                    break
                for message in messages:
                    self.messages.append(message)
                    if "Event" in message:
                        self.events.append(message)
                    elif (aid := message.get("ActionID")) is not None:
                        self.responses.setdefault(aid, message)
                self._notify()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, check: Callable[[], Any], within_s: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            result = check()
            if result is not None and result is not False:
                return result
            if self.closed:
                raise ConnectionError(f"connection closed while waiting for {what}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {what} within {within_s}s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def send(self, action: str, headers: Headers | None = None, **kw: str) -> str:
        """Send an action; returns its ActionID (generated unless given)."""
        fields: dict[str, str | Sequence[str]] = {"Action": action}
        fields.update(headers or {})
        fields.update(kw)
        aid = str(fields.setdefault("ActionID", f"t-{next(self._ids)}"))
        self.writer.write(encode(fields))
        return aid

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are."""
        self.writer.write(data)

    async def response(self, aid: str, within_s: float = 2.0) -> Message:
        """Wait for the response to an ActionID."""
        result: Message = await self._wait(
            lambda: self.responses.get(aid), within_s, f"response {aid}"
        )
        return result

    async def action(
        self, action: str, headers: Headers | None = None, *, within_s: float = 2.0, **kw: str
    ) -> Message:
        """Send an action and wait for its response."""
        return await self.response(self.send(action, headers, **kw), within_s)

    async def login(
        self, username: str = "cron", secret: str = "1234", events: str | None = None
    ) -> Message:
        """Log in (optionally with an Events mask); returns the response."""
        fields: dict[str, str] = {"Username": username, "Secret": secret}
        if events is not None:
            fields["Events"] = events
        return await self.action("Login", fields)

    async def list_action(
        self, action: str, headers: Headers | None = None, *, within_s: float = 2.0
    ) -> tuple[Message, list[Message], Message]:
        """Run an EventList action: (response, item events, the Complete event)."""
        aid = self.send(action, headers)
        response = await self.response(aid, within_s)

        def complete() -> Message | None:
            for ev in self.events:
                if ev.get("ActionID") == aid and ev.get("EventList") == "Complete":
                    return ev
            return None

        done: Message = await self._wait(complete, within_s, f"{action} Complete")
        items = [
            ev
            for ev in self.events
            if ev.get("ActionID") == aid and ev is not done and "EventList" not in ev
        ]
        return response, items, done

    async def wait_for_event(
        self, predicate: Callable[[Message], bool], within_s: float = 2.0, start: int = 0
    ) -> Message:
        """The first event (from index ``start`` of ``events``) matching ``predicate``."""

        def find() -> Message | None:
            for ev in self.events[start:]:
                if predicate(ev):
                    return ev
            return None

        result: Message = await self._wait(find, within_s, "matching event")
        return result

    async def wait_for_events(
        self,
        predicate: Callable[[Message], bool],
        count: int,
        within_s: float = 2.0,
        start: int = 0,
    ) -> list[Message]:
        """Wait until ``count`` events (from index ``start``) match ``predicate``; returns them."""

        def find() -> list[Message] | None:
            found = [ev for ev in self.events[start:] if predicate(ev)]
            return found if len(found) >= count else None

        result: list[Message] = await self._wait(find, within_s, f"{count} matching events")
        return result

    async def wait_closed(self, within_s: float = 2.0) -> None:
        """Wait until the server closes the connection (EOF)."""
        await asyncio.wait_for(asyncio.shield(self._task), within_s)

    async def wait_error(self, within_s: float = 2.0) -> AmiProtocolError:
        """Wait until the parser rejects what the server sent."""
        await self.wait_closed(within_s)
        assert self.error is not None, "connection ended without a protocol error"
        return self.error

    async def settle(self, seconds: float = 0.05) -> None:
        """Let in-flight bytes arrive."""
        await asyncio.sleep(seconds)

    async def close(self) -> None:
        """Close the socket and stop reading."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


class SimFactory(Protocol):
    """Signature of the sim_factory fixture."""

    def __call__(self, server_ip: str = ..., **kwargs: Any) -> Awaitable[SimAsterisk]:
        """Create and start a SimAsterisk on 127.0.0.1:0."""
        ...


@pytest.fixture
async def sim_factory() -> AsyncIterator[SimFactory]:
    """Creates started SimAsterisk servers on 127.0.0.1:0; stops them all at teardown."""
    sims: list[SimAsterisk] = []

    async def make(server_ip: str = "10.10.0.1", **kwargs: Any) -> SimAsterisk:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        server = SimAsterisk(server_ip, **kwargs)
        await server.start()
        sims.append(server)
        return server

    yield make
    for server in sims:
        await server.stop()


@pytest.fixture
async def sim(sim_factory: SimFactory) -> SimAsterisk:
    """One started SimAsterisk (server_ip 10.10.0.1, default carrier alpha on prefix 9)."""
    return await sim_factory()


@pytest.fixture
async def ami_connect() -> AsyncIterator[Callable[..., Awaitable[RawAmiClient]]]:
    """Connects RawAmiClients to a SimAsterisk (logged in unless login=False); closes them after."""
    clients: list[RawAmiClient] = []

    async def connect(
        server: SimAsterisk,
        *,
        login: bool = True,
        events: str | None = None,
        max_message_bytes: int = 65536,
    ) -> RawAmiClient:
        client = await RawAmiClient.connect(
            server.host, server.port, max_message_bytes=max_message_bytes
        )
        clients.append(client)
        if login:
            response = await client.login(server.username, server.secret, events=events)
            assert response["Response"] == "Success", response
        return client

    yield connect
    for client in clients:
        await client.close()


async def start_cluster(
    stack: AsyncExitStack,
    database_url: DatabaseUrl,
    ips: Iterable[str],
    *,
    poll_interval_s: float = 0.05,
    **sim_options: Any,
) -> list[SimAsterisk]:
    """Started simulated servers, each with its command sender; ``stack`` stops them all."""
    sims = []
    for ip in ips:
        sim = SimAsterisk(ip, **sim_options)
        await sim.start()
        stack.push_async_callback(sim.stop)
        sender = CommandSender(sim, database_url, poll_interval_s=poll_interval_s)
        await sender.start()
        stack.push_async_callback(sender.stop)
        sims.append(sim)
    return sims
