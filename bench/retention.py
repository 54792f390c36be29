"""Retention: rows our tables gain per day at a call rate, what pruning them costs, and that a
steady call rate with pruning keeps the tables flat (a soak over simulated days).

* rows per day: the decision rows one real executed cycle writes per call placed (the 20x50
  seed of bench/cycle.py, bench/execute.py's cycle), times 86,400 x the call rate;
* prune cost: one batch of `batch_rows` old rows deleted from a vb_decision_log of `--rows`
  rows, p50/p99 over the batches of a whole pass (the statement VICIdial's processes could wait
  behind), against the baseline of one unbatched DELETE of the same rows;
* soak: `--days` simulated days at `--cps` calls/s (scaled down by `--scale` to keep the run
  short), each day's rows inserted, then one retention pass with decision_log_days = 7: the
  table's size per day must level off at about 7 days' worth.

Usage: python bench/retention.py [--rows 200000] [--cps 10] [--days 14] [--scale 0.01]
Only loopback: MariaDB from VB_BENCH_DATABASE_URL (default .../vb_bench_retention), created,
seeded and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scratch import bench_database_url, scratch_databases

from balancer.db import retention as sql
from balancer.db.connection import Connection, connect
from balancer.ops.retention import Retention
from balancer.ops.retention_settings import RetentionConfig

DEFAULT_URL = "mysql://vbtest:vbtest@127.0.0.1:3306/vb_bench_retention"
DECISIONS_PER_CALL = 1.16  # bench/execute.py 20x50: 238 decision rows for 205 calls
BATCH = 2_000


class Inline:
    """The Retention task's DbRunner on one connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def run(self, fn: Any, idempotent: bool = True) -> Any:
        return fn(self.conn)


def fill(conn: Connection, rows: int, start: datetime, span: timedelta) -> None:
    """``rows`` decision rows spread evenly over ``span`` from ``start``."""
    step = span / max(1, rows)
    with conn.cursor() as cur:
        for first in range(0, rows, 5_000):
            chunk = range(first, min(rows, first + 5_000))
            cur.executemany(
                "INSERT INTO vb_decision_log (decided_at, cycle_id, kind, campaign_id, lead_id,"
                " server_ip, outcome, reason, details) VALUES (%s, 'bench', 'balance', 'CAMP1',"
                " %s, '10.10.0.1', 'placed', 'fill 3 on 10.10.0.1', '{\"man_id\":1}')",
                [(start + step * n, n) for n in chunk],
            )


def count(conn: Connection) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM vb_decision_log")
        row = cur.fetchone()
    return int(row[0]) if row else 0


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def prune_cost(conn: Connection, rows: int) -> list[dict[str, Any]]:
    now = sql.database_now(conn)
    with conn.cursor() as cur:
        cur.execute("DELETE FROM vb_decision_log")
    fill(conn, rows, now - timedelta(days=60), timedelta(days=60))
    cutoff = now - timedelta(days=30)
    times: list[float] = []
    deleted = 0
    while True:
        t0 = time.perf_counter()
        n = sql.prune_older(conn, sql.DECISIONS, cutoff, BATCH)
        times.append((time.perf_counter() - t0) * 1000)
        deleted += n
        if n < BATCH:
            break
    ours = {
        "bench": "retention",
        "figure": f"prune {deleted} rows older than 30 days from {rows} (batches of {BATCH})",
        "batches": len(times),
        "batch_ms_p50": round(statistics.median(times), 2),
        "batch_ms_p99": round(percentile(times, 99), 2),
        "total_s": round(sum(times) / 1000, 2),
        "goal": "each batch well under a balance cycle (2.5 s): p99 <= 250 ms",
        "goal_met": percentile(times, 99) <= 250,
    }
    with conn.cursor() as cur:
        cur.execute("DELETE FROM vb_decision_log")
    fill(conn, rows, now - timedelta(days=60), timedelta(days=60))
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute("DELETE FROM vb_decision_log WHERE decided_at < %s", (cutoff,))
    single_ms = (time.perf_counter() - t0) * 1000
    base = {
        "bench": "retention",
        "figure": "baseline: the same rows in one unbatched DELETE",
        "statement_ms": round(single_ms, 1),
        "vs_our_batch_p99": round(single_ms / max(0.001, percentile(times, 99)), 1),
    }
    return [ours, base]


def soak(conn: Connection, cps: float, days: int, scale: float) -> dict[str, Any]:
    """Simulated days: a day's rows (scaled), then a pass of the real Retention task with the
    simulated day as its clock."""
    with conn.cursor() as cur:
        cur.execute("DELETE FROM vb_decision_log")
    per_day = int(cps * 86_400 * DECISIONS_PER_CALL * scale)
    start = sql.database_now(conn) - timedelta(days=days)
    sizes: list[int] = []
    config = RetentionConfig(decision_log_days=7, decision_log_max_rows=0, call_retries_days=0)
    retention = Retention(config, Inline(conn), lambda: True)
    for day in range(days):
        fill(conn, per_day, start + timedelta(days=day), timedelta(days=1))
        asyncio.run(retention.prune_once(now=start + timedelta(days=day + 1)))
        sizes.append(count(conn))
    flat = max(sizes[7:]) <= per_day * 7 * 1.01 if len(sizes) > 7 else True
    return {
        "bench": "retention",
        "figure": f"soak: {days} simulated days at {cps:g} calls/s (rows scaled by {scale:g})",
        "rows_per_day_at_cps": int(cps * 86_400 * DECISIONS_PER_CALL),
        "rows_per_simulated_day": per_day,
        "table_rows_each_day": sizes,
        "goal": "flat at about 7 days of rows after day 7",
        "goal_met": flat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--cps", type=float, default=10.0)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--scale", type=float, default=0.01)
    args = parser.parse_args()
    url = bench_database_url(DEFAULT_URL)
    with scratch_databases("bench/retention.py", url):
        conn = connect(url)
        try:
            for figure in prune_cost(conn, args.rows):
                print(json.dumps(figure), flush=True)
            print(json.dumps(soak(conn, args.cps, args.days, args.scale)), flush=True)
        finally:
            conn.close()


if __name__ == "__main__":
    main()
