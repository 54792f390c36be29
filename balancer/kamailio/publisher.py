"""Publishing to one Kamailio: a thread of its own, passes when something is due, backoff.

Each endpoint of an HA pair has its own `EndpointPublisher`, so one that is down or slow never
delays the other. A pass runs on the publisher's own worker thread (blocking HTTP and file
writes stay off the event loop): read ``dispatcher.list``, plan with `model.plan_pass`, write the
whole list file when it changed (atomically: a Kamailio starting at any moment loads a complete
file), reload it when members or weights are due and the reload bound allows, else set the
states that differ. A failed pass is retried with exponential backoff and jitter; the pass that
succeeds after it compares everything, so it restores the full desired state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from balancer.errors import KamailioError
from balancer.kamailio.model import (
    Desired,
    KamDest,
    Key,
    Pass,
    ReloadLimiter,
    parse_list,
    plan_pass,
)
from balancer.kamailio.rpc import KamailioFault, KamailioRpc
from balancer.kamailio.settings import KamailioConfig, KamailioEndpoint

log = logging.getLogger(__name__)


class LagObserver(Protocol):
    """Receives each publish lag in seconds (a histogram)."""

    def observe(self, value: float) -> None: ...


@dataclass
class PublishStats:
    """Counters a scrape and the published document show, per endpoint."""

    passes: int = 0
    state_changes: int = 0
    reloads: int = 0
    file_writes: int = 0
    failures: int = 0
    reloads_deferred: int = 0
    last_ok_at: float | None = None  # epoch seconds of the last pass that reached Kamailio
    last_publish_at: float | None = None  # epoch seconds of the last change applied
    last_error: str | None = None
    last_lag_s: float | None = None
    restarts_seen: int = 0
    reasons: list[str] = field(default_factory=list)  # the last few reload reasons


class EndpointPublisher:
    """Keeps one Kamailio in step with the latest desired state offered to it."""

    def __init__(
        self,
        endpoint: KamailioEndpoint,
        config: KamailioConfig,
        *,
        lag: LagObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.config = config
        self.rpc = KamailioRpc(endpoint.url, config.rpc_timeout_s)
        self.lag = lag
        self.clock = clock
        self.stats = PublishStats()
        self.reachable: bool | None = None  # None: not tried yet
        self.kam: dict[Key, KamDest] | None = None  # what it reported last
        self.told: dict[Key, bool] = {}  # the state it was last given, per destination
        self.admin_disabled: set[Key] = set()
        self.last_pass: Pass | None = None
        self.limiter = ReloadLimiter(config.max_reloads_per_minute)
        self._desired: Desired | None = None
        self._wake = asyncio.Event()
        self._stopping = threading.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"kamailio-{endpoint.name}")
        self._failures_in_row = 0
        self._retry_at = 0.0
        self._verify_at = 0.0
        self._reload_at: float | None = None  # a reload deferred by the bound
        self._up_since: str | None = None
        self._paused = False

    # ------------------------------------------------------------------ event-loop side

    def offer(self, desired: Desired) -> None:
        """The newest desired state; a pass follows at once when it changes anything."""
        self._desired = desired
        if self._due(desired):
            self._wake.set()

    def pause(self) -> None:
        """Not the publishing daemon any more (leader mode): stop, and restore all on resume."""
        self._paused = True
        self.told = {}

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._wake.set()

    def _due(self, desired: Desired) -> bool:
        """A change the last pass did not apply: a state, a member, or a share past hysteresis."""
        last = self.last_pass
        if last is None or self.kam is None:
            return True
        for w in desired.all():
            if self.told.get(w.key) is not w.active and w.key not in last.admin_disabled:
                return True
        probe = plan_pass(
            desired,
            self.kam,
            self.told,
            self.admin_disabled,
            algorithm=self.config.algorithm,
            probing=self.config.probing,
            hysteresis=self.config.weight_hysteresis,
        )
        deferred = self._reload_at is not None and self._reload_at > self.clock()
        return bool(probe.states) or (probe.reload_reason is not None and not deferred)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``; never raises (failures are counted, logged and retried)."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                now = self.clock()
                due = [self._verify_at]
                if self._reload_at is not None:
                    due.append(self._reload_at)
                wait_s = max(0.0, min(due) - now)
                waits: set[asyncio.Future[Any]] = {stopping}
                if self._failures_in_row:
                    # Backing off: only the retry time wakes it (it carries the newest state).
                    wait_s = max(0.0, self._retry_at - now)
                else:
                    waits.add(asyncio.ensure_future(self._wake.wait()))
                await asyncio.wait(waits, timeout=wait_s, return_when="FIRST_COMPLETED")
                for waiter in waits - {stopping}:
                    waiter.cancel()
                if stop.is_set():
                    break
                if self._failures_in_row and self.clock() < self._retry_at:
                    continue
                self._wake.clear()
                desired = self._desired
                if desired is None or self._paused:
                    self._verify_at = self.clock() + self.config.verify_interval_s
                    continue
                try:
                    await loop.run_in_executor(self._executor, self._pass, desired)
                except KamailioError as exc:
                    self._failed(exc)
                except Exception as exc:  # a bug must not end publishing for good
                    log.exception("kamailio %s: pass failed", self.endpoint.name)
                    self._failed(KamailioError(str(exc)))
                else:
                    self._succeeded()
        finally:
            stopping.cancel()
            self._stopping.set()
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _failed(self, exc: KamailioError) -> None:
        self.stats.failures += 1
        self.stats.last_error = str(exc)
        self._failures_in_row += 1
        cap, initial = self.config.retry_max_s, self.config.retry_initial_s
        delay = min(cap, initial * 2 ** (self._failures_in_row - 1))
        delay = min(cap, delay + random.uniform(0, initial))
        self._retry_at = self.clock() + delay
        if self.reachable is not False or self._failures_in_row % 20 == 0:
            log.error(
                "kamailio %s: publish failed (%d in a row, retrying in %.1fs): %s",
                self.endpoint.name,
                self._failures_in_row,
                delay,
                exc,
            )
        self.reachable = False

    def _succeeded(self) -> None:
        if self._failures_in_row:
            log.info("kamailio %s: reachable again; desired state restored", self.endpoint.name)
        self._failures_in_row = 0
        self.reachable = True
        self.stats.last_error = None
        self._verify_at = self.clock() + self.config.verify_interval_s

    # ------------------------------------------------------------------ worker-thread side

    def _pass(self, desired: Desired) -> None:
        """One publish (on the worker thread): list, plan, write, reload or set states.

        The event loop reads ``told``, ``kam`` and ``last_pass`` meanwhile, so they are replaced
        whole, never changed in place.
        """
        self.stats.passes += 1
        told = dict(self.told)
        try:
            up_since = self.rpc.up_since()
            kam = self._list()
        except KamailioError:
            # Unreachable: still keep the file whole and current, so a Kamailio starting now
            # loads the desired state (planned from what it reported last).
            self._write_file(self._plan(desired, self.kam, told).file_text)
            self.told = {}  # it may come back with anything: tell it everything again
            raise
        if self._up_since is not None and up_since != self._up_since:
            self.stats.restarts_seen += 1
            log.warning("kamailio %s: restarted (up since %s)", self.endpoint.name, up_since)
            told = {}
        self._up_since = up_since
        self.kam = kam
        self.stats.last_ok_at = time.time()
        plan = self._plan(desired, kam, told)
        self.admin_disabled = plan.admin_disabled
        self._write_file(plan.file_text)
        now = self.clock()
        applied: list[Key] = []  # destinations whose state changed in Kamailio: lag measured
        published = False
        if plan.reload_reason is not None and self.limiter.allowed(now):
            if self._reload(plan.reload_reason, now):
                published = True
                for w in desired.all():
                    if w.key not in plan.admin_disabled:
                        before = kam.get(w.key)
                        if before is None or (before.state == "A") != w.active:
                            applied.append(w.key)
                        told[w.key] = w.active
                self._reload_at = None
                # What the reload loaded; anything still different is set below.
                kam = self.kam = self._list()
                plan = self._plan(desired, kam, told)
        elif plan.reload_reason is not None:
            self._reload_at = self.limiter.next_allowed(now)
            self.stats.reloads_deferred += 1
        for state, set_id, duid in plan.states:
            if self._stopping.is_set():
                break
            try:
                self.rpc.call("dispatcher.set_duid_state", state, set_id, duid)
            except KamailioFault as exc:
                # Not loaded (a reload is due) or gone: the reload brings it with its state.
                log.warning(
                    "kamailio %s: set %s %s/%s: %s", self.endpoint.name, state, set_id, duid, exc
                )
                continue
            self.stats.state_changes += 1
            published = True
            before = kam.get((set_id, duid))
            if before is None or (before.state == "A") != (state != "i"):
                applied.append((set_id, duid))
            told[(set_id, duid)] = state != "i"
        # Destinations already as wanted count as told (a restart loaded them from the file).
        for w in desired.all():
            have = kam.get(w.key)
            known = w.key in told or w.key in plan.admin_disabled
            if have is not None and not known and (have.state == "A") == w.active:
                told[w.key] = w.active
        self.told = told
        self.last_pass = plan
        if published:
            self.stats.last_publish_at = time.time()
        if applied:
            ack = self.clock()
            wanted = desired.by_key()
            for key in dict.fromkeys(applied):
                lag = max(0.0, ack - wanted[key].since)
                self.stats.last_lag_s = lag
                if self.lag is not None:
                    self.lag.observe(lag)

    def _list(self) -> dict[Key, KamDest]:
        try:
            return parse_list(self.rpc.list())
        except (ValueError, TypeError, AttributeError) as exc:
            raise KamailioError(f"{self.endpoint.url}: dispatcher.list: {exc}") from None

    def _plan(
        self, desired: Desired, kam: dict[Key, KamDest] | None, told: dict[Key, bool]
    ) -> Pass:
        return plan_pass(
            desired,
            kam,
            told,
            self.admin_disabled,
            algorithm=self.config.algorithm,
            probing=self.config.probing,
            hysteresis=self.config.weight_hysteresis,
        )

    def _reload(self, reason: str, now: float) -> bool:
        """``dispatcher.reload``; False when Kamailio refused it as too soon (its reload_delta)."""
        try:
            self.rpc.call("dispatcher.reload")
        except KamailioFault as exc:
            self.limiter.record(now)
            self._reload_at = self.limiter.next_allowed(now)
            self.stats.reloads_deferred += 1
            log.warning("kamailio %s: reload refused (%s); retrying", self.endpoint.name, exc)
            return False
        self.limiter.record(now)
        self.stats.reloads += 1
        self.stats.reasons = [*self.stats.reasons[-4:], reason]
        log.info("kamailio %s: reloaded the dispatcher list (%s)", self.endpoint.name, reason)
        return True

    def _write_file(self, text: str) -> None:
        """Replace the list file atomically when its content differs (read back each time, so a
        file someone else replaced or emptied is rewritten too)."""
        path = Path(self.endpoint.list_file)
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == text:
                return
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            reason = exc.strerror or exc
            raise KamailioError(
                f"kamailio.endpoints {self.endpoint.name}: cannot write {path}: {reason}"
            ) from None
        self.stats.file_writes += 1

    # ------------------------------------------------------------------ reporting

    def document(self) -> dict[str, Any]:
        """This endpoint's part of the published `kamailio` document."""
        plan = self.last_pass
        stats = self.stats
        return {
            "name": self.endpoint.name,
            "url": self.endpoint.url,
            "list_file": self.endpoint.list_file,
            "reachable": self.reachable,
            "paused": self._paused,
            "last_ok_at": stats.last_ok_at,
            "last_publish_at": stats.last_publish_at,
            "last_error": stats.last_error,
            "last_lag_s": stats.last_lag_s,
            "failures": stats.failures,
            "reloads": stats.reloads,
            "reloads_deferred": stats.reloads_deferred,
            "state_changes": stats.state_changes,
            "restarts_seen": stats.restarts_seen,
            "reload_reasons": list(stats.reasons),
            "weights": {f"{s}/{d}": w for (s, d), w in (plan.weights if plan else {}).items()},
            "admin_disabled": sorted(f"{s}/{d}" for s, d in self.admin_disabled),
        }
