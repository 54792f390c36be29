"""Small helpers the SQL modules share: one statement read or written, a value fitted or read."""

from __future__ import annotations

import logging
from typing import Any

import pymysql
import pymysql.cursors

from balancer.db.connection import Connection

log = logging.getLogger(__name__)


def dict_rows(conn: Connection, sql: str, *params: object) -> list[dict[str, Any]]:
    """Run one parameterized SELECT; rows as dicts keyed by column name."""
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def text(value: Any) -> str:
    """A column value as text: '' for NULL, bytes decoded as UTF-8."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def one_row(conn: Connection, sql: str, *params: object) -> tuple[Any, ...] | None:
    """Run one parameterized SELECT; its first row, or None."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        row: tuple[Any, ...] | None = cur.fetchone()
        return row


def all_rows(conn: Connection, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Run one parameterized SELECT; every row as a tuple."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def write(conn: Connection, sql: str, *params: object) -> int:
    """Run one write; returns the new AUTO_INCREMENT id (0 when none)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return int(cur.lastrowid or 0)


def rollback(conn: Connection) -> None:
    """Roll back; a broken connection is only logged (the server discards the transaction)."""
    try:
        conn.rollback()
    except pymysql.err.Error as exc:  # a broken connection: the server rolls back on its own
        log.warning("rollback failed (%s); the server discards the transaction", exc)


def fit(value: str, width: int) -> str:
    """Cut to a column's width: strict mode rejects a longer value (and the whole call with it)."""
    return value[:width]


def placeholders(count: int) -> str:
    """``%s, %s, ...`` for an IN list of ``count`` parameters."""
    return ", ".join(["%s"] * count)
