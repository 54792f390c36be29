"""Per-call failover: a balance call that fails on a trunk before answer is re-placed once.

The seed's "failure route" idea: a trunk failure (503/500/... -> causes 34, 38, 27, 102, 41, 42,
58, 127) moves the call to the next carrier of its route; a called-party outcome (busy, no
answer, normal clearing, invalid number) never does. At most one retry per call, and a failed
retry is never retried: `replace_call` keys vb_call_retries by the failed call's caller code,
so this holds across daemons and leader changes. Only the leader re-places (every write carries
its epoch, balancer/db/fence.py), and every retry, or refusal to retry, goes to the decision
log (kind 'failover'). When no carrier is left on the call's own server, the retry moves to
another UP server with trunk lines to spare (the daemon's `alternates`).

A new leader picks up its predecessor's calls: every daemon keeps the trunk failures of calls
it did not place (while standing by, and for `_ADOPT_WINDOW_S` after it takes the lease), and
once it leads it finds each one's Originate in vicidial_manager (VDACnote, dial string: the
carrier is the one whose dial prefix it carries) and re-places the balance calls among them.

Correlation, from AMI back to the lead: every Originate the balancer writes carries the
VICIdial caller code (``V`` + 9 digits of time + 10-digit lead_id) as its Callerid name, and
Asterisk copies it to every leg of the call: the Local ``;1``/``;2`` legs and the trunk channel
(see tests/data/asterisk22-originate-session.txt: ``CallerIDName`` on every Hangup; the
simulator does the same). The executor tells us each routed call it committed, keyed by that
code, with the carrier it chose. The first Hangup carrying a known code decides: ChannelState
Up means the call was answered (then hung up: nothing to do); otherwise its ``Cause`` (the trunk
leg's cause propagates to the Local legs, as the recording shows) is classified. A DialEnd
``ANSWER`` carrying the code forgets the call early. The caller code was chosen over the Local
channel name (``Local/<dial string>@<context>``): the name holds only the number, which a
campaign may dial again, while the code names the one call and its lead exactly. Calls whose
outcome never arrives are forgotten after their dial timeout.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import pymysql

from balancer.balance.model import DbSnapshot, ServerInfo
from balancer.carriers.health import UP_STATE, CarrierHealth, caller_code_in, dial_timeout_s
from balancer.carriers.routing import CarrierPick, Outcome, PlacedCall, classify_cause
from balancer.config import RoutingConfig
from balancer.db.calls import CallResult
from balancer.db.cycle_log import Decision, details, log_decisions
from balancer.db.fence import FenceLost, LeaderFence
from balancer.db.retries import FoundCall, find_balance_call, replace_call
from balancer.db.worker import DbWorker
from balancer.errors import DatabaseError
from balancer.store.base import Channel

log = logging.getLogger(__name__)

KIND = "failover"
_FORGET_MARGIN_S = 30.0  # a call with no outcome is forgotten this long after its dial timeout
# A failure of a call this process did not place is kept this long: a standby's failures for the
# moment it takes over, and a new leader's for the calls its predecessor had ringing.
_ADOPT_WINDOW_S = 90.0
_MAX_UNKNOWN = 10_000
_SWEEP_S = 1.0


@dataclass(frozen=True)
class FailedCall:
    """A routed call that failed on a trunk before answer."""

    call: PlacedCall
    cause: int
    adopted: bool = False  # placed by another leader, found in the database


class Failover:
    """Watches the calls the executor routed and re-places each trunk failure once.

    Subscribes itself to ``carriers`` (every routed call committed is reported there) and is a
    tracker listener (Hangup, DialEnd). ``run(stop, db)`` does the re-placing.
    """

    def __init__(
        self,
        routing: RoutingConfig,
        carriers: CarrierHealth,
        *,
        fence: Callable[[], LeaderFence | None],
        on_fence_lost: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = datetime.now,
        max_tracked: int = 100_000,
    ) -> None:
        self.routing = routing
        self.carriers = carriers
        self.fence = fence
        self.on_fence_lost = on_fence_lost
        self.clock = clock
        self.now = now
        self.max_tracked = max_tracked
        self.calls: dict[str, tuple[PlacedCall, float]] = {}  # caller code -> call, forget at
        self._due: deque[tuple[float, str]] = deque()
        self.pending: deque[FailedCall] = deque()
        # trunk failures of calls not placed here: (seen at, caller code, server_ip, cause)
        self.unknown: deque[tuple[float, str, str, int]] = deque()
        self._unknown_codes: set[str] = set()  # the codes in `unknown` (each kept once)
        # codes this process decided (its own calls' first Hangup): their other legs are not
        # "unknown" calls of another leader (insertion ordered, bounded)
        self._decided: dict[str, None] = {}
        self._epoch: int | None = None
        self._led_since: float | None = None
        # The latest cycle's snapshot (campaigns, servers), and the other servers a retry may
        # move to when no carrier can take it on its own server (both set by the daemon).
        self.snapshot: Callable[[], DbSnapshot | None] = lambda: None
        self.alternates: Callable[[PlacedCall], Sequence[ServerInfo]] = lambda _call: ()
        self.host_server_ip = ""  # the VDACnote's host field ('' -> the call's server)
        self._wake: asyncio.Event | None = None
        self.retried = 0
        self.not_retried = 0
        self.adopted = 0
        carriers.observers.append(self.track)

    # ------------------------------------------------------------------ inputs

    def track(self, call: PlacedCall) -> None:
        """A routed call was committed: watch for its outcome."""
        if not self.routing.retry_failed_calls:
            return
        due = self.clock() + dial_timeout_s(call.campaign.dial_timeout) + _FORGET_MARGIN_S
        self.calls[call.caller_code] = (call, due)
        self._due.append((due, call.caller_code))
        while len(self.calls) > self.max_tracked and self._due:
            _, code = self._due.popleft()
            self.calls.pop(code, None)

    def on_channel_event(
        self, server_ip: str, event: Mapping[str, str], channel: Channel | None
    ) -> None:
        """Hangup before answer with a trunk-failure cause: queue the call's retry (O(1))."""
        name = event.get("Event")
        if name == "DialEnd":
            if event.get("DialStatus") == "ANSWER":
                code = caller_code_in(event, "DestCallerIDName", "CallerIDName")
                if code is not None:
                    self.calls.pop(code, None)
            return
        if name != "Hangup":
            return
        code = caller_code_in(event, "CallerIDName", "ConnectedLineName")
        if code is None:
            return
        answered = event.get("ChannelState") == UP_STATE
        cause_text = event.get("Cause", "")
        cause = int(cause_text) if cause_text.isdigit() else 0
        trunk_failure = not answered and classify_cause(cause) is Outcome.TRUNK_FAILURE
        entry = self.calls.get(code)
        if entry is None or entry[0].server_ip != server_ip:
            # Perhaps a call another leader placed: kept for a while, looked up if we lead.
            if (
                trunk_failure
                and code not in self._unknown_codes  # one per call, not one per leg
                and code not in self._decided  # a later leg of a call of ours
                and self.routing.retry_failed_calls
                and self._adopting()
            ):
                if len(self.unknown) >= _MAX_UNKNOWN:
                    self._unknown_codes.discard(self.unknown.popleft()[1])
                self.unknown.append((self.clock(), code, server_ip, cause))
                self._unknown_codes.add(code)
            return
        del self.calls[code]
        self._decided[code] = None
        if len(self._decided) > _MAX_UNKNOWN:
            del self._decided[next(iter(self._decided))]
        if not trunk_failure:
            return  # answered, or busy, no answer, normal clearing ...: the called party's doing
        self.pending.append(FailedCall(entry[0], cause))
        if self._wake is not None:
            self._wake.set()

    def on_channels_replaced(self, server_ip: str, channels: Sequence[Channel]) -> None:
        """Nothing to do: a call's outcome comes from its Hangup."""

    def _adopting(self) -> bool:
        """Whether failures of unknown calls are kept now: while standing by, and for a while
        after becoming leader (its predecessor's calls may still fail)."""
        fence = self.fence()
        now = self.clock()
        if fence is None:
            self._epoch = None
            return True
        if fence.epoch != self._epoch:
            self._epoch, self._led_since = fence.epoch, now
        return self._led_since is not None and now - self._led_since < _ADOPT_WINDOW_S

    async def _adopt(self, db: DbWorker) -> None:
        """Look up the failures of calls this process did not place; queue the balance calls'."""
        snapshot = self.snapshot()
        if not self.unknown or snapshot is None or self.fence() is None:
            return
        now = self.clock()
        keep: list[tuple[float, str, str, int]] = []
        while self.unknown:
            seen_at, code, server_ip, cause = self.unknown.popleft()
            self._unknown_codes.discard(code)
            if now - seen_at > _ADOPT_WINDOW_S:
                continue
            try:
                found = await db.run(functools.partial(find_balance_call, caller_code=code))
            except (DatabaseError, pymysql.err.Error) as exc:
                log.error("looking up call %s: %s", code, exc)
                keep.append((seen_at, code, server_ip, cause))
                break
            call = None if found is None else self._placed_call(found, snapshot)
            if call is None or call.server_ip != server_ip:
                continue  # not a routed balance call (VICIdial's own, or not routed)
            self.adopted += 1
            log.info("call %s (lead %d) was placed by another leader: adopted", code, call.lead_id)
            self.pending.append(FailedCall(call, cause, adopted=True))
        self.unknown.extendleft(reversed(keep))
        self._unknown_codes.update(code for _, code, _, _ in keep)

    def _placed_call(self, found: FoundCall, snapshot: DbSnapshot) -> PlacedCall | None:
        """A PlacedCall rebuilt from the database, with its carrier found by its dial prefix."""
        campaign = snapshot.campaigns.get(found.campaign_id)
        server = snapshot.servers.get(found.server_ip)
        if campaign is None or server is None:
            return None
        tail = found.number if campaign.omit_phone_code else found.phone_code + found.number
        if not found.dial_string.endswith(tail):
            return None
        prefix = found.dial_string[: len(found.dial_string) - len(tail)]
        carrier = next(
            (c.id for c in self.carriers.carriers.values() if c.dial_prefix == prefix), None
        )
        route = self.carriers.table.match(found.phone_code, found.number)
        if carrier is None or route is None:
            return None
        return PlacedCall(
            caller_code=found.caller_code,
            lead_id=found.lead_id,
            campaign=campaign,
            server=server,
            carrier_id=carrier,
            route=route.name,
            phone_code=found.phone_code,
            number=found.number,
            alt_dial=found.alt_dial,
            placed_at=found.placed_at,
            retry_of=found.retry_of,
        )

    # ------------------------------------------------------------------ re-placing

    async def run(self, stop: asyncio.Event, db: DbWorker) -> None:
        """Re-place queued failures through ``db`` until ``stop`` is set."""
        self._wake = asyncio.Event()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if not self.pending:
                    woken = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait(
                        {woken, stopping}, timeout=_SWEEP_S, return_when=asyncio.FIRST_COMPLETED
                    )
                    woken.cancel()
                self._wake.clear()
                self._forget_expired()
                await self._adopt(db)
                while self.pending and not stop.is_set():
                    failed = self.pending.popleft()
                    try:
                        await self.retry(db, failed)
                    except Exception:
                        log.exception("re-placing call %s failed", failed.call.caller_code)
        finally:
            stopping.cancel()
            self._wake = None

    async def retry(self, db: DbWorker, failed: FailedCall) -> CallResult | None:
        """Re-place one failed call on the next carrier of its route (if we lead and one can)."""
        call = failed.call
        fence = self.fence()
        if fence is None:
            log.debug("call %s failed on %s: not the leader", call.caller_code, call.carrier_id)
            return None
        failure = f"cause {failed.cause} on carrier {call.carrier_id}"
        if call.retry_of is not None:
            if failed.adopted:
                return None  # another leader's retry that failed: it is never retried
            why = f"{failure}: the call was already the retry of {call.retry_of} (at most one)"
            await self._log(db, call, "not_retried", why, failed)
            return None
        choice = self.carriers.choose(
            call.server_ip, call.phone_code, call.number, exclude=(call.carrier_id,)
        )
        target = call.server
        if not isinstance(choice, CarrierPick) and choice is not None:
            # no carrier left on its own server: another server with lines may take it
            for server in self.alternates(call):
                elsewhere = self.carriers.choose(server.server_ip, call.phone_code, call.number)
                if isinstance(elsewhere, CarrierPick):
                    choice, target = elsewhere, server
                    break
        if not isinstance(choice, CarrierPick):
            why = "routing no longer applies" if choice is None else choice.reason
            await self._log(db, call, "not_retried", f"{failure}; no carrier: {why}", failed)
            return None
        pick = choice
        try:
            result = await db.run(
                lambda conn: replace_call(
                    conn,
                    fence,
                    call,
                    pick,
                    call.carrier_id,
                    failed.cause,
                    target,
                    self.host_server_ip,
                ),
                idempotent=False,
            )
        except FenceLost:
            log.warning("call %s failed: leadership lost before its retry", call.caller_code)
            self.on_fence_lost()
            return None
        except (DatabaseError, pymysql.err.Error) as exc:
            log.error("re-placing call %s (lead %d): %s", call.caller_code, call.lead_id, exc)
            return None
        if not isinstance(result, CallResult):
            if failed.adopted and result.reason.startswith("already re-placed"):
                return None  # the leader that placed it handled it: nothing to say
            await self._log(db, call, "not_retried", f"{failure}; {result.reason}", failed)
            return None
        self.retried += 1
        retry = PlacedCall(
            caller_code=result.caller_code,
            lead_id=call.lead_id,
            campaign=call.campaign,
            server=target,
            carrier_id=pick.carrier_id,
            route=pick.route,
            phone_code=call.phone_code,
            number=call.number,
            alt_dial=call.alt_dial,
            placed_at=self.now().replace(microsecond=0),
            retry_of=call.caller_code,
        )
        self.carriers.placed(retry)
        log.info(
            "call %s (lead %d) failed with %s: re-placed on %s as %s",
            call.caller_code,
            call.lead_id,
            failure,
            pick.carrier_id,
            result.caller_code,
        )
        info: dict[str, object] = {"retry_caller_code": result.caller_code, "man_id": result.man_id}
        why = f"{failure}: re-placed once on the next carrier of route {pick.route!r}"
        if target.server_ip != call.server_ip:
            info["moved_to"] = target.server_ip
            why += f", on {target.server_ip} (no carrier left on {call.server_ip})"
        await self._log(db, call, "retried", why, failed, pick.carrier_id, info)
        return result

    async def _log(
        self,
        db: DbWorker,
        call: PlacedCall,
        outcome: str,
        reason: str,
        failed: FailedCall,
        carrier_id: str = "",
        extra: Mapping[str, object] | None = None,
    ) -> None:
        if outcome != "retried":
            self.not_retried += 1
            log.info("call %s (lead %d) not re-placed: %s", call.caller_code, call.lead_id, reason)
        decision = Decision(
            decided_at=self.now(),
            cycle_id=f"failover:{call.caller_code}",
            kind=KIND,
            campaign_id=call.campaign.campaign_id,
            lead_id=call.lead_id,
            server_ip=call.server_ip,
            carrier_id=carrier_id or call.carrier_id,
            outcome=outcome,
            reason=reason,
            details=details(
                caller_code=call.caller_code,
                failed_carrier=call.carrier_id,
                cause=failed.cause,
                route=call.route,
                **(extra or {}),
            ),
        )
        try:
            await db.run(
                lambda conn: log_decisions(conn, [decision], self.fence()), idempotent=False
            )
        except FenceLost:
            log.warning("failover decision of %s not logged: leadership lost", call.caller_code)
        except (DatabaseError, pymysql.err.Error) as exc:
            log.error("writing the failover decision of %s: %s", call.caller_code, exc)

    def _forget_expired(self) -> None:
        now = self.clock()
        while self._due and self._due[0][0] <= now:
            due, code = self._due.popleft()
            entry = self.calls.get(code)
            if entry is not None and entry[1] == due:
                del self.calls[code]
