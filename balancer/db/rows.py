"""Small helpers the SQL modules share for reading rows."""

from __future__ import annotations

from typing import Any

import pymysql.cursors

from balancer.db.connection import Connection


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
