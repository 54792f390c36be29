"""SQL for agent phones and login flags: phones/aliases, live agents, conferences, flags, decisions.

Reads take a connection and return the plain records of `balancer.agents.facts`. Every flag
write is one transaction that re-checks, under a row lock, the condition the decision was made
on: so two keepers (or a keeper and an admin) racing on one server can never close an admin's 'N' or
re-open a flag the balancer does not hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from balancer.agents.facts import (
    CONFBRIDGE_TABLE,
    MEETME_TABLE,
    AgentTables,
    Grouping,
    GroupingMode,
    LoginFlagRecord,
    ServerRecord,
)
from balancer.agents.flag_rules import FlagAction, FlagChange
from balancer.db.connection import Connection
from balancer.db.queries import load_updater_ages
from balancer.db.rows import dict_rows, text
from balancer.errors import BalancerError

T = TypeVar("T")

KIND_ASSIGN_PHONE = "assign_phone"
KIND_LOGIN_FLAG = "login_flag"
KIND_DRAIN = "drain"


def _flag(value: object) -> str | None:
    return None if value is None else str(value)


def _int(value: object, default: int) -> int:
    try:
        return int(str(value))
    except ValueError:
        return default


# --------------------------------------------------------------------------- phones


@dataclass(frozen=True)
class PhoneRow:
    """A `phones` row found for a login."""

    login: str
    extension: str
    server_ip: str
    active: bool
    protocol: str


@dataclass(frozen=True)
class ResolvedPhones:
    """The phone logins asked for (from an alias or a comma list), their rows and the missing."""

    query: str
    alias_id: str | None  # set when the argument was a phones_alias id
    logins: tuple[str, ...]
    phones: tuple[PhoneRow, ...]  # in the list's order, then by server_ip
    missing: tuple[str, ...]  # logins with no phones row
    # VICIdial's agent screen balances only a list: text with a comma, longer than 2 characters.
    balanced: bool = True


def _split_logins(text: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for part in text.split(","):
        login = part.strip()
        if login:
            seen.setdefault(login, None)
    return tuple(seen)


def resolve_phones(conn: Connection, alias_or_logins: str) -> ResolvedPhones:
    """Phone rows for a phones_alias id, or for a comma-separated list of phone logins.

    A single word is an alias when phones_alias has it, else one login. Raises BalancerError
    naming the argument when it yields no phone at all.
    """
    query = alias_or_logins.strip()
    alias_id: str | None = None
    listed = query
    if "," not in query:
        rows = dict_rows(
            conn, "SELECT alias_id, logins_list FROM phones_alias WHERE alias_id = %s", query
        )
        if rows:
            alias_id = str(rows[0]["alias_id"])
            listed = text(rows[0]["logins_list"])
            logins = _split_logins(listed)
            if not logins:
                raise BalancerError(f"phone alias {alias_id!r}: its logins_list is empty")
        else:
            logins = _split_logins(query)
    else:
        logins = _split_logins(query)
    if not logins:
        raise BalancerError(f"phone alias or logins {query!r}: no phone login given")
    # pymysql renders a tuple parameter as a parenthesised, escaped list.
    found = dict_rows(
        conn,
        "SELECT login, extension, server_ip, active, protocol FROM phones WHERE login IN %s",
        logins,
    )
    order = {login: i for i, login in enumerate(logins)}
    phones = sorted(
        (
            PhoneRow(
                login=text(r["login"]),
                extension=text(r["extension"]),
                server_ip=text(r["server_ip"]),
                active=r["active"] == "Y",
                protocol=text(r["protocol"]),
            )
            for r in found
        ),
        key=lambda p: (order.get(p.login, len(order)), p.server_ip, p.extension),
    )
    present = {p.login for p in phones}
    missing = tuple(login for login in logins if login not in present)
    if not phones:
        if alias_id is not None:
            message = (
                f"phone alias {alias_id!r}: none of its logins ({', '.join(logins)}) is in phones"
            )
        elif len(logins) == 1:
            message = f"{query!r} is neither a phones_alias id nor a login in phones"
        else:
            message = f"phone logins {query!r}: none of them is in phones"
        raise BalancerError(message)
    balanced = "," in listed and len(listed) > 2
    return ResolvedPhones(query, alias_id, logins, tuple(phones), missing, balanced)


# --------------------------------------------------------------------------- servers and load


# Columns of `servers` that VICIdial added over the years (active_twin_server_ip, later
# conf_engine with ConfBridge): read when the database has them, else their defaults.
_OPTIONAL_SERVER_COLUMNS = {"conf_engine": "MEETME", "active_twin_server_ip": ""}
_SERVERS_SELECT = {
    frozenset(): "SELECT server_id, server_ip, active, active_agent_login_server,"
    " max_vicidial_trunks FROM servers ORDER BY server_ip",
    frozenset({"conf_engine"}): "SELECT server_id, server_ip, active, active_agent_login_server,"
    " max_vicidial_trunks, conf_engine FROM servers ORDER BY server_ip",
    frozenset({"active_twin_server_ip"}): "SELECT server_id, server_ip, active,"
    " active_agent_login_server, max_vicidial_trunks, active_twin_server_ip FROM servers"
    " ORDER BY server_ip",
    frozenset(_OPTIONAL_SERVER_COLUMNS): "SELECT server_id, server_ip, active,"
    " active_agent_login_server, max_vicidial_trunks, conf_engine, active_twin_server_ip"
    " FROM servers ORDER BY server_ip",
}


def _present(conn: Connection, table: str, columns: tuple[str, ...]) -> set[str]:
    """Which of ``columns`` ``table`` has (an empty set when the table is missing)."""
    rows = dict_rows(
        conn,
        "SELECT column_name AS c FROM information_schema.columns"
        " WHERE table_schema = DATABASE() AND table_name = %s",
        table,
    )
    have = {text(r["c"]).lower() for r in rows}
    return {c for c in columns if c.lower() in have}


def load_server_records(
    conn: Connection, *, login_columns: bool = False
) -> dict[str, ServerRecord]:
    """Every `servers` row's agent-related columns, by server_ip.

    ``login_columns``: also conf_engine and active_twin_server_ip (what the agent screen checks),
    where the database has them.
    """
    optional: set[str] = set()
    if login_columns:
        optional = _present(conn, "servers", tuple(_OPTIONAL_SERVER_COLUMNS))
    rows = dict_rows(conn, _SERVERS_SELECT[frozenset(optional)])
    records: dict[str, ServerRecord] = {}
    for r in rows:
        values = {c: text(r[c]) if c in r else d for c, d in _OPTIONAL_SERVER_COLUMNS.items()}
        records[text(r["server_ip"])] = ServerRecord(
            server_ip=text(r["server_ip"]),
            server_id=text(r["server_id"]),
            active=_flag(r["active"]),
            login_flag=_flag(r["active_agent_login_server"]),
            max_trunks=max(0, _int(r["max_vicidial_trunks"], 0)),
            conf_engine=values["conf_engine"] or "MEETME",
            twin_server_ip=values["active_twin_server_ip"].strip(),
        )
    return records


def find_server(conn: Connection, server: str) -> ServerRecord | None:
    """The `servers` row whose server_ip or server_id is ``server``; server_ip wins a tie."""
    records = load_server_records(conn)
    if server in records:
        return records[server]
    for record in records.values():
        if record.server_id == server:
            return record
    return None


def load_agent_counts(conn: Connection, campaign_id: str | None = None) -> dict[str, int]:
    """server_ip -> non-remote agents logged in (of one campaign when ``campaign_id``)."""
    # VICIdial's own test (vicidial.php): a remote agent's extension starts with 'R' ('R/...');
    # a NULL extension is not counted either, as in its query.
    if campaign_id is None:
        rows = dict_rows(
            conn,
            "SELECT server_ip, COUNT(*) AS n FROM vicidial_live_agents"
            " WHERE extension NOT LIKE 'R%%' GROUP BY server_ip",
        )
    else:
        rows = dict_rows(
            conn,
            "SELECT server_ip, COUNT(*) AS n FROM vicidial_live_agents"
            " WHERE campaign_id = %s AND extension NOT LIKE 'R%%' GROUP BY server_ip",
            campaign_id,
        )
    return {text(r["server_ip"]): int(r["n"]) for r in rows}


_FREE_CONFERENCES = {
    MEETME_TABLE: "SELECT server_ip, COUNT(*) AS n FROM vicidial_conferences"
    " WHERE extension IS NULL OR extension = '' GROUP BY server_ip",
    CONFBRIDGE_TABLE: "SELECT server_ip, COUNT(*) AS n FROM vicidial_confbridges"
    " WHERE extension IS NULL OR extension = '' GROUP BY server_ip",
}


def load_free_conferences(conn: Connection, table: str = MEETME_TABLE) -> dict[str, int]:
    """server_ip -> agent conferences with an empty extension (free), in one of VICIdial's two
    conference tables; empty when the database has no such table (before ConfBridge)."""
    if table == CONFBRIDGE_TABLE and not _present(conn, table, ("server_ip",)):
        return {}
    rows = dict_rows(conn, _FREE_CONFERENCES[table])
    return {text(r["server_ip"]): int(r["n"]) for r in rows}


def load_login_flags(conn: Connection) -> dict[str, LoginFlagRecord]:
    """The vb_login_flags rows: flags the balancer changed and still holds."""
    rows = dict_rows(
        conn, "SELECT server_ip, set_to, previous, reason, changed_at FROM vb_login_flags"
    )
    return {
        text(r["server_ip"]): LoginFlagRecord(
            text(r["server_ip"]),
            text(r["set_to"]),
            _flag(r["previous"]),
            text(r["reason"]),
            text(r["changed_at"]),
        )
        for r in rows
    }


def load_grouping(conn: Connection, campaign_id: str) -> Grouping:
    """The campaign's login grouping from VICIdial's own columns (vicidial_campaigns.pllb_grouping
    and pllb_grouping_limit, system_settings.pllb_grouping_limit); DISABLED without a row."""
    rows = dict_rows(
        conn,
        "SELECT pllb_grouping, pllb_grouping_limit FROM vicidial_campaigns WHERE campaign_id = %s",
        campaign_id,
    )
    system = dict_rows(conn, "SELECT pllb_grouping_limit FROM system_settings LIMIT 1")
    # No system_settings row: VICIdial's column default.
    system_limit = _int(system[0]["pllb_grouping_limit"], 0) if system else Grouping().system_limit
    if not rows:
        return Grouping(campaign_id, system_limit=system_limit)
    try:
        mode = GroupingMode(text(rows[0]["pllb_grouping"]) or "DISABLED")
    except ValueError:
        mode = GroupingMode.DISABLED
    # A NULL limit compares as nothing in the screen: no server is below it.
    return Grouping(campaign_id, mode, _int(rows[0]["pllb_grouping_limit"], 0), system_limit)


def campaign_exists(conn: Connection, campaign_id: str) -> bool:
    """Whether vicidial_campaigns has this campaign."""
    return bool(
        dict_rows(conn, "SELECT 1 FROM vicidial_campaigns WHERE campaign_id = %s", campaign_id)
    )


def read_flag_tables(conn: Connection) -> AgentTables:
    """What the login-flag keeper needs from MySQL (four small queries)."""
    return AgentTables(
        servers=load_server_records(conn),
        agents=load_agent_counts(conn),
        updater_ages=load_updater_ages(conn),
        flag_records=load_login_flags(conn),
    )


def read_agent_tables(conn: Connection, campaign_id: str | None = None) -> AgentTables:
    """Everything choosing a phone needs from MySQL (nine small queries; twelve with a campaign)."""
    return AgentTables(
        servers=load_server_records(conn, login_columns=True),
        agents=load_agent_counts(conn),
        updater_ages=load_updater_ages(conn),
        flag_records=load_login_flags(conn),
        free_conferences=load_free_conferences(conn, MEETME_TABLE),
        free_confbridges=load_free_conferences(conn, CONFBRIDGE_TABLE),
        campaign_agents={} if campaign_id is None else load_agent_counts(conn, campaign_id),
        grouping=Grouping() if campaign_id is None else load_grouping(conn, campaign_id),
    )


# --------------------------------------------------------------------------- decision log


def log_decision(
    conn: Connection,
    kind: str,
    *,
    server_ip: str = "",
    campaign_id: str = "",
    outcome: str = "",
    reason: str = "",
    details: Mapping[str, Any] | None = None,
    cycle_id: str = "",
) -> None:
    """One vb_decision_log row (in the caller's transaction, if one is open)."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO vb_decision_log (cycle_id, kind, campaign_id, server_ip, outcome,"
            " reason, details) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                cycle_id[:40],
                kind[:20],
                campaign_id[:20],
                server_ip[:15],
                outcome[:20],
                reason[:255],
                None if details is None else json.dumps(details, sort_keys=True, default=str),
            ),
        )


# --------------------------------------------------------------------------- login flags


def _transaction(conn: Connection, work: Callable[[], T]) -> T:
    conn.begin()
    try:
        result = work()
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
    return result


def _locked_flag(conn: Connection, server_ip: str) -> tuple[bool, str | None]:
    rows = dict_rows(
        conn,
        "SELECT active_agent_login_server AS flag FROM servers WHERE server_ip = %s FOR UPDATE",
        server_ip,
    )
    return (bool(rows), _flag(rows[0]["flag"]) if rows else None)


def _locked_record(conn: Connection, server_ip: str) -> LoginFlagRecord | None:
    rows = dict_rows(
        conn,
        "SELECT set_to, previous, reason FROM vb_login_flags WHERE server_ip = %s FOR UPDATE",
        server_ip,
    )
    if not rows:
        return None
    r = rows[0]
    return LoginFlagRecord(server_ip, text(r["set_to"]), _flag(r["previous"]), text(r["reason"]))


def close_login_flag(conn: Connection, server_ip: str, reason: str) -> bool:
    """Set the server's flag 'N' and remember it, if it is 'Y' now; False when it was not."""

    def work() -> bool:
        _, flag = _locked_flag(conn, server_ip)
        if flag != "Y":
            return False
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE servers SET active_agent_login_server = 'N' WHERE server_ip = %s",
                (server_ip,),
            )
            cur.execute(
                "INSERT INTO vb_login_flags (server_ip, set_to, previous, reason, changed_at)"
                " VALUES (%s, 'N', 'Y', %s, NOW())"
                " ON DUPLICATE KEY UPDATE set_to = 'N', previous = 'Y', reason = VALUES(reason),"
                " changed_at = NOW()",
                (server_ip, reason[:255]),
            )
        log_decision(
            conn,
            KIND_LOGIN_FLAG,
            server_ip=server_ip,
            outcome="closed",
            reason=reason,
            details={"set_to": "N", "previous": "Y"},
        )
        return True

    return _transaction(conn, work)


def reopen_login_flag(conn: Connection, server_ip: str, reason: str) -> bool:
    """Restore the admin's value of a flag the balancer holds at 'N'; False when it does not."""

    def work() -> bool:
        _, flag = _locked_flag(conn, server_ip)
        record = _locked_record(conn, server_ip)
        if flag != "N" or record is None or record.set_to != "N":
            return False
        restored = record.previous or "Y"
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE servers SET active_agent_login_server = %s WHERE server_ip = %s",
                (restored, server_ip),
            )
            cur.execute("DELETE FROM vb_login_flags WHERE server_ip = %s", (server_ip,))
        log_decision(
            conn,
            KIND_LOGIN_FLAG,
            server_ip=server_ip,
            outcome="reopened",
            reason=reason,
            details={"set_to": restored, "previous": "N"},
        )
        return True

    return _transaction(conn, work)


def release_login_flag(conn: Connection, server_ip: str, reason: str) -> bool:
    """Forget a vb_login_flags row whose flag is no longer the balancer's 'N' (servers kept)."""

    def work() -> bool:
        exists, flag = _locked_flag(conn, server_ip)
        record = _locked_record(conn, server_ip)
        if record is None or (exists and flag == "N" and record.set_to == "N"):
            return False
        with conn.cursor() as cur:
            cur.execute("DELETE FROM vb_login_flags WHERE server_ip = %s", (server_ip,))
        log_decision(
            conn,
            KIND_LOGIN_FLAG,
            server_ip=server_ip,
            outcome="released",
            reason=reason,
            details={"flag": flag, "record_set_to": record.set_to},
        )
        return True

    return _transaction(conn, work)


def apply_flag_change(conn: Connection, change: FlagChange) -> bool:
    """Apply one decided change in its own transaction; False when its condition no longer holds."""
    if change.action is FlagAction.CLOSE:
        return close_login_flag(conn, change.server_ip, change.reason)
    if change.action is FlagAction.REOPEN:
        return reopen_login_flag(conn, change.server_ip, change.reason)
    return release_login_flag(conn, change.server_ip, change.reason)
