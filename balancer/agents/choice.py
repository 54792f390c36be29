"""Which phone login of an alias (one login per server) an agent should use (pure: no I/O).

Two modes (`[agents] mode`), over the same `ServerFacts` (`facts.py`):

* ``"vicidial"``: exactly the login VICIdial's agent screen (vicidial.php) picks. It walks the
  logins in the alias's order. A login is eligible when its phones row names a server that is
  active='Y' and active_agent_login_server='Y', has a free conference (vicidial_conferences, or
  vicidial_confbridges once a CONFBRIDGE server was met: see `_choose_vicidial`), a live twin
  when active_twin_server_ip is set, and a server_updater newer than two minutes. The campaign's
  pllb_grouping may force a login: ONE_SERVER_ONLY the first eligible one whose server has the
  campaign's agents; CASCADING the first one where the campaign has agents, fewer than its
  pllb_grouping_limit, on a server with fewer than system_settings.pllb_grouping_limit agents.
  Otherwise the fewest non-remote agents win; on a tie the LATER login wins (the screen's
  ``$pb_count >= $row[0]``). It knows nothing of capacity, live calls or drain: the balancer
  steers it through the login flags.
* ``"capacity"`` (the default): the same eligibility (with the admin's own flag, not the
  balancer's 'N'), and the server must also be UP, not DRAINED, within our server_updater age
  and below its agent capacity; the phone must be active. The lowest score (the higher of agent
  and trunk utilisation) wins; ties go to fewer agents, then the alias's order, then server_ip.
  ONE_SERVER_ONLY goes to the server holding most of the campaign's agents; CASCADING fills the
  fullest server still below both limits; both fall back to the score.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from balancer.agents.facts import (
    CONFBRIDGE,
    CONFBRIDGE_TABLE,
    MEETME_TABLE,
    Grouping,
    GroupingMode,
    Load,
    ServerFacts,
    health_text,
    load_of,
    screen_problems,
    updater_stale,
)
from balancer.store.base import Health

CAPACITY_MODE = "capacity"
VICIDIAL_MODE = "vicidial"


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
    """The choice (None when no login is usable), its reason, and every candidate seen.

    ``grouped``: the campaign's grouping rule made the choice (not the fewest-agents or score
    rule).
    """

    chosen: CandidateView | None
    reason: str
    candidates: tuple[CandidateView, ...]
    grouping: Grouping
    mode: str = CAPACITY_MODE
    grouped: bool = False

    @property
    def skipped(self) -> list[CandidateView]:
        return [c for c in self.candidates if not c.eligible]


def choose_phone(
    phones: Sequence[PhoneCandidate],
    facts: Mapping[str, ServerFacts],
    *,
    updater_max_age_s: float | None,
    grouping: Grouping | None = None,
    campaign_agents: Mapping[str, int] | None = None,
    mode: str = CAPACITY_MODE,
    balanced: bool = True,
) -> Assignment:
    """The phone login an agent should use, by the mode's rule.

    ``balanced``: the logins came as a list (VICIdial balances only a list with a comma; a
    single login is used as it is). ``updater_max_age_s`` is our own limit (capacity mode).
    """
    grouping = grouping or Grouping()
    campaign_agents = campaign_agents or {}
    if mode == VICIDIAL_MODE:
        return _choose_vicidial(phones, facts, grouping, campaign_agents, balanced)
    return _choose_capacity(phones, facts, updater_max_age_s, grouping, campaign_agents)


def _skipped_text(views: Iterable[CandidateView]) -> str:
    return "; ".join(f"skipped {v.phone.server_ip}: {v.problems[0]}" for v in views if v.problems)


# --------------------------------------------------------------------------- capacity mode


def capacity_problems(facts: ServerFacts, updater_max_age_s: float | None) -> list[str]:
    """Every reason the server cannot take an agent now (capacity mode); empty: eligible."""
    stale = updater_stale(facts, updater_max_age_s)
    # The agent screen's own checks, with the flag as the admin set it: a 'N' the balancer
    # holds is ours to lift, and the checks below already say whether it should be.
    found = screen_problems(
        facts,
        facts.admin_login_flag,
        facts.conference_table,
        by_admin=True,
        check_updater=stale is None,
    )
    if facts.drained:
        found.append("DRAINED")
    if facts.health is None:
        found.append("no live state (is a daemon tracking it?)")
    elif facts.health is not Health.UP:
        found.append(health_text(facts))
    if stale:
        found.append(stale)
    load = load_of(facts)
    if load.agents >= facts.capacity:
        found.append(f"at agent capacity ({load.agents}/{facts.capacity})")
    return found


def _capacity_view(
    phone: PhoneCandidate, facts: Mapping[str, ServerFacts], updater_max_age_s: float | None
) -> CandidateView:
    server = facts.get(phone.server_ip)
    inactive = [] if phone.active else [f"phone {phone.login} inactive (phones.active='N')"]
    if server is None:
        return CandidateView(phone, None, None, (*inactive, "not in the servers table"))
    found = (*inactive, *capacity_problems(server, updater_max_age_s))
    return CandidateView(phone, server, load_of(server), found)


def _rank(view: CandidateView) -> tuple[float, int, int, str]:
    assert view.load is not None
    return (view.load.score, view.load.agents, view.phone.position, view.phone.server_ip)


def _apply_grouping(
    eligible: list[CandidateView],
    grouping: Grouping,
    campaign_agents: Mapping[str, int],
) -> tuple[list[CandidateView], str, bool]:
    """Narrow the eligible candidates by the campaign's grouping mode: the pool, a note for
    the reason, and whether the mode made the choice (then the pool is the one it wants)."""
    cid = grouping.campaign_id

    def agents_of(v: CandidateView) -> int:
        return campaign_agents.get(v.phone.server_ip, 0)

    if grouping.mode is GroupingMode.ONE_SERVER_ONLY:
        with_agents = [v for v in eligible if agents_of(v) > 0]
        if with_agents:
            # Concentrate: the server with the most of this campaign's agents.
            with_agents.sort(key=lambda v: (-agents_of(v), _rank(v)))
            n = agents_of(with_agents[0])
            note = f"ONE_SERVER_ONLY: campaign {cid} already has {n} agents here"
            return with_agents[:1], note, True
        elsewhere = sorted(ip for ip, n in campaign_agents.items() if n > 0)
        if elsewhere:
            return (
                eligible,
                (
                    f"ONE_SERVER_ONLY: campaign {cid}'s server(s) {', '.join(elsewhere)} not "
                    "eligible for this phone; chose by score"
                ),
                False,
            )
        note = f"ONE_SERVER_ONLY: campaign {cid} has no agents yet; chose by score"
        return eligible, note, False
    if grouping.mode is GroupingMode.CASCADING:
        limit, system = grouping.campaign_limit, grouping.system_limit
        if limit <= 0:
            return eligible, "CASCADING with pllb_grouping_limit 0: chose by score", False
        below = [
            v
            for v in eligible
            if agents_of(v) < limit and v.facts is not None and v.facts.agents < system
        ]
        if not below:
            return (
                eligible,
                (
                    f"CASCADING: every eligible server has {limit}+ agents of campaign {cid} "
                    f"or {system}+ agents; chose by score"
                ),
                False,
            )
        # Fill the fullest server that is still below the limits, then the next.
        below.sort(key=lambda v: (-agents_of(v), _rank(v)))
        note = f"CASCADING: campaign {cid} has {agents_of(below[0])}/{limit} agents here"
        return below[:1], note, True
    return eligible, "", False


def _choose_capacity(
    phones: Sequence[PhoneCandidate],
    facts: Mapping[str, ServerFacts],
    updater_max_age_s: float | None,
    grouping: Grouping,
    campaign_agents: Mapping[str, int],
) -> Assignment:
    views = tuple(_capacity_view(p, facts, updater_max_age_s) for p in phones)
    skipped_text = _skipped_text(views)
    eligible = [v for v in views if v.eligible]
    if not eligible:
        detail = skipped_text.replace("skipped ", "") if skipped_text else "no phones"
        return Assignment(None, f"no eligible server: {detail}", views, grouping)
    pool, note, grouped = _apply_grouping(eligible, grouping, campaign_agents)
    chosen = min(pool, key=_rank)
    assert chosen.load is not None
    count = len({v.phone.server_ip for v in eligible})
    if note:
        why = note
    elif count == 1:
        why = "the only eligible server"
    else:
        why = f"lowest among {count} eligible"
    reason = f"{chosen.load.describe()} — {why}"
    if skipped_text:
        reason += f"; {skipped_text}"
    return Assignment(chosen, reason, views, grouping, CAPACITY_MODE, grouped)


# --------------------------------------------------------------------------- vicidial mode


def _first_row_per_login(phones: Sequence[PhoneCandidate]) -> list[PhoneCandidate]:
    # The screen reads one server_ip per login (the first phones row MySQL returns).
    seen: set[str] = set()
    walk: list[PhoneCandidate] = []
    for phone in sorted(phones, key=lambda p: p.position):
        if phone.login not in seen:
            seen.add(phone.login)
            walk.append(phone)
    return walk


def _screen_accepts(phones: Sequence[PhoneCandidate], facts: Mapping[str, ServerFacts]) -> bool:
    # Before balancing, the screen checks that some phone of the list is active on a server
    # open for agent logins (its password is not ours to check).
    return any(
        p.active and p.server_ip in facts and facts[p.server_ip].login_flag == "Y" for p in phones
    )


def _grouping_forces(
    server: ServerFacts, grouping: Grouping, campaign_agents: Mapping[str, int]
) -> str | None:
    """The note when the campaign's grouping takes this (eligible) login at once, else None."""
    n = campaign_agents.get(server.server_ip, 0)
    cid = grouping.campaign_id
    if grouping.mode is GroupingMode.ONE_SERVER_ONLY and n > 0:
        return f"ONE_SERVER_ONLY: the first eligible server with campaign {cid}'s agents ({n})"
    if (
        grouping.mode is GroupingMode.CASCADING
        and 0 < n < grouping.campaign_limit
        and server.agents < grouping.system_limit
    ):
        return (
            f"CASCADING: campaign {cid} has {n}/{grouping.campaign_limit} agents here, "
            f"the server {server.agents}/{grouping.system_limit}"
        )
    return None


def _ungrouped_note(grouping: Grouping) -> str:
    cid = grouping.campaign_id
    if grouping.mode is GroupingMode.ONE_SERVER_ONLY:
        return f"ONE_SERVER_ONLY: no eligible server has campaign {cid}'s agents; "
    if grouping.mode is GroupingMode.CASCADING:
        return (
            f"CASCADING: no eligible server has campaign {cid}'s agents below "
            f"{grouping.campaign_limit} with fewer than {grouping.system_limit} agents; "
        )
    return ""


def _choose_vicidial(
    phones: Sequence[PhoneCandidate],
    facts: Mapping[str, ServerFacts],
    grouping: Grouping,
    campaign_agents: Mapping[str, int],
    balanced: bool,
) -> Assignment:
    walk = _first_row_per_login(phones)
    if not balanced:
        return _single_login(walk, facts, grouping)
    views: list[CandidateView] = []
    # The screen starts with vicidial_conferences and switches to vicidial_confbridges when it
    # meets a CONFBRIDGE server, never back: later MEETME servers of the same walk are looked
    # up in vicidial_confbridges too. Kept, so that the choice is the screen's.
    conf_table = MEETME_TABLE
    best: CandidateView | None = None
    tied: list[CandidateView] = []
    forced: tuple[CandidateView, str] | None = None
    for phone in walk:
        server = facts.get(phone.server_ip)
        if server is None:
            views.append(CandidateView(phone, None, None, ("not in the servers table",)))
            continue
        if server.conf_engine == CONFBRIDGE:
            conf_table = CONFBRIDGE_TABLE
        view = CandidateView(
            phone,
            server,
            load_of(server),
            tuple(screen_problems(server, server.login_flag, conf_table)),
        )
        views.append(view)
        if not view.eligible or forced is not None:
            continue  # after a forced login the screen stops walking; shown, not weighed
        note = _grouping_forces(server, grouping, campaign_agents)
        if note is not None:
            forced = (view, note)
        elif best is None or server.agents <= best_agents(best):
            # The screen's `$pb_count >= $row[0]`: an equal count replaces the earlier login.
            tie = best is not None and server.agents == best_agents(best)
            tied = [*tied, best] if tie and best is not None else []
            best = view
    all_views = tuple(views)
    skipped_text = _skipped_text(all_views)
    if not _screen_accepts(phones, facts):
        return Assignment(
            None,
            "the agent screen refuses this login: no phone of the list is active on a server "
            "with active_agent_login_server='Y'",
            all_views,
            grouping,
            VICIDIAL_MODE,
        )
    if forced is not None:
        chosen, why, grouped = forced[0], forced[1], True
    elif best is not None:
        chosen, grouped = best, False
        eligible = sum(1 for v in views if v.eligible)
        why = (
            f"{_ungrouped_note(grouping)}fewest agents: {best_agents(best)} non-remote agents "
            f"logged in, among {eligible} eligible login{'s' if eligible != 1 else ''}"
        )
        if tied:
            others = ", ".join(v.phone.login for v in tied)
            why += f" (tied with {others}: the later login wins, as in the agent screen)"
    else:
        detail = skipped_text.replace("skipped ", "") if skipped_text else "no phones"
        return Assignment(None, f"no eligible login: {detail}", all_views, grouping, VICIDIAL_MODE)
    reason = f"{why}; {skipped_text}" if skipped_text else why
    if not chosen.phone.active:
        reason = (
            f"the agent screen would take {chosen.phone.login} on {chosen.phone.server_ip} "
            f"({why}), but that phone is inactive (phones.active='N'): its login fails"
        )
        return Assignment(None, reason, all_views, grouping, VICIDIAL_MODE, grouped)
    return Assignment(chosen, reason, all_views, grouping, VICIDIAL_MODE, grouped)


def best_agents(view: CandidateView) -> int:
    """The non-remote agents logged in on a candidate's server (the screen's count)."""
    return 0 if view.facts is None else view.facts.agents


def _single_login(
    walk: list[PhoneCandidate], facts: Mapping[str, ServerFacts], grouping: Grouping
) -> Assignment:
    # One login, no comma: the screen does not balance; it only checks the phone is active on
    # a server open for agent logins.
    phone = walk[0] if walk else None
    if phone is None:
        return Assignment(None, "no phones", (), grouping, VICIDIAL_MODE)
    server = facts.get(phone.server_ip)
    found: list[str] = []
    if not phone.active:
        found.append(f"phone {phone.login} inactive (phones.active='N')")
    if server is None:
        found.append("not in the servers table")
    elif server.login_flag != "Y":
        found.append(f"agent logins off (active_agent_login_server={server.login_flag!r})")
    view = CandidateView(phone, server, None if server is None else load_of(server), tuple(found))
    if found:
        reason = f"the agent screen refuses this single login: {'; '.join(found)}"
        return Assignment(None, reason, (view,), grouping, VICIDIAL_MODE)
    reason = "a single login: the agent screen uses it as it is (it balances only a list)"
    return Assignment(view, reason, (view,), grouping, VICIDIAL_MODE)
