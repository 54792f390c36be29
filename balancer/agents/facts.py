"""What agent decisions know about each server: VICIdial's rows and the live state (pure: no I/O).

`build_facts` joins the `servers` rows, the agent counts, conferences, server_updater ages and
the balancer's own vb_login_flags records (read in one round by `balancer/db/agents.py`) with
the store's live state, into one `ServerFacts` per server. Both agent decisions read these:
the phone choice (`choice.py`) and the login-flag rules (`flag_rules.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from balancer.config import AgentsConfig
from balancer.store.base import ChannelClass, Health, ServerState

# VICIdial's agent screen (vicidial.php) counts a server_updater row as live when it is newer
# than two minutes; the same for the twin named by active_twin_server_ip.
VICIDIAL_UPDATER_WINDOW_S = 120.0
# Where the agent screen looks for a free conference, by servers.conf_engine.
CONFBRIDGE = "CONFBRIDGE"
MEETME_TABLE = "vicidial_conferences"
CONFBRIDGE_TABLE = "vicidial_confbridges"


class GroupingMode(StrEnum):
    """VICIdial's per-campaign login grouping, vicidial_campaigns.pllb_grouping."""

    DISABLED = "DISABLED"
    ONE_SERVER_ONLY = "ONE_SERVER_ONLY"  # go where the campaign already has agents
    CASCADING = "CASCADING"  # stay with the campaign's server while under both limits


@dataclass(frozen=True)
class Grouping:
    """A campaign's grouping as VICIdial stores it (its defaults are VICIdial's)."""

    campaign_id: str = ""
    mode: GroupingMode = GroupingMode.DISABLED
    campaign_limit: int = 50  # vicidial_campaigns.pllb_grouping_limit: the campaign's agents
    system_limit: int = 100  # system_settings.pllb_grouping_limit: all agents of the server


@dataclass(frozen=True)
class LoginFlagRecord:
    """A vb_login_flags row: the balancer set the server's flag to ``set_to``."""

    server_ip: str
    set_to: str
    previous: str | None = "Y"
    reason: str = ""
    changed_at: str = ""  # as the database holds it ('2026-01-02 03:04:05')


@dataclass(frozen=True)
class ServerRecord:
    """The `servers` columns agent decisions use (ENUMs kept as stored: 'Y', 'N' or None)."""

    server_ip: str
    server_id: str = ""
    active: str | None = "Y"
    login_flag: str | None = "Y"  # active_agent_login_server
    max_trunks: int = 23  # max_vicidial_trunks
    conf_engine: str = "MEETME"  # conf_engine: CONFBRIDGE conferences are in vicidial_confbridges
    twin_server_ip: str = ""  # active_twin_server_ip


@dataclass(frozen=True)
class AgentTables:
    """Everything agent decisions read from MySQL, in one round."""

    servers: dict[str, ServerRecord]
    agents: dict[str, int]  # server_ip -> non-remote logged-in agents
    updater_ages: dict[str, float]  # server_ip -> seconds since server_updater.last_update
    flag_records: dict[str, LoginFlagRecord]  # vb_login_flags by server_ip
    free_conferences: dict[str, int] = field(default_factory=dict)  # vicidial_conferences
    free_confbridges: dict[str, int] = field(default_factory=dict)  # vicidial_confbridges
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
    updater_age_s: float | None = None  # None: no server_updater row
    free_conferences: int = 0  # in vicidial_conferences
    free_confbridges: int = 0  # in vicidial_confbridges
    conf_engine: str = "MEETME"
    twin_server_ip: str = ""
    twin_updater_age_s: float | None = None  # the twin's server_updater age (None: no row)
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

    @property
    def conference_table(self) -> str:
        """The table the agent screen takes this server's conferences from."""
        return CONFBRIDGE_TABLE if self.conf_engine == CONFBRIDGE else MEETME_TABLE

    def free_in(self, table: str) -> int:
        """Free conferences of this server in one of the two conference tables."""
        return self.free_confbridges if table == CONFBRIDGE_TABLE else self.free_conferences


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
        twin = row.twin_server_ip
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
            free_confbridges=tables.free_confbridges.get(ip, 0),
            conf_engine=row.conf_engine,
            twin_server_ip=twin,
            twin_updater_age_s=tables.updater_ages.get(twin) if twin else None,
            agents=tables.agents.get(ip, 0),
            agent_phones=state.count(ChannelClass.AGENT) if fresh and state is not None else 0,
            trunk_lines=state.count(ChannelClass.TRUNK) if fresh and state is not None else 0,
            max_trunks=row.max_trunks,
            capacity=capacity_of(config, ip),
        )
    return facts


# --------------------------------------------------------------------------- load


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


# --------------------------------------------------------------------------- shared checks


def health_text(facts: ServerFacts) -> str:
    """'DOWN (connection closed)', 'SUSPECT', 'UNKNOWN'."""
    health = "UNKNOWN" if facts.health is None else str(facts.health).upper()
    return f"{health} ({facts.health_reason})" if facts.health_reason else health


def updater_stale(facts: ServerFacts, max_age_s: float | None) -> str | None:
    """Why the server's server_updater is older than our limit, or None (no row: not judged)."""
    if max_age_s is None or facts.updater_age_s is None or facts.updater_age_s <= max_age_s:
        return None
    return f"server_updater stale ({facts.updater_age_s:.0f}s > {max_age_s:g}s)"


def updater_live(age_s: float | None) -> bool:
    """VICIdial's own test of a server_updater row: there is one, newer than two minutes."""
    return age_s is not None and age_s < VICIDIAL_UPDATER_WINDOW_S


def _updater_problem(age_s: float | None) -> str | None:
    if updater_live(age_s):
        return None
    if age_s is None:
        return "no server_updater row"
    return f"server_updater {age_s:.0f}s old (the agent screen wants < 120s)"


def screen_problems(
    facts: ServerFacts,
    login_flag: str | None,
    conf_table: str,
    *,
    by_admin: bool = False,
    check_updater: bool = True,
) -> list[str]:
    """Why VICIdial's agent screen skips this server when balancing a login, in its order:
    active and open for agent logins, a free conference, a live twin, a live server_updater.

    ``by_admin``: ``login_flag`` is the admin's own (capacity mode looks through the
    balancer's 'N'); ``check_updater`` False leaves out the server's own server_updater (the
    caller judged it already).
    """
    found: list[str] = []
    if not facts.active:
        found.append("server inactive (active='N')")
    if login_flag != "Y":
        by = " by the admin" if by_admin else ""
        found.append(f"agent logins off{by} (active_agent_login_server={login_flag!r})")
    if facts.free_in(conf_table) <= 0:
        found.append(f"no free conference in {conf_table}")
    # A twin is named by more than 4 characters (VICIdial's own test of the column).
    if len(facts.twin_server_ip) > 4:
        twin = _updater_problem(facts.twin_updater_age_s)
        if twin:
            found.append(f"twin {facts.twin_server_ip} not live ({twin})")
    updater = _updater_problem(facts.updater_age_s) if check_updater else None
    if updater:
        found.append(updater)
    return found
