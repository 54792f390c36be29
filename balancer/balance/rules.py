"""The per-server arithmetic of VICIdial's balance (FILL) process, as pure functions.

Rule numbers cite "The balance (FILL) algorithm VICIdial runs today" in the shared VICIDIAL.md.
`balancer/balance/planner.py` strings these together into a plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from balancer.balance.model import OUTBALANCE, DbSnapshot, LiveServer, ServerInfo, SystemSettings
from balancer.store.base import Health

DEFAULT_PACE_MS = 25.0  # rule 5: VICIdial's pace when the configured rate is out of range


def stop_reason(settings: SystemSettings | None) -> str | None:
    """Why autodial is off cluster-wide (rule 1), or None when dialing may go on."""
    if settings is None:
        return "no system_settings row: autodial is off"
    if not settings.outbound_autodial_active:
        return "system_settings.outbound_autodial_active is off"
    if settings.disable_auto_dial:
        return "system_settings.disable_auto_dial is on"
    return None


def pace_ms(settings: SystemSettings | None) -> float:
    """Wait after every call: 1000 / outbound_calls_per_second, 25 ms out of 1..1000 (rule 5)."""
    cps = settings.outbound_calls_per_second if settings is not None else 0
    return 1000.0 / cps if 1 <= cps <= 1000 else DEFAULT_PACE_MS


def balance_active(server: ServerInfo) -> bool:
    """Accepts balance calls: vicidial_balance_active and, our addition (rule 6), active."""
    return server.active and server.balance_active


@dataclass(frozen=True)
class Counts:
    """The snapshot's auto-call and trunk-rule figures, indexed once per cycle."""

    auto_on: Mapping[str, int]  # all vicidial_auto_calls rows per server
    outbalance_on: Mapping[tuple[str, str], int]  # (campaign, server) -> OUTBALANCE rows
    outbalance_total: Mapping[str, int]  # campaign -> OUTBALANCE rows on any server
    dedicated_on: Mapping[str, int]  # server -> dedicated_trunks of every campaign's rules
    own_dedicated: Mapping[tuple[str, str], int]  # (campaign, server) -> its rules' dedicated
    max_limit: Mapping[tuple[str, str], int]  # (campaign, server) -> its MAXIMUM_LIMIT cap

    @classmethod
    def of(cls, snapshot: DbSnapshot) -> Counts:
        """Index a snapshot (sums do not depend on dict order, so this is deterministic)."""
        auto_on: dict[str, int] = {}
        outbalance_on: dict[tuple[str, str], int] = {}
        outbalance_total: dict[str, int] = {}
        for (ip, campaign, kind), n in snapshot.auto_calls.items():
            auto_on[ip] = auto_on.get(ip, 0) + n
            if kind == OUTBALANCE:
                outbalance_on[campaign, ip] = outbalance_on.get((campaign, ip), 0) + n
                outbalance_total[campaign] = outbalance_total.get(campaign, 0) + n
        dedicated_on: dict[str, int] = {}
        own_dedicated: dict[tuple[str, str], int] = {}
        max_limit: dict[tuple[str, str], int] = {}
        for rule in snapshot.trunk_rules:
            key = (rule.campaign_id, rule.server_ip)
            dedicated_on[rule.server_ip] = dedicated_on.get(rule.server_ip, 0) + rule.dedicated
            own_dedicated[key] = own_dedicated.get(key, 0) + rule.dedicated
            if rule.maximum_limit:
                # vicidial_server_trunks has no unique key; of duplicate MAXIMUM_LIMIT rows the
                # smallest cap wins, so the result does not depend on the order rows were read.
                max_limit[key] = min(max_limit.get(key, rule.dedicated), rule.dedicated)
        return cls(auto_on, outbalance_on, outbalance_total, dedicated_on, own_dedicated, max_limit)


def allowed_lines(counts: Counts, server: ServerInfo, campaign_id: str) -> tuple[int, str]:
    """Lines the campaign may still use on the server by its trunk rules (rule 4), with why."""
    key = (campaign_id, server.server_ip)
    here = counts.outbalance_on.get(key, 0)
    if key in counts.max_limit:
        base = counts.max_limit[key]
        why = f"MAXIMUM_LIMIT {base}"
    else:
        others = counts.dedicated_on.get(server.server_ip, 0) - counts.own_dedicated.get(key, 0)
        base = server.max_trunks - server.offlimits - others
        why = (
            f"{server.max_trunks} max - {server.offlimits} offlimits - {others} dedicated to others"
        )
    if here:
        why += f" - {here} OUTBALANCE here"
    return max(0, base - here), why


def free_lines(
    counts: Counts,
    server: ServerInfo,
    live: LiveServer | None,
    live_mode: bool,
    carried: int,
) -> tuple[int, str]:
    """Unused lines on the server (rule 4), floored at 0, with why.

    ``carried`` is the calls already planned on it this cycle for earlier campaigns (rule 3).
    VICIdial lets free go negative, which over-dials later servers; we floor it at 0.
    """
    used = counts.auto_on.get(server.server_ip, 0) + carried
    free = server.max_trunks - used
    why = f"{server.max_trunks} max - {used} auto calls"
    if live_mode:
        lines = (live.trunk_lines if live is not None else 0) + carried
        if server.max_trunks - lines < free:
            free = server.max_trunks - lines
            why = f"{server.max_trunks} max - {lines} live trunk lines"
    return max(0, free), why


def exclusion(server: ServerInfo, live: LiveServer | None, live_mode: bool) -> str | None:
    """Why a balance-active server may not take calls now (drained; in live mode, not UP)."""
    if live is not None and live.drained:
        return "drained by the operator"
    if not live_mode:
        return None
    if live is None:
        return "no live state (not tracked): not UP"
    if live.health is not Health.UP:
        return f"health {live.health.value}: not UP"
    return None
