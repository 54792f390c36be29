"""What Kamailio's dispatcher should hold, what it does hold, and what one publish changes (pure).

The balancer's wish per destination is `Wanted` (active or not, and its spare capacity); what a
Kamailio reports through ``dispatcher.list`` parses into `KamDest`; `plan_pass` compares the two
with what the balancer last told that Kamailio and returns one `Pass`: the list file to write
(always the whole state, inactive and admin-disabled flags included), whether to reload it, and
the ``dispatcher.set_duid_state`` calls to make. Nothing here does I/O.

Who decides a destination's state:
- the balancer's DOWN/DRAINED → inactive ("i", without the probing flag, so Kamailio's OPTIONS
  probing in ds_probing_mode 3 never re-activates a box whose Asterisk answers while VICIdial on
  it is dead); re-asserted whenever Kamailio shows anything else;
- the balancer's UP → active ("ap" with probing): set when the balancer's view turns UP (or was
  never told to this Kamailio); after that, an I/T with the probing flag is Kamailio's own verdict
  on the SIP side and is left alone (its probing brings the destination back);
- an admin's "d" (disabled) is never touched and is written back as flag 4 on every rewrite.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from balancer.config_values import is_loopback

# Dispatcher list-file flag bits (dispatcher README, "Destination List File").
FLAG_INACTIVE = 1
FLAG_TRYING = 2
FLAG_DISABLED = 4
FLAG_PROBING = 8

FILE_HEADER = (
    "# Written by vici-balancer: the whole desired dispatcher state, rewritten on every change.\n"
    "# Edits here are overwritten. Take a destination out by hand with\n"
    "#   kamcmd dispatcher.set_state d <set> <uri>   (kept disabled across rewrites), or\n"
    "#   vici-balancer drain <server>\n"
    "# setid destination flags priority attributes\n"
)

Key = tuple[int, str]  # (set id, duid)


@dataclass(frozen=True)
class ServerView:
    """One server as the live view shows it (health None: not known yet)."""

    server_ip: str
    server_id: str
    health: str | None  # "up", "suspect", "down" (balancer.store.base.Health values)
    drained: bool
    fresh: bool
    max_trunks: int
    trunk_lines: int
    agent_lines: int
    agent_capacity: int


@dataclass(frozen=True)
class Wanted:
    """One destination as the balancer wants it."""

    set_id: int
    duid: str
    server_ip: str
    uri: str
    active: bool
    spare: int  # spare capacity: trunk lines or agent seats, >= 0
    reason: str  # why active or not ("up", "down: ...", "drained", "held: suspect")
    since: float  # monotonic time the balancer saw `active` take its value

    @property
    def key(self) -> Key:
        return (self.set_id, self.duid)


@dataclass(frozen=True)
class SetSpec:
    """A managed set: id, capacity kind ("trunks" or "agents") and members (empty: all)."""

    id: int
    capacity: str
    servers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Desired:
    """The balancer's whole wish, per set in file order."""

    sets: Mapping[int, tuple[Wanted, ...]]
    skipped: tuple[str, ...] = ()  # destinations left out, with why (invalid duid, loopback)

    def all(self) -> list[Wanted]:
        return [w for wanted in self.sets.values() for w in wanted]

    def by_key(self) -> dict[Key, Wanted]:
        return {w.key: w for w in self.all()}


def spare_of(view: ServerView, capacity: str) -> int:
    """Spare trunk lines (max_vicidial_trunks - live trunk lines) or spare agent seats."""
    if capacity == "agents":
        return max(0, view.agent_capacity - view.agent_lines)
    return max(0, view.max_trunks - view.trunk_lines)


def _verdict(view: ServerView, previous: Wanted | None) -> tuple[bool, str]:
    if view.drained:
        return False, "drained"
    if not view.fresh:
        # Nobody is tracking it: fail static (keep what was published) rather than take a
        # working box out because the balancer lost its own view.
        return (previous.active if previous else False), "held: live state stale"
    if view.health == "down":
        return False, "down"
    if view.health == "up":
        return True, "up"
    # SUSPECT (one missed heartbeat) or unknown: hold, so one lost Ping does not flap Kamailio.
    return (previous.active if previous else False), f"held: {view.health or 'unknown'}"


def valid_duid(text: str) -> bool:
    """A duid Kamailio's attribute parser keeps whole (no separators, no spaces)."""
    return bool(text) and not any(c in text for c in ";=, \t\r\n#")


def uri_host(uri: str) -> str:
    """The host of 'sip:host:port;params' or 'sip:user@[v6]:port'."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split(";", 1)[0].rpartition("@")[2]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.split(":", 1)[0]


def build_desired(
    views: Iterable[ServerView],
    sets: Sequence[SetSpec],
    uri_of: Mapping[str, str],
    previous: Desired | None,
    now: float,
    *,
    loopback_only: bool = False,
) -> Desired:
    """The desired state of every managed set from the live view (``uri_of``: server_ip → URI)."""
    before = previous.by_key() if previous else {}
    skipped: list[str] = []
    ordered = sorted(views, key=lambda v: ipaddress.IPv4Address(v.server_ip))
    out: dict[int, tuple[Wanted, ...]] = {}
    for spec in sets:
        members = set(spec.servers)
        wanted: list[Wanted] = []
        for view in ordered:
            if members and view.server_ip not in members:
                continue
            uri = uri_of[view.server_ip]
            if not valid_duid(view.server_id):
                skipped.append(f"{view.server_ip}: server_id {view.server_id!r} is no usable duid")
                continue
            if loopback_only and not is_loopback(uri_host(uri)):
                skipped.append(f"{view.server_ip}: {uri} is not on loopback")
                continue
            prev = before.get((spec.id, view.server_id))
            active, reason = _verdict(view, prev)
            since = prev.since if prev is not None and prev.active == active else now
            wanted.append(
                Wanted(
                    set_id=spec.id,
                    duid=view.server_id,
                    server_ip=view.server_ip,
                    uri=uri,
                    active=active,
                    spare=spare_of(view, spec.capacity),
                    reason=reason,
                    since=since,
                )
            )
        out[spec.id] = tuple(wanted)
    return Desired(out, tuple(dict.fromkeys(skipped)))


# --------------------------------------------------------------------------- weights


def shares(spares: Sequence[int]) -> list[int]:
    """Integer percentages proportional to ``spares``, summing to 100 (largest remainder).

    A positive spare never rounds down to 0 (it still gets 1 %); when every spare is 0 the
    shares are equal, so a full cluster is spread evenly rather than sent to one box.
    """
    if not spares:
        return []
    total = sum(spares)
    basis = list(spares) if total > 0 else [1] * len(spares)
    total = sum(basis)
    exact = [100 * s / total for s in basis]
    out = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: 100 - sum(out)]:
        out[i] += 1
    for i, s in enumerate(basis):
        if s > 0 and out[i] == 0:
            out[i] = 1
    while sum(out) > 100:  # floors of 1 can overshoot: take from the largest
        big = max(range(len(out)), key=lambda i: (out[i], -i))
        out[big] -= 1
    return out


def weights_for(
    wanted: Sequence[Wanted], algorithm: int, excluded: set[Key] | None = None
) -> dict[Key, int]:
    """Each destination's weight attribute value.

    Algorithm 11 (rweight) renormalises over the destinations active at each moment by itself,
    so every destination keeps its share of the set's spare capacity. Algorithm 9 (weight) gives
    an inactive destination's slots to its neighbour, so its weights are spread over the
    destinations that can take calls, and the others get 0 (ignored until the next reload).
    """
    excluded = excluded or set()
    if algorithm == 11:
        pool = [w for w in wanted if w.key not in excluded]
    else:
        pool = [w for w in wanted if w.active and w.key not in excluded]
    values = dict(zip((w.key for w in pool), shares([w.spare for w in pool]), strict=True))
    active = [w.key for w in pool if w.active]
    if active and not any(values[key] for key in active):
        # Kamailio sums rweights over the active destinations only and keeps a stale list when
        # that sum is 0: every active one full while an inactive one has room. Share evenly.
        values.update(dict.fromkeys(active, 1))
    return {w.key: values.get(w.key, 0) for w in wanted}


# --------------------------------------------------------------------------- Kamailio's side


@dataclass(frozen=True)
class KamDest:
    """One destination as ``dispatcher.list`` reports it."""

    set_id: int
    uri: str
    flags: str  # e.g. "AP": state letter A/I/T/D, then P (probing) or X
    duid: str
    weight: int
    rweight: int

    @property
    def state(self) -> str:
        return self.flags[:1]

    @property
    def probing(self) -> bool:
        return self.flags[1:2] == "P"

    @property
    def key(self) -> Key:
        return (self.set_id, self.duid)

    def weight_for(self, algorithm: int) -> int:
        return self.rweight if algorithm == 11 else self.weight


def parse_list(result: Any) -> dict[Key, KamDest]:
    """``dispatcher.list``'s result (jsonrpcs) by (set, duid); entries without a duid get ''."""
    out: dict[Key, KamDest] = {}
    if not isinstance(result, dict):
        raise ValueError(f"dispatcher.list: expected an object, got {type(result).__name__}")
    for record in result.get("RECORDS") or []:
        group = record.get("SET", {}) if isinstance(record, dict) else {}
        set_id = int(group.get("ID", 0))
        for target in group.get("TARGETS") or []:
            dest = target.get("DEST", {}) if isinstance(target, dict) else {}
            attrs = dest.get("ATTRS") or {}
            duid = str(attrs.get("DUID") or "")
            entry = KamDest(
                set_id=set_id,
                uri=str(dest.get("URI", "")),
                flags=str(dest.get("FLAGS", "")),
                duid=duid,
                weight=int(attrs.get("WEIGHT") or 0),
                rweight=int(attrs.get("RWEIGHT") or 0),
            )
            # A duid seen twice in a set (or none at all) cannot be addressed by duid: keep the
            # set/uri pair distinct so the membership check sees it and a reload fixes it.
            key = entry.key if entry.key not in out and duid else (set_id, f"?{entry.uri}")
            out[key] = entry
    return out


# --------------------------------------------------------------------------- one publish


@dataclass(frozen=True)
class Pass:
    """What one publish to one Kamailio does, in this order: write, reload, set states."""

    file_text: str
    weights: dict[Key, int]
    reload_reason: str | None  # why a reload is due (None: weights and members in step)
    states: list[tuple[str, int, str]] = field(default_factory=list)  # (state, set, duid)
    admin_disabled: set[Key] = field(default_factory=set)
    verdicts: dict[Key, str] = field(default_factory=dict)  # Kamailio's probing says I/T


def active_arg(probing: bool) -> str:
    return "ap" if probing else "a"


def target_flags(active: bool, probing: bool) -> str:
    """The FLAGS dispatcher.list shows once the balancer's state is applied."""
    if not active:
        return "IX"
    return "AP" if probing else "AX"


def reload_reason(
    wanted: Sequence[Wanted],
    kam: Mapping[Key, KamDest],
    weights: Mapping[Key, int],
    algorithm: int,
    hysteresis: int,
) -> str | None:
    """Why Kamailio's list must be reloaded: members or URIs differ, or a share moved enough."""
    want = {w.key: w for w in wanted}
    sets = {w.set_id for w in wanted}
    theirs = {k: d for k, d in kam.items() if d.set_id in sets}
    missing = sorted(set(want) - set(theirs))
    if missing:
        return f"missing in Kamailio: {', '.join(f'{s}/{d}' for s, d in missing[:5])}"
    extra = sorted(set(theirs) - set(want))
    if extra:
        return f"not wanted: {', '.join(f'{s}/{d}' for s, d in extra[:5])}"
    for key, w in want.items():
        if theirs[key].uri != w.uri:
            return f"{key[0]}/{key[1]}: uri {theirs[key].uri} -> {w.uri}"
    for key in sorted(want):
        have, new = theirs[key].weight_for(algorithm), weights.get(key, 0)
        if (have == 0) != (new == 0):
            return f"{key[0]}/{key[1]}: weight {have} -> {new}"
        if abs(have - new) > hysteresis:
            return f"{key[0]}/{key[1]}: weight {have} -> {new} (more than {hysteresis} points)"
    return None


def plan_pass(
    desired: Desired,
    kam: Mapping[Key, KamDest] | None,
    told: Mapping[Key, bool],
    admin_disabled: set[Key],
    *,
    algorithm: int,
    probing: bool,
    hysteresis: int,
) -> Pass:
    """One publish to one Kamailio.

    ``kam`` is what it reports now (None when it could not be read: the file is still written,
    from what was last known); ``told`` the state the balancer last gave it per destination;
    ``admin_disabled`` the destinations an admin disabled, as last seen.
    """
    wanted = desired.all()
    admin = set(admin_disabled)
    verdicts: dict[Key, str] = {}
    if kam is not None:
        for w in wanted:
            have = kam.get(w.key)
            if have is None:
                continue
            if have.state == "D":
                admin.add(w.key)
            else:
                admin.discard(w.key)  # re-enabled by hand: the balancer's again
                if w.active and told.get(w.key) is True and have.state in "IT" and have.probing:
                    verdicts[w.key] = have.state
    excluded = admin | (set(verdicts) if algorithm == 9 else set())
    weights: dict[Key, int] = {}
    for members in desired.sets.values():  # each set's shares add up on their own
        weights.update(weights_for(members, algorithm, excluded))
    lines = [FILE_HEADER]
    # Kamailio loads a set's lines in reverse, and algorithm 9 ignores every weight unless the
    # last line's is non-zero (dispatch.c, dp_init_weights): zero weights go first.
    ordered = [
        w
        for members in desired.sets.values()
        for w in sorted(members, key=lambda w: weights[w.key] != 0)
    ]
    for w in ordered:
        if w.key in admin:
            flags = FLAG_DISABLED
        elif not w.active:
            flags = FLAG_INACTIVE
        else:
            verdict = verdicts.get(w.key)
            flags = {"I": FLAG_INACTIVE, "T": FLAG_TRYING}.get(verdict or "", 0)
            flags |= FLAG_PROBING if probing else 0
        attr = "rweight" if algorithm == 11 else "weight"
        lines.append(f"{w.set_id} {w.uri} {flags} 0 duid={w.duid};{attr}={weights[w.key]}\n")
    text = "".join(lines)
    if kam is None:
        return Pass(text, weights, None, [], admin, verdicts)
    reason = reload_reason(wanted, kam, weights, algorithm, hysteresis)
    states: list[tuple[str, int, str]] = []
    for w in wanted:
        have = kam.get(w.key)
        if have is None or w.key in admin:
            continue  # not loaded yet (the reload brings it with its state), or the admin's
        if not w.active:
            if have.flags != "IX":
                states.append(("i", w.set_id, w.duid))
        elif have.flags != target_flags(True, probing) and w.key not in verdicts:
            states.append((active_arg(probing), w.set_id, w.duid))
    return Pass(text, weights, reason, states, admin, verdicts)


class ReloadLimiter:
    """At most ``per_minute`` reloads in any 60 s, evenly spaced (60/per_minute apart)."""

    def __init__(self, per_minute: int) -> None:
        self.spacing_s = 60.0 / per_minute
        self.last: float | None = None

    def next_allowed(self, now: float) -> float:
        """The earliest monotonic time a reload may run."""
        return now if self.last is None else max(now, self.last + self.spacing_s)

    def allowed(self, now: float) -> bool:
        return self.next_allowed(now) <= now

    def record(self, now: float) -> None:
        self.last = now
