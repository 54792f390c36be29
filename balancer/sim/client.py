"""One AMI connection to the simulated Asterisk: its login state, event mask, filters and writer."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable

ALL_CLASSES: frozenset[str] = frozenset(
    {"system", "call", "log", "verbose", "command", "agent", "user", "config", "dtmf", "reporting"}
    | {"cdr", "dialplan", "originate", "agi", "cc", "aoc", "test", "security", "message"}
)
_ON = frozenset({"on", "yes", "true", "all", "1"})
_OFF = frozenset({"off", "no", "false", "none", "0", ""})


def parse_event_mask(text: str) -> frozenset[str]:
    """The event classes an ``Events:`` value turns on (``on``, ``off``, ``call,system``)."""
    value = text.strip().lower()
    if value in _ON:
        return ALL_CLASSES
    if value in _OFF:
        return frozenset()
    classes = frozenset(part.strip() for part in value.split(",") if part.strip())
    return ALL_CLASSES if "all" in classes else classes


class OutEvent:
    """A rendered event on its way to clients; decoded once, and only if a filter needs it."""

    __slots__ = ("_text", "cls", "data")

    def __init__(self, cls: str, data: bytes) -> None:
        """Wrap the rendered bytes of an event of class ``cls``."""
        self.cls = cls
        self.data = data
        self._text: str | None = None

    @property
    def text(self) -> str:
        """The event as text, for regex filters."""
        if self._text is None:
            self._text = self.data.decode("utf-8", "replace")
        return self._text


class _Close:
    """Queue marker: flush what is queued, then close the connection."""


_CLOSE = _Close()
_Item = bytes | asyncio.Future[None] | _Close


class SimClient:
    """Server-side state of one AMI connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        write_delay: Callable[[], float],
        running: asyncio.Event | None = None,
    ) -> None:
        """Wrap the streams; ``write_delay`` is read before every write, and nothing is written
        while ``running`` is clear (fault injection)."""
        self.reader = reader
        self.writer = writer
        self.authenticated = False
        self.username = ""
        self.mask: frozenset[str] = ALL_CLASSES
        self.whitelist: list[re.Pattern[str]] = []
        self.blacklist: list[re.Pattern[str]] = []
        self.closing = False
        self.draining = False  # closing after the queued bytes are written
        self.stalled = False  # stuck mid-message: nothing more is ever written
        self.task: asyncio.Task[None] | None = None
        self.writer_task: asyncio.Task[None] | None = None
        self._write_delay = write_delay
        self._running = running
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def wants(self, event: OutEvent) -> bool:
        """Whether this client's mask and filters let the event through (Asterisk 13+ semantics)."""
        if not self.authenticated or event.cls not in self.mask:
            return False
        if not self.whitelist and not self.blacklist:
            return True
        text = event.text
        if self.whitelist and not any(p.search(text) for p in self.whitelist):
            return False
        return not any(p.search(text) for p in self.blacklist)

    def add_filter(self, expression: str) -> None:
        """Add a whitelist filter, or a blacklist one if it starts with ``!`` (re.error if bad)."""
        if expression.startswith("!"):
            self.blacklist.append(re.compile(expression[1:]))
        else:
            self.whitelist.append(re.compile(expression))

    def send(self, data: bytes) -> None:
        """Queue bytes for the writer (never blocks the caller)."""
        if not self.closing and not self.stalled:
            self._queue.put_nowait(data)

    def close_soon(self) -> None:
        """Close the connection once everything queued so far is written."""
        if not self.closing:
            self.closing = self.draining = True
            self._queue.put_nowait(_CLOSE)

    async def flush(self) -> None:
        """Wait until everything queued so far has been written (or the connection is gone)."""
        if self.writer_task is None or self.writer_task.done():
            return
        marker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(marker)
        await asyncio.wait({marker, self.writer_task}, return_when=asyncio.FIRST_COMPLETED)
        marker.cancel()

    async def write_loop(self) -> None:
        """Write queued bytes in batches after the injected delay; ends with the connection."""
        waiters: list[asyncio.Future[None]] = []
        try:
            while True:
                items = [await self._queue.get()]
                while not self._queue.empty():
                    items.append(self._queue.get_nowait())
                chunks = [item for item in items if isinstance(item, bytes)]
                waiters = [item for item in items if isinstance(item, asyncio.Future)]
                delay = self._write_delay()
                if delay > 0 and chunks:
                    await asyncio.sleep(delay)
                if self._running is not None and not self._running.is_set():
                    await self._running.wait()
                    while not self._queue.empty():  # what piled up meanwhile goes out too
                        item = self._queue.get_nowait()
                        items.append(item)
                        if isinstance(item, bytes):
                            chunks.append(item)
                        elif isinstance(item, asyncio.Future):
                            waiters.append(item)
                if chunks:
                    self.writer.write(b"".join(chunks))
                    await self.writer.drain()
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
                if any(isinstance(item, _Close) for item in items):
                    self.writer.close()
                    return
        except (ConnectionError, OSError):
            self.writer.close()
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes included."""
        self.closing = True
        self.writer.transport.abort()

    async def close(self) -> None:
        """Stop the writer (after it drained, if asked to) and close the socket."""
        self.closing = True
        writer_task = self.writer_task
        if self.draining and writer_task is not None and not writer_task.done():
            await asyncio.wait({writer_task}, timeout=2.0)
        if self.writer_task is not None and self.writer_task is not asyncio.current_task():
            self.writer_task.cancel()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), timeout=1.0)
