"""`vici-balancer status`: the live view of every server, from the state store alone.

The document built here is the stable JSON form (`--json`); the table is rendered from it, so the
two never disagree.
"""

from __future__ import annotations

import json
import time
from typing import Any

from balancer.store.base import ChannelClass, Health, ServerState, StateStore
from balancer.store.keys import (
    BALANCE_SUMMARY,
    LOGIN_FLAGS_DOCUMENT,
    ROUTES_DOCUMENT,
    SERVERS_DOCUMENT,
    kamailio_document,
)

STATUS_VERSION = 2  # 2: a DOWN or stale server's line counts are null (last_seen_lines)


def server_entry(state: ServerState, now: float) -> dict[str, Any]:
    """One server's row of the status document."""
    meta = state.meta
    if state.drained:
        shown = "drained"
    elif not state.fresh:
        shown = "stale"
    else:
        shown = str(meta.health)
    counts = {
        "trunk_lines": state.count(ChannelClass.TRUNK),
        "agent_phones": state.count(ChannelClass.AGENT),
        "local": state.count(ChannelClass.LOCAL),
        "other": state.count(ChannelClass.OTHER),
        "total": state.total,
    }
    # A DOWN (or stale) server's live lines are unknown: its last counts are only what was
    # true when it was last heard from, so they are shown apart and count 0 in the totals.
    known = state.fresh and meta.health is not Health.DOWN
    return {
        "server_id": meta.server_id,
        "server_ip": state.server_ip,
        "health": shown,
        "tracked_health": str(meta.health),
        "health_reason": meta.health_reason,
        "drained": state.drained,
        "fresh": state.fresh,
        "address": meta.address,
        "max_trunks": meta.max_trunks,
        "lines_known": known,
        **(counts if known else dict.fromkeys(counts)),
        "last_seen_lines": None if known else counts,
        "carriers": dict(sorted((k, v) for k, v in state.carriers.items() if v)),
        "last_event_age_s": None
        if meta.last_event_at is None
        else round(max(0.0, now - meta.last_event_at), 1),
        "rtt_ms": meta.rtt_ms,
        "reconnects": meta.reconnects,
        "connected_since": meta.connected_since,
    }


async def build_status(store: StateStore, source: str, now: float | None = None) -> dict[str, Any]:
    """The whole status document: servers, totals, daemons, and whether it is stale."""
    now = time.time() if now is None else now
    states = await store.servers()
    daemons = await store.daemons()
    tracked = [server_entry(s, now) for s in states]
    servers = tracked + await untracked_entries(store, {s["server_ip"] for s in tracked})
    servers.sort(key=lambda s: str(s["server_ip"]))
    keys = ("trunk_lines", "max_trunks", "agent_phones", "local", "other", "total")
    totals: dict[str, Any] = {k: sum(s[k] or 0 for s in servers) for k in keys}
    totals["servers"] = len(servers)
    totals["up"] = sum(1 for s in servers if s["health"] == "up")
    problems: list[str] = []
    if not daemons:
        problems.append("no daemon is tracking (no fresh daemon heartbeat in the store)")
    if not servers:
        problems.append("the store knows no servers")
    stale = [s["server_ip"] for s in tracked if not s["fresh"]]
    if stale:
        problems.append(f"stale state for {', '.join(stale)}")
    balance_text = await store.get_document(BALANCE_SUMMARY)
    balance = json.loads(balance_text) if balance_text else None
    kamailio = await kamailio_endpoints(store, daemons)
    warnings = [
        f"kamailio {k['name']} ({k['url']}): unreachable: {k['last_error']}"
        for k in kamailio
        if k["publishing"] and k["reachable"] is False
    ]
    return {
        "version": STATUS_VERSION,
        "balance": balance,
        "generated_at": round(now, 3),
        "source": source,
        "daemons": daemons,
        "stale": bool(problems),
        "problems": problems,
        "servers": servers,
        "totals": totals,
        "kamailio": kamailio,
        "carriers": await carrier_states(store),
        "login_flags": await login_flags_view(store),
        "warnings": warnings,
    }


async def untracked_entries(store: StateStore, tracked: set[str]) -> list[dict[str, Any]]:
    """The servers rows the daemons do not track (inactive, not Asterisk, invalid), and drained
    servers the tracker never published: listed so that no server is invisible."""
    text = await store.get_document(SERVERS_DOCUMENT)
    rows: list[dict[str, Any]] = json.loads(text) if text else []
    drained = await store.drained()
    entries: list[dict[str, Any]] = []
    for row in rows:
        ip = str(row["server_ip"])
        if ip in tracked:
            continue
        entries.append(_untracked(ip, str(row.get("server_id") or ""), ip in drained, row))
    listed = tracked | {str(row["server_ip"]) for row in rows}
    entries.extend(_untracked(ip, "", True, None) for ip in sorted(drained - listed))
    return entries


def _untracked(
    ip: str, server_id: str, drained: bool, row: dict[str, Any] | None
) -> dict[str, Any]:
    why = (row or {}).get("why_untracked") or "not in the tracker (no AMI session)"
    return {
        "server_id": server_id,
        "server_ip": ip,
        "health": "drained" if drained else "untracked",
        "tracked_health": "untracked",
        "health_reason": why,
        "drained": drained,
        "fresh": False,
        "address": "",
        "max_trunks": 0,
        "lines_known": False,
        **dict.fromkeys(("trunk_lines", "agent_phones", "local", "other", "total")),
        "last_seen_lines": None,
        "carriers": {},
        "last_event_age_s": None,
        "rtt_ms": None,
        "reconnects": 0,
        "connected_since": None,
    }


async def carrier_states(store: StateStore) -> list[dict[str, Any]]:
    """Each carrier's breaker, carrier-wide and per server, as the leader last published it."""
    text = await store.get_document(ROUTES_DOCUMENT)
    if not text:
        return []
    out: list[dict[str, Any]] = []
    for carrier in json.loads(text).get("carriers", []):
        out.append(
            {
                "carrier": carrier["id"],
                "server_ip": None,
                "state": carrier["state"],
                "reason": carrier.get("reason", ""),
            }
        )
        for server in carrier.get("servers", []):
            state = server["state"] if server.get("available", True) else "unavailable"
            out.append(
                {
                    "carrier": carrier["id"],
                    "server_ip": server["server_ip"],
                    "state": state,
                    "reason": server.get("reason", ""),
                }
            )
    return out


async def kamailio_endpoints(store: StateStore, daemons: list[str]) -> list[dict[str, Any]]:
    """Each Kamailio RPC endpoint as its publishing daemon last reported it ([kamailio])."""
    out: list[dict[str, Any]] = []
    for daemon in daemons:
        text = await store.get_document(kamailio_document(daemon))
        if not text:
            continue
        doc = json.loads(text)
        for endpoint in doc.get("endpoints", []):
            out.append(
                {
                    "daemon": daemon,
                    "publishing": bool(doc.get("publishing")),
                    "name": endpoint.get("name"),
                    "url": endpoint.get("url"),
                    "reachable": endpoint.get("reachable"),
                    "last_publish_at": endpoint.get("last_publish_at"),
                    "last_ok_at": endpoint.get("last_ok_at"),
                    "last_error": endpoint.get("last_error"),
                }
            )
    return out


def _age(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _known(value: int | None) -> str:
    return "?" if value is None else str(value)


def _rtt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def render_table(doc: dict[str, Any]) -> str:
    """The status document as a fixed-width table with a totals line."""
    header = (
        "SERVER",
        "SERVER_IP",
        "HEALTH",
        "AMI ADDRESS",
        "TRUNKS",
        "AGENTS",
        "LOCAL",
        "TOTAL",
        "CARRIERS",
        "LAST EVENT",
        "RTT",
    )
    rows: list[tuple[str, ...]] = [header]
    for s in doc["servers"]:
        carriers = " ".join(f"{k}={v}" for k, v in s["carriers"].items()) or "-"
        rows.append(
            (
                s["server_id"] or "-",
                s["server_ip"],
                s["health"].upper(),
                s["address"] or "-",
                f"{_known(s['trunk_lines'])}/{s['max_trunks']}",
                _known(s["agent_phones"]),
                _known(s["local"]),
                _known(s["total"]),
                carriers if s["lines_known"] else "-",
                _age(s["last_event_age_s"]),
                _rtt(s["rtt_ms"]),
            )
        )
    t = doc["totals"]
    rows.append(
        (
            "TOTAL",
            f"{t['up']}/{t['servers']} up",
            "",
            "",
            f"{t['trunk_lines']}/{t['max_trunks']}",
            str(t["agent_phones"]),
            str(t["local"]),
            str(t["total"]),
            "",
            "",
            "",
        )
    )
    lines = columns(rows)
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines.extend(_render_balance(doc.get("balance")))
    lines.extend(_render_carriers(doc.get("carriers") or []))
    lines.extend(_render_kamailio(doc.get("kamailio") or [], doc["generated_at"]))
    lines.extend(_render_login_flags(doc.get("login_flags"), doc["generated_at"]))
    for problem in [*doc["problems"], *doc.get("warnings", [])]:
        lines.append(f"WARNING: {problem}")
    return "\n".join(lines)


def _render_carriers(carriers: list[dict[str, Any]]) -> list[str]:
    """One line per carrier: its carrier-wide breaker, then each server's (as the leader sees)."""
    if not carriers:
        return []
    by_carrier: dict[str, list[dict[str, Any]]] = {}
    for row in carriers:
        by_carrier.setdefault(str(row["carrier"]), []).append(row)
    rows: list[tuple[str, ...]] = [("CARRIER", "BREAKERS (carrier-wide, then per server)")]
    for carrier, states in by_carrier.items():
        parts = []
        for row in states:
            where = row["server_ip"] or "all"
            reason = f" ({row['reason']})" if row["reason"] and row["state"] != "closed" else ""
            parts.append(f"{where} {str(row['state']).upper()}{reason}")
        rows.append((carrier, "; ".join(parts)))
    return ["", *columns(rows)]


def _render_kamailio(endpoints: list[dict[str, Any]], now: float) -> list[str]:
    """The Kamailio RPC endpoints the daemons publish to (nothing without [kamailio])."""
    if not endpoints:
        return []
    rows: list[tuple[str, ...]] = [("KAMAILIO", "RPC ENDPOINT", "STATE", "LAST CHANGE", "DAEMON")]
    for k in endpoints:
        if not k["publishing"]:
            state = "standby"
        elif k["reachable"] is None:
            state = "not tried yet"
        else:
            state = "ok" if k["reachable"] else "UNREACHABLE"
        at = k["last_publish_at"]
        rows.append(
            (
                str(k["name"]),
                str(k["url"]),
                state,
                "-" if not at else f"{max(0.0, now - at):.1f}s ago",
                str(k["daemon"]),
            )
        )
    return ["", *columns(rows)]


def _render_balance(balance: dict[str, Any] | None) -> list[str]:
    """The balance section: per server and per campaign, from the last cycle's summary."""
    if not balance:
        return ["", "BALANCE: no recent cycle (no daemon leading, or balancing disabled)"]
    state = balance.get("stopped") or balance.get("skipped") or "active"
    leader = balance.get("leader") or {}
    by = f", leader {leader['name']} epoch {leader.get('epoch')}" if leader.get("name") else ""
    lines = ["", f"BALANCE ({balance['mode']}, cycle {balance['cycle_id']}{by}): {state}"]
    rows: list[tuple[str, ...]] = [("SERVER_IP", "BALANCE", "RANK", "ALLOWED", "OUTBALANCE")]
    for s in balance["servers"]:
        rows.append(
            (
                s["server_ip"],
                "Y" if s["balance_active"] else "N",
                str(s["rank"]),
                str(s["allowed_for_balance"]),
                str(s["outbalance_calls"]),
            )
        )
    lines.extend(columns(rows))
    if balance["campaigns"]:
        rows = [("CAMPAIGN", "SHORTAGE", "FILLING", "PLACED/MIN")]
        for c in balance["campaigns"]:
            rows.append(
                (
                    c["campaign_id"],
                    str(c["shortage"]),
                    str(c["filling"]),
                    str(c["placed_last_minute"]),
                )
            )
        lines.append("")
        lines.extend(columns(rows))
    return lines


# --------------------------------------------------------------------------- login flags


async def login_flags_view(store: StateStore) -> dict[str, Any] | None:
    """The login-flag keeper's last published view (balancer/agents/login_flags.py): the
    active_agent_login_server flags the balancer holds closed, and why; None when none is."""
    text = await store.get_document(LOGIN_FLAGS_DOCUMENT)
    view: dict[str, Any] | None = json.loads(text) if text else None
    return view


def _render_login_flags(flags: dict[str, Any] | None, now: float) -> list[str]:
    """Which login flags the balancer holds closed and why; the 'N's it leaves alone."""
    if not flags:
        return ["", "LOGIN FLAGS: not published (agents.manage_login_flags off, or no daemon)"]
    held = flags.get("held") or []
    age = f"{max(0.0, now - float(flags.get('published_at') or now)):.1f}s ago"
    if not held:
        lines = ["", f"LOGIN FLAGS: the balancer holds none closed (checked {age})"]
    else:
        lines = [
            "",
            f"LOGIN FLAGS: the balancer holds {len(held)} closed"
            f" (active_agent_login_server='N', checked {age})",
        ]
        rows: list[tuple[str, ...]] = [("SERVER_IP", "SERVER", "SINCE", "CLOSED BECAUSE", "NOW")]
        for h in held:
            rows.append(
                (
                    str(h["server_ip"]),
                    str(h["server_id"] or "-"),
                    str(h["since"] or "-"),
                    str(h["closed_because"]),
                    str(h["now"]),
                )
            )
        lines.extend(columns(rows))
    others = flags.get("not_ours") or []
    if others:
        names = ", ".join(
            f"{o['server_ip']} ({o['server_id']})" if o["server_id"] else str(o["server_ip"])
            for o in others
        )
        lines.append(f"closed by someone else, never re-opened by the balancer: {names}")
    return lines


def columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
