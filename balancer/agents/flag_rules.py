"""Which `servers.active_agent_login_server` flags the balancer closes or re-opens (pure: no I/O).

The flag is the lever VICIdial's agent screen obeys: it only balances a login onto servers whose
flag is 'Y'. `decide_login_flags` closes ('N') the flag of a server that is DOWN, DRAINED, has a
stale server_updater or is at agent capacity, and re-opens ('Y') it once the server has been UP
for a settle time and is below capacity by the hysteresis margin. It only ever re-opens a flag
it closed itself (recorded in vb_login_flags), so an administrator's own 'N' is never overridden.
`login_flags.py` runs these rules against the database.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from balancer.agents.facts import (
    LoginFlagRecord,
    ServerFacts,
    agent_load,
    health_text,
    updater_stale,
)
from balancer.store.base import Health


class FlagAction(StrEnum):
    """What the keeper does to one server's active_agent_login_server."""

    CLOSE = "close"  # 'Y' -> 'N', remembered in vb_login_flags
    REOPEN = "reopen"  # the balancer's own 'N' -> 'Y' (the admin's previous value)
    RELEASE = "release"  # forget a vb_login_flags row whose flag someone else changed since


@dataclass(frozen=True)
class FlagChange:
    """One change to apply, with its reason (logged in vb_decision_log)."""

    server_ip: str
    action: FlagAction
    reason: str

    @property
    def set_to(self) -> str | None:
        return {FlagAction.CLOSE: "N", FlagAction.REOPEN: "Y"}.get(self.action)


@dataclass(frozen=True)
class FlagSettings:
    """Thresholds for the login-flag decision."""

    hysteresis_pct: float = 10.0  # re-open a full server only this far below capacity
    settle_s: float = 2.0  # re-open only after UP this long (a bouncing server stays closed)
    updater_max_age_s: float | None = 60.0  # None: server_updater not checked


def reopen_threshold(capacity: int, hysteresis_pct: float) -> int:
    """Most agents at which a server closed for capacity may re-open (always below capacity)."""
    return min(capacity - 1, math.floor(capacity * (1 - hysteresis_pct / 100)))


def desired_flag(
    facts: ServerFacts, settings: FlagSettings, healthy_for_s: float, final: bool = False
) -> tuple[str | None, str]:
    """('N' or 'Y' or None for "leave it", why) from health, drain and agent load.

    ``final`` (the last pass at shutdown) drops the settle time and the hysteresis margin: with
    no balancer left to re-open a flag later, the flag should say what is true now.
    """
    if not facts.active:
        return None, "server inactive"
    if facts.drained:
        return "N", "DRAINED"
    if facts.health is None:
        return None, "no live state"
    if facts.health is Health.DOWN:
        return "N", health_text(facts)
    stale = updater_stale(facts, settings.updater_max_age_s)
    if stale:
        return "N", stale
    load = agent_load(facts)
    if load >= facts.capacity:
        return "N", f"at agent capacity ({load}/{facts.capacity})"
    if facts.health is not Health.UP:
        return None, health_text(facts)
    if final:
        return "Y", f"UP, below agent capacity ({load}/{facts.capacity})"
    if healthy_for_s < settings.settle_s:
        return None, f"UP for {healthy_for_s:.1f}s < {settings.settle_s:g}s"
    threshold = reopen_threshold(facts.capacity, settings.hysteresis_pct)
    if load > threshold:
        return None, f"{load}/{facts.capacity} agents, re-opens at {threshold}"
    return "Y", f"UP, {load}/{facts.capacity} agents"


def decide_login_flags(
    facts: Iterable[ServerFacts],
    settings: FlagSettings,
    healthy_for_s: Mapping[str, float] | None = None,
    *,
    final: bool = False,
    orphan_records: Iterable[LoginFlagRecord] = (),
) -> list[FlagChange]:
    """The flag changes to make, ordered by server_ip.

    Closes only a flag that is 'Y' now; re-opens only a 'N' the balancer set itself; a record
    whose flag someone changed since (or whose server row is gone: ``orphan_records``) is
    released, never acted on. An admin's own 'N' is therefore never touched.
    """
    healthy_for_s = healthy_for_s or {}
    changes: list[FlagChange] = []
    for f in sorted(facts, key=lambda f: f.server_ip):
        want, why = desired_flag(f, settings, healthy_for_s.get(f.server_ip, 0.0), final)
        record = f.flag_record
        ours = f.balancer_holds_flag
        if f.login_flag == "Y" and want == "N":
            changes.append(FlagChange(f.server_ip, FlagAction.CLOSE, why))
        elif ours and want == "Y":
            changes.append(FlagChange(f.server_ip, FlagAction.REOPEN, why))
        elif record is not None and not ours:
            changes.append(
                FlagChange(
                    f.server_ip,
                    FlagAction.RELEASE,
                    f"flag changed by someone else since (now {f.login_flag!r})",
                )
            )
    for record in sorted(orphan_records, key=lambda r: r.server_ip):
        changes.append(
            FlagChange(record.server_ip, FlagAction.RELEASE, "server no longer in servers")
        )
    return changes


# --------------------------------------------------------------------------- status document

FLAGS_DOCUMENT_VERSION = 1


def flags_document(
    facts: Iterable[ServerFacts],
    settings: FlagSettings,
    healthy_for_s: Mapping[str, float],
    published_at: float,
) -> dict[str, object]:
    """What `status` shows of the login flags: each flag the balancer holds closed (why it
    closed it, since when, and what holds it now) and each 'N' that is not ours (left alone)."""
    held: list[dict[str, object]] = []
    others: list[dict[str, object]] = []
    for f in sorted(facts, key=lambda f: f.server_ip):
        if f.balancer_holds_flag and f.flag_record is not None:
            _, now = desired_flag(f, settings, healthy_for_s.get(f.server_ip, 0.0))
            held.append(
                {
                    "server_ip": f.server_ip,
                    "server_id": f.server_id,
                    "closed_because": f.flag_record.reason,
                    "since": f.flag_record.changed_at,
                    "restores": f.flag_record.previous,
                    "now": now,
                }
            )
        elif f.login_flag != "Y":
            others.append(
                {"server_ip": f.server_ip, "server_id": f.server_id, "flag": f.login_flag}
            )
    return {
        "version": FLAGS_DOCUMENT_VERSION,
        "published_at": round(published_at, 3),
        "held": held,
        "not_ours": others,
    }
