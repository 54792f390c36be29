"""Opening pymysql connections with the settings every balancer connection shares."""

from __future__ import annotations

import pymysql
import pymysql.cursors

from balancer.db.url import DatabaseUrl
from balancer.errors import DatabaseError

Connection = pymysql.connections.Connection


def connect(url: DatabaseUrl, timeout_s: float = 5.0, autocommit: bool = True) -> Connection:
    """Open a connection in strict SQL mode; errors name the server, never the password."""
    try:
        return pymysql.connect(
            host=url.host,
            port=url.port,
            user=url.user,
            password=url.password,
            database=url.database,
            connect_timeout=max(1, int(timeout_s)),
            read_timeout=30,
            write_timeout=30,
            autocommit=autocommit,
            charset="utf8mb4",
            init_command="SET SESSION sql_mode='STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,"
            "NO_ENGINE_SUBSTITUTION'",
        )
    except pymysql.err.OperationalError as exc:
        code = exc.args[0] if exc.args else "?"
        message = exc.args[1] if len(exc.args) > 1 else str(exc)
        raise DatabaseError(f"database {url}: cannot connect ({code}: {message})") from None


def connect_server(url: DatabaseUrl, timeout_s: float = 5.0) -> Connection:
    """Connect without selecting a database (to create one)."""
    try:
        return pymysql.connect(
            host=url.host,
            port=url.port,
            user=url.user,
            password=url.password,
            connect_timeout=max(1, int(timeout_s)),
            autocommit=True,
            charset="utf8mb4",
        )
    except pymysql.err.OperationalError as exc:
        code = exc.args[0] if exc.args else "?"
        raise DatabaseError(
            f"database server {url.host}:{url.port}: cannot connect ({code})"
        ) from None
