"""Shared fixtures: real MariaDB and Redis on loopback (never skipped), simulated Asterisk servers.

Services come from scripts/services (run by `make test`). URLs:
  VB_TEST_DATABASE_URL  default mysql://vbtest:vbtest@127.0.0.1:3306/vb_test
                        (each session works in its own database <name>_<pid>, dropped after)
  VB_TEST_REDIS_URL     default redis://127.0.0.1:6379/15  (this database is flushed between tests)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pymysql
import pytest
import redis
from fixtures_sim import *  # noqa: F403  (simulated Asterisk fixtures)

from balancer.db.connection import Connection, connect, connect_server
from balancer.db.url import DatabaseUrl, parse_database_url
from balancer.errors import DatabaseError

# Code under test must never dial anything but loopback (see balancer/ami/session.py).
os.environ["VICI_BALANCER_LOOPBACK_ONLY"] = "1"

HOW_TO_START = "start MariaDB and Redis with `bash scripts/services` (or run `make test`)"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _test_database_url() -> DatabaseUrl:
    url = parse_database_url(
        os.environ.get("VB_TEST_DATABASE_URL", "mysql://vbtest:vbtest@127.0.0.1:3306/vb_test"),
        "VB_TEST_DATABASE_URL",
    )
    assert url.host in LOOPBACK, "tests only ever talk to a loopback database"
    return url


def _scratch_database(suffix: str, engine: str | None) -> Iterator[DatabaseUrl]:
    """A database of this test session's own (VB_TEST_DATABASE_URL's name + pid + suffix), with
    the schema installed; dropped when the session ends. Concurrent runs stay apart."""
    from balancer.db import schema

    base = _test_database_url()
    url = base.with_database(f"{base.database}_{os.getpid()}{suffix}")
    try:
        server = connect_server(base)
    except DatabaseError as exc:
        pytest.fail(f"MariaDB is not reachable: {exc}; {HOW_TO_START}", pytrace=False)
    try:
        with server.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
            cur.execute(f"CREATE DATABASE `{url.database}`")
        conn = connect(url)
        try:
            schema.install(conn, engine=engine)
        finally:
            conn.close()
        yield url
    finally:
        with server.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        server.close()


@pytest.fixture(scope="session")
def stock_database_url() -> Iterator[DatabaseUrl]:
    """VICIdial's own engines: MyISAM, and MEMORY for the live tables (what users have)."""
    yield from _scratch_database("", None)


@pytest.fixture(scope="session")
def innodb_database_url() -> Iterator[DatabaseUrl]:
    """The same tables converted to InnoDB, as some sites do."""
    yield from _scratch_database("_innodb", "InnoDB")


@pytest.fixture(scope="session")
def database_url(stock_database_url: DatabaseUrl) -> DatabaseUrl:
    """The test database with VICIdial's stock engines. Modules that must hold on both engines
    override this with `both_engines` (see below)."""
    return stock_database_url


def both_engines(request: pytest.FixtureRequest) -> DatabaseUrl:
    """Body of a module-level ``database_url`` fixture parametrised over ("stock", "innodb")."""
    url: DatabaseUrl = request.getfixturevalue(f"{request.param}_database_url")
    return url


def _empty_all_tables(conn: Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        tables = [row[0] for row in cur.fetchall()]
        for table in tables:
            if table != "vb_schema_version":  # schema metadata, not data
                cur.execute(f"DELETE FROM `{table}`")


@pytest.fixture
def db(database_url: DatabaseUrl) -> Iterator[Connection]:
    """An autocommit connection to the test database, every table emptied first."""
    conn = connect(database_url)
    _empty_all_tables(conn)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("VB_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    assert client.connection_pool.connection_kwargs.get("host") in LOOPBACK
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {url}: {exc}; {HOW_TO_START}", pytrace=False)
    finally:
        client.close()
    return url


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[str]:
    """The test Redis database, flushed before the test; yields its URL."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    yield redis_url


def execute(conn: Connection, sql: str, *params: object) -> int:
    """Run one parameterized statement; returns the affected row count."""
    with conn.cursor() as cur:
        return int(cur.execute(sql, params))


def fetchall(conn: Connection, sql: str, *params: object) -> list[dict[str, object]]:
    """Rows as dicts."""
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


__all__ = ["AsyncIterator", "both_engines", "execute", "fetchall"]
