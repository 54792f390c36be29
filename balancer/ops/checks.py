"""`vici-balancer check`: is this host ready to run the balancer? Database, state store, every AMI,
every Kamailio RPC endpoint.

Each check is an async function returning CheckResult(name, ok, detail); `run_checks` runs them
all (MySQL and Redis side by side, then every server's AMI login at once) and returns them in a
fixed order. Blocking MySQL work runs in a worker thread. Nothing here writes anything, and no
message ever holds a password or AMI secret: database URLs are printed masked, Redis errors come
already scrubbed from the store, and AMI failures quote only what the server answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass

import pymysql

from balancer.ami.codec import Message, MessageReader, encode
from balancer.ami.endpoint import AmiEndpoint
from balancer.ami.session import LOOPBACK_ONLY_ENV
from balancer.config import AmiConfig, Config
from balancer.config_values import is_loopback
from balancer.db import queries, records, schema
from balancer.db.connection import connect
from balancer.db.engines import FENCE_TABLE, LOCKING_ENGINES, WritePath, write_path
from balancer.db.fence import LeaseRow
from balancer.db.fence import read as read_lease
from balancer.db.url import DatabaseUrl
from balancer.errors import AmiProtocolError, BalancerError, KamailioError
from balancer.kamailio.model import parse_list
from balancer.kamailio.rpc import KamailioRpc
from balancer.kamailio.settings import KamailioConfig, KamailioEndpoint
from balancer.live.registry import RowProblem, resolve
from balancer.store.factory import open_store

STORE_TIMEOUT_S = 5.0
AMI_PARALLEL = 20  # logins at once; a big cluster is still checked in a few seconds


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict; ``detail`` names what was checked and, on failure, why it failed."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        """'ok   mysql  mysql://cron:***@127.0.0.1:3306/asterisk (schema ok)'."""
        return f"{'ok' if self.ok else 'FAIL':<4} {self.name:<6} {self.detail}"


# --------------------------------------------------------------------------- config


def check_config(config: Config) -> CheckResult:
    """The configuration loaded and validated (the CLI exits 2 before this when it did not)."""
    where = config.path or "built-in defaults (no config file)"
    store = "memory://" if config.redis.is_memory else "redis"
    http = config.http
    metrics = f"http on {http.listen}" if http.listen else "no http server"
    if http.listen and http.token:
        metrics += f" (token from {http.token_source})"
    return CheckResult(
        "config",
        True,
        f"{where} (database from {config.database.source}, state store {store}, "
        f"{len(config.carriers)} carriers, {metrics})",
    )


# --------------------------------------------------------------------------- MySQL


@dataclass(frozen=True)
class _MysqlOutcome:
    problems: list[schema.SchemaProblem]
    servers: list[records.ServerRow] | None
    error: str | None
    path: WritePath | None = None
    lease: LeaseRow | None = None


def _mysql_work(url: DatabaseUrl, timeout_s: float) -> _MysqlOutcome:
    """Connect, compare the schema with sql/, read the engines, the lease and the servers
    table (on a worker thread)."""
    conn = connect(url, timeout_s)
    try:
        problems = schema.check(conn)
        try:
            servers: list[records.ServerRow] | None = queries.load_servers(conn)
            path: WritePath | None = write_path(conn)
            lease: LeaseRow | None = read_lease(conn)
            error = None
        except pymysql.MySQLError as exc:
            servers, path, lease = None, None, None
            error = f"cannot read the servers table ({exc.args[-1] if exc.args else exc})"
        return _MysqlOutcome(problems, servers, error, path, lease)
    finally:
        conn.close()


def _engines_line(path: WritePath) -> str:
    """'write path: ...; engines: MEMORY (vicidial_hopper, ...), MyISAM (...)'."""
    by_engine: dict[str, list[str]] = {}
    for table, engine in sorted(path.engines.items()):
        by_engine.setdefault(engine or "missing", []).append(table)
    engines = "; ".join(f"{e}: {', '.join(t)}" for e, t in sorted(by_engine.items()))
    return f"write path: {path.description}; engines: {engines}"


def _lease_line(lease: LeaseRow | None) -> str:
    if lease is None or not lease.holder or lease.remaining_s <= 0:
        epoch = f" (last epoch {lease.epoch})" if lease is not None else ""
        return f"no leader{epoch}"
    return f"leader {lease.holder.split('/')[0]} (epoch {lease.epoch})"


async def check_mysql(config: Config) -> tuple[CheckResult, list[records.ServerRow] | None]:
    """Connect and run schema.check; the result and, when readable, the servers rows."""
    url = config.database.url
    try:
        outcome = await asyncio.to_thread(_mysql_work, url, config.database.connect_timeout_s)
    except BalancerError as exc:
        return CheckResult("mysql", False, str(exc)), None
    except pymysql.MySQLError as exc:
        reason = exc.args[-1] if exc.args else exc
        return CheckResult("mysql", False, f"{url}: {reason}"), None
    if outcome.problems:
        missing = "; ".join(problem.message for problem in outcome.problems)
        hint = ""
        if any(problem.column is None for problem in outcome.problems):
            hint = " (`vici-balancer schema install` creates missing tables)"
        detail = f"{url}: {len(outcome.problems)} schema problem(s): {missing}{hint}"
        return CheckResult("mysql", False, detail), outcome.servers
    if outcome.error is not None or outcome.path is None:
        return CheckResult("mysql", False, f"{url}: {outcome.error}"), None
    engines = _engines_line(outcome.path)
    fence_engine = outcome.path.engines.get(FENCE_TABLE, "")
    if fence_engine not in LOCKING_ENGINES:
        detail = (
            f"{url}: {FENCE_TABLE} is {fence_engine or 'missing'}: the leader fence needs a"
            f" table-locking engine ({', '.join(sorted(LOCKING_ENGINES))}) so that a takeover"
            f" can never fall inside a fenced write; {engines}"
        )
        return CheckResult("mysql", False, detail), outcome.servers
    detail = f"{url} (schema ok; {_lease_line(outcome.lease)}; {engines})"
    return CheckResult("mysql", True, detail), outcome.servers


# --------------------------------------------------------------------------- Redis


async def check_redis(config: Config) -> CheckResult:
    """Reach the state store with a cheap read; memory:// needs nothing."""
    if config.redis.is_memory:
        return CheckResult(
            "redis", True, "memory:// (in-process store: one daemon; `status` cannot see it)"
        )
    try:
        store = open_store(config.redis)
    except BalancerError as exc:
        return CheckResult("redis", False, str(exc))
    where = getattr(store, "where", "redis")
    try:
        daemons = await asyncio.wait_for(store.daemons(), STORE_TIMEOUT_S)
    except BalancerError as exc:
        return CheckResult("redis", False, str(exc))
    except TimeoutError:
        return CheckResult(
            "redis", False, f"Redis at {where}: no answer within {STORE_TIMEOUT_S:g}s"
        )
    finally:
        await store.close()
    running = f"{len(daemons)} daemon{'' if len(daemons) == 1 else 's'} alive"
    return CheckResult(
        "redis", True, f"{where} (key prefix {config.redis.key_prefix!r}; {running})"
    )


# --------------------------------------------------------------------------- AMI


class _Refused(Exception):
    """The server answered an action with an error."""


class _AmiClient:
    """Just enough AMI for a login check: request/response by ActionID, EventList reading."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_bytes: int
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = MessageReader(max_message_bytes=max_bytes)
        self.pending: list[Message] = []
        self._ids = itertools.count(1)

    async def _next(self) -> Message:
        while not self.pending:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.pending.extend(self.parser.feed(data))
        return self.pending.pop(0)

    async def banner(self) -> str:
        while self.parser.banner is None:
            data = await self.reader.read(4096)
            if not data:
                raise ConnectionError("the server closed the connection before its banner")
            self.pending.extend(self.parser.feed(data))
        return self.parser.banner

    async def send(self, action: Mapping[str, str]) -> str:
        action_id = f"vbcheck-{next(self._ids)}"
        self.writer.write(encode({**action, "ActionID": action_id}))
        await self.writer.drain()
        return action_id

    async def request(self, action: Mapping[str, str]) -> Message:
        """Send and return the response carrying our ActionID (events in between are skipped)."""
        action_id = await self.send(action)
        while True:
            message = await self._next()
            if message.get("ActionID") == action_id and "Response" in message:
                return message

    async def list_request(self, action: Mapping[str, str]) -> list[Message]:
        """Send an EventList action; its items (_Refused when the server answers Error)."""
        action_id = await self.send(action)
        items: list[Message] = []
        while True:
            message = await self._next()
            if message.get("ActionID") != action_id:
                continue
            if "Response" in message:
                if message["Response"] != "Success":
                    raise _Refused(message.get("Message", "error"))
                if message.get("EventList", "").lower() != "start":
                    return items  # an answer without a list
                continue
            if message.get("EventList", "").lower() == "complete":
                return items
            items.append(message)


async def check_ami_login(endpoint: AmiEndpoint, ami: AmiConfig) -> CheckResult:
    """Log in with the balancer's credentials, list channels (the action tracking needs), log off.

    Bounded by ami.connect_timeout_s for the connection and ami.action_timeout_s per answer.
    """
    target = f"{endpoint.server_ip}  {endpoint.address}"

    def failed(reason: str) -> CheckResult:
        return CheckResult("ami", False, f"{target}: {reason}")

    if os.environ.get(LOOPBACK_ONLY_ENV) and not is_loopback(endpoint.host):
        return failed(f"refusing to connect to non-loopback {endpoint.host} ({LOOPBACK_ONLY_ENV})")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port), ami.connect_timeout_s
        )
    except TimeoutError:
        return failed(f"connect timed out after {ami.connect_timeout_s:g}s")
    except OSError as exc:
        # asyncio's strerror is "Connect call failed (host, port)"; the errno says why.
        return failed(f"cannot connect: {os.strerror(exc.errno) if exc.errno else exc}")
    client = _AmiClient(reader, writer, ami.max_message_bytes)
    timeout = ami.action_timeout_s
    step = "the banner"
    try:
        banner = await asyncio.wait_for(client.banner(), timeout)
        step = "Login"
        reply = await asyncio.wait_for(
            client.request(
                {
                    "Action": "Login",
                    "Username": endpoint.username,
                    "Secret": endpoint.secret,
                    "Events": "off",
                }
            ),
            timeout,
        )
        if reply.get("Response") != "Success":
            return failed(f"login rejected: {reply.get('Message', 'no message')}")
        step = "CoreShowChannels"
        try:
            channels = await asyncio.wait_for(
                client.list_request({"Action": "CoreShowChannels"}), timeout
            )
        except _Refused as exc:
            return failed(
                f"logged in, but CoreShowChannels was refused: {exc} "
                "(the AMI user needs write=reporting or system; see config/manager.conf.example)"
            )
        step = "Logoff"
        with contextlib.suppress(TimeoutError, ConnectionError, AmiProtocolError):
            await asyncio.wait_for(client.request({"Action": "Logoff"}), min(timeout, 1.0))
    except TimeoutError:
        return failed(f"no answer to {step} within {timeout:g}s")
    except AmiProtocolError as exc:
        return failed(str(exc))
    except (ConnectionError, OSError) as exc:
        return failed(f"connection lost during {step}: {exc}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    version = banner.removeprefix("Asterisk Call Manager/")
    count = f"{len(channels)} channel{'' if len(channels) == 1 else 's'}"
    return CheckResult("ami", True, f"{target} (logged in, AMI {version}, {count})")


async def check_ami(config: Config, rows: list[records.ServerRow] | None) -> list[CheckResult]:
    """One result per active Asterisk server (addresses resolved as the registry does)."""
    if rows is None:
        return [CheckResult("ami", False, "skipped: the servers table could not be read")]
    active = [r for r in rows if r.active == "Y" and r.active_asterisk_server == "Y"]
    if not active:
        return [
            CheckResult(
                "ami",
                False,
                "no servers rows with active='Y' and active_asterisk_server='Y'",
            )
        ]
    limit = asyncio.Semaphore(AMI_PARALLEL)

    async def one(row: records.ServerRow) -> CheckResult:
        resolved = resolve(row, config.ami)
        if isinstance(resolved, RowProblem):
            return CheckResult(
                "ami", False, f"{resolved.server}: servers.{resolved.field} {resolved.message}"
            )
        async with limit:
            return await check_ami_login(resolved.endpoint, config.ami)

    return list(await asyncio.gather(*(one(row) for row in active)))


# --------------------------------------------------------------------------- Kamailio


def _kamailio_probe(endpoint: KamailioEndpoint, config: KamailioConfig) -> CheckResult:
    """The endpoint answers dispatcher.list, and the list file can be written (worker thread)."""
    target = f"{endpoint.name}  {endpoint.url}"
    rpc = KamailioRpc(endpoint.url, config.rpc_timeout_s)
    try:
        version = rpc.call("core.version")
        listed = parse_list(rpc.list())
    except (KamailioError, ValueError) as exc:
        return CheckResult("kamailio", False, f"{target}: {exc}")
    folder = os.path.dirname(endpoint.list_file) or "."
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return CheckResult(
            "kamailio",
            False,
            f"{target}: reachable, but the balancer cannot write {endpoint.list_file} "
            f"(kamailio.endpoints.list_file; the folder must exist and be writable)",
        )
    sets = {key[0] for key in listed}
    managed = sorted(s.id for s in config.sets)
    missing = [str(s) for s in managed if s not in sets]
    loaded = f"{len(listed)} destination{'' if len(listed) == 1 else 's'} in {len(sets)} set(s)"
    note = f"; set(s) {', '.join(missing)} not loaded yet" if missing else ""
    return CheckResult(
        "kamailio", True, f"{target} ({str(version).strip()}, {loaded}{note}; list_file writable)"
    )


async def check_kamailio(config: Config) -> list[CheckResult]:
    """One result per [kamailio] endpoint (none without the section), all probed at once."""
    kamailio = config.kamailio
    if kamailio is None:
        return []
    return list(
        await asyncio.gather(
            *(asyncio.to_thread(_kamailio_probe, e, kamailio) for e in kamailio.endpoints)
        )
    )


# --------------------------------------------------------------------------- all


async def run_checks(config: Config) -> list[CheckResult]:
    """Every check, in the order printed: config, mysql, redis, ami per server, kamailio."""
    (mysql, rows), redis, kamailio = await asyncio.gather(
        check_mysql(config), check_redis(config), check_kamailio(config)
    )
    return [check_config(config), mysql, redis, *await check_ami(config, rows), *kamailio]
