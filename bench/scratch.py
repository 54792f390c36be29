"""Scratch databases for the benchmarks: named vb_*, held by one run at a time, dropped after."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balancer.db.connection import connect, connect_server
from balancer.db.schema import install
from balancer.db.url import DatabaseUrl, parse_database_url


def bench_database_url(default: str) -> DatabaseUrl:
    """VB_BENCH_DATABASE_URL (or ``default``); only a vb_* database may be dropped and rebuilt."""
    url = parse_database_url(
        os.environ.get("VB_BENCH_DATABASE_URL", default), "VB_BENCH_DATABASE_URL"
    )
    if not url.database.startswith("vb_"):
        raise SystemExit(f"refusing to use database {url.database!r}: it must start with vb_")
    return url


@contextlib.contextmanager
def scratch_databases(owner: str, *urls: DatabaseUrl) -> Iterator[None]:
    """Create each database afresh with the schema for the block; drop them after.

    Two runs on one database would drop it under each other: the first URL's name is held
    with GET_LOCK for the whole block, and a second run stops before touching anything.
    """
    admin = connect_server(urls[0])
    with admin.cursor() as cur:
        cur.execute("SELECT GET_LOCK(%s, 0)", (f"{owner} {urls[0].database}",))
        row = cur.fetchone()
    if row is None or row[0] != 1:
        admin.close()
        raise SystemExit(
            f"database {urls[0].database} is in use by another {owner} run;"
            " set VB_BENCH_DATABASE_URL to another vb_ database"
        )
    try:
        for url in urls:
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
                cur.execute(f"CREATE DATABASE `{url.database}`")
            conn = connect(url)
            try:
                install(conn)
            finally:
                conn.close()
        yield
    finally:
        with admin.cursor() as cur:
            for url in urls:
                cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        admin.close()
