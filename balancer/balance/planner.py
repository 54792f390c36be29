"""The pure balance planner: a DB snapshot plus live state in, a plan with reasons out.

It follows "The balance (FILL) algorithm VICIdial runs today" in the shared VICIDIAL.md (rule
numbers below cite it), with the harmful parts fixed as that file says. Mode "faithful" is that
arithmetic; mode "live" adds what AMI sees: only UP servers, live trunk lines capping free lines,
and the server with the most spare lines first within a rank. No I/O, no clock, no randomness:
the same input always gives the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from balancer.balance.model import (
    CampaignPlan,
    DbSnapshot,
    LiveServer,
    Placement,
    Plan,
    ServerInfo,
    Skip,
)
from balancer.balance.rules import (
    Counts,
    allowed_lines,
    balance_active,
    exclusion,
    free_lines,
    pace_ms,
    stop_reason,
)
from balancer.config import BalanceConfig

MODES = ("live", "faithful")
NO_AGENT = "but no live agent that is not PAUSED"  # rule 4: such a campaign dials nothing


@dataclass(frozen=True)
class _Context:
    """What stays the same for every campaign of one cycle."""

    snapshot: DbSnapshot
    counts: Counts
    live: Mapping[str, LiveServer]
    live_mode: bool
    shortages: Mapping[tuple[str, str], int]  # only rows > 0
    balance_servers: tuple[ServerInfo, ...]  # rank DESC, server_ip as text


@dataclass(frozen=True)
class _Slot:
    """One candidate server for one campaign, with its normal-rule numbers (rule 4)."""

    server: ServerInfo
    allowed: int
    allowed_why: str
    free: int
    free_why: str
    remaining: int  # needed - planned before this server
    to_dial: int  # min(remaining, allowed, free), never below 0

    @property
    def head(self) -> str:
        """The numbers behind to_dial, for reasons."""
        rank, allowed, free = self.server.rank, self.allowed, self.free
        return f"rank {rank}: allowed {allowed}, free {free}, needed {self.remaining}"

    def zero_reason(self, needed: int) -> str:
        """Why the normal rules gave this server nothing."""
        if self.remaining <= 0:
            return f"rank {self.server.rank}: nothing left, all {needed} needed already planned"
        return self.cap_reason()

    def cap_reason(self) -> str:
        """Why this server can take no call at all: allowed or free is 0."""
        if self.allowed == 0:
            return f"rank {self.server.rank}: allowed 0 ({self.allowed_why})"
        return f"rank {self.server.rank}: no free lines ({self.free_why})"


def plan_cycle(
    snapshot: DbSnapshot, live: Mapping[str, LiveServer] | None, config: BalanceConfig
) -> Plan:
    """Plan one balance cycle: which campaign gets how many calls on which server, and why."""
    if config.mode not in MODES:
        raise ValueError(f"balance.mode: expected 'live' or 'faithful', got {config.mode!r}")
    pace = pace_ms(snapshot.settings)
    stopped = stop_reason(snapshot.settings)  # rule 1: no reset of balance_trunk_fill here
    if stopped is not None:
        return Plan(config.mode, config.staggered, stopped=stopped, pace_ms=pace)

    shortages = {key: n for key, n in snapshot.shortages.items() if n > 0}
    demand: dict[str, int] = {}
    for (campaign_id, _ip), n in shortages.items():
        info = snapshot.campaigns.get(campaign_id)
        # Rule 6: an inactive (or unknown) campaign has no demand, though VICIdial counts it.
        if info is not None and info.active:
            demand[campaign_id] = demand.get(campaign_id, 0) + n
    balance_servers = tuple(
        sorted(
            (s for s in snapshot.servers.values() if balance_active(s)),
            key=lambda s: (-s.rank, s.server_ip),  # str order is VICIdial's TEXT order (rule 4)
        )
    )
    # Rule 2 (with rule 6's inactive servers): nothing to do, every balance_trunk_fill -> 0.
    if not demand:
        stopped = "no active campaign reports a trunk shortage"
    elif not balance_servers:
        stopped = "no server is balance-active (active and vicidial_balance_active)"
    if stopped is not None:
        return Plan(config.mode, config.staggered, stopped=stopped, reset_fill=True, pace_ms=pace)

    ctx = _Context(
        snapshot=snapshot,
        counts=Counts.of(snapshot),
        live=live or {},
        live_mode=config.mode == "live",
        shortages=shortages,
        balance_servers=balance_servers,
    )
    campaigns: list[CampaignPlan] = []
    sequence: list[Placement] = []
    carried: dict[str, int] = {}  # rule 3: this cycle's calls per server, for later campaigns
    for campaign_id in sorted(demand):
        campaign, calls = _plan_campaign(ctx, campaign_id, demand[campaign_id], carried, config)
        campaigns.append(campaign)
        sequence.extend(calls)
        for placement in campaign.placements:
            carried[placement.server_ip] = carried.get(placement.server_ip, 0) + placement.calls
    return Plan(
        config.mode,
        config.staggered,
        campaigns=tuple(campaigns),
        pace_ms=pace,
        sequence=tuple(sequence),
    )


def _plan_campaign(
    ctx: _Context,
    campaign_id: str,
    demand: int,
    carried: Mapping[str, int],
    config: BalanceConfig,
) -> tuple[CampaignPlan, list[Placement]]:
    """One campaign's placements (aggregated per server) and its calls in placing order."""
    already = ctx.counts.outbalance_total.get(campaign_id, 0)
    needed = demand - already
    may_dial = ctx.snapshot.live_agents.get(campaign_id, 0) > 0

    def result(
        note: str, placements: list[Placement] | None = None, skips: list[Skip] | None = None
    ) -> CampaignPlan:
        return CampaignPlan(
            campaign_id,
            demand,
            already,
            needed,
            may_dial,
            placements=tuple(placements or ()),
            skips=tuple(skips or ()),
            note=note,
        )

    if needed <= 0:
        return result(f"already filling {already} >= demand {demand}: nothing needed"), []
    slots, excluded = _candidates(ctx, campaign_id, needed, carried)
    if not slots:
        note = "no candidate server: each balance-active one reports the shortage or is excluded"
        return result(note, skips=excluded), []

    hopper = ctx.snapshot.hopper_ready.get(campaign_id, 0)
    if config.staggered:
        placements, skips, calls = _deal(campaign_id, slots, needed, may_dial, hopper)
    else:
        placements, skips = _place_in_order(campaign_id, slots, needed, may_dial, hopper)
        calls = placements
    placed = sum(p.calls for p in placements)
    planned = sum(s.to_dial for s in slots)
    note = f"demand {demand} - already filling {already} = needed {needed}; placing {placed}"
    if placed < planned:
        why = "no live agent that is not PAUSED" if not may_dial else f"hopper {hopper} READY"
        note += f" of {planned} planned ({why})"
    # Servers after the need was covered get no Skip each: with hundreds of servers and
    # campaigns that would be tens of thousands of identical reasons (and decision-log rows).
    not_needed = {s.server.server_ip for s in slots if s.remaining <= 0 and s.to_dial == 0}
    not_needed -= {p.server_ip for p in placements}  # staggered dealing may still use them
    if not_needed:
        skips = [s for s in skips if s.server_ip not in not_needed]
        note += f"; {len(not_needed)} more candidate servers not needed"
    return result(note, placements, excluded + skips), calls


def _candidates(
    ctx: _Context, campaign_id: str, needed: int, carried: Mapping[str, int]
) -> tuple[list[_Slot], list[Skip]]:
    """Candidate servers in filling order with their to_dial (rule 4), and why others are out."""
    rows: list[tuple[ServerInfo, int, str, int, str]] = []
    excluded: list[Skip] = []
    for server in ctx.balance_servers:
        ip = server.server_ip
        shortage = ctx.shortages.get((campaign_id, ip), 0)
        if shortage:
            # Rule 4: a server short of lines for this campaign is never asked to fill it.
            excluded.append(Skip(campaign_id, ip, f"reports a shortage of {shortage} itself"))
            continue
        live = ctx.live.get(ip)
        why = exclusion(server, live, ctx.live_mode)
        if why is not None:
            excluded.append(Skip(campaign_id, ip, why))
            continue
        allowed, allowed_why = allowed_lines(ctx.counts, server, campaign_id)
        free, free_why = free_lines(ctx.counts, server, live, ctx.live_mode, carried.get(ip, 0))
        rows.append((server, allowed, allowed_why, free, free_why))
    if ctx.live_mode:
        # Live mode: within a rank tier the server with the most spare lines goes first.
        rows.sort(key=lambda r: (-r[0].rank, -r[3], r[0].server_ip))
    slots: list[_Slot] = []
    planned = 0
    for server, allowed, allowed_why, free, free_why in rows:
        remaining = needed - planned
        to_dial = max(0, min(remaining, allowed, free))
        # Rule 4: planned counts to_dial even when nothing is dialed for want of agents or leads.
        planned += to_dial
        slots.append(_Slot(server, allowed, allowed_why, free, free_why, remaining, to_dial))
    return slots, excluded


def _place_in_order(
    campaign_id: str, slots: list[_Slot], needed: int, may_dial: bool, hopper: int
) -> tuple[list[Placement], list[Skip]]:
    """Normal mode: each server in order gets its to_dial, as far as agents and leads allow."""
    placements: list[Placement] = []
    skips: list[Skip] = []
    for slot in slots:
        ip = slot.server.server_ip
        if slot.remaining <= 0:
            continue  # need already covered: counted in the campaign note, not one Skip each
        head = f"{slot.head} -> {slot.to_dial}"
        if slot.to_dial == 0:
            skips.append(Skip(campaign_id, ip, slot.zero_reason(needed)))
        elif not may_dial:
            # Rule 4: no live agent that is not PAUSED, nothing is dialed.
            skips.append(Skip(campaign_id, ip, f"{head}, {NO_AGENT}"))
        elif hopper == 0:
            skips.append(Skip(campaign_id, ip, f"{head}, but the hopper is empty"))
        else:
            # Rule 4: never more than the READY hopper rows left; a shallow hopper starves
            # later servers, since their to_dial already counted these calls.
            calls = min(slot.to_dial, hopper)
            reason = head if calls == slot.to_dial else f"{head}, hopper {hopper} left -> {calls}"
            hopper -= calls
            placements.append(Placement(campaign_id, ip, calls, reason))
    return placements, skips


def _deal(
    campaign_id: str, slots: list[_Slot], needed: int, may_dial: bool, hopper: int
) -> tuple[list[Placement], list[Skip], list[Placement]]:
    """Staggered mode (rule 7, fixed): deal the gathered calls one by one over each rank tier."""
    # Gather only what the normal rules planned (never more than needed), and only leads there
    # are; every gathered call fits, since each server's cap is at least its to_dial.
    gathered = min(sum(s.to_dial for s in slots), hopper) if may_dial else 0
    caps = [min(s.allowed, s.free) for s in slots]  # each server's own cap, not the tier's
    dealt = [0] * len(slots)
    sequence: list[Placement] = []
    start = 0
    while start < len(slots) and len(sequence) < gathered:
        rank = slots[start].server.rank
        end = start
        while end < len(slots) and slots[end].server.rank == rank:
            end += 1
        progressed = True
        while progressed and len(sequence) < gathered:
            progressed = False
            for i in range(start, end):
                if len(sequence) == gathered or dealt[i] >= caps[i]:
                    continue
                dealt[i] += 1
                progressed = True
                ip = slots[i].server.server_ip
                reason = f"staggered call {len(sequence) + 1}/{gathered}: rank {rank} round-robin"
                sequence.append(Placement(campaign_id, ip, 1, reason))
        start = end

    placements: list[Placement] = []
    skips: list[Skip] = []
    for slot, cap, n in zip(slots, caps, dealt, strict=True):
        ip = slot.server.server_ip
        if n:
            reason = f"{slot.head}, cap {cap}: dealt {n} of {gathered} round-robin"
            placements.append(Placement(campaign_id, ip, n, reason))
        elif cap == 0:
            skips.append(Skip(campaign_id, ip, slot.cap_reason()))
        elif not may_dial:
            skips.append(Skip(campaign_id, ip, f"{slot.head}, {NO_AGENT}"))
        elif hopper == 0:
            skips.append(Skip(campaign_id, ip, f"{slot.head}, but the hopper is empty"))
        else:
            reason = f"rank {slot.server.rank}: all {gathered} gathered calls dealt before it"
            skips.append(Skip(campaign_id, ip, reason))
    return placements, skips, sequence
