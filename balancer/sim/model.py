"""What the simulated Asterisk holds (carriers, channels) and the wire shape of channel headers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

ChannelKind = Literal["local", "trunk", "agent", "other"]
Headers = list[tuple[str, str]]

log = logging.getLogger("balancer.sim")

# Asterisk cause codes and the text Asterisk prints beside them (Cause-txt).
CAUSE_TEXT: dict[int, str] = {
    1: "Unallocated (unassigned) number",
    16: "Normal Clearing",
    17: "User busy",
    18: "No user responding",
    19: "No answer",
    20: "Subscriber absent",
    21: "Call Rejected",
    27: "Destination out of order",
    28: "Invalid number format (addr incomplete)",
    34: "Circuit/channel congestion",
    38: "Network out of order",
    41: "Temporary failure",
    42: "Switching equipment congestion",
    58: "Bearer capability not available",
    102: "Recovery on timer expiry",
    127: "Interworking, unspecified",
}
STATE_DESC: dict[int, str] = {0: "Down", 4: "Ring", 5: "Ringing", 6: "Up"}
UP = 6
NORMAL_CLEARING = 16
UNREACHABLE_CAUSE = 20  # chan_sip/PJSIP refuse to dial an unreachable peer: CHANUNAVAIL


def cause_text(cause: int) -> str:
    """Asterisk's text for a hangup cause."""
    return CAUSE_TEXT.get(cause, "Unknown")


def dial_status(cause: int) -> str:
    """The DialEnd DialStatus Asterisk reports for a failed dial with this cause."""
    return {17: "BUSY", 19: "NOANSWER", 34: "CONGESTION", 42: "CONGESTION"}.get(
        cause, "CHANUNAVAIL"
    )


@dataclass
class SimCarrier:
    """A carrier trunk the simulated dialplan reaches through a dial prefix."""

    name: str
    dial_prefix: str
    technology: str = "SIP"  # or "PJSIP"
    fail_cause: int | None = None  # every call through it fails with this cause
    registered: bool = True
    reachable: bool = (
        True  # False: calls fail CHANUNAVAIL (cause 20) unless fail_cause says otherwise
    )
    # True: the dialplan reaches it without a trunk channel of its own (only the Local legs
    # exist, as on a real Asterisk whose carrier is behind Local/ or an AGI): outcomes still apply
    local_only: bool = False


@dataclass
class SimChannel:
    """One live channel on the simulated server."""

    name: str
    uniqueid: str
    linkedid: str
    state: int
    context: str
    exten: str
    carrier: str | None = None
    kind: ChannelKind = "other"
    priority: int = 1
    cid_num: str = ""
    cid_name: str = ""
    connected_num: str = ""
    connected_name: str = ""
    application: str = ""
    app_data: str = ""
    created: float = field(default_factory=time.monotonic)

    def headers(self, prefix: str = "") -> Headers:
        """The standard channel snapshot block (``Channel``, ``ChannelState`` ... ``Linkedid``)."""
        p = prefix
        return [
            (p + "Channel", self.name),
            (p + "ChannelState", str(self.state)),
            (p + "ChannelStateDesc", STATE_DESC.get(self.state, "Unknown")),
            (p + "CallerIDNum", self.cid_num or "<unknown>"),
            (p + "CallerIDName", self.cid_name or "<unknown>"),
            (p + "ConnectedLineNum", self.connected_num or "<unknown>"),
            (p + "ConnectedLineName", self.connected_name or "<unknown>"),
            (p + "Language", "en"),
            (p + "AccountCode", ""),
            (p + "Context", self.context),
            (p + "Exten", self.exten),
            (p + "Priority", str(self.priority)),
            (p + "Uniqueid", self.uniqueid),
            (p + "Linkedid", self.linkedid),
        ]

    def duration(self) -> str:
        """Time since creation as HH:MM:SS, as CoreShowChannel prints it."""
        secs = int(time.monotonic() - self.created)
        return f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def render(headers: Iterable[tuple[str, str]]) -> bytes:
    """One AMI message from trusted headers (the simulator's own values never hold CR/LF)."""
    return "".join([*(f"{k}: {v}\r\n" for k, v in headers), "\r\n"]).encode("utf-8")


def render_event(name: str, cls: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """An event with its ``Privilege: <class>,all`` line, as Asterisk prints it."""
    head = f"Event: {name}\r\nPrivilege: {cls},all\r\n"
    return "".join([head, *(f"{k}: {v}\r\n" for k, v in headers), "\r\n"]).encode("utf-8")


def parse_callerid(text: str) -> tuple[str, str]:
    """Split ``"name" <number>`` / ``name <number>`` / ``number`` into (number, name)."""
    text = text.strip()
    if text.endswith(">") and "<" in text:
        name, _, rest = text.rpartition("<")
        return rest[:-1].strip(), name.strip().strip('"').strip()
    return text, text


class TaskSet:
    """Holds a reference to every background task until it ends; cancels them all on demand."""

    def __init__(self) -> None:
        """Start empty."""
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        """Tasks still running."""
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` as a held task."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("simulator task %s failed", task.get_name(), exc_info=exc)

    async def wait(self) -> None:
        """Wait until every task held now (and any they spawn) has ended."""
        current = asyncio.current_task()
        while tasks := [t for t in self._tasks if t is not current and not t.done()]:
            await asyncio.wait(tasks)

    async def cancel_all(self) -> None:
        """Cancel every held task (including ones spawned while cancelling) and wait for them."""
        current = asyncio.current_task()
        while True:
            tasks = [t for t in self._tasks if t is not current and not t.done()]
            if not tasks:
                return
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
