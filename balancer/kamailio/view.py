"""`vici-balancer kamailio`: per set and destination, what each Kamailio has beside what the
balancer wants, and when it last published.

"Has" comes straight from each endpoint's ``dispatcher.list``; "wants" from the documents the
publishing daemons put in the shared store (`KamailioSync.document`). The JSON document built
here is the stable form (``--json``); the table is rendered from it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from balancer.errors import BalancerError, KamailioError
from balancer.kamailio.model import KamDest, Key, parse_list
from balancer.kamailio.rpc import KamailioRpc
from balancer.kamailio.settings import KamailioConfig
from balancer.live.status import columns
from balancer.store.base import StateStore
from balancer.store.keys import kamailio_document

VIEW_VERSION = 1


async def read_documents(store: StateStore) -> list[dict[str, Any]]:
    """Every alive daemon's published Kamailio document (none with a memory:// store)."""
    docs: list[dict[str, Any]] = []
    for daemon in await store.daemons():
        text = await store.get_document(kamailio_document(daemon))
        if text:
            docs.append(json.loads(text))
    return docs


async def read_endpoints(config: KamailioConfig) -> dict[str, dict[Key, KamDest] | str]:
    """Each endpoint's current list, or the error that prevented reading it."""

    def one(url: str) -> dict[Key, KamDest] | str:
        try:
            return parse_list(KamailioRpc(url, config.rpc_timeout_s).list())
        except (KamailioError, ValueError) as exc:
            return str(exc)

    results = await asyncio.gather(
        *(asyncio.to_thread(one, endpoint.url) for endpoint in config.endpoints)
    )
    return {e.name: r for e, r in zip(config.endpoints, results, strict=True)}


def _publisher(docs: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(document, endpoint entry) of the daemon publishing to ``name`` (the freshest one)."""
    found: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for doc in docs:
        for entry in doc.get("endpoints", []):
            if entry.get("name") == name and doc.get("publishing"):
                found.append((doc, entry))
    if not found:
        return {}, {}
    return max(found, key=lambda pair: pair[1].get("last_ok_at") or 0)


def _row(
    set_id: int,
    duid: str,
    wanted: dict[str, Any] | None,
    weight_wanted: int | None,
    have: KamDest | None,
    algorithm: int,
    hysteresis: int,
) -> dict[str, Any]:
    note = ""
    in_step = True
    if have is None:
        in_step, note = False, "not loaded in Kamailio (reload pending)"
    elif wanted is None:
        in_step, note = False, "not wanted by the balancer (reload pending)"
    elif have.state == "D":
        note = "disabled by an admin (left alone)"
    elif not wanted["active"]:
        if have.flags != "IX":
            in_step, note = False, "should be inactive"
    elif have.state in "IT" and have.probing:
        note = "Kamailio's probing says its SIP side is down"
    elif have.state != "A":
        in_step, note = False, "should be active"
    if in_step and have is not None and weight_wanted is not None and have.state != "D":
        current = have.weight_for(algorithm)
        if (current == 0) != (weight_wanted == 0) or abs(current - weight_wanted) > hysteresis:
            in_step, note = False, "weight differs (reload pending)"
    return {
        "set": set_id,
        "duid": duid,
        "server_ip": wanted["server_ip"] if wanted else None,
        "uri": (wanted or {}).get("uri") or (have.uri if have else None),
        "kamailio": None
        if have is None
        else {"flags": have.flags, "weight": have.weight_for(algorithm)},
        "wanted": None
        if wanted is None
        else {
            "state": "active" if wanted["active"] else "inactive",
            "weight": weight_wanted,
            "spare": wanted["spare"],
            "reason": wanted["reason"],
        },
        "in_step": in_step,
        "note": note,
    }


def build_view(
    config: KamailioConfig,
    lists: dict[str, dict[Key, KamDest] | str],
    docs: list[dict[str, Any]],
    now: float | None = None,
) -> dict[str, Any]:
    """The whole document: per endpoint, per set, per destination."""
    now = time.time() if now is None else now
    endpoints: list[dict[str, Any]] = []
    problems: list[str] = []
    if not docs:
        problems.append("no daemon is publishing to Kamailio (no fresh document in the store)")
    for endpoint in config.endpoints:
        listed = lists.get(endpoint.name, "not read")
        doc, entry = _publisher(docs, endpoint.name)
        wanted_sets = {s["id"]: s for s in doc.get("sets", [])}
        weights = entry.get("weights", {})
        sets: list[dict[str, Any]] = []
        for spec in config.sets:
            wanted = {d["duid"]: d for d in wanted_sets.get(spec.id, {}).get("destinations", [])}
            have = (
                {k[1]: d for k, d in listed.items() if k[0] == spec.id}
                if isinstance(listed, dict)
                else {}
            )
            rows = [
                _row(
                    spec.id,
                    duid,
                    wanted.get(duid),
                    weights.get(f"{spec.id}/{duid}"),
                    have.get(duid),
                    config.algorithm,
                    config.weight_hysteresis,
                )
                for duid in sorted(set(wanted) | set(have))
            ]
            sets.append({"id": spec.id, "capacity": spec.capacity, "destinations": rows})
        reachable = isinstance(listed, dict)
        if not reachable:
            problems.append(f"{endpoint.name}: unreachable: {listed}")
        elif docs:
            drifted = [r for s in sets for r in s["destinations"] if not r["in_step"]]
            if drifted:
                problems.append(f"{endpoint.name}: {len(drifted)} destination(s) not as wanted")
        endpoints.append(
            {
                "name": endpoint.name,
                "url": endpoint.url,
                "list_file": endpoint.list_file,
                "reachable": reachable,
                "error": None if reachable else listed,
                "published_by": doc.get("daemon"),
                "last_publish_at": entry.get("last_publish_at"),
                "last_ok_at": entry.get("last_ok_at"),
                "publisher_error": entry.get("last_error"),
                "reloads": entry.get("reloads"),
                "sets": sets,
            }
        )
    return {
        "version": VIEW_VERSION,
        "generated_at": round(now, 3),
        "algorithm": config.algorithm,
        "endpoints": endpoints,
        "problems": problems,
        "ok": not problems,
    }


async def kamailio_view(config: KamailioConfig, store: StateStore | None) -> dict[str, Any]:
    """Read every endpoint and the store's documents, and build the view."""
    docs: list[dict[str, Any]] = []
    if store is not None:
        try:
            docs = await read_documents(store)
        except BalancerError:
            docs = []
    return build_view(config, await read_endpoints(config), docs)


def _ago(at: float | None, now: float) -> str:
    return "never" if not at else f"{max(0.0, now - at):.1f}s ago"


def render_view(doc: dict[str, Any]) -> str:
    """The view as text: one block per endpoint and set."""
    now = doc["generated_at"]
    lines: list[str] = []
    for ep in doc["endpoints"]:
        state = "reachable" if ep["reachable"] else f"UNREACHABLE ({ep['error']})"
        by = ep["published_by"] or "no daemon"
        lines.append(
            f"ENDPOINT {ep['name']}  {ep['url']}  {state}; published by {by}, "
            f"last change {_ago(ep['last_publish_at'], now)}, "
            f"last check {_ago(ep['last_ok_at'], now)}"
        )
        for s in ep["sets"]:
            lines.append(f"SET {s['id']} ({s['capacity']}, algorithm {doc['algorithm']})")
            rows: list[tuple[str, ...]] = [
                ("DUID", "SERVER_IP", "URI", "KAMAILIO", "WEIGHT", "WANTED", "WEIGHT", "REASON", "")
            ]
            for d in s["destinations"]:
                kam, want = d["kamailio"] or {}, d["wanted"] or {}
                rows.append(
                    (
                        d["duid"],
                        d["server_ip"] or "-",
                        d["uri"] or "-",
                        kam.get("flags", "-"),
                        str(kam.get("weight", "-")),
                        want.get("state", "-"),
                        str(want.get("weight", "-")),
                        want.get("reason", "-"),
                        d["note"] if d["in_step"] else f"DIFFERS: {d['note']}",
                    )
                )
            lines.extend(columns(rows))
        lines.append("")
    for problem in doc["problems"]:
        lines.append(f"WARNING: {problem}")
    return "\n".join(lines).rstrip()
