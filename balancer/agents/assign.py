"""Assigning an agent's phone and draining a server: the database and the shared store around
the pure choice (`balancer/agents/choice.py`); each decision goes to vb_decision_log."""

from __future__ import annotations

import asyncio
from typing import Any

from balancer.agents.choice import (
    VICIDIAL_MODE,
    Assignment,
    CandidateView,
    PhoneCandidate,
    choose_phone,
)
from balancer.agents.facts import build_facts
from balancer.config import Config
from balancer.db import agents as db_agents
from balancer.db.connection import connect
from balancer.db.url import DatabaseUrl
from balancer.errors import BalancerError
from balancer.store.base import ServerState
from balancer.store.factory import open_store

ASSIGN_VERSION = 2


# --------------------------------------------------------------------------- assign-phone


def _candidate_entry(view: CandidateView) -> dict[str, Any]:
    facts, load = view.facts, view.load
    return {
        "login": view.phone.login,
        "extension": view.phone.extension,
        "server_ip": view.phone.server_ip,
        "server_id": facts.server_id if facts else "",
        "eligible": view.eligible,
        "problems": list(view.problems),
        "health": None if facts is None or facts.health is None else str(facts.health),
        "drained": bool(facts and facts.drained),
        "score": None if load is None else round(load.score, 4),
        "agents": None if load is None else load.agents,
        "capacity": None if load is None else load.capacity,
        "trunk_lines": None if load is None else load.trunks,
        "max_trunks": None if load is None else load.max_trunks,
        "free_conferences": None if facts is None else facts.free_in(facts.conference_table),
        "conference_table": None if facts is None else facts.conference_table,
        "phone_active": view.phone.active,
    }


def assignment_document(
    assignment: Assignment,
    resolved: db_agents.ResolvedPhones,
    campaign_id: str | None,
    campaign_agents: dict[str, int],
) -> dict[str, Any]:
    """The stable JSON form of an assignment (`--json`); the text line is rendered from it."""
    chosen = None if assignment.chosen is None else _candidate_entry(assignment.chosen)
    candidates = []
    for view in assignment.candidates:
        entry = _candidate_entry(view)
        entry["campaign_agents"] = campaign_agents.get(view.phone.server_ip, 0)
        candidates.append(entry)
    return {
        "version": ASSIGN_VERSION,
        "query": resolved.query,
        "alias_id": resolved.alias_id,
        "logins": list(resolved.logins),
        "missing_logins": list(resolved.missing),
        "campaign_id": campaign_id,
        "mode": assignment.mode,
        "grouping": {
            "mode": str(assignment.grouping.mode),
            "campaign_limit": assignment.grouping.campaign_limit,
            "system_limit": assignment.grouping.system_limit,
            "applied": assignment.grouped,
        },
        "chosen": chosen,
        "reason": assignment.reason,
        "candidates": candidates,
    }


def render_assignment(doc: dict[str, Any]) -> str:
    """One line: 'phone 1012 on 10.10.0.2 (ast2): score 0.35 (agents 7/20, ...) — ...'."""
    chosen = doc["chosen"]
    if chosen is None:
        line = f"no phone for {doc['query']}: {doc['reason']}"
    else:
        name = f" ({chosen['server_id']})" if chosen["server_id"] else ""
        line = f"phone {chosen['login']} on {chosen['server_ip']}{name}: {doc['reason']}"
    if doc["missing_logins"]:
        line += f"; not in phones: {', '.join(doc['missing_logins'])}"
    return line


async def _live_state(config: Config) -> tuple[list[ServerState], set[str]]:
    store = open_store(config.redis)
    try:
        return await store.servers(), await store.drained()
    finally:
        await store.close()


def assign_phone(
    config: Config,
    url: DatabaseUrl,
    timeout_s: float,
    alias_or_logins: str,
    campaign_id: str | None = None,
) -> dict[str, Any]:
    """Choose the phone login for an alias or login list by ``agents.mode``, log the decision;
    the JSON document.

    Raises BalancerError for an unknown alias/logins or campaign.
    """
    conn = connect(url, timeout_s)
    try:
        resolved = db_agents.resolve_phones(conn, alias_or_logins)
        if campaign_id is not None and not db_agents.campaign_exists(conn, campaign_id):
            raise BalancerError(f"campaign {campaign_id!r}: not in vicidial_campaigns")
        tables = db_agents.read_agent_tables(conn, campaign_id)
        # The agent screen's own rule knows nothing of the live state.
        vicidial = config.agents.mode == VICIDIAL_MODE
        states, drained = ([], set()) if vicidial else asyncio.run(_live_state(config))
        facts = build_facts(tables, states, drained, config.agents)
        health = config.health
        assignment = choose_phone(
            [
                PhoneCandidate(p.login, p.extension, p.server_ip, i, p.active)
                for i, p in enumerate(resolved.phones)
            ],
            facts,
            updater_max_age_s=health.server_updater_max_age_s
            if health.check_server_updater
            else None,
            grouping=tables.grouping,
            campaign_agents=tables.campaign_agents,
            mode=config.agents.mode,
            balanced=resolved.balanced,
        )
        doc = assignment_document(assignment, resolved, campaign_id, tables.campaign_agents)
        chosen = assignment.chosen
        db_agents.log_decision(
            conn,
            db_agents.KIND_ASSIGN_PHONE,
            server_ip="" if chosen is None else chosen.phone.server_ip,
            campaign_id=campaign_id or "",
            outcome="no_server" if chosen is None else "assigned",
            reason=assignment.reason,
            details=doc,
        )
        return doc
    finally:
        conn.close()


# --------------------------------------------------------------------------- drain / undrain


async def _set_drained(config: Config, server_ip: str, drained: bool) -> bool:
    """Set the flag in the shared store; returns whether it was set before."""
    store = open_store(config.redis)
    try:
        before = server_ip in await store.drained()
        await store.set_drained(server_ip, drained)
        return before
    finally:
        await store.close()


def set_drain(
    config: Config,
    url: DatabaseUrl,
    timeout_s: float,
    server: str,
    drained: bool,
    reason: str = "",
) -> str:
    """Drain or undrain a server (server_ip or server_id) in the store, log it; the message."""
    conn = connect(url, timeout_s)
    try:
        record = db_agents.find_server(conn, server)
        if record is None:
            raise BalancerError(
                f"server {server!r}: no servers row with that server_ip or server_id"
            )
        was = asyncio.run(_set_drained(config, record.server_ip, drained))
        word = "drained" if drained else "undrained"
        db_agents.log_decision(
            conn,
            db_agents.KIND_DRAIN,
            server_ip=record.server_ip,
            outcome=word,
            reason=reason or f"operator: vici-balancer {'drain' if drained else 'undrain'}",
            details={"server_id": record.server_id, "was_drained": was},
        )
    finally:
        conn.close()
    name = f"{record.server_ip} ({record.server_id})" if record.server_id else record.server_ip
    if drained:
        already = " (it already was)" if was else ""
        return (
            f"drained {name}{already}: no new balance calls or agent logins; "
            "calls in progress are untouched"
        )
    already = " (it was not drained)" if not was else ""
    return f"undrained {name}{already}: it takes balance calls and agent logins again"
