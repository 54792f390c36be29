"""SimAsterisk: a real asyncio TCP server on loopback that speaks AMI like Asterisk 22 (or 1.4-13).

The wire shapes follow a recorded Asterisk 22 session (docs: shared/ami/). One call through a
carrier: Local ;1/;2 legs plus a ``SIP/<carrier>-xxxxxxxx`` trunk leg; a broken carrier or full
lines fail it with the Asterisk cause, and the failed ``OriginateResponse`` carries ``Reason: 0``
and ``Uniqueid: <unknown>`` exactly as Asterisk does. Fault injection affects only this server.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Sequence

from balancer.config_values import is_loopback
from balancer.sim.calls import CallEngine
from balancer.sim.manager import ManagerInterface
from balancer.sim.model import (
    NORMAL_CLEARING,
    Headers,
    SimCarrier,
    SimChannel,
    TaskSet,
)

GARBAGE = b"\x16\x03\x01 this is not AMI\r\n<html>nope</html>\r\n\r\n"
HALF_MESSAGE = b"Event: Newchannel\r\nPrivilege: call,all\r\nChannel: SIP/x"


class _Keep(enum.Enum):
    KEEP = 0


KEEP = _Keep.KEEP


class SimAsterisk:
    """One simulated Asterisk; its state and fault injection are reachable without an AMI client."""

    def __init__(
        self,
        server_ip: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        username: str = "cron",
        secret: str = "1234",
        carriers: Sequence[SimCarrier] | None = None,
        max_lines: int = 100,
        full_cause: int = 34,
        call_duration_s: float = 5.0,
        answer_delay_s: float = 0.02,
        legacy_command_output: bool = False,
        start_epoch: int | None = None,
    ) -> None:
        """Configure the server; nothing listens until ``start()``. Only loopback hosts allowed."""
        if not is_loopback(host):
            raise ValueError(f"simulated Asterisk {server_ip}: host {host!r} is not loopback")
        self.server_ip = server_ip
        self._host = host
        self._port = port
        self._tasks = TaskSet()
        self._server: asyncio.Server | None = None
        started_at = time.time()
        self.engine = CallEngine(
            carriers=list(carriers) if carriers is not None else [SimCarrier("alpha", "9")],
            max_lines=max_lines,
            full_cause=full_cause,
            call_duration_s=call_duration_s,
            answer_delay_s=answer_delay_s,
            start_epoch=int(started_at) if start_epoch is None else start_epoch,
            emit=self._emit,
            tasks=self._tasks,
        )
        self.manager = ManagerInterface(
            server_ip=server_ip,
            username=username,
            secret=secret,
            legacy_command_output=legacy_command_output,
            engine=self.engine,
            tasks=self._tasks,
            started_at=started_at,
        )

    def _emit(self, name: str, cls: str, headers: Headers) -> None:
        self.manager.emit(name, cls, headers)

    # ------------------------------------------------------------------ lifecycle
    @property
    def host(self) -> str:
        """The loopback address it listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port (the real one once started with port 0)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` for AMI clients."""
        return f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"

    @property
    def username(self) -> str:
        """The AMI login name."""
        return self.manager.username

    @property
    def secret(self) -> str:
        """The AMI secret."""
        return self.manager.secret

    async def start(self) -> None:
        """Listen for AMI clients."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self.manager.on_connect, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        self.manager.host, self.manager.port = self._host, self._port
        self.manager.accepting = True

    async def stop(self) -> None:
        """Close every client, cancel every task and stop listening."""
        server, self._server = self._server, None
        self.manager.accepting = False
        self.manager.running.set()  # a stopped server starts again unpaused
        if server is not None:
            server.close()
        for client in list(self.manager.clients):
            client.abort()
        await self._tasks.cancel_all()
        self.engine.clear()
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> SimAsterisk:
        """Start on entry."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop on exit."""
        await self.stop()

    # ------------------------------------------------------------------ state
    @property
    def channels(self) -> dict[str, SimChannel]:
        """Live channels by Uniqueid."""
        return self.engine.channels

    @property
    def carriers(self) -> dict[str, SimCarrier]:
        """Carriers by name."""
        return self.engine.carriers

    @property
    def originates(self) -> int:
        """Originates attempted (AMI and server-side)."""
        return self.engine.originates

    @property
    def client_count(self) -> int:
        """AMI connections open now."""
        return len(self.manager.clients)

    @property
    def logins(self) -> int:
        """Successful AMI logins."""
        return self.manager.logins

    @property
    def login_failures(self) -> int:
        """Rejected AMI logins."""
        return self.manager.login_failures

    @property
    def connections(self) -> int:
        """AMI connections accepted."""
        return self.manager.connections

    def channel_count(self) -> int:
        """Live channels of every kind."""
        return len(self.engine.channels)

    def trunk_lines_in_use(self, carrier: str | None = None) -> int:
        """Live trunk channels, for one carrier or all."""
        return self.engine.trunk_lines_in_use(carrier)

    def find_channel(self, name: str) -> SimChannel | None:
        """The live channel with this name."""
        return self.engine.find(name)

    # ------------------------------------------------------------------ server-side API
    async def originate(
        self,
        dialstring: str,
        context: str = "default",
        exten: str = "8368",
        duration_s: float | None = None,
        callerid: str = "",
        *,
        action_id: str | None = None,
    ) -> str | None:
        """Call ``Local/<dialstring>@<context>``: the ;1 Uniqueid once answered, None if it failed.

        With ``action_id``, an ``OriginateResponse`` carrying it follows (as for async Originate).
        """
        channel = f"Local/{dialstring}@{context}"
        outcome = await self.engine.originate(
            channel, context=context, exten=exten, callerid=callerid, duration_s=duration_s
        )
        if action_id is not None:
            self.manager.originate_response(action_id, outcome, context, exten)
        return outcome.uniqueid

    def add_agent_channel(
        self, peer: str, duration_s: float | None = None, technology: str = "SIP"
    ) -> str:
        """An agent phone channel (``SIP/<peer>-xxxxxxxx``) in a conference; returns Uniqueid."""
        return self.engine.add_channel(
            technology,
            peer,
            kind="agent",
            context="default",
            exten="8600051",
            duration_s=duration_s,
            application="MeetMe",
            app_data="8600051,F",
        )

    def add_trunk_channel(self, carrier: str, duration_s: float | None = None) -> str:
        """An inbound call on a carrier trunk; returns its Uniqueid."""
        known = self.engine.carriers.get(carrier)
        if known is None:
            raise ValueError(f"simulated Asterisk {self.server_ip}: no carrier {carrier!r}")
        return self.engine.add_channel(
            known.technology,
            carrier,
            kind="trunk",
            carrier=carrier,
            context="trunkinbound",
            exten="s",
            duration_s=duration_s,
            application="AGI",
            app_data="agi://127.0.0.1:4577/call_log",
        )

    async def hangup(self, uniqueid: str, cause: int = NORMAL_CLEARING) -> bool:
        """Hang up the call this channel belongs to; False when there is no such channel."""
        return self.engine.hangup(uniqueid, cause)

    async def hangup_all(self, cause: int = NORMAL_CLEARING) -> int:
        """Hang up every call; returns how many ended."""
        return self.engine.hangup_all(cause)

    def set_carrier_state(
        self,
        name: str,
        *,
        fail_cause: int | _Keep | None = KEEP,
        registered: bool | _Keep = KEEP,
        reachable: bool | _Keep = KEEP,
    ) -> None:
        """Change a carrier's health; reachability and registration changes emit AMI events."""
        carrier = self.engine.carriers.get(name)
        if carrier is None:
            raise ValueError(f"simulated Asterisk {self.server_ip}: no carrier {name!r}")
        if not isinstance(fail_cause, _Keep):
            carrier.fail_cause = fail_cause
        domain = f"sip.{name}.example"
        if not isinstance(reachable, _Keep):
            carrier.reachable = reachable
            status = "Reachable" if reachable else "Unreachable"
            if carrier.technology.upper() == "PJSIP":
                self._emit(
                    "ContactStatus",
                    "system",
                    [
                        ("URI", f"sip:{name}@{domain}:5060"),
                        ("ContactStatus", status),
                        ("AOR", name),
                        ("EndpointName", name),
                        ("RoundtripUsec", "12000" if reachable else "0"),
                    ],
                )
            else:
                self._emit(
                    "PeerStatus",
                    "system",
                    [
                        ("ChannelType", carrier.technology),
                        ("Peer", f"{carrier.technology}/{name}"),
                        ("PeerStatus", status),
                        ("Time", "12" if reachable else "-1"),
                    ],
                )
        if not isinstance(registered, _Keep):
            carrier.registered = registered
            self._emit(
                "Registry",
                "system",
                [
                    ("ChannelType", carrier.technology),
                    ("Username", name),
                    ("Domain", domain),
                    ("Status", "Registered" if registered else "Rejected"),
                ],
            )

    # ------------------------------------------------------------------ fault injection
    async def drop_clients(self) -> None:
        """Close every AMI connection now, unsent bytes included."""
        clients = list(self.manager.clients)
        for client in clients:
            client.abort()
        tasks = {c.task for c in clients if c.task is not None and not c.task.done()}
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def set_unresponsive(self, on: bool) -> None:
        """Keep sockets open but read and ignore actions and send nothing (a hung Asterisk)."""
        self.manager.unresponsive = on

    def set_paused(self, on: bool) -> None:
        """Stop the whole server as SIGSTOP would: nothing is read or written and new
        connections get no banner; on resume everything waiting is answered, in order."""
        if on:
            self.manager.running.clear()
        else:
            self.manager.running.set()

    def set_write_delay(self, seconds: float) -> None:
        """Wait this long before every write to every client (a slow server)."""
        self.manager.write_delay_s = max(0.0, seconds)

    def suppress_events(self, on: bool) -> None:
        """Keep changing channels but send no events (lost events)."""
        self.manager.suppress = on

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are to every connected client and wait until written."""
        clients = list(self.manager.clients)
        for client in clients:
            client.send(data)
        await asyncio.gather(*(client.flush() for client in clients))

    async def send_garbage(self, data: bytes = GARBAGE) -> None:
        """Send bytes that are not AMI (ending in a blank line, so a reader judges the block)."""
        await self.send_raw(data)

    async def send_big_line(self, size: int = 1_048_576) -> None:
        """Send one line of ``size`` bytes with no terminator."""
        await self.send_raw(b"x" * size)

    async def send_half_message(self) -> None:
        """Send the start of an event, then nothing more on those connections (a stalled stream)."""
        clients = list(self.manager.clients)
        for client in clients:
            client.send(HALF_MESSAGE)
            client.stalled = True
        await asyncio.gather(*(client.flush() for client in clients))

    async def send_invalid_utf8(self) -> str:
        """Send a valid Newchannel/Hangup pair, invalid UTF-8 in CallerIDName; returns its id."""
        uid = self.engine.next_uniqueid()
        name = self.engine.tech_name("SIP", "garbled").encode()
        parts = []
        for event, extra in (
            (b"Newchannel", b""),
            (b"Hangup", b"Cause: 16\r\nCause-txt: Normal Clearing\r\n"),
        ):
            parts.append(
                b"Event: " + event + b"\r\nPrivilege: call,all\r\nChannel: " + name + b"\r\n"
                b"ChannelState: 0\r\nChannelStateDesc: Down\r\nCallerIDNum: 5550100\r\n"
                b"CallerIDName: caf\xc3 \xff\xfe\r\nContext: default\r\nExten: s\r\n"
                b"Uniqueid: "
                + uid.encode()
                + b"\r\nLinkedid: "
                + uid.encode()
                + b"\r\n"
                + extra
                + b"\r\n"
            )
        await self.send_raw(b"".join(parts))
        return uid

    async def shutdown(self) -> None:
        """Send ``Shutdown`` (uncleanly, no restart), close all clients, drop all calls silently."""
        self._emit("Shutdown", "system", [("Shutdown", "Uncleanly"), ("Restart", "False")])
        clients = list(self.manager.clients)
        for client in clients:
            client.close_soon()
        self.engine.clear()
        tasks = {c.task for c in clients if c.task is not None and not c.task.done()}
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
