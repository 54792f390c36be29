"""`vici-balancer status`: the live view of every server, from the state store alone.

The document built here is the stable JSON form (`--json`); the table is rendered from it, so the
two never disagree.
"""

from __future__ import annotations

import time
from typing import Any

from balancer.store.base import ChannelClass, ServerState, StateStore

STATUS_VERSION = 1


def server_entry(state: ServerState, now: float) -> dict[str, Any]:
    """One server's row of the status document."""
    meta = state.meta
    if state.drained:
        shown = "drained"
    elif not state.fresh:
        shown = "stale"
    else:
        shown = str(meta.health)
    return {
        "server_id": meta.server_id,
        "server_ip": state.server_ip,
        "health": shown,
        "tracked_health": str(meta.health),
        "health_reason": meta.health_reason,
        "drained": state.drained,
        "fresh": state.fresh,
        "address": meta.address,
        "trunk_lines": state.count(ChannelClass.TRUNK),
        "max_trunks": meta.max_trunks,
        "agent_phones": state.count(ChannelClass.AGENT),
        "local": state.count(ChannelClass.LOCAL),
        "other": state.count(ChannelClass.OTHER),
        "total": state.total,
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
    servers = [server_entry(s, now) for s in states]
    keys = ("trunk_lines", "max_trunks", "agent_phones", "local", "other", "total")
    totals: dict[str, Any] = {k: sum(s[k] for s in servers) for k in keys}
    totals["servers"] = len(servers)
    totals["up"] = sum(1 for s in servers if s["health"] == "up")
    problems: list[str] = []
    if not daemons:
        problems.append("no daemon is tracking (no fresh daemon heartbeat in the store)")
    if not servers:
        problems.append("the store knows no servers")
    stale = [s["server_ip"] for s in servers if not s["fresh"]]
    if stale:
        problems.append(f"stale state for {', '.join(stale)}")
    return {
        "version": STATUS_VERSION,
        "generated_at": round(now, 3),
        "source": source,
        "daemons": daemons,
        "stale": bool(problems),
        "problems": problems,
        "servers": servers,
        "totals": totals,
    }


def _age(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


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
                f"{s['trunk_lines']}/{s['max_trunks']}",
                str(s["agent_phones"]),
                str(s["local"]),
                str(s["total"]),
                carriers,
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    for problem in doc["problems"]:
        lines.append(f"WARNING: {problem}")
    return "\n".join(lines)
