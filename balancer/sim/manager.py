"""The simulated Asterisk's manager interface: AMI connections, the actions, event delivery."""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Awaitable, Callable

from balancer.ami.codec import MessageReader
from balancer.errors import AmiProtocolError
from balancer.sim.calls import CallEngine, OriginateOutcome
from balancer.sim.client import OutEvent, SimClient, parse_event_mask
from balancer.sim.model import NORMAL_CLEARING, Headers, TaskSet, render, render_event

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
_TRUE = frozenset({"true", "yes", "1", "on", "y"})
_PRE_LOGIN = frozenset({"login", "logoff", "challenge"})
_UNKNOWN = "Invalid/unknown command: {}. Use Action: ListCommands to show available commands."
_BAD_FILTER = "Filter did not compile.  Check the syntax of the filter given."

Handler = Callable[["SimClient", dict[str, str], str], Awaitable[None]]


def _first(headers: dict[str, str], key: str, default: str = "") -> str:
    """The first value of a header (a repeated key arrives joined with newlines)."""
    value = headers.get(key)
    return default if value is None else value.split("\n", 1)[0].strip()


class ManagerInterface:
    """AMI sessions of one simulated server: login, event masks and filters, actions, replies."""

    def __init__(
        self,
        *,
        server_ip: str,
        username: str,
        secret: str,
        legacy_command_output: bool,
        engine: CallEngine,
        tasks: TaskSet,
        started_at: float,
    ) -> None:
        """Serve AMI for ``engine``; connection tasks go into ``tasks``."""
        self.server_ip = server_ip
        self.username = username
        self.secret = secret
        self.legacy_command_output = legacy_command_output
        self.engine = engine
        self.tasks = tasks
        self.started_at = started_at
        self.host = ""
        self.port = 0
        self.accepting = False
        self.clients: set[SimClient] = set()
        self.unresponsive = False
        # Cleared while the whole server is stopped (SIGSTOP): nothing is read or written.
        self.running = asyncio.Event()
        self.running.set()
        self.suppress = False
        self.write_delay_s = 0.0
        self.logins = 0
        self.login_failures = 0
        self.connections = 0
        self._handlers: dict[str, Handler] = {
            "login": self._login,
            "logoff": self._logoff,
            "ping": self._ping,
            "events": self._events,
            "filter": self._filter,
            "coreshowchannels": self._core_show_channels,
            "command": self._command,
            "hangup": self._hangup_action,
            "originate": self._originate_action,
        }

    # ------------------------------------------------------------------ connections
    def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine) so that the connection task is ours to hold and cancel.
        if not self.accepting:  # stopping: refuse quietly
            writer.transport.abort()
            return
        client = SimClient(reader, writer, lambda: self.write_delay_s, self.running)
        self.clients.add(client)
        self.connections += 1
        client.writer_task = self.tasks.spawn(client.write_loop(), name=f"sim-write-{client.peer}")
        client.task = self.tasks.spawn(self._serve(client), name=f"sim-conn-{client.peer}")

    async def _serve(self, client: SimClient) -> None:
        parser = MessageReader(expect_banner=False, required_keys=(), max_message_bytes=65536)
        client.send(BANNER)
        try:
            while not client.closing:
                await self.running.wait()
                data = await client.reader.read(65536)
                if not data:
                    break
                try:
                    messages = parser.feed(data)
                except AmiProtocolError:
                    break  # an oversized request: Asterisk drops such a client
                for message in messages:
                    await self.running.wait()  # a stopped server answers after it resumes
                    if self.unresponsive or client.closing:
                        continue
                    await self._dispatch(client, message)
        except (ConnectionError, OSError):
            pass
        finally:
            self.clients.discard(client)
            await client.close()

    def emit(self, name: str, cls: str, headers: Headers) -> None:
        """Send an event to every logged-in client whose event mask and filters let it through."""
        if self.suppress or self.unresponsive or not self.clients:
            return
        event = OutEvent(cls, render_event(name, cls, headers))
        for client in self.clients:
            if client.wants(event):
                client.send(event.data)

    def _reply(self, client: SimClient, aid: str, response: str, *headers: tuple[str, str]) -> None:
        out: Headers = [("Response", response)]
        if aid:
            out.append(("ActionID", aid))
        out.extend(headers)
        client.send(render(out))

    async def _dispatch(self, client: SimClient, message: dict[str, str]) -> None:
        headers = {key.lower(): value for key, value in message.items()}
        aid = _first(headers, "actionid")
        action = _first(headers, "action")
        if not action:
            self._reply(client, aid, "Error", ("Message", "Missing action in request"))
            return
        name = action.lower()
        if not client.authenticated and name not in _PRE_LOGIN:
            self._reply(client, aid, "Error", ("Message", "Permission denied"))
            return
        handler = self._handlers.get(name)
        if handler is None:
            self._reply(client, aid, "Error", ("Message", _UNKNOWN.format(action)))
            return
        await handler(client, headers, aid)

    # ------------------------------------------------------------------ actions
    async def _login(self, client: SimClient, headers: dict[str, str], aid: str) -> None:
        if client.authenticated:
            self._reply(client, aid, "Success", ("Message", "Already authenticated"))
            return
        username = _first(headers, "username")
        secret = _first(headers, "secret")
        ok = username == self.username and hmac.compare_digest(
            secret.encode(), self.secret.encode()
        )
        if not ok:
            self.login_failures += 1
            self._reply(client, aid, "Error", ("Message", "Authentication failed"))
            client.close_soon()  # Asterisk ends the session after a failed login
            return
        self.logins += 1
        client.authenticated = True
        client.username = username
        if "events" in headers:
            client.mask = parse_event_mask(_first(headers, "events"))
        self._reply(client, aid, "Success", ("Message", "Authentication accepted"))
        if "system" in client.mask:
            uptime = str(int(time.time() - self.started_at))
            body = [("Uptime", uptime), ("LastReload", uptime), ("Status", "Fully Booted")]
            client.send(render_event("FullyBooted", "system", body))
        now = time.time()
        event_tv = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}+0000"
        )
        self.emit(
            "SuccessfulAuth",
            "security",
            [
                ("EventTV", event_tv),
                ("Severity", "Informational"),
                ("Service", "AMI"),
                ("EventVersion", "1"),
                ("AccountID", username),
                ("SessionID", f"0x{id(client):x}"),
                ("LocalAddress", f"IPV4/TCP/{self.host}/{self.port}"),
                ("RemoteAddress", f"IPV4/TCP/{client.peer.replace(':', '/')}"),
                ("UsingPassword", "0"),
                ("SessionTV", event_tv),
            ],
        )

    async def _logoff(self, client: SimClient, headers: dict[str, str], aid: str) -> None:
        self._reply(client, aid, "Goodbye", ("Message", "Thanks for all the fish."))
        client.close_soon()

    async def _ping(self, client: SimClient, headers: dict[str, str], aid: str) -> None:
        self._reply(client, aid, "Success", ("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}"))

    async def _events(self, client: SimClient, headers: dict[str, str], aid: str) -> None:
        client.mask = parse_event_mask(_first(headers, "eventmask", "on"))
        self._reply(client, aid, "Success", ("Events", "On" if client.mask else "Off"))

    async def _filter(self, client: SimClient, headers: dict[str, str], aid: str) -> None:
        if _first(headers, "operation").lower() != "add":
            self._reply(client, aid, "Error", ("Message", "Unknown operation"))
            return
        try:
            client.add_filter(headers.get("filter", "").split("\n", 1)[0])
        except re.error:
            self._reply(client, aid, "Error", ("Message", _BAD_FILTER))
            return
        self._reply(client, aid, "Success", ("Message", "Success"))

    async def _core_show_channels(
        self, client: SimClient, headers: dict[str, str], aid: str
    ) -> None:
        idh = [("ActionID", aid)] if aid else []
        channels = list(self.engine.channels.values())
        parts = [
            render(
                [
                    ("Response", "Success"),
                    *idh,
                    ("EventList", "start"),
                    ("Message", "Channels will follow"),
                ]
            )
        ]
        for ch in channels:
            parts.append(
                render(
                    [
                        ("Event", "CoreShowChannel"),
                        *idh,
                        *ch.headers(),
                        ("Application", ch.application),
                        ("ApplicationData", ch.app_data),
                        ("Duration", ch.duration()),
                        ("BridgeId", ""),
                    ]
                )
            )
        complete = [("EventList", "Complete"), ("ListItems", str(len(channels)))]
        parts.append(render([("Event", "CoreShowChannelsComplete"), *idh, *complete]))
        client.send(b"".join(parts))

    def _command_output(self, command: str) -> list[str]:
        words = command.split()
        cmd = " ".join(words).lower()
        if cmd == "core show channels count":
            chans, calls, done = (
                len(self.engine.channels),
                self.engine.active_calls(),
                self.engine.calls_processed,
            )
            return [
                f"{chans} active channel{'' if chans == 1 else 's'}",
                f"{calls} active call{'' if calls == 1 else 's'}",
                f"{done} call{'' if done == 1 else 's'} processed",
            ]
        if cmd == "core show version":
            version = "13.38.3-vici" if self.legacy_command_output else "22.10.1"
            return [f"Asterisk {version} built by sim @ {self.server_ip} on a x86_64 running Linux"]
        shown = " ".join(words)
        return [
            f"No such command '{shown}' (type 'core show help {shown}' for other possible commands)"
        ]

    async def _command(self, client: SimClient, headers: dict[str, str], aid: str) -> None:
        lines = self._command_output(_first(headers, "command"))
        if not self.legacy_command_output:
            output = [("Output", line) for line in lines]
            self._reply(client, aid, "Success", ("Message", "Command output follows"), *output)
            return
        head = "Response: Follows\r\nPrivilege: Command\r\n" + (
            f"ActionID: {aid}\r\n" if aid else ""
        )
        body = "".join(f"{line}\n" for line in lines)
        client.send(f"{head}{body}--END COMMAND--\r\n\r\n".encode())

    async def _hangup_action(self, client: SimClient, headers: dict[str, str], aid: str) -> None:
        name = _first(headers, "channel")
        cause_text = _first(headers, "cause", str(NORMAL_CLEARING))
        cause = int(cause_text) if cause_text.isdigit() else NORMAL_CLEARING
        channel = self.engine.find(name) if name else None
        if channel is None:
            self._reply(client, aid, "Error", ("Message", "No such channel"))
            return
        self._reply(client, aid, "Success", ("Message", "Channel Hungup"))
        self.engine.hangup(channel.uniqueid, cause)

    async def _originate_action(self, client: SimClient, headers: dict[str, str], aid: str) -> None:
        channel = _first(headers, "channel")
        if not channel:
            self._reply(client, aid, "Error", ("Message", "Channel not specified"))
            return
        context = _first(headers, "context", "default")
        exten = _first(headers, "exten", "s")
        variables: dict[str, str] = {}
        for item in re.split(r"[\n,]", headers.get("variable", "")):
            key, sep, value = item.partition("=")
            if sep and key.strip():
                variables[key.strip()] = value.strip()
        run = self.engine.originate(
            channel,
            context=context,
            exten=exten,
            priority=_first(headers, "priority", "1"),
            callerid=_first(headers, "callerid"),
            variables=variables,
        )
        if _first(headers, "async").lower() in _TRUE:
            self._reply(client, aid, "Success", ("Message", "Originate successfully queued"))
            self.tasks.spawn(self._finish_async(run, aid, context, exten), name="sim-originate")
            return
        outcome = await run
        if outcome.ok:
            self._reply(client, aid, "Success", ("Message", "Originate successfully queued"))
        else:
            self._reply(client, aid, "Error", ("Message", "Originate failed"))

    async def _finish_async(
        self, run: Awaitable[OriginateOutcome], aid: str, context: str, exten: str
    ) -> None:
        outcome = await run
        self.originate_response(aid, outcome, context, exten)

    def originate_response(
        self, aid: str, outcome: OriginateOutcome, context: str, exten: str
    ) -> None:
        self.emit(
            "OriginateResponse",
            "call",
            [
                *([("ActionID", aid)] if aid else []),
                ("Response", "Success" if outcome.ok else "Failure"),
                ("Channel", outcome.channel),
                ("Context", context),
                ("Exten", exten),
                ("Reason", "4" if outcome.ok else "0"),
                ("Uniqueid", outcome.uniqueid or "<unknown>"),
                ("CallerIDNum", outcome.cid_num or "<unknown>"),
                ("CallerIDName", outcome.cid_name or "<unknown>"),
            ],
        )
