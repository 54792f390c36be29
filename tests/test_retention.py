"""Retention on a real MariaDB: our growing tables are pruned by age and by row count, in
batches, only by the leader; VICIdial's tables are never touched."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import balance_seed as seed
from conftest import execute, fetchall

from balancer.db.connection import Connection
from balancer.ops.retention import Retention
from balancer.ops.retention_settings import RetentionConfig


def decisions(db: Connection, count: int, at: datetime) -> None:
    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO vb_decision_log (decided_at, kind, reason) VALUES (%s, 'balance', %s)",
            [(at, f"row {n}") for n in range(count)],
        )


def now(db: Connection) -> datetime:
    value = fetchall(db, "SELECT NOW() AS t")[0]["t"]
    assert isinstance(value, datetime)
    return value


def test_old_decisions_go_in_batches_and_recent_ones_stay(db: Connection) -> None:
    today = now(db)
    decisions(db, 25, today - timedelta(days=40))
    decisions(db, 5, today - timedelta(days=1))
    execute(
        db,
        "INSERT INTO vb_call_retries (caller_code, retry_caller_code, lead_id, server_ip,"
        " retried_at) VALUES ('V1', 'V2', 1, '10.10.0.1', %s), ('V3', 'V4', 2, '10.10.0.1', %s)",
        today - timedelta(days=30),
        today,
    )
    seed.example(db)  # VICIdial's rows: never touched
    config = RetentionConfig(decision_log_days=30, decision_log_max_rows=0, batch_rows=10)
    retention = Retention(config, seed.InlineDb(db), lambda: True)
    deleted = asyncio.run(retention.prune_once())
    assert deleted == {"vb_decision_log": 25, "vb_call_retries": 1}
    assert seed.count(db, "vb_decision_log") == 5
    assert [r["caller_code"] for r in fetchall(db, "SELECT caller_code FROM vb_call_retries")] == [
        "V3"
    ]
    assert seed.count(db, "vicidial_hopper") == 1 and seed.count(db, "vicidial_list") == 1
    assert retention.stats.pruned == {"vb_decision_log": 25, "vb_call_retries": 1}
    assert asyncio.run(retention.prune_once()) == {"vb_decision_log": 0, "vb_call_retries": 0}


def test_the_decision_log_is_capped_at_its_newest_rows(db: Connection) -> None:
    decisions(db, 50, now(db))
    config = RetentionConfig(
        decision_log_days=0, decision_log_max_rows=20, batch_rows=7, call_retries_days=0
    )
    deleted = asyncio.run(Retention(config, seed.InlineDb(db), lambda: True).prune_once())
    assert deleted == {"vb_decision_log": 30}
    kept = [
        str(r["reason"]) for r in fetchall(db, "SELECT reason FROM vb_decision_log ORDER BY id")
    ]
    assert kept == [f"row {n}" for n in range(30, 50)]


async def test_only_the_leader_prunes(db: Connection) -> None:
    decisions(db, 3, now(db) - timedelta(days=90))
    leading = False
    retention = Retention(RetentionConfig(interval_s=0.01), seed.InlineDb(db), lambda: leading)
    stop = asyncio.Event()
    task = asyncio.create_task(retention.run(stop))
    try:
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert retention.stats.passes == 0 and seed.count(db, "vb_decision_log") == 3
        leading = True
        for _ in range(500):
            if retention.stats.passes:
                break
            await asyncio.sleep(0.01)
        assert seed.count(db, "vb_decision_log") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_the_leading_daemon_prunes_and_counts_it(db: Connection, database_url: Any) -> None:
    from dataclasses import replace

    from tracking_helpers import eventually, make_config, running

    from balancer.config import BalanceConfig
    from balancer.daemon import Daemon
    from balancer.ops.metrics import render

    decisions(db, 12, now(db) - timedelta(days=45))
    config = replace(
        make_config(database_url),
        balance=BalanceConfig(cycle_interval_s=0.3, lock_ttl_s=1.5),
        retention=RetentionConfig(interval_s=0.2, batch_rows=5),
    )
    daemon = Daemon(config)
    async with running(daemon):

        async def pruned() -> bool:
            return seed.count(db, "vb_decision_log", "decided_at < NOW() - INTERVAL 40 DAY") == 0

        await eventually(pruned, timeout=20)
        text = (await render(daemon)).decode()
        assert 'vici_balancer_retention_pruned_rows_total{table="vb_decision_log"} 12.0' in text
