"""The routes view: the route table with every carrier's breaker state, failure ratio and lines
in use per server (`vici-balancer routes`).

The live state is what the leading daemon last published in the state store
(``CarrierHealth.run_publisher``); without it the table comes from the configuration alone,
every state shown as unknown, and the command exits 1 (like `status` with stale state).
"""

from __future__ import annotations

import json
import time
from typing import Any

from balancer.carriers.health import CarrierHealth
from balancer.config import Config
from balancer.live.status import columns
from balancer.store.factory import open_store
from balancer.store.keys import ROUTES_DOCUMENT

NO_STORE = (
    "redis.url is 'memory://': carrier state lives inside the daemon process; "
    "set redis.url to the Redis the daemons use to see it"
)
NO_DOCUMENT = "no daemon has published carrier state recently (none leading, or none running)"


async def read_routes(config: Config) -> dict[str, Any]:
    """The routes document: the leader's published one, else the config's (states unknown)."""
    problems: list[str] = []
    doc: dict[str, Any] | None = None
    if config.redis.is_memory:
        problems.append(NO_STORE)
    else:
        store = open_store(config.redis)
        try:
            text = await store.get_document(ROUTES_DOCUMENT)
        finally:
            await store.close()
        if text:
            doc = json.loads(text)
        else:
            problems.append(NO_DOCUMENT)
    if doc is None:
        health = CarrierHealth(config.carriers, config.routes, config.routing)
        doc = health.document(live=False)
    doc["problems"] = problems
    return doc


def _when(value: float | None, now: float) -> str:
    if value is None:
        return "-"
    stamp = time.strftime("%H:%M:%S", time.localtime(value))
    return f"{stamp} ({max(0.0, now - value):.0f}s ago)"


def render_routes(doc: dict[str, Any], now: float | None = None) -> str:
    """The routes document as two tables: routes, then carriers per server."""
    now = time.time() if now is None else now
    settings = doc["routing"]
    mode = "routed" if settings["routes_balance_calls"] else "NOT routed (campaign prefix)"
    lines = [
        f"ROUTES: balance calls {mode}; per-call retry "
        f"{'on' if settings['retry_failed_calls'] else 'off'}; breaker opens after "
        f"{settings['failure_threshold']} consecutive trunk failures or ratio > "
        f"{settings['failure_ratio']:g} over {settings['window_s']:g}s, "
        f"cool-down {settings['cool_down_s']:g}s, {settings['probe_calls']} probes"
    ]
    rows: list[tuple[str, ...]] = [("ROUTE", "MATCH", "CARRIERS (failover order)")]
    for route in doc["routes"]:
        tiers = []
        for tier in route["tiers"]:
            names = "|".join(c["carrier"] for c in tier)
            if len(tier) > 1:
                names += " (" + ":".join(str(c["weight"]) for c in tier) + ")"
            tiers.append(names)
        match = "default" if route["default"] else " ".join(route["match"])
        rows.append((route["name"], match, " > ".join(tiers)))
    if len(rows) == 1:
        rows.append(("-", "-", "no [[routes]] configured"))
    lines.extend(columns(rows))
    lines.append("")
    rows = [
        (
            "CARRIER",
            "PREFIX",
            "SERVER",
            "STATE",
            "FAIL RATIO",
            "CALLS",
            "LINES",
            "CHANGED",
            "REASON",
        )
    ]
    for carrier in doc["carriers"]:
        cap = carrier["max_lines_per_server"]
        rows.append(
            (
                carrier["id"],
                carrier["dial_prefix"],
                "(all)",
                carrier["state"].upper(),
                f"{carrier['failure_ratio']:.2f}",
                str(carrier["calls_in_window"]),
                f"cap {cap}" if cap else "no cap",
                _when(carrier["changed_at"], now),
                carrier["reason"],
            )
        )
        for server in carrier["servers"]:
            reserved = f"+{server['reserved']}" if server["reserved"] else ""
            used = f"{server['lines_in_use']}{reserved}" + (f"/{cap}" if cap else "")
            state = server["state"].upper() if server["available"] else "UNAVAILABLE"
            reason = server["reason"] if server["available"] else "not available on this server"
            rows.append(
                (
                    "",
                    "",
                    server["server_ip"],
                    state,
                    f"{server['failure_ratio']:.2f}",
                    str(server["calls_in_window"]),
                    used,
                    _when(server["changed_at"], now),
                    reason,
                )
            )
    lines.extend(columns(rows))
    for problem in doc.get("problems", []):
        lines.append(f"WARNING: {problem}")
    return "\n".join(lines)
