"""VICIdial's per-server command sender, played against a simulated Asterisk.

Every poll it claims the ``NEW`` rows of ``vicidial_manager`` for its server_ip, one guarded UPDATE
per row (``... AND status='NEW'``): only a row whose update affected exactly one row is executed,
so two senders never run a row twice. SQL runs in a worker thread on the sender's own connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

import pymysql
import pymysql.cursors

from balancer.db.connection import Connection, connect
from balancer.db.url import DatabaseUrl
from balancer.errors import DatabaseError
from balancer.sim.model import TaskSet
from balancer.sim.server import SimAsterisk

log = logging.getLogger("balancer.sim.sender")

CMD_COLUMNS = tuple(f"cmd_line_{c}" for c in "bcdefghijk")
_SELECT = (
    "SELECT man_id, action, channel, callerid, cmd_line_b, cmd_line_c, cmd_line_d, cmd_line_e,"
    " cmd_line_f, cmd_line_g, cmd_line_h, cmd_line_i, cmd_line_j, cmd_line_k"
    " FROM vicidial_manager WHERE server_ip = %s AND status = 'NEW' ORDER BY man_id LIMIT %s"
)
_CLAIM = "UPDATE vicidial_manager SET status = 'SENT' WHERE man_id = %s AND status = 'NEW'"


def parse_command_lines(row: dict[str, Any]) -> dict[str, str]:
    """The ``Key: Value`` strings of cmd_line_b..cmd_line_k as a dict with lower-case keys."""
    fields: dict[str, str] = {}
    for column in CMD_COLUMNS:
        text = row.get(column) or ""
        key, sep, value = str(text).partition(":")
        if sep and key.strip():
            fields[key.strip().lower()] = value.strip()
    return fields


class CommandSender:
    """Runs this server's queued AMI commands from vicidial_manager on the simulated Asterisk."""

    def __init__(
        self,
        server: SimAsterisk,
        database_url: DatabaseUrl,
        *,
        poll_interval_s: float = 0.1,
        batch_size: int = 200,
    ) -> None:
        """Bind to one simulated server (its server_ip selects the rows) and one database."""
        self.server = server
        self.database_url = database_url
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.claimed = 0
        self.originated = 0
        self.answered = 0
        self.failed = 0
        self.hangups = 0
        self.skipped = 0
        self.db_errors = 0
        self.executed_ids: collections.deque[int] = collections.deque(maxlen=100_000)
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._claiming: asyncio.Task[list[dict[str, Any]]] | None = None
        self._calls = TaskSet()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start polling."""
        if self._task is None:
            name = f"sender-{self.server.server_ip}"
            self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def stop(self) -> None:
        """Stop polling, cancel calls still being placed and close the database connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._claiming is not None:
            # a claim already running in its thread must finish before its connection is closed
            claiming, self._claiming = self._claiming, None
            await asyncio.wait({claiming})
            if not claiming.cancelled() and claiming.exception() is not None:
                self.db_errors += 1
        await self._calls.cancel_all()
        await asyncio.to_thread(self._close)

    async def __aenter__(self) -> CommandSender:
        """Start on entry."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop on exit."""
        await self.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except DatabaseError as exc:
                self.db_errors += 1
                log.warning("sender %s: %s", self.server.server_ip, exc)
            await asyncio.sleep(self.poll_interval_s)

    async def run_once(self) -> int:
        """Claim and start executing one batch of rows; returns how many rows were claimed."""
        claiming = asyncio.get_running_loop().create_task(asyncio.to_thread(self._claim))
        self._claiming = claiming
        try:
            rows = await asyncio.shield(claiming)
        finally:
            if claiming.done():
                self._claiming = None
        for row in rows:
            self._execute(row)
        return len(rows)

    async def wait_idle(self) -> None:
        """Wait until every call started so far has been answered or has failed."""
        await self._calls.wait()

    # ------------------------------------------------------------------ database (worker thread)
    def _claim(self) -> list[dict[str, Any]]:
        if self._conn is None:
            self._conn = connect(self.database_url)
        try:
            with self._conn.cursor(pymysql.cursors.DictCursor) as cur:
                cur.execute(_SELECT, (self.server.server_ip, self.batch_size))
                rows: list[dict[str, Any]] = list(cur.fetchall())
                mine = [row for row in rows if cur.execute(_CLAIM, (row["man_id"],)) == 1]
        except pymysql.err.Error as exc:
            self._close()
            raise DatabaseError(f"command sender {self.server.server_ip}: {exc}") from None
        self.claimed += len(mine)
        return mine

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # ------------------------------------------------------------------ execution
    def _execute(self, row: dict[str, Any]) -> None:
        man_id = int(row["man_id"])
        action = str(row.get("action") or "").strip().lower()
        fields = parse_command_lines(row)
        self.executed_ids.append(man_id)
        if action == "originate":
            channel = fields.get("channel", "")
            tech, _, rest = channel.partition("/")
            dial, _, chan_ctx = rest.partition("@")
            if tech.lower() != "local" or not dial:
                log.warning(
                    "sender %s: row %s: unsupported channel %r",
                    self.server.server_ip,
                    man_id,
                    channel,
                )
                self.skipped += 1
                return
            self.originated += 1
            self._calls.spawn(
                self._originate(
                    dial,
                    context=fields.get("context") or chan_ctx or "default",
                    exten=fields.get("exten", "s"),
                    callerid=fields.get("callerid", ""),
                    action_id=str(row.get("callerid") or "") or None,
                ),
                name=f"sender-originate-{man_id}",
            )
        elif action == "hangup":
            target = self.server.find_channel(fields.get("channel", ""))
            if target is None:
                self.skipped += 1
                return
            self.hangups += 1
            self.server.engine.hangup(target.uniqueid, _cause(fields.get("cause", "")))
        else:
            self.skipped += 1  # Redirect, Command ...: nothing to model

    async def _originate(
        self, dial: str, *, context: str, exten: str, callerid: str, action_id: str | None
    ) -> None:
        uniqueid = await self.server.originate(
            dial, context=context, exten=exten, callerid=callerid, action_id=action_id
        )
        if uniqueid is None:
            self.failed += 1
        else:
            self.answered += 1


def _cause(text: str) -> int:
    return int(text) if text.strip().isdigit() else 16
