"""Run blocking pymysql work off the event loop, on one thread with its own connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import pymysql

from balancer.db.connection import Connection, connect
from balancer.db.url import DatabaseUrl
from balancer.errors import DatabaseError

log = logging.getLogger(__name__)
T = TypeVar("T")


class DbRunner(Protocol):
    """Something that runs blocking SQL work for async code (a DbWorker; tests may run inline)."""

    async def run(self, fn: Callable[[Connection], T], idempotent: bool = True) -> T:
        """Run ``fn(conn)`` and return its result."""
        ...


class DbWorker:
    """One connection, one thread: AMI events keep flowing while SQL runs.

    A call that fails because the connection broke is retried once on a fresh connection
    only when ``idempotent`` (reads); writes report the failure and let the caller decide.
    """

    def __init__(self, url: DatabaseUrl, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vb-db")
        self._conn: Connection | None = None

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = connect(self.url, self.timeout_s)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(pymysql.err.Error):
                self._conn.close()
            self._conn = None

    def _call(self, fn: Callable[[Connection], T], idempotent: bool) -> T:
        for attempt in (1, 2):
            conn = self._connection()
            try:
                return fn(conn)
            except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
                self._drop()
                if not idempotent or attempt == 2:
                    raise DatabaseError(f"database {self.url}: {exc.args[-1]}") from None
                log.warning("database %s: connection lost (%s); retrying once", self.url, exc)
        raise AssertionError("unreachable")

    async def run(self, fn: Callable[[Connection], T], idempotent: bool = True) -> T:
        """Run ``fn(conn)`` on the worker thread and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, idempotent)

    async def close(self) -> None:
        """Close the connection and stop the thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._drop)
        self._executor.shutdown(wait=True)
