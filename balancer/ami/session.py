"""One AMI session per Asterisk server: panoramisk's protocol behind a typed class fixing its traps.

What panoramisk gives us: the asyncio Protocol (`AMIProtocol`), action encoding with generated
ActionIDs, and matching of responses and EventList events to the action's future (`Action`).
What this class adds (see DESIGN.md, "panoramisk: known traps"):
  - our own incremental parser (whole messages decoded at once, size cap, garbage detection);
  - a connect timeout and a timeout on every action;
  - pending actions FAIL when the connection drops; nothing is ever re-sent after a reconnect;
  - event listeners are called inside a guard, so a handler's exception cannot kill the session;
  - an awaited heartbeat Ping that notices a peer that stopped answering;
  - reconnect with exponential backoff and jitter (tenacity), capped, also after a login rejection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Mapping
from typing import Any, Protocol

from panoramisk.actions import Action
from panoramisk.ami_protocol import AMIProtocol
from panoramisk.message import Message
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from balancer.ami.codec import MessageReader
from balancer.ami.endpoint import AmiEndpoint
from balancer.config import AmiConfig, HealthConfig
from balancer.config_values import is_loopback
from balancer.errors import AmiError, AmiProtocolError
from balancer.store.base import Health

log = logging.getLogger(__name__)

AmiMessage = dict[str, str]
# Tests set this so that code under test can never dial anything but loopback.
LOOPBACK_ONLY_ENV = "VICI_BALANCER_LOOPBACK_ONLY"


class SessionListener(Protocol):
    """What the tracker implements to hear from sessions. Calls must be cheap and must not block."""

    def on_login(self, server_ip: str) -> None:
        """Logged in (a fresh connection): time to take a channel snapshot."""

    def on_event(self, server_ip: str, event: AmiMessage) -> None:
        """An unsolicited event (not part of an action's reply)."""

    def on_health(self, server_ip: str, health: Health, reason: str) -> None:
        """The session's view of the server changed (UP, SUSPECT, DOWN)."""

    def on_rtt(self, server_ip: str, rtt_ms: float) -> None:
        """A heartbeat round trip completed."""


class _Protocol(AMIProtocol):  # type: ignore[misc]
    """panoramisk's protocol with our parser and without its resend-after-reconnect behaviour."""

    def __init__(self, session: AmiSession, max_message_bytes: int) -> None:
        super().__init__()
        self.session = session
        self.reader = MessageReader(max_message_bytes=max_message_bytes)
        self.closed_event = asyncio.Event()
        self.banner_event = asyncio.Event()
        self.error: BaseException | None = None
        self.closed: bool = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.encoding = "utf-8"
        self.factory = self  # panoramisk reads factory.save_stream / forgetable_actions
        self.save_stream = None
        self.forgetable_actions = ()
        self.awaiting_actions: list[Any] = []

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except AmiProtocolError as exc:
            self.abort(exc)
            return
        if self.reader.banner is not None:
            self.banner_event.set()
        for message in messages:
            action_id = message.get("ActionID")
            if action_id is not None and action_id in self.responses:
                # Part of an action's reply (EventList items too): panoramisk resolves it.
                self.handle_message(Message(message))
            elif "Event" in message:
                self.session.dispatch_event(message)

    def abort(self, exc: BaseException) -> None:
        """Drop the connection because of what the peer sent."""
        if self.error is None:
            self.error = exc
        if not self.closed:
            self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.error is None:
            self.error = exc or AmiError("connection closed by peer")
        self.close()
        self.closed_event.set()

    def close(self) -> None:
        # Trap 1: panoramisk queues pending actions for re-sending after reconnect (a duplicate
        # Originate). We fail them instead.
        reason = self.error or AmiError("connection closed")
        for action in list(self.responses.values()):
            if not action.future.done():
                action.future.set_exception(AmiError(f"{self.session.name}: {reason}"))
                action.future.exception()  # mark retrieved: nobody may be waiting any more
        self.responses.clear()
        if not self.closed:
            self.closed = True
            self.transport.close()


class AmiSession:
    """Keeps one server's AMI connection alive and reports events and health to a listener."""

    def __init__(
        self,
        endpoint: AmiEndpoint,
        ami: AmiConfig,
        health: HealthConfig,
        listener: SessionListener,
        filters: tuple[str, ...] = (),
    ) -> None:
        self.endpoint = endpoint
        self.ami = ami
        self.health_config = health
        self.listener = listener
        self.filters = filters
        self.name = f"AMI {endpoint.server_ip} ({endpoint.address})"
        self._protocol: _Protocol | None = None
        self._task: asyncio.Task[None] | None = None
        self.health = Health.DOWN
        self.connected_since: float | None = None
        self.reconnects = 0
        self.logins = 0
        self.last_error = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        """Start the connect/serve/reconnect loop (held by the session; stop() cancels it)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)
        return self._task

    async def stop(self) -> None:
        """Log off politely when connected, close, and cancel any pending reconnect."""
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            with contextlib.suppress(AmiError, TimeoutError):
                await asyncio.wait_for(self._send(protocol, {"Action": "Logoff"}), 0.5)
            protocol.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._set_health(Health.DOWN, "stopped")

    @property
    def connected(self) -> bool:
        return self._protocol is not None and not self._protocol.closed

    async def _run(self) -> None:
        stable_after_s = max(10.0, self.ami.reconnect_max_s)
        while True:
            retrying = AsyncRetrying(
                wait=self._backoff,
                retry=retry_if_exception_type((AmiError, OSError, TimeoutError)),
                before_sleep=self._before_sleep,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        started = await self._connect_and_serve()
                        # A connection that stayed up long enough resets the backoff;
                        # a short one counts as a failure, so a flapping peer cannot make us spin.
                        if time.monotonic() - started < stable_after_s:
                            raise AmiError(self.last_error or "connection lost")
                        break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # pragma: no cover - tenacity retries forever on our errors
                log.exception("%s: unexpected error, reconnecting: %s", self.name, exc)
                await asyncio.sleep(self.ami.reconnect_max_s)
            self.reconnects += 1

    def _backoff(self, state: RetryCallState) -> float:
        """Exponential from reconnect_initial_s, plus jitter, never above reconnect_max_s."""
        initial, cap = self.ami.reconnect_initial_s, self.ami.reconnect_max_s
        exponential = wait_exponential(multiplier=initial, max=cap)(state)
        return float(min(cap, exponential + random.uniform(0, initial)))

    def _before_sleep(self, state: RetryCallState) -> None:
        self.reconnects += 1
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: %s; reconnecting in %.1fs", self.name, self.last_error, delay)

    async def _connect_and_serve(self) -> float:
        """Connect, log in, serve until the connection ends; returns when it was established."""
        host, port = self.endpoint.host, self.endpoint.port
        if os.environ.get(LOOPBACK_ONLY_ENV) and not is_loopback(host):
            self.last_error = (
                f"refusing to connect to non-loopback {host} ({LOOPBACK_ONLY_ENV} set)"
            )
            raise AmiError(self.last_error)
        loop = asyncio.get_running_loop()
        max_bytes = self.ami.max_message_bytes
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self, max_bytes), host, port),
                self.ami.connect_timeout_s,
            )
        except TimeoutError:
            self.last_error = f"connect timed out after {self.ami.connect_timeout_s:g}s"
            raise AmiError(self.last_error) from None
        except OSError as exc:
            self.last_error = f"cannot connect: {exc.strerror or exc}"
            raise AmiError(self.last_error) from None
        assert isinstance(protocol, _Protocol)
        self._protocol = protocol
        try:
            await self._login(protocol)
            started = time.monotonic()
            self.connected_since = time.time()
            self.logins += 1
            self._set_health(Health.UP, "logged in")
            self._notify(self.listener.on_login, self.endpoint.server_ip)
            await self._serve(protocol)
            return started
        finally:
            protocol.close()
            self._protocol = None
            self.connected_since = None
            self._set_health(Health.DOWN, self.last_error or "disconnected")

    async def _login(self, protocol: _Protocol) -> None:
        timeout = self.ami.action_timeout_s
        try:
            await asyncio.wait_for(protocol.banner_event.wait(), timeout)
        except TimeoutError:
            self.last_error = f"no AMI banner within {timeout:g}s"
            raise AmiError(self.last_error) from None
        response = await self._request(
            protocol,
            {
                "Action": "Login",
                "Username": self.endpoint.username,
                "Secret": self.endpoint.secret,
                "Events": self.ami.events,
            },
        )
        if response.get("Response") != "Success":
            self.last_error = f"login rejected: {response.get('Message', 'no message')}"
            raise AmiError(self.last_error)
        if self.ami.use_filters:
            for expression in self.filters:
                # Older Asterisk answers Error to Filter; that only costs us bandwidth.
                await self._request(
                    protocol, {"Action": "Filter", "Operation": "Add", "Filter": expression}
                )

    async def _serve(self, protocol: _Protocol) -> None:
        """Heartbeat until the connection closes or the peer stops answering."""
        interval = self.health_config.heartbeat_interval_s
        misses = 0
        while not protocol.closed:
            sent = time.monotonic()
            try:
                await asyncio.wait_for(self._send(protocol, {"Action": "Ping"}), interval)
            except TimeoutError:
                misses += 1
                if misses >= self.health_config.heartbeat_misses:
                    self.last_error = f"no answer to {misses} heartbeats"
                    protocol.abort(AmiError(self.last_error))
                    break
                self._set_health(Health.SUSPECT, f"heartbeat missed ({misses})")
                continue
            except AmiError:
                break
            rtt = time.monotonic() - sent
            misses = 0
            self._set_health(Health.UP, "heartbeat ok")
            self._notify(self.listener.on_rtt, self.endpoint.server_ip, rtt * 1000.0)
            closed = asyncio.ensure_future(protocol.closed_event.wait())
            try:
                await asyncio.wait({closed}, timeout=max(0.0, interval - rtt))
            finally:
                closed.cancel()
        error = protocol.error
        if not self.last_error or not isinstance(error, AmiError) or str(error) != self.last_error:
            self.last_error = _describe(error)
        log.warning("%s: connection lost: %s", self.name, self.last_error)

    # ------------------------------------------------------------------ actions

    async def _send(self, protocol: _Protocol, action: Mapping[str, str]) -> Any:
        """Send an action through panoramisk and await its (un-timed) future."""
        if protocol.closed:
            raise AmiError(f"{self.name}: not connected")
        fields = dict(action)
        if fields.get("Action", "").lower() == "originate":
            fields.setdefault("Async", "true")  # trap 2: a missing Async key breaks panoramisk
        # as_list=None lets panoramisk detect EventList replies (its protocol defaults to False,
        # which would resolve CoreShowChannels with its first message only).
        return await protocol.send(Action(fields), as_list=None)

    async def _request(self, protocol: _Protocol, action: Mapping[str, str]) -> AmiMessage:
        try:
            reply = await asyncio.wait_for(self._send(protocol, action), self.ami.action_timeout_s)
        except TimeoutError:
            self.last_error = (
                f"{action.get('Action')} timed out after {self.ami.action_timeout_s:g}s"
            )
            raise AmiError(self.last_error) from None
        return _as_dict(reply[0] if isinstance(reply, list) else reply)

    async def action(self, action: Mapping[str, str]) -> AmiMessage:
        """Send one action and return its response (timeout from config)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            raise AmiError(f"{self.name}: not connected")
        return await self._request(protocol, action)

    async def list_action(self, action: Mapping[str, str]) -> list[AmiMessage]:
        """Send an EventList action; returns the list items (without the start/complete markers)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            raise AmiError(f"{self.name}: not connected")
        try:
            reply = await asyncio.wait_for(self._send(protocol, action), self.ami.action_timeout_s)
        except TimeoutError:
            raise AmiError(f"{self.name}: {action.get('Action')} timed out") from None
        messages = [_as_dict(m) for m in (reply if isinstance(reply, list) else [reply])]
        head = messages[0] if messages else {}
        if head.get("Response") not in (None, "Success"):
            raise AmiError(f"{self.name}: {action.get('Action')}: {head.get('Message', 'error')}")
        return [
            m
            for m in messages
            if "Event" in m and m.get("EventList") != "Complete" and "Response" not in m
        ]

    # ------------------------------------------------------------------ listener plumbing

    def dispatch_event(self, event: AmiMessage) -> None:
        """Hand an event to the listener; its exceptions are logged, never propagated (trap 3)."""
        self._notify(self.listener.on_event, self.endpoint.server_ip, event)

    def _set_health(self, health: Health, reason: str) -> None:
        if health is not self.health:
            self.health = health
            self._notify(self.listener.on_health, self.endpoint.server_ip, health, reason)

    def _notify(self, callback: Any, *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("%s: listener %s failed (ignored)", self.name, callback.__name__)


def _as_dict(message: Any) -> AmiMessage:
    return {str(k): str(v) for k, v in dict(message).items()}


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "connection closed"
    if isinstance(error, AmiError):
        return str(error)
    return f"connection lost ({type(error).__name__}: {error})" if str(error) else "connection lost"
