"""Real Kamailio and SIPp for the Kamailio tests and the benchmark: processes on loopback.

`KamailioProcess` runs /usr/sbin/kamailio with the shipped config/kamailio.cfg (its #!define
values overridden with -A), SIP on a UDP loopback port and JSON-RPC over HTTP on a TCP one.
`SippUas` is one Asterisk server's SIP side (a SIPp UAS answering INVITEs, and OPTIONS with -aa),
counting the INVITEs it received from its message trace. `run_uac` sends a bounded number of
INVITEs to Kamailio and waits for SIPp to finish by itself. Every process is started here and
ended here by its own pid; none outlives its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tracking_helpers import make_config, running, seed_phones, seed_server

from balancer.config import BalanceConfig, KamailioConfig, KamailioEndpoint, KamailioSet
from balancer.daemon import Daemon
from balancer.db.connection import connect
from balancer.db.url import DatabaseUrl
from balancer.sim.server import SimAsterisk

ROOT = Path(__file__).resolve().parents[1]
KAMAILIO_CFG = ROOT / "config" / "kamailio.cfg"
UAC_SCENARIO = ROOT / "tests" / "data" / "sipp" / "uac.xml"
HOW_TO_INSTALL = "install Kamailio and SIPp with `bash scripts/services` (or run `make test`)"


def kamailio_binary() -> str:
    """Path of kamailio; AssertionError (a failure, never a skip) when it is not installed."""
    found = shutil.which("kamailio") or (
        "/usr/sbin/kamailio" if os.path.exists("/usr/sbin/kamailio") else None
    )
    assert found, f"kamailio is not installed: {HOW_TO_INSTALL}"
    return found


def sipp_binary() -> str:
    found = shutil.which("sipp")
    assert found, f"sipp is not installed: {HOW_TO_INSTALL}"
    return found


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A loopback port nobody listens on right now (UDP by default)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rpc(url: str, method: str, *params: object, timeout_s: float = 2.0) -> Any:
    """One JSON-RPC call (the tests' own client, independent of the balancer's)."""
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1})
    request = urllib.request.Request(url, data=body.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        reply = json.loads(exc.read())
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


def dispatcher_list(url: str) -> dict[str, Any]:
    """dispatcher.list's result; Kamailio answers an empty list with a fault."""
    try:
        result: dict[str, Any] = rpc(url, "dispatcher.list")
    except RuntimeError as exc:
        if "no destination sets" in str(exc).lower():
            return {"RECORDS": []}
        raise
    return result


def flags_by_duid(url: str, set_id: int = 1) -> dict[str, str]:
    """duid -> FLAGS ("AP", "IX", "DX", ...) of one set, from dispatcher.list."""
    out: dict[str, str] = {}
    result = dispatcher_list(url)
    for record in result.get("RECORDS") or []:
        if record["SET"]["ID"] != set_id:
            continue
        for target in record["SET"]["TARGETS"]:
            dest = target["DEST"]
            out[str(dest["ATTRS"]["DUID"])] = str(dest["FLAGS"])
    return out


def weights_by_duid(url: str, set_id: int = 1, attr: str = "RWEIGHT") -> dict[str, int]:
    out: dict[str, int] = {}
    for record in dispatcher_list(url).get("RECORDS") or []:
        if record["SET"]["ID"] == set_id:
            for target in record["SET"]["TARGETS"]:
                dest = target["DEST"]
                out[str(dest["ATTRS"]["DUID"])] = int(dest["ATTRS"][attr])
    return out


@dataclass
class KamailioProcess:
    """One Kamailio on loopback running the shipped config."""

    workdir: Path
    defines: dict[str, str] = field(default_factory=dict)
    sip_port: int = field(default_factory=free_port)
    rpc_port: int = field(default_factory=lambda: free_port(socket.SOCK_STREAM))
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.rpc_port}/RPC"

    @property
    def list_file(self) -> Path:
        return self.workdir / "dispatcher.list"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"kamailio-{self.rpc_port}.log"

    def command(self) -> list[str]:
        values = {
            "SIP_LISTEN": f"udp:127.0.0.1:{self.sip_port}",
            "RPC_LISTEN": f"tcp:127.0.0.1:{self.rpc_port}",
            "RPC_PORT": str(self.rpc_port),
            "DS_LIST": f'"{self.list_file}"',
            "RELOAD_DELTA": "1",
            "CHILDREN": "2",
            **self.defines,
        }
        args = [kamailio_binary(), "-f", str(KAMAILIO_CFG), "-DD", "-E", "-m", "48", "-M", "4"]
        args += ["-Y", str(self.workdir), "-P", str(self.workdir / f"kamailio-{self.rpc_port}.pid")]
        for name, value in values.items():
            args += ["-A", f"{name}={value}"]
        return args

    def start(self, within_s: float = 15.0) -> None:
        """Start and wait until its RPC answers (an empty list file is created if missing)."""
        assert self.process is None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.list_file.exists():
            self.list_file.write_text("")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        self.starts += 1
        deadline = time.monotonic() + within_s
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise AssertionError(f"kamailio exited with {self.process.returncode}:\n{tail}")
            try:
                rpc(self.url, "core.uptime", timeout_s=0.5)
                return
            except (OSError, ValueError, RuntimeError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(
                        f"kamailio RPC did not answer within {within_s}s"
                    ) from None
                time.sleep(0.05)

    def stop(self, within_s: float = 10.0) -> None:
        """SIGTERM (Kamailio's main process ends its children), SIGKILL to its group if stuck."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(within_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        # Its children share the session it leads; make sure none lingers on our ports.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class SippUas:
    """One server's SIP side: a SIPp UAS on a loopback port that answers INVITEs (and OPTIONS)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    @property
    def trace(self) -> Path:
        return self.workdir / f"uas-{self.port}.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                sipp_binary(),
                "-sn",
                "uas",
                "-aa",
                "-i",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-nostdin",
                "-trace_msg",
                "-message_file",
                str(self.trace),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def invites(self) -> int:
        """Calls whose INVITE arrived so far, by Call-ID (a retransmission under load counts
        once); SIPp writes its message trace as it goes."""
        if not self.trace.exists():
            return 0
        calls: set[bytes] = set()
        in_invite = False
        with self.trace.open("rb") as handle:
            for line in handle:
                if line.startswith(b"INVITE sip:"):
                    in_invite = True
                elif in_invite and line.lower().startswith(b"call-id:"):
                    calls.add(line.split(b":", 1)[1].strip())
                    in_invite = False
        return len(calls)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def run_uac(
    kamailio: KamailioProcess, calls: int, rate: int = 200, workdir: Path | None = None
) -> str:
    """Send ``calls`` INVITEs to Kamailio at ``rate``/s and wait for SIPp to end by itself.

    Returns SIPp's summary. The tests count what the UASes received, so a call whose BYE got
    lost on a loaded machine (SIPp exits 1) is no failure here; SIPp failing to run (any other
    exit) or overrunning its deadline is.
    """
    out = (workdir or kamailio.workdir) / f"uac-{time.monotonic_ns()}.out"
    timeout_s = max(10, 5 * calls // max(1, rate) + 10)
    with out.open("wb") as handle:
        process = await asyncio.create_subprocess_exec(
            sipp_binary(),
            "-sf",
            str(UAC_SCENARIO),
            f"127.0.0.1:{kamailio.sip_port}",
            "-i",
            "127.0.0.1",
            "-p",
            str(free_port()),
            "-m",
            str(calls),
            "-r",
            str(rate),
            "-l",
            "200",
            "-timeout",
            f"{timeout_s}s",
            "-timeout_error",
            "-nostdin",
            "-max_non_invite_retrans",
            "20",
            stdout=handle,
            stderr=handle,
            stdin=subprocess.DEVNULL,
        )
        try:
            code = await asyncio.wait_for(process.wait(), timeout_s + 10)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"sipp uac did not end within {timeout_s + 10}s") from None
    summary = out.read_text(errors="replace")
    assert code in (0, 1), f"sipp uac exited {code}:\n{summary[-3000:]}"
    return summary


# --------------------------------------------------------------------------- a rig

DUIDS = ("ast1", "ast2", "ast3")
DEADLINE_S = 15.0  # only so a hung test ends: publishing takes well under a second


@dataclass
class Rig:
    sims: list[SimAsterisk]
    uases: list[SippUas]
    kam: KamailioProcess
    daemon: Daemon
    workdir: Path

    def counts(self) -> list[int]:
        return [uas.invites() for uas in self.uases]


def kamailio_config(
    kam: KamailioProcess, uases: Sequence[SippUas], sims: Sequence[SimAsterisk], **changes: object
) -> KamailioConfig:
    config = KamailioConfig(
        endpoints=(KamailioEndpoint("kam1", kam.url, str(kam.list_file)),),
        sets=(KamailioSet(1, "trunks"),),
        uris={sim.server_ip: uas.uri for sim, uas in zip(sims, uases, strict=True)},
        poll_interval_s=0.1,
        verify_interval_s=0.5,
        rpc_timeout_s=1.0,
        retry_initial_s=0.1,
        retry_max_s=0.5,
        max_reloads_per_minute=30,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def rig(
    database_url: DatabaseUrl,
    sim_factory: object,
    tmp_path: Path,
    *,
    max_trunks: Sequence[int] = (30, 30, 30),
    extra_endpoints: Sequence[KamailioEndpoint] = (),
    balance: bool = False,
    redis_url: str = "memory://",
    kamailio_defines: dict[str, str] | None = None,
    config_changes: dict[str, Any] | None = None,
    start: bool = True,
    **kamailio_changes: object,
) -> AsyncIterator[Rig]:
    """Three servers (AMI: simulated, SIP: a SIPp UAS each; phones 101-105 on every one), a
    Kamailio with the shipped config, and a daemon publishing to it (running for the block's
    duration unless ``start`` is false), for the block's duration."""
    sims = [await sim_factory(f"10.10.0.{i + 1}") for i in range(3)]  # type: ignore[operator]
    conn = connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("DELETE FROM servers")
            cur.execute("DELETE FROM phones")
        for sim, trunks in zip(sims, max_trunks, strict=True):
            seed_server(conn, sim, max_trunks=trunks)
            seed_phones(conn, sim.server_ip, [str(ext) for ext in range(101, 106)])
    finally:
        conn.close()
    uases = [SippUas(tmp_path) for _ in sims]
    kam = KamailioProcess(tmp_path, defines=dict(kamailio_defines or {}))
    try:
        for uas in uases:
            uas.start()
        kam.start()
        kconf = kamailio_config(kam, uases, sims, **kamailio_changes)
        kconf = replace(kconf, endpoints=kconf.endpoints + tuple(extra_endpoints))
        config = make_config(database_url, redis_url, kamailio=kconf, **(config_changes or {}))
        if balance:
            config = replace(config, balance=BalanceConfig(enabled=True, cycle_interval_s=0.2))
        daemon = Daemon(config)
        if not start:  # the test runs the daemon itself
            yield Rig(sims, uases, kam, daemon, tmp_path)
            return
        async with running(daemon):
            yield Rig(sims, uases, kam, daemon, tmp_path)
    finally:
        kam.stop()
        for uas in uases:
            uas.stop()


async def until(check: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> float:
    """Poll ``check()`` (sync, may raise while Kamailio restarts) until true; seconds taken."""
    start = time.monotonic()
    last: object = None
    while True:
        try:
            if check():
                return time.monotonic() - start
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            last = exc
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s (last error {last})")
        await asyncio.sleep(0.02)


def flags_are(kam: KamailioProcess, **expected: str) -> bool:
    flags = flags_by_duid(kam.url)
    return all(flags.get(duid) == value for duid, value in expected.items())


async def settled(r: Rig, weights: dict[str, int] | None = None) -> None:
    await until(lambda: flags_are(r.kam, ast1="AP", ast2="AP", ast3="AP"), "all active")
    if weights is not None:
        await until(lambda: weights_by_duid(r.kam.url) == weights, f"weights {weights}")
