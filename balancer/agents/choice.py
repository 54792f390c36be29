"""Agent phones by real capacity, and VICIdial's login flags kept honest (pure: no I/O).

Two decisions live here, both from the same per-server facts (`ServerFacts`):

* `choose_phone`: which phone login of an alias (one login per server) an agent should use. A
  server is eligible when it is UP, not DRAINED, active, open for agent logins as the admin set it,
  has a free conference, its server_updater is fresh and it is below its agent capacity. Its score
  is the higher of its agent utilisation and its trunk utilisation; the lowest score wins, ties go
  to fewer agents, then the alias's own order, then server_ip. VICIdial's campaign grouping modes
  (ONE_SERVER_ONLY, CASCADING) narrow the choice first.
* `decide_login_flags`: which `servers.active_agent_login_server` flags the balancer should close
  ('N': DOWN, DRAINED, stale server_updater, at agent capacity) or re-open ('Y': UP for a settle
  time and below capacity by the hysteresis margin). It only ever re-opens a flag it closed itself
  (recorded in vb_login_flags), so an administrator's own 'N' is never overridden.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from balancer.config import AgentsConfig
from balancer.store.base import ChannelClass, Health, ServerState

# --------------------------------------------------------------------------- inputs


class GroupingMode(StrEnum):
    """VICIdial's per-campaign agent-login server grouping (vb_campaign_grouping.mode)."""

    NONE = "NONE"
    ONE_SERVER_ONLY = "ONE_SERVER_ONLY"  # go where the campaign already has agents
    CASCADING = "CASCADING"  # fill a server with the campaign's agents up to a limit, then the next


@dataclass(frozen=True)
class Grouping:
    """A campaign's grouping mode; cascade_limit is agents per server (0: no limit)."""

    campaign_id: str = ""
    mode: GroupingMode = GroupingMode.NONE
    cascade_limit: int = 0


@dataclass(frozen=True)
class LoginFlagRecord:
    """A vb_login_flags row: the balancer set the server's flag to ``set_to``."""

    server_ip: str
    set_to: str
    previous: str | None = "Y"
    reason: str = ""


@dataclass(frozen=True)
class ServerRecord:
    """The `servers` columns agent assignment uses (ENUMs kept as stored: 'Y', 'N' or None)."""

    server_ip: str
    server_id: str = ""
    active: str | None = "Y"
    login_flag: str | None = "Y"  # active_agent_login_server
    max_trunks: int = 23  # max_vicidial_trunks


@dataclass(frozen=True)
class AgentTables:
    """Everything agent assignment and the flag keeper read from MySQL, in one round."""

    servers: dict[str, ServerRecord]
    agents: dict[str, int]  # server_ip -> non-remote logged-in agents
    free_conferences: dict[str, int]  # server_ip -> conferences with an empty extension
    updater_ages: dict[str, float]  # server_ip -> seconds since server_updater.last_update
    flag_records: dict[str, LoginFlagRecord]  # vb_login_flags by server_ip
    campaign_agents: dict[str, int] = field(default_factory=dict)  # the asked campaign's agents
    grouping: Grouping = field(default_factory=Grouping)


@dataclass(frozen=True)
class ServerFacts:
    """One server as agent decisions see it: the DB's flags and counts plus the live state."""

    server_ip: str
    server_id: str = ""
    active: bool = True
    login_flag: str | None = "Y"  # active_agent_login_server as it is now
    flag_record: LoginFlagRecord | None = None  # the balancer's own change, if any
    health: Health | None = None  # None: no fresh live state for this server
    health_reason: str = ""
    drained: bool = False
    updater_age_s: float | None = None  # None: no server_updater row (judged by AMI alone)
    free_conferences: int = 0
    agents: int = 0  # non-remote agents logged in (vicidial_live_agents)
    agent_phones: int = 0  # live agent phone channels (AMI)
    trunk_lines: int = 0  # live trunk channels (AMI)
    max_trunks: int = 0
    capacity: int = 0

    @property
    def balancer_holds_flag(self) -> bool:
        """True when the current 'N' is the balancer's own (vb_login_flags says it set it)."""
        return balancer_holds(self.login_flag, self.flag_record)

    @property
    def admin_login_flag(self) -> str | None:
        """The flag as the administrator set it: what the balancer replaced, while it holds it."""
        if self.balancer_holds_flag and self.flag_record is not None:
            return self.flag_record.previous
        return self.login_flag


def balancer_holds(login_flag: str | None, record: LoginFlagRecord | None) -> bool:
    """Whether the flag's current 'N' was set by the balancer (and not changed since)."""
    return login_flag == "N" and record is not None and record.set_to == "N"


def capacity_of(config: AgentsConfig, server_ip: str) -> int:
    """A server's agent capacity: its own setting, else the cluster default."""
    return config.capacity.get(server_ip, config.default_capacity)


def build_facts(
    tables: AgentTables,
    states: Iterable[ServerState],
    drained: Iterable[str],
    config: AgentsConfig,
) -> dict[str, ServerFacts]:
    """ServerFacts for every `servers` row, from the DB tables and the store's live state.

    A server the store does not know, or whose state is not fresh, has health None.
    """
    live = {s.server_ip: s for s in states}
    drained_set = set(drained) | {s.server_ip for s in live.values() if s.drained}
    facts: dict[str, ServerFacts] = {}
    for ip, row in tables.servers.items():
        state = live.get(ip)
        fresh = state is not None and state.fresh
        facts[ip] = ServerFacts(
            server_ip=ip,
            server_id=row.server_id,
            active=row.active == "Y",
            login_flag=row.login_flag,
            flag_record=tables.flag_records.get(ip),
            health=state.meta.health if fresh and state is not None else None,
            health_reason=state.meta.health_reason if state is not None else "",
            drained=ip in drained_set,
            updater_age_s=tables.updater_ages.get(ip),
            free_conferences=tables.free_conferences.get(ip, 0),
            agents=tables.agents.get(ip, 0),
            agent_phones=state.count(ChannelClass.AGENT) if fresh and state is not None else 0,
            trunk_lines=state.count(ChannelClass.TRUNK) if fresh and state is not None else 0,
            max_trunks=row.max_trunks,
            capacity=capacity_of(config, ip),
        )
    return facts


# --------------------------------------------------------------------------- capacity model


@dataclass(frozen=True)
class Load:
    """A server's load against its capacity; score is the higher utilisation (lower is better)."""

    agents: int
    capacity: int
    trunks: int
    max_trunks: int
    agent_util: float
    trunk_util: float

    @property
    def score(self) -> float:
        return max(self.agent_util, self.trunk_util)

    def describe(self) -> str:
        """'score 0.35 (agents 7/20, trunks 3/23)'."""
        return (
            f"score {self.score:.2f} (agents {self.agents}/{self.capacity}, "
            f"trunks {self.trunks}/{self.max_trunks})"
        )


def _ratio(used: int, limit: int) -> float:
    # A zero limit holds nothing: any use of it is full, none is empty.
    if limit <= 0:
        return 1.0 if used > 0 else 0.0
    return used / limit


def agent_load(facts: ServerFacts) -> int:
    """Agents on the server: logged in, or phones already up (a phone may ring in before login)."""
    return max(facts.agents, facts.agent_phones)


def load_of(facts: ServerFacts) -> Load:
    """The server's agent and trunk utilisation."""
    agents = agent_load(facts)
    return Load(
        agents=agents,
        capacity=facts.capacity,
        trunks=facts.trunk_lines,
        max_trunks=facts.max_trunks,
        agent_util=1.0 if facts.capacity <= 0 else agents / facts.capacity,
        trunk_util=_ratio(facts.trunk_lines, facts.max_trunks),
    )


def _health_text(facts: ServerFacts) -> str:
    health = "UNKNOWN" if facts.health is None else str(facts.health).upper()
    return f"{health} ({facts.health_reason})" if facts.health_reason else health


def updater_stale(facts: ServerFacts, max_age_s: float | None) -> str | None:
    """Why the server's server_updater is stale, or None (no row: judged by AMI alone)."""
    if max_age_s is None or facts.updater_age_s is None or facts.updater_age_s <= max_age_s:
        return None
    return f"server_updater stale ({facts.updater_age_s:.0f}s > {max_age_s:g}s)"


def problems(facts: ServerFacts, updater_max_age_s: float | None) -> list[str]:
    """Every reason the server cannot take an agent now; empty when it is eligible."""
    found: list[str] = []
    if not facts.active:
        found.append("server inactive (active='N')")
    if facts.admin_login_flag != "Y":
        found.append(
            f"agent logins off by the admin (active_agent_login_server={facts.admin_login_flag!r})"
        )
    if facts.drained:
        found.append("DRAINED")
    if facts.health is None:
        found.append("no live state (is a daemon tracking it?)")
    elif facts.health is not Health.UP:
        found.append(_health_text(facts))
    stale = updater_stale(facts, updater_max_age_s)
    if stale:
        found.append(stale)
    if facts.free_conferences <= 0:
        found.append("no free conference")
    load = load_of(facts)
    if load.agents >= facts.capacity:
        found.append(f"at agent capacity ({load.agents}/{facts.capacity})")
    return found


# --------------------------------------------------------------------------- phone choice


@dataclass(frozen=True)
class PhoneCandidate:
    """One phone login on one server; position is its place in the alias's list."""

    login: str
    extension: str
    server_ip: str
    position: int = 0
    active: bool = True  # phones.active = 'Y'


@dataclass(frozen=True)
class CandidateView:
    """A candidate with its server's facts, load and problems (empty problems: eligible)."""

    phone: PhoneCandidate
    facts: ServerFacts | None
    load: Load | None
    problems: tuple[str, ...]

    @property
    def eligible(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Assignment:
    """The choice (None when no server is eligible), its reason, and every candidate seen."""

    chosen: CandidateView | None
    reason: str
    candidates: tuple[CandidateView, ...]
    grouping: Grouping

    @property
    def skipped(self) -> list[CandidateView]:
        return [c for c in self.candidates if not c.eligible]


def _view(
    phone: PhoneCandidate, facts: Mapping[str, ServerFacts], updater_max_age_s: float | None
) -> CandidateView:
    server = facts.get(phone.server_ip)
    inactive = [] if phone.active else [f"phone {phone.login} inactive (phones.active='N')"]
    if server is None:
        return CandidateView(phone, None, None, (*inactive, "not in the servers table"))
    found = (*inactive, *problems(server, updater_max_age_s))
    return CandidateView(phone, server, load_of(server), found)


def _rank(view: CandidateView) -> tuple[float, int, int, str]:
    assert view.load is not None
    return (view.load.score, view.load.agents, view.phone.position, view.phone.server_ip)


def _servers(views: Iterable[CandidateView]) -> list[str]:
    return sorted({v.phone.server_ip for v in views})


def _apply_grouping(
    eligible: list[CandidateView],
    grouping: Grouping,
    campaign_agents: Mapping[str, int],
) -> tuple[list[CandidateView], str]:
    """Narrow the eligible candidates by the campaign's grouping mode; with a note for the reason.

    Among the remaining candidates the caller takes the best-ranked; for both modes the
    candidates here are already ordered so that the first is the one the mode wants.
    """
    cid = grouping.campaign_id
    if grouping.mode is GroupingMode.ONE_SERVER_ONLY:
        with_agents = [v for v in eligible if campaign_agents.get(v.phone.server_ip, 0) > 0]
        if with_agents:
            # Concentrate: the server with the most of this campaign's agents.
            with_agents.sort(key=lambda v: (-campaign_agents.get(v.phone.server_ip, 0), _rank(v)))
            n = campaign_agents.get(with_agents[0].phone.server_ip, 0)
            return with_agents[:1], f"ONE_SERVER_ONLY: campaign {cid} already has {n} agents here"
        elsewhere = sorted(ip for ip, n in campaign_agents.items() if n > 0)
        if elsewhere:
            return eligible, (
                f"ONE_SERVER_ONLY: campaign {cid}'s server(s) {', '.join(elsewhere)} not "
                "eligible for this phone; chose by score"
            )
        return eligible, f"ONE_SERVER_ONLY: campaign {cid} has no agents yet; chose by score"
    if grouping.mode is GroupingMode.CASCADING:
        limit = grouping.cascade_limit
        if limit <= 0:
            return eligible, "CASCADING without a cascade_limit: chose by score"
        below = [v for v in eligible if campaign_agents.get(v.phone.server_ip, 0) < limit]
        if not below:
            return eligible, (
                f"CASCADING: every eligible server has {limit}+ agents of campaign {cid}; "
                "chose by score"
            )
        # Fill the fullest server that is still below the limit, then the next.
        below.sort(key=lambda v: (-campaign_agents.get(v.phone.server_ip, 0), _rank(v)))
        n = campaign_agents.get(below[0].phone.server_ip, 0)
        return below[:1], f"CASCADING: campaign {cid} has {n}/{limit} agents here"
    return eligible, ""


def choose_phone(
    phones: Sequence[PhoneCandidate],
    facts: Mapping[str, ServerFacts],
    *,
    updater_max_age_s: float | None,
    grouping: Grouping | None = None,
    campaign_agents: Mapping[str, int] | None = None,
) -> Assignment:
    """The phone login an agent should use: eligible, grouping mode applied, lowest score."""
    grouping = grouping or Grouping()
    campaign_agents = campaign_agents or {}
    views = tuple(_view(p, facts, updater_max_age_s) for p in phones)
    skipped = [v for v in views if not v.eligible]
    skipped_text = "; ".join(f"skipped {v.phone.server_ip}: {v.problems[0]}" for v in skipped)
    eligible = [v for v in views if v.eligible]
    if not eligible:
        detail = skipped_text.replace("skipped ", "") if skipped_text else "no phones"
        return Assignment(None, f"no eligible server: {detail}", views, grouping)
    pool, note = _apply_grouping(eligible, grouping, campaign_agents)
    chosen = min(pool, key=_rank)
    assert chosen.load is not None
    count = len(_servers(eligible))
    if note:
        why = note
    elif count == 1:
        why = "the only eligible server"
    else:
        why = f"lowest among {count} eligible"
    reason = f"{chosen.load.describe()} — {why}"
    if skipped_text:
        reason += f"; {skipped_text}"
    return Assignment(chosen, reason, views, grouping)


# --------------------------------------------------------------------------- login flags


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
        return "N", _health_text(facts)
    stale = updater_stale(facts, settings.updater_max_age_s)
    if stale:
        return "N", stale
    load = agent_load(facts)
    if load >= facts.capacity:
        return "N", f"at agent capacity ({load}/{facts.capacity})"
    if facts.health is not Health.UP:
        return None, _health_text(facts)
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
