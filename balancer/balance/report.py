"""Rendering a cycle's plan and outcome for `rebalance --once` (text and a stable JSON form)."""

from __future__ import annotations

import dataclasses
from typing import Any

from balancer.balance.cycle import CycleResult


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {
            str(k) if not isinstance(k, tuple) else "/".join(map(str, k)): _jsonable(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def cycle_document(result: CycleResult) -> dict[str, Any]:
    """The cycle as a JSON-ready document: plan, execution outcome, why skipped."""
    plan = result.plan
    placed: dict[str, int] = {}
    if result.report is not None:
        for (campaign, server_ip), count in sorted(result.report.placed.items()):
            placed[f"{campaign}/{server_ip}"] = count
    return {
        "version": 1,
        "cycle_id": result.cycle_id,
        "taken_at": result.snapshot.taken_at.isoformat(sep=" "),
        "mode": plan.mode,
        "staggered": plan.staggered,
        "stopped": plan.stopped,
        "reset_fill": plan.reset_fill,
        "pace_ms": plan.pace_ms,
        "calls_planned": plan.total_calls,
        "campaigns": [_jsonable(c) for c in plan.campaigns],
        "sequence": [_jsonable(p) for p in plan.sequence],
        "executed": result.report is not None,
        "skipped": result.skipped,
        "calls_placed": placed,
        "execution_stopped": result.report.stopped if result.report is not None else None,
        "seconds": round(result.seconds, 3),
    }


def render_cycle(result: CycleResult) -> str:
    """A few readable lines per campaign, then what was placed."""
    doc = cycle_document(result)
    lines = [
        f"cycle {doc['cycle_id']} at {doc['taken_at']}: mode {doc['mode']}"
        f"{' (staggered)' if doc['staggered'] else ''}, {doc['calls_planned']} calls planned"
    ]
    if doc["stopped"]:
        lines.append(f"nothing to do: {doc['stopped']}")
    for campaign in result.plan.campaigns:
        agents = "agents ready" if campaign.may_dial else "no live agent"
        lines.append(
            f"{campaign.campaign_id}: demand {campaign.demand}, filling {campaign.already_filling},"
            f" needed {campaign.needed}, {agents}"
            + (f" ({campaign.note})" if campaign.note else "")
        )
        for placement in campaign.placements:
            lines.append(f"  -> {placement.server_ip}: {placement.calls} ({placement.reason})")
        for skip in campaign.skips:
            lines.append(f"  -- {skip.server_ip}: {skip.reason}")
    if doc["skipped"]:
        lines.append(f"not executed: {doc['skipped']}")
    elif doc["executed"]:
        total = sum(doc["calls_placed"].values())
        where = ", ".join(f"{k}: {v}" for k, v in doc["calls_placed"].items()) or "none"
        lines.append(f"placed {total} calls ({where}) in {doc['seconds']}s")
        if doc["execution_stopped"]:
            lines.append(f"execution stopped early: {doc['execution_stopped']}")
    return "\n".join(lines)
