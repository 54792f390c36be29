"""One executed balance cycle at 20 servers x 50 campaigns: statements and rows per call, on
VICIdial's stock engines (MyISAM/MEMORY) and, side by side in the same run, on InnoDB copies.

The cluster is bench/cycle.py's deterministic 20x50 seed (25 READY hopper rows per campaign).
One cycle is the daemon's own: `read_snapshot`, `plan_cycle` (faithful mode) and the real
Executor under a database lease (repair step, claims, ordered fenced writes, hopper settle,
fills, decision log), at 1000 calls/s. Statements and rows are MariaDB's own session counters
(``Questions``, ``Rows_read``) on the executor's connection, so nothing of ours is instrumented.

Baseline in the same run, on the same seed: VICIdial's own claim statements for the same
placements (``UPDATE vicidial_hopper ... ORDER BY priority DESC, hopper_id LIMIT n`` then the
read-back by user, VICIdial's hopper being indexed on lead_id only), which alone read more rows
than our whole cycle. Goals (issue 11): <= 10 statements per call and <= 18,000 rows read per
cycle on the stock engines (1 % of the 1.84 M rows VICIdial's FILL script reads at this size).

Usage: python bench/execute.py [--servers 20] [--campaigns 50] [--runs 5]
Only loopback: MariaDB from VB_BENCH_DATABASE_URL (default .../vb_bench_execute); databases
<name>_stock and <name>_innodb are created, seeded and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cycle import counters, seed_size
from scratch import bench_database_url

from balancer.balance.executor import Executor
from balancer.balance.planner import plan_cycle
from balancer.config import BalanceConfig
from balancer.db import fence as lease
from balancer.db.connection import Connection, connect, connect_server
from balancer.db.fence import LeaderFence
from balancer.db.schema import install
from balancer.db.snapshot import read_snapshot
from balancer.db.url import DatabaseUrl
from balancer.db.worker import DbWorker

DEFAULT_URL = "mysql://vbtest:vbtest@127.0.0.1:3306/vb_bench_execute"
FAITHFUL = BalanceConfig(mode="faithful", shortage_window_s=1200)
VICIDIAL_ROWS_READ = 1_840_000  # VICIDIAL.md: VICIdial's script at 20x50, 260 calls
GOAL_STATEMENTS_PER_CALL = 10
GOAL_ROWS_PER_CYCLE = 18_000


def _reseed(conn: Connection, servers: int, campaigns: int) -> None:
    with conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        for (table,) in cur.fetchall():
            if table != "vb_schema_version":
                cur.execute(f"DELETE FROM `{table}`")  # noqa: S608 - names from SHOW TABLES
    seed_size(conn, servers, campaigns)
    with conn.cursor() as cur:
        cur.execute("UPDATE system_settings SET outbound_calls_per_second = 1000")


async def _our_cycle(url: DatabaseUrl) -> dict[str, Any]:
    worker = DbWorker(url)
    try:
        epoch = await worker.run(lambda c: lease.take(c, "bench", 3600))
        assert epoch is not None
        fence = LeaderFence(lease.BALANCE_LEASE, epoch)
        executor = Executor(worker, fence=lambda: fence, dst=lambda _now: False)
        q0, r0 = await worker.run(counters)
        started = time.perf_counter()
        snapshot = await worker.run(lambda c: read_snapshot(c, FAITHFUL))
        plan = plan_cycle(snapshot, None, FAITHFUL)
        q1, r1 = await worker.run(counters)
        report = await executor.execute(plan, snapshot, "bench")
        seconds = time.perf_counter() - started
        q2, r2 = await worker.run(counters)
    finally:
        await worker.close()
    placements = sum(1 for p in plan.sequence if p.calls)
    return {
        "calls": report.total_placed,
        "planned": plan.total_calls,
        "placements": placements,
        "errors": report.errors,
        "snapshot_statements": q1 - q0 - 1,
        "snapshot_rows": r1 - r0,
        "execute_statements": q2 - q1 - 1,
        "execute_rows": r2 - r1,
        "seconds": seconds,
        "plan": [(p.campaign_id, p.calls) for p in plan.sequence if p.calls],
    }


def _vicidial_claims(conn: Connection, plan: list[tuple[str, int]]) -> tuple[int, int]:
    """VICIdial's claim statements for the same placements: (statements, rows read)."""
    q0, r0 = counters(conn)
    with conn.cursor() as cur:
        for index, (campaign_id, calls) in enumerate(plan):
            user = f"VDFC_bench{index}"[:20]
            cur.execute(
                "UPDATE vicidial_hopper SET status = 'QUEUE', user = %s WHERE campaign_id = %s"
                " AND status = 'READY' ORDER BY priority DESC, hopper_id LIMIT %s",
                (user, campaign_id, calls),
            )
            cur.execute(
                "SELECT lead_id, alt_dial FROM vicidial_hopper"
                " WHERE user = %s AND status = 'QUEUE'",
                (user,),
            )
            cur.fetchall()
    q1, r1 = counters(conn)
    return q1 - q0 - 1, r1 - r0


def bench_engine(
    url: DatabaseUrl, engine: str | None, servers: int, campaigns: int, runs: int
) -> list[dict[str, Any]]:
    name = "stock (MyISAM/MEMORY)" if engine is None else engine
    conn = connect(url)
    install(conn, engine=engine)
    cycles: list[dict[str, Any]] = []
    baseline: tuple[int, int] = (0, 0)
    for _ in range(runs):
        _reseed(conn, servers, campaigns)
        cycle = asyncio.run(_our_cycle(url))
        cycles.append(cycle)
        _reseed(conn, servers, campaigns)
        baseline = _vicidial_claims(conn, cycle["plan"])
    conn.close()
    last = cycles[-1]
    calls = max(1, last["calls"])
    statements = last["snapshot_statements"] + last["execute_statements"]
    rows = last["snapshot_rows"] + last["execute_rows"]
    ms = [c["seconds"] * 1000 for c in cycles]
    ours = {
        "bench": "execute",
        "figure": f"one executed cycle {servers}x{campaigns}, {name}",
        "engine": name,
        "calls_placed": last["calls"],
        "calls_planned": last["planned"],
        "placements": last["placements"],
        "statements_per_cycle": statements,
        "statements_per_call": round(statements / calls, 2),
        "execute_statements_per_call": round(last["execute_statements"] / calls, 2),
        "rows_read_per_cycle": rows,
        "snapshot_rows": last["snapshot_rows"],
        "rows_read_per_call": round(rows / calls, 1),
        "cycle_ms_p50": round(statistics.median(ms), 1),
        "cycle_ms_max": round(max(ms), 1),
        "runs": len(cycles),
        "errors": last["errors"],
    }
    if engine is None:
        ours["goal"] = (
            f"<= {GOAL_STATEMENTS_PER_CALL} statements per call and <= {GOAL_ROWS_PER_CYCLE}"
            " rows read per cycle"
        )
        ours["goal_met"] = (
            statements / calls <= GOAL_STATEMENTS_PER_CALL and rows <= GOAL_ROWS_PER_CYCLE
        )
        ours["vs_vicidial_rows_read"] = f"{rows / VICIDIAL_ROWS_READ:.2%} of 1.84 M"
    base = {
        "bench": "execute",
        "figure": f"baseline: VICIdial's claim statements alone, same placements, {name}",
        "engine": name,
        "statements": baseline[0],
        "rows_read": baseline[1],
        "rows_read_vs_our_whole_cycle": round(baseline[1] / max(1, rows), 1),
    }
    return [ours, base]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--campaigns", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    base = bench_database_url(DEFAULT_URL)
    admin = connect_server(base)
    urls = {
        engine: base.with_database(f"{base.database}_{engine or 'stock'}".lower())
        for engine in (None, "InnoDB")
    }
    try:
        for engine, url in urls.items():
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
                cur.execute(f"CREATE DATABASE `{url.database}`")
            for figure in bench_engine(url, engine, args.servers, args.campaigns, args.runs):
                print(json.dumps(figure), flush=True)
    finally:
        with admin.cursor() as cur:
            for url in urls.values():
                cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        admin.close()


if __name__ == "__main__":
    main()
