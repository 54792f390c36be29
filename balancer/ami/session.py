"""One AMI session per Asterisk server: panoramisk's protocol behind a typed class fixing its traps.

What panoramisk gives us: the asyncio Protocol (`AMIProtocol`), action encoding with generated
ActionIDs, and matching of responses and EventList events to the action's future (`Action`).
What this class adds (see DESIGN.md, "panoramisk: known traps"):
  - our own incremental parser (whole messages decoded at once, size cap, garbage detection);
  - a connect timeout and a timeout on every action;
  - pending actions FAIL when the connection drops; nothing is ever re-sent after a reconnect;
  - event listeners are called inside a guard, so a handler's exception cannot kill the session;
  - an awaited heartbeat Ping that notices a peer that stopped answering;
  - reconnect with backoff (tenacity): full jitter under a ceiling that follows the outage's
    length, capped, reset by a login;
  - heartbeats on a fixed schedule, so a hung peer is DOWN within a hard bound;
  - health reasons that are the cause of each change ("stopped" after stop(), never a stale error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn, Protocol

from panoramisk.actions import Action
from panoramisk.ami_protocol import AMIProtocol
from panoramisk.message import Message
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

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


def backoff_ceiling_s(unreachable_s: float, initial_s: float, max_s: float) -> float:
    """The longest wait once a server has been unreachable this long: as long, within limits."""
    return min(max_s, max(initial_s, unreachable_s))


class AmiSession:
    """Keeps one server's AMI connection alive and reports events and health to a listener.

    Reconnect policy: every attempt after a failure waits a random time in [0, ceiling] ("full
    jitter", so the balancers of a site do not all hit a recovering Asterisk in the same
    instant). The ceiling is how long the server has been unreachable so far, at least
    ``ami.reconnect_initial_s`` and at most ``ami.reconnect_max_s``: each wait is at most the
    time already waited, so attempts thin out geometrically (about x1.5 apart on average) while
    it stays away, and once it answers again it is reconnected within about as long as the
    outage had lasted. (A ceiling doubled per attempt let attempts that fail at once, such as a
    refused connection, push it far past the outage: seconds after a 1 s blip.) A successful
    login resets it: the loss of a connection that logged in waits at most
    ``reconnect_initial_s``, however often the server flaps.

    Hung peers: heartbeat Pings go out every ``heartbeat_interval_s`` on a fixed schedule, each
    given ``heartbeat_timeout_s`` to be answered; one miss makes the server SUSPECT, and
    ``heartbeat_misses`` misses in a row DOWN. So DOWN comes at most ``heartbeat_interval_s *
    heartbeat_misses + heartbeat_timeout_s`` after the last answered Ping, wherever in the cycle
    the peer stopped answering (2.5 s with the defaults).
    """

    def __init__(
        self,
        endpoint: AmiEndpoint,
        ami: AmiConfig,
        health: HealthConfig,
        listener: SessionListener,
        filters: tuple[str, ...] = (),
        *,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.ami = ami
        self.health_config = health
        self.listener = listener
        self.filters = filters
        self.name = f"AMI {endpoint.server_ip} ({endpoint.address})"
        # Injected so that tests can check the schedule and the spread without waiting for it.
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._clock = clock
        self._unreachable_since: float | None = None  # the first failure since the last login
        self._protocol: _Protocol | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._reported = False
        self.health = Health.DOWN
        self.health_reason = "not connected yet"
        self.health_changed_at = time.monotonic()  # when health or a DOWN's cause last changed
        self.connected_since: float | None = None
        self.attempts = 0  # connection attempts
        self.reconnects = 0  # attempts after the first one
        self.failures = 0  # failed attempts since the last login
        self.logins = 0
        self.last_error = ""  # why the last attempt or connection ended
        self.last_backoff_s = 0.0
        self.last_heartbeat_at: float | None = None  # time.monotonic() of the last answered Ping
        self.last_backoff_ceiling_s = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        """Start the connect/serve/reconnect loop (held by the session; stop() cancels it)."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=self.name)
        return self._task

    async def stop(self) -> None:
        """Log off politely when connected, close, and cancel any pending reconnect."""
        # From here on nothing the closing connection does is news: the server is DOWN because
        # we stopped, and that is the only reason reported.
        self._stopping = True
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            with contextlib.suppress(AmiError, TimeoutError):
                await self._call(protocol, {"Action": "Logoff"}, 0.5)
            protocol.close()
        task, self._task = self._task, None
        if task is not None:
            # Until it has ended: a cancellation lost inside a library's await must not leave
            # the reconnect loop running (and the daemon's shutdown waiting for it).
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: session task failed: %s", self.name, task.exception())
        self.last_error = "stopped"
        self._report(Health.DOWN, "stopped")

    @property
    def connected(self) -> bool:
        """True while a connection is open (logged in or logging in)."""
        return self._protocol is not None and not self._protocol.closed

    async def _run(self) -> None:
        retrying = AsyncRetrying(
            sleep=self._sleep,
            wait=self._backoff,
            # Our own errors are the expected ends of a connection; anything else is a bug,
            # logged with its traceback by _before_sleep, and retried all the same.
            retry=retry_if_exception_type(Exception),
            before_sleep=self._before_sleep,
        )
        async for attempt in retrying:
            if self._stopping:
                return  # stop() asked; do not start another connection
            with attempt:
                await self._attempt()

    async def _attempt(self) -> None:
        """One connection, from connect to its end; always ends by raising why it ended."""
        if self.attempts:
            self.reconnects += 1
        self.attempts += 1
        try:
            await self._connect_and_serve()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            if self._unreachable_since is None:
                self._unreachable_since = self._clock()
            if not isinstance(exc, AmiError) or not self.last_error:
                self.last_error = _describe(exc)
            self._report(Health.DOWN, self.last_error)
            raise
        raise AmiError(self.last_error or "connection ended")  # pragma: no cover - serve raises

    def _backoff(self, state: RetryCallState) -> float:
        """Full jitter under a ceiling that follows the outage (see the class docstring)."""
        since = self._unreachable_since
        unreachable_s = 0.0 if since is None else self._clock() - since
        ceiling = backoff_ceiling_s(
            unreachable_s, self.ami.reconnect_initial_s, self.ami.reconnect_max_s
        )
        self.last_backoff_ceiling_s = ceiling
        self.last_backoff_s = self._rng.uniform(0.0, ceiling)
        return self.last_backoff_s

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        if error is not None and not isinstance(error, AmiError):
            log.error("%s: unexpected error", self.name, exc_info=error)
        log.warning(
            "%s: %s; reconnecting in %.2fs (attempt %d, wait at most %.2gs)",
            self.name,
            self.last_error,
            self.last_backoff_s,
            self.attempts + 1,
            self.last_backoff_ceiling_s,
        )

    async def _connect_and_serve(self) -> None:
        """Connect, log in, serve until the connection ends; raises AmiError saying why."""
        self.last_error = ""
        host, port = self.endpoint.host, self.endpoint.port
        if os.environ.get(LOOPBACK_ONLY_ENV) and not is_loopback(host):
            self._fail(f"refusing to connect to non-loopback {host} ({LOOPBACK_ONLY_ENV} set)")
        loop = asyncio.get_running_loop()
        max_bytes = self.ami.max_message_bytes
        try:
            async with asyncio.timeout(self.ami.connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self, max_bytes), host, port
                )
        except TimeoutError:
            self._fail(f"connect timed out after {self.ami.connect_timeout_s:g}s")
        except OSError as exc:
            self._fail(f"cannot connect: {exc.strerror or exc}")
        assert isinstance(protocol, _Protocol)
        self._protocol = protocol
        try:
            await self._login(protocol)
            self.connected_since = time.time()
            self.logins += 1
            # A login is a success: the next loss waits from reconnect_initial_s again.
            self.failures, self._unreachable_since = 0, None
            self._report(Health.UP, "logged in")
            self._notify(self.listener.on_login, self.endpoint.server_ip)
            self._fail(await self._serve(protocol))
        except AmiError as exc:
            self.last_error = self.last_error or str(exc)
            raise
        finally:
            protocol.close()
            self._protocol = None
            self.connected_since = None

    def _fail(self, reason: str) -> NoReturn:
        """End this attempt: ``reason`` is what the DOWN it causes says."""
        self.last_error = reason
        raise AmiError(reason)

    async def _login(self, protocol: _Protocol) -> None:
        timeout = self.ami.action_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await protocol.banner_event.wait()
        except TimeoutError:
            self._fail(f"no AMI banner within {timeout:g}s")
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
            self._fail(f"login rejected: {response.get('Message', 'no message')}")
        if self.ami.use_filters:
            for expression in self.filters:
                # Older Asterisk answers Error to Filter; that only costs us bandwidth.
                await self._request(
                    protocol, {"Action": "Filter", "Operation": "Add", "Filter": expression}
                )

    async def _serve(self, protocol: _Protocol) -> str:
        """Heartbeat on a fixed schedule until the connection ends; returns why it ended."""
        # asyncio's clock is time.monotonic(), so the schedule and last_heartbeat_at agree.
        loop = asyncio.get_running_loop()
        misses = 0
        due = loop.time()
        while not protocol.closed:
            # Read each round, so that a reload applies to running sessions.
            config = self.health_config
            interval = config.heartbeat_interval_s
            timeout = min(config.heartbeat_timeout_s, interval)
            sent = loop.time()
            try:
                # Answered by due + timeout, counted from the schedule rather than from when
                # this task got to send it: a late wake-up does not stretch the bound. A loop
                # far behind still gives the peer half the timeout (its lateness is ours).
                limit_s = max(timeout / 2, due + timeout - sent)
                await self._call(protocol, {"Action": "Ping"}, limit_s)
            except TimeoutError:
                misses += 1
                if misses >= config.heartbeat_misses:
                    reason = f"no answer to {misses} heartbeats"
                    protocol.abort(AmiError(reason))
                    log.warning("%s: %s", self.name, reason)
                    return reason
                self._report(Health.SUSPECT, f"heartbeat missed ({misses})")
            except AmiError:
                break
            else:
                self.last_heartbeat_at = time.monotonic()
                rtt = self.last_heartbeat_at - sent
                misses = 0
                self._report(Health.UP, "heartbeat ok")
                self._notify(self.listener.on_rtt, self.endpoint.server_ip, rtt * 1000.0)
            # The next Ping is due one interval after this one was, not after its answer: the
            # bound on DOWN then holds wherever in the cycle the peer stops answering. A loop
            # that fell behind sends at once rather than in a burst.
            due = max(due + interval, loop.time())
            closed = asyncio.ensure_future(protocol.closed_event.wait())
            try:
                await asyncio.wait({closed}, timeout=due - loop.time())
            finally:
                closed.cancel()
        reason = _describe(protocol.error)
        log.warning("%s: connection lost: %s", self.name, reason)
        return reason

    # ------------------------------------------------------------------ actions

    async def _call(self, protocol: _Protocol, action: Mapping[str, str], limit_s: float) -> Any:
        """Send an action through panoramisk and await its reply for at most ``limit_s``.

        Raises TimeoutError (the caller words it) or AmiError when the connection is gone.
        """
        if protocol.closed:
            raise AmiError(f"{self.name}: not connected")
        fields = dict(action)
        if fields.get("Action", "").lower() == "originate":
            fields.setdefault("Async", "true")  # trap 2: a missing Async key breaks panoramisk
        request = Action(fields)
        # as_list=None lets panoramisk detect EventList replies (its protocol defaults to False,
        # which would resolve CoreShowChannels with its first message only).
        future = protocol.send(request, as_list=None)
        try:
            # Trap 5: panoramisk never times out. asyncio.timeout, not wait_for: on Python 3.11
            # wait_for can swallow a cancellation that arrives as the reply does, and a
            # session told to stop would then carry on.
            async with asyncio.timeout(limit_s):
                return await future
        except TimeoutError:
            # A late reply must not find a waiting action: forget it (panoramisk would keep it).
            protocol.responses.pop(request.id, None)
            raise

    async def _request(self, protocol: _Protocol, action: Mapping[str, str]) -> AmiMessage:
        timeout = self.ami.action_timeout_s
        try:
            reply = await self._call(protocol, action, timeout)
        except TimeoutError:
            raise AmiError(f"{action.get('Action')} timed out after {timeout:g}s") from None
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
            reply = await self._call(protocol, action, self.ami.action_timeout_s)
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

    def _report(self, health: Health, reason: str) -> None:
        """Tell the listener about a change of health, with the cause of this change.

        While stopping, only the final "stopped" is reported. A DOWN server whose cause changes
        (refused, then rejected) reports the new cause: it is why the server is down now.
        """
        if self._stopping and reason != "stopped":
            return
        changed = health is not self.health or (
            health is Health.DOWN and reason != self.health_reason
        )
        if changed or not self._reported:
            self.health, self.health_reason, self._reported = health, reason, True
            self.health_changed_at = time.monotonic()
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
