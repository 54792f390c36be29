"""config/grafana-dashboard.json queries only metrics the daemon's /metrics really serves.

A daemon tracks a simulated server with a live trunk call, with carriers configured, a cycle
observed and a call counted, so every family it can export is present in one scrape; every
metric name in every query of the dashboard (panels and variables) must be one of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from tracking_helpers import eventually, health_is, make_config, running, seed_server

from balancer.config import HostPort, HttpConfig
from balancer.daemon import Daemon
from balancer.db.connection import Connection
from balancer.db.url import DatabaseUrl
from balancer.sim.server import SimAsterisk
from balancer.store.base import Health

DASHBOARD = Path(__file__).resolve().parents[1] / "config" / "grafana-dashboard.json"
METRIC = re.compile(r"\bvici_balancer_[a-z0-9_]+\b")


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text in the dashboard: panel targets (rows included) and variables."""
    found: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            found.extend(t["expr"] for t in panel.get("targets", []))
            panels(panel.get("panels", []))

    panels(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
        elif variable.get("type") == "query":
            found.append(str(query))
    return found


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    assert len(queries(dashboard)) >= 20


async def test_every_metric_the_dashboard_queries_is_served(
    db: Connection, database_url: DatabaseUrl, redis_db: str
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = {name for query in queries(dashboard) for name in METRIC.findall(query)}
    assert len(wanted) > 15
    async with SimAsterisk("10.10.0.1", call_duration_s=60) as sim:
        seed_server(db, sim, max_trunks=10)
        config = make_config(
            database_url,
            redis_url=redis_db,
            prefix="vbgraf:",
            http=HttpConfig(listen=HostPort("127.0.0.1", 0)),
        )
        daemon = Daemon(config)
        async with running(daemon):
            assert daemon.http is not None
            await eventually(lambda: health_is(daemon.store, sim.server_ip, Health.UP))
            await sim.originate("93125550001")  # a trunk call on carrier alpha
            daemon.cycle_stats.observe_seconds(0.02)
            daemon.cycle_stats.count_placed(sim.server_ip, "alpha")
            url = daemon.http.url + "metrics"
            served: set[str] = set()

            async def all_there() -> bool:
                nonlocal served
                async with aiohttp.ClientSession() as client, client.get(url) as reply:
                    text = await reply.text()
                served = {
                    sample.name
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                }
                return wanted <= served

            try:
                await eventually(all_there, timeout=10, interval=0.2)
            except AssertionError:
                raise AssertionError(f"not in /metrics: {sorted(wanted - served)}") from None
