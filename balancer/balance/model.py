"""The balance engine's inputs and outputs as plain data (no I/O): the contract between the DB
snapshot reader (`balancer/db/snapshot.py`), the pure planner (`balancer/balance/planner.py`)
and the executor (`balancer/balance/executor.py`).

Names follow VICIdial's tables (see shared VICIDIAL.md); values are already typed and cleaned
(ENUM 'Y'/'N' -> bool, numbers -> int) by the reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from balancer.store.base import Health

OUTBALANCE = "OUTBALANCE"


@dataclass(frozen=True)
class SystemSettings:
    """`system_settings` (one row; a missing row means autodial is off)."""

    outbound_autodial_active: bool = True
    disable_auto_dial: bool = False
    outbound_calls_per_second: int = 10
    call_limit_24hour: bool = False  # VICIdial then records the lead's state per 24-hour call


@dataclass(frozen=True)
class ServerInfo:
    """The `servers` columns the balance engine uses."""

    server_ip: str
    server_id: str = ""
    active: bool = True
    balance_active: bool = False  # vicidial_balance_active
    rank: int = 0  # vicidial_balance_rank: higher is filled first
    max_trunks: int = 23  # max_vicidial_trunks
    offlimits: int = 0  # balance_trunks_offlimits
    asterisk_version: str = ""
    routing_prefix: str = "13"
    ext_context: str = "default"
    answer_transfer_agent: str = "8365"
    local_gmt: float = -5.0


@dataclass(frozen=True)
class CampaignInfo:
    """The `vicidial_campaigns` columns used to plan and to write a balance call."""

    campaign_id: str
    active: bool = True
    dial_timeout: int = 60
    dial_prefix: str = "9"
    campaign_cid: str = "0000000000"
    vdad_exten: str = "8368"  # campaign_vdad_exten
    omit_phone_code: bool = False
    queue_priority: int = 50
    auto_alt_dial: str = "NONE"
    use_custom_cid: bool = False


@dataclass(frozen=True)
class TrunkRule:
    """One `vicidial_server_trunks` row: lines reserved on a server for a campaign."""

    server_ip: str
    campaign_id: str
    dedicated: int = 0
    maximum_limit: bool = False  # trunk_restriction = 'MAXIMUM_LIMIT'


@dataclass(frozen=True)
class DbSnapshot:
    """Everything the planner needs from MySQL, read in a constant number of queries."""

    taken_at: datetime  # the database's NOW() when read: one timestamp per cycle
    settings: SystemSettings | None
    servers: dict[str, ServerInfo]
    campaigns: dict[str, CampaignInfo]
    # Fresh (within the shortage window) rows with local_trunk_shortage > 0: (campaign, server) -> n
    shortages: dict[tuple[str, str], int]
    trunk_rules: tuple[TrunkRule, ...]
    # vicidial_auto_calls rows counted by (server_ip, campaign_id, call_type)
    auto_calls: dict[tuple[str, str, str], int]
    # live agents per campaign that are not PAUSED (campaign_id or dial_campaign_id), after the
    # configured remote-agent and freshness rules were applied by the reader
    live_agents: dict[str, int]
    hopper_ready: dict[str, int]  # READY vicidial_hopper rows per campaign
    # READY hopper_ids per campaign in VICIdial's claim order (priority DESC, hopper_id): the
    # executor claims these by primary key
    hopper_ids: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def auto_calls_on(self, server_ip: str) -> int:
        """All auto-call rows on a server, any campaign, any call type."""
        return sum(n for (ip, _, _), n in self.auto_calls.items() if ip == server_ip)

    def outbalance(self, campaign_id: str, server_ip: str | None = None) -> int:
        """A campaign's OUTBALANCE rows, on one server or on all."""
        return sum(
            n
            for (ip, camp, kind), n in self.auto_calls.items()
            if camp == campaign_id and kind == OUTBALANCE and (server_ip is None or ip == server_ip)
        )


@dataclass(frozen=True)
class LiveServer:
    """What the state store says about a server right now (live mode's extra inputs)."""

    health: Health
    drained: bool = False
    trunk_lines: int = 0  # trunk channels in use per AMI


@dataclass(frozen=True)
class Placement:
    """Calls to place for one campaign on one server, with the reason for the number."""

    campaign_id: str
    server_ip: str
    calls: int
    reason: str


@dataclass(frozen=True)
class Skip:
    """A candidate server that got nothing, and why (for the decision log and --dry-run)."""

    campaign_id: str
    server_ip: str
    reason: str


@dataclass(frozen=True)
class CampaignPlan:
    """One campaign's share of the cycle."""

    campaign_id: str
    demand: int  # sum of fresh local_trunk_shortage
    already_filling: int  # its OUTBALANCE calls, any server
    needed: int  # demand - already_filling (may be <= 0)
    may_dial: bool  # has a live agent that is not PAUSED
    placements: tuple[Placement, ...] = ()
    skips: tuple[Skip, ...] = ()
    note: str = ""

    @property
    def planned(self) -> int:
        return sum(p.calls for p in self.placements)


@dataclass(frozen=True)
class Plan:
    """The planner's output: what to place, in order, and what to store as balance_trunk_fill."""

    mode: str  # "live" or "faithful"
    staggered: bool
    stopped: str | None = None  # why nothing at all is done (autodial off, no demand, ...)
    reset_fill: bool = False  # set every campaign's balance_trunk_fill to 0 (VICIdial step 2)
    campaigns: tuple[CampaignPlan, ...] = ()
    pace_ms: float = 100.0  # wait after every call: 1000 / outbound_calls_per_second
    # The order calls are placed in: for staggered mode, one Placement per call, round-robin.
    sequence: tuple[Placement, ...] = field(default=())

    @property
    def total_calls(self) -> int:
        return sum(p.calls for p in self.sequence)
