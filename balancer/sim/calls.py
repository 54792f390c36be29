"""The simulated Asterisk core: channels, calls through carriers, hangups and their events."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from balancer.sim.model import (
    NORMAL_CLEARING,
    UNREACHABLE_CAUSE,
    UP,
    ChannelKind,
    Headers,
    SimCarrier,
    SimChannel,
    TaskSet,
    cause_text,
    dial_status,
    parse_callerid,
)

Emit = Callable[[str, str, Headers], None]  # (event name, class, headers after Privilege)

_CID_PRES = ("CID-CallingPres", "0 (Presentation Allowed, Not Screened)")


@dataclass(frozen=True)
class OriginateOutcome:
    """How an originate ended: answered (uniqueid of the ;1 leg) or failed with a cause."""

    ok: bool
    uniqueid: str | None
    channel: (
        str  # the ;1 leg when answered; the requested channel, as Asterisk reports it, when not
    )
    cause: int
    cid_num: str
    cid_name: str


class CallEngine:
    """Channels and calls of one simulated server; every change is reported through ``emit``."""

    def __init__(
        self,
        *,
        carriers: Sequence[SimCarrier],
        max_lines: int,
        full_cause: int,
        call_duration_s: float,
        answer_delay_s: float,
        start_epoch: int,
        emit: Emit,
        tasks: TaskSet,
    ) -> None:
        """Set up an idle server; ``tasks`` holds the call timers."""
        # copies: a carrier list shared by several servers must not share their faults
        self.carriers: dict[str, SimCarrier] = {c.name: dataclasses.replace(c) for c in carriers}
        self.max_lines = max_lines
        self.full_cause = full_cause
        self.call_duration_s = call_duration_s
        self.answer_delay_s = answer_delay_s
        self.start_epoch = start_epoch
        self.channels: dict[str, SimChannel] = {}
        self.calls_processed = 0
        self.originates = 0
        self._emit = emit
        self._tasks = tasks
        self._calls: dict[str, list[str]] = {}  # linkedid -> uniqueids, in creation order
        self._timers: dict[str, asyncio.Task[None]] = {}  # linkedid -> end-of-call timer
        self._ringing: dict[str, int | None] = {}  # linkedid -> cause, if hung up while ringing
        self._trunks: dict[str, int] = {}  # carrier -> live trunk channels
        self._uid_seq = 0
        self._local_seq = 0
        self._tech_seq = 0

    # ------------------------------------------------------------------ queries
    def active_calls(self) -> int:
        """Calls (groups of linked channels) alive now."""
        return len(self._calls)

    def trunk_lines_in_use(self, carrier: str | None = None) -> int:
        """Trunk channels alive now, for one carrier or all."""
        if carrier is None:
            return sum(self._trunks.values())
        return self._trunks.get(carrier, 0)

    def carrier_for(self, dial: str) -> SimCarrier | None:
        """The carrier whose dial prefix is the longest one starting ``dial``."""
        best: SimCarrier | None = None
        for carrier in self.carriers.values():
            if dial.startswith(carrier.dial_prefix) and (
                best is None or len(carrier.dial_prefix) > len(best.dial_prefix)
            ):
                best = carrier
        return best

    def find(self, name: str) -> SimChannel | None:
        """The live channel with this name."""
        for ch in self.channels.values():
            if ch.name == name:
                return ch
        return None

    # ------------------------------------------------------------------ building blocks
    def next_uniqueid(self) -> str:
        """The next ``<start_epoch>.<seq>`` Uniqueid (per-server: collides across servers)."""
        uid = f"{self.start_epoch}.{self._uid_seq}"
        self._uid_seq += 1
        return uid

    def tech_name(self, technology: str, peer: str) -> str:
        """The next ``<tech>/<peer>-xxxxxxxx`` channel name."""
        name = f"{technology}/{peer}-{self._tech_seq:08x}"
        self._tech_seq += 1
        return name

    def _add(self, ch: SimChannel) -> SimChannel:
        self.channels[ch.uniqueid] = ch
        if ch.kind == "trunk" and ch.carrier is not None:
            self._trunks[ch.carrier] = self._trunks.get(ch.carrier, 0) + 1
        self._calls.setdefault(ch.linkedid, []).append(ch.uniqueid)
        self._emit("Newchannel", "call", ch.headers())
        return ch

    def _set_state(self, ch: SimChannel, state: int) -> None:
        ch.state = state
        self._emit("Newstate", "call", ch.headers())

    def _set_callerid(self, ch: SimChannel, num: str, name: str) -> None:
        ch.cid_num, ch.cid_name = num, name
        ch.connected_num, ch.connected_name = num, name
        self._emit("NewCallerid", "call", [*ch.headers(), _CID_PRES])

    def _dial(
        self, event: str, caller: SimChannel | None, dest: SimChannel, extra: Headers
    ) -> None:
        # An originated dial has no caller: DialBegin/DialEnd then carry only Dest* fields.
        headers = caller.headers() if caller is not None else []
        self._emit(event, "call", [*headers, *dest.headers("Dest"), *extra])

    def _start_timer(self, linkedid: str, duration_s: float | None) -> None:
        if duration_s is not None:
            self._timers[linkedid] = self._tasks.spawn(self._expire(linkedid, duration_s))

    async def _expire(self, linkedid: str, duration_s: float) -> None:
        await asyncio.sleep(max(0.0, duration_s))
        self._timers.pop(linkedid, None)
        self.hangup_call(linkedid, NORMAL_CLEARING)

    # ------------------------------------------------------------------ calls
    async def originate(
        self,
        channel: str,
        *,
        context: str,
        exten: str,
        priority: str = "1",
        callerid: str = "",
        duration_s: float | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> OriginateOutcome:
        """Place a call like ``Action: Originate`` and wait until it is answered or has failed."""
        self.originates += 1
        variables = variables or {}
        cid_num, cid_name = parse_callerid(callerid) if callerid else ("", "")
        if duration_s is None and "CALL_DURATION" in variables:
            try:
                duration_s = float(variables["CALL_DURATION"])
            except ValueError:
                duration_s = None
        duration = self.call_duration_s if duration_s is None else duration_s
        tech, _, rest = channel.partition("/")
        if tech.lower() != "local" or "@" not in rest:
            # Only Local channels are modelled (VICIdial always originates through Local/).
            await asyncio.sleep(self.answer_delay_s)
            return OriginateOutcome(False, None, channel, UNREACHABLE_CAUSE, cid_num, cid_name)
        dial, _, chan_ctx = rest.partition("@")
        base = f"Local/{dial}@{chan_ctx}-{self._local_seq:08x}"
        self._local_seq += 1
        self.calls_processed += 1
        u1 = self.next_uniqueid()
        one = self._add(SimChannel(base + ";1", u1, u1, 0, chan_ctx, dial, kind="local"))
        two = self._add(
            SimChannel(base + ";2", self.next_uniqueid(), u1, 4, chan_ctx, dial, kind="local")
        )
        one.application, one.app_data = "AppDial2", "(Outgoing Line)"
        self._emit(
            "Newexten",
            "dialplan",
            [
                *one.headers(),
                ("Extension", dial),
                ("Application", "AppDial2"),
                ("AppData", "(Outgoing Line)"),
            ],
        )
        for var, value in variables.items():
            self._emit("VarSet", "dialplan", [*one.headers(), ("Variable", var), ("Value", value)])
        self._set_callerid(one, cid_num, cid_name)
        self._set_callerid(two, cid_num, cid_name)
        self._emit(
            "LocalBridge",
            "call",
            [
                *one.headers("LocalOne"),
                *two.headers("LocalTwo"),
                ("Context", chan_ctx),
                ("Exten", dial),
                ("LocalOptimization", "Yes"),
            ],
        )
        self._dial("DialBegin", None, one, [("DialString", f"{dial}@{chan_ctx}")])
        carrier = self.carrier_for(dial)
        trunk: SimChannel | None = None
        cause: int | None = None
        if carrier is not None and carrier.local_only:
            cause = self._dial_failure(carrier)
            two.application, two.app_data = "Wait", f"{duration:g}"
        elif carrier is not None:
            cause = self._dial_failure(carrier)
            number = dial[len(carrier.dial_prefix) :]
            trunk = SimChannel(
                self.tech_name(carrier.technology, carrier.name),
                self.next_uniqueid(),
                u1,
                0,
                chan_ctx,
                number,
                carrier=carrier.name,
                kind="trunk",
                cid_num=cid_num,
                cid_name=cid_name,
                application="AppDial",
                app_data="(Outgoing Line)",
            )
            two.application, two.app_data = "Dial", f"{carrier.technology}/{carrier.name}/{number}"
            self._add(trunk)
            self._dial("DialBegin", two, trunk, [("DialString", f"{carrier.name}/{number}")])
        else:
            two.application, two.app_data = "Wait", f"{duration:g}"
        self._ringing[u1] = None
        try:
            await asyncio.sleep(self.answer_delay_s)
        finally:
            hung_up = self._ringing.pop(u1, None)
        if u1 not in self.channels:  # hung up while ringing
            cause = hung_up or NORMAL_CLEARING
            return OriginateOutcome(False, None, channel, cause, cid_num, cid_name)
        if cause is not None:
            status = [("DialStatus", dial_status(cause))]
            if trunk is not None:
                self._dial("DialEnd", two, trunk, status)
            self._dial("DialEnd", None, one, status)
            self.hangup_call(u1, cause, first=trunk.uniqueid if trunk else two.uniqueid)
            return OriginateOutcome(False, None, channel, cause, cid_num, cid_name)
        if trunk is not None:
            self._set_state(trunk, UP)
        self._set_state(two, UP)
        self._set_state(one, UP)
        if trunk is not None:
            self._dial("DialEnd", two, trunk, [("DialStatus", "ANSWER")])
        self._dial("DialEnd", None, one, [("DialStatus", "ANSWER")])
        one.context, one.exten, one.priority = (
            context,
            exten,
            int(priority) if priority.isdigit() else 1,
        )
        one.application, one.app_data = "Wait", f"{duration:g}"
        self._emit(
            "Newexten",
            "dialplan",
            [
                *one.headers(),
                ("Extension", exten),
                ("Application", "Wait"),
                ("AppData", one.app_data),
            ],
        )
        self._start_timer(u1, duration)
        return OriginateOutcome(True, u1, one.name, NORMAL_CLEARING, cid_num, cid_name)

    def _dial_failure(self, carrier: SimCarrier) -> int | None:
        if carrier.fail_cause is not None:
            return carrier.fail_cause
        if not carrier.reachable:
            return UNREACHABLE_CAUSE
        if self.trunk_lines_in_use() >= self.max_lines:
            return self.full_cause
        return None

    def add_channel(
        self,
        technology: str,
        peer: str,
        *,
        kind: ChannelKind,
        context: str,
        exten: str,
        carrier: str | None = None,
        duration_s: float | None = None,
        application: str = "",
        app_data: str = "",
    ) -> str:
        """A standalone answered channel (agent phone, inbound trunk call); returns its uniqueid."""
        uid = self.next_uniqueid()
        ch = SimChannel(
            self.tech_name(technology, peer),
            uid,
            uid,
            4,
            context,
            exten,
            carrier=carrier,
            kind=kind,
            cid_num=peer,
            cid_name=peer,
            application=application,
            app_data=app_data,
        )
        self.calls_processed += 1
        self._add(ch)
        self._set_state(ch, UP)
        self._start_timer(uid, duration_s)
        return uid

    # ------------------------------------------------------------------ hangups
    def hangup_call(self, linkedid: str, cause: int, first: str | None = None) -> bool:
        """Hang up every channel of one call with ``cause``; ``first`` is the leg hung up first."""
        uids = self._calls.pop(linkedid, None)
        if not uids:
            return False
        timer = self._timers.pop(linkedid, None)
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        if linkedid in self._ringing:
            self._ringing[linkedid] = cause
        chans = [ch for uid in uids if (ch := self.channels.pop(uid, None)) is not None]
        for ch in chans:
            if ch.kind == "trunk" and ch.carrier is not None:
                self._trunks[ch.carrier] -= 1
        if first is not None:
            chans.sort(key=lambda ch: ch.uniqueid != first)
        elif len(chans) > 1:
            chans = chans[1:] + chans[:1]  # trunk / ;2 first, the originating ;1 leg last
        if not chans:
            return True
        cause_headers = [("Cause", str(cause))]
        self._emit("SoftHangupRequest", "call", [*chans[0].headers(), *cause_headers])
        for ch in chans[1:]:
            self._emit("HangupRequest", "call", [*ch.headers(), *cause_headers])
        for ch in chans:
            self._emit(
                "Hangup", "call", [*ch.headers(), *cause_headers, ("Cause-txt", cause_text(cause))]
            )
        return True

    def hangup(self, uniqueid: str, cause: int = NORMAL_CLEARING) -> bool:
        """Hang up the call this channel belongs to; False when there is no such channel."""
        ch = self.channels.get(uniqueid)
        if ch is None:
            return False
        return self.hangup_call(ch.linkedid, cause, first=uniqueid)

    def hangup_all(self, cause: int = NORMAL_CLEARING) -> int:
        """Hang up every call; returns how many calls ended."""
        return sum(self.hangup_call(linkedid, cause) for linkedid in list(self._calls))

    def clear(self) -> None:
        """Forget every channel without events (the server went away)."""
        for timer in self._timers.values():
            if timer is not asyncio.current_task():
                timer.cancel()
        self._timers.clear()
        self._calls.clear()
        self._trunks.clear()
        self.channels.clear()
