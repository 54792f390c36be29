"""AMI ingest benchmark: simulated servers blast Newchannel/Hangup events at the tracker.

The simulated servers run in a child process (so this process only ingests). Each server sends
``--events`` events (a Newchannel for every channel, a Hangup for most of them, in the shapes of
the recorded Asterisk 22 session), as fast as the sockets take them. This process runs the real
daemon pieces (AmiSession -> Tracker -> RedisStore) and measures:
  - events/s from the first event's arrival to the last event's count landing in Redis;
  - the delay from an event's arrival to its count in Redis (p50/p99), sampled every 50th event;
  - that the channel counts in Redis at the end equal the channels the blaster left alive.
Baseline in the same run: the same blast written one event per Redis call (no batching).
VICIdial's own updater polls channels every 0.4 s, so its view is 0-400 ms stale (200 ms mean).

Prints one JSON line per figure. Usage: python bench/ami_ingest.py [--servers 4] [--events 50000]
Only loopback is used: Redis from VB_BENCH_REDIS_URL (default redis://127.0.0.1:6379/14).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balancer.ami.endpoint import AmiEndpoint
from balancer.ami.session import AmiSession
from balancer.config import AmiConfig, HealthConfig
from balancer.live.tracker import Classifier, Tracker
from balancer.store.base import Channel, ServerMeta
from balancer.store.redis import RedisStore

SAMPLE_EVERY = 50
LIVE_PER_SERVER = 150  # channels left alive at the end of each server's blast


# --------------------------------------------------------------------------- child: the blaster


def _newchannel(name: str, uid: str, exten: str) -> bytes:
    return (
        "Event: Newchannel\r\nPrivilege: call,all\r\n"
        f"Channel: {name}\r\nChannelState: 0\r\nChannelStateDesc: Down\r\n"
        "CallerIDNum: <unknown>\r\nCallerIDName: <unknown>\r\nConnectedLineNum: <unknown>\r\n"
        "ConnectedLineName: <unknown>\r\nLanguage: en\r\nAccountCode: \r\n"
        f"Context: default\r\nExten: {exten}\r\nPriority: 1\r\n"
        f"Uniqueid: {uid}\r\nLinkedid: {uid}\r\n\r\n"
    ).encode()


def _hangup(name: str, uid: str) -> bytes:
    return (
        "Event: Hangup\r\nPrivilege: call,all\r\n"
        f"Channel: {name}\r\nChannelState: 6\r\nChannelStateDesc: Up\r\n"
        "CallerIDNum: 3125550000\r\nCallerIDName: <unknown>\r\nConnectedLineNum: <unknown>\r\n"
        "ConnectedLineName: <unknown>\r\nLanguage: en\r\nAccountCode: \r\n"
        f"Context: default\r\nExten: h\r\nPriority: 1\r\nUniqueid: {uid}\r\nLinkedid: {uid}\r\n"
        "Cause: 16\r\nCause-txt: Normal Clearing\r\n\r\n"
    ).encode()


def blast_stream(server_no: int, events: int) -> tuple[list[bytes], dict[str, str]]:
    """The event chunks for one server and the channels it leaves alive (uid -> name)."""
    chunks: list[bytes] = []
    live: dict[str, str] = {}
    order: list[str] = []
    buf: list[bytes] = []
    seq = 0
    sent = 0
    while sent < events:
        # Keep about LIVE_PER_SERVER channels up; hang up the oldest beyond that.
        if len(live) >= LIVE_PER_SERVER and (sent % 2 == 1 or events - sent <= len(live)):
            uid = order.pop(0)
            buf.append(_hangup(live.pop(uid), uid))
        else:
            uid = f"1795000000.{seq}"
            kind = seq % 4
            name = (
                f"SIP/alpha-{seq:08x}"
                if kind == 0
                else f"PJSIP/beta-{seq:08x}"
                if kind == 1
                else f"SIP/10{seq % 9}-{seq:08x}"
                if kind == 2
                else f"Local/9312555{seq % 10000:04d}@default-{seq:08x};1"
            )
            seq += 1
            live[uid] = name
            order.append(uid)
            buf.append(_newchannel(name, uid, "8368"))
        sent += 1
        if len(buf) >= 64:
            chunks.append(b"".join(buf))
            buf = []
    if buf:
        chunks.append(b"".join(buf))
    del server_no
    return chunks, live


async def child(servers: int, events: int, rate: float) -> None:
    """Run the simulated servers; blast when told 'go' on stdin; exit on EOF."""
    from balancer.sim.server import SimAsterisk

    sims = [SimAsterisk(f"10.10.0.{i + 1}") for i in range(servers)]
    for sim in sims:
        await sim.start()
    streams = [blast_stream(i, events) for i in range(servers)]
    print(json.dumps({"ports": [s.port for s in sims]}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.readline()  # "go"

    async def blast(sim: SimAsterisk, chunks: list[bytes]) -> None:
        # rate 0: as fast as the socket takes it; else paced to rate events/s over all servers
        per_chunk_s = 64 * servers / rate if rate > 0 else 0.0
        start = time.perf_counter()
        for n, chunk in enumerate(chunks):
            await sim.send_raw(chunk)
            if per_chunk_s:
                delay = start + (n + 1) * per_chunk_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)

    await asyncio.gather(*(blast(s, c) for s, (c, _) in zip(sims, streams, strict=True)))
    print(json.dumps({"sent": servers * events}), flush=True)
    await reader.read()  # until the parent closes stdin
    for sim in sims:
        await sim.stop()


# --------------------------------------------------------------------------- parent: the ingest


class TimedStore(RedisStore):
    """RedisStore that records when sampled channels' counts land, and can write unbatched."""

    def __init__(self, *args: object, unbatched: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.arrivals: dict[str, float] = {}
        self.delays: list[float] = []
        self.last_write = 0.0
        self.unbatched = unbatched

    async def apply(
        self,
        server_ip: str,
        adds: Iterable[Channel],
        removes: Iterable[str],
        last_event_at: float | None = None,
    ) -> None:
        adds, removes = list(adds), list(removes)
        if self.unbatched:
            for channel in adds:
                await super().apply(server_ip, [channel], [], last_event_at)
            for uid in removes:
                await super().apply(server_ip, [], [uid], last_event_at)
        else:
            await super().apply(server_ip, adds, removes, last_event_at)
        now = time.perf_counter()
        self.last_write = now
        for uid in [*(c.uniqueid for c in adds), *removes]:
            key = f"{server_ip}/{uid}"
            arrived = self.arrivals.pop(key, None)
            if arrived is not None:
                self.delays.append(now - arrived)


class TimedTracker(Tracker):
    """Tracker that stamps the arrival of every SAMPLE_EVERY-th event."""

    def __init__(self, store: TimedStore, *args: object, **kwargs: object) -> None:
        super().__init__(store, *args, **kwargs)  # type: ignore[arg-type]
        self.timed = store
        self.first_event = 0.0

    def on_event(self, server_ip: str, event: dict[str, str]) -> None:
        if self.events_total == 0:
            self.first_event = time.perf_counter()
        if self.events_total % SAMPLE_EVERY == 0 and event.get("Uniqueid"):
            self.timed.arrivals[f"{server_ip}/{event['Uniqueid']}"] = time.perf_counter()
        super().on_event(server_ip, event)


async def ingest(
    ports: list[int],
    events: int,
    redis_url: str,
    unbatched: bool,
    go: callable,  # type: ignore[valid-type]
) -> dict[str, object]:
    prefix = f"vbbench{os.getpid()}{'u' if unbatched else 'b'}:"
    store = TimedStore(redis_url, prefix, 60.0, unbatched=unbatched)
    classifier = Classifier({"alpha": "alpha", "beta": "beta"}, {})
    health = HealthConfig(heartbeat_interval_s=5.0)
    tracker = TimedTracker(store, health, classifier)
    ami = AmiConfig(max_message_bytes=65536)
    sessions = []
    for i, port in enumerate(ports):
        ip = f"10.10.0.{i + 1}"
        tracker.add_server(ip, ServerMeta(server_id=f"b{i}"))
        endpoint = AmiEndpoint(ip, "127.0.0.1", port, "cron", "1234")
        sessions.append(AmiSession(endpoint, ami, health, tracker))
    stop = asyncio.Event()
    flusher = asyncio.create_task(tracker.run_flusher(stop))
    for session in sessions:
        session.start()
    while not all(s.connected for s in sessions):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    await tracker.flush()
    expected = events * len(ports)
    go()
    deadline = time.monotonic() + 300
    while tracker.events_total < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    # Wait for the last batch to land.
    while any(t.pending for t in tracker.servers.values()):
        await asyncio.sleep(0.005)
    await tracker.flush()
    elapsed = store.last_write - tracker.first_event
    exact = True
    for i in range(len(ports)):
        state = await store.server(f"10.10.0.{i + 1}")
        if state is None or state.total != LIVE_PER_SERVER:
            exact = False
    stop.set()
    await flusher
    for session in sessions:
        await session.stop()
    for i in range(len(ports)):
        await store.forget_server(f"10.10.0.{i + 1}")
    await store.close()
    delays = sorted(store.delays)
    return {
        "events": tracker.events_total,
        "seconds": round(elapsed, 3),
        "events_per_s": round(tracker.events_total / elapsed) if elapsed > 0 else None,
        "delay_p50_ms": round(statistics.median(delays) * 1000, 2) if delays else None,
        "delay_p99_ms": round(delays[int(len(delays) * 0.99) - 1] * 1000, 2) if delays else None,
        "samples": len(delays),
        "exact_counts": exact,
    }


def run_once(
    servers: int, events: int, redis_url: str, unbatched: bool, rate: float = 0.0
) -> dict[str, object]:
    args = ["--servers", str(servers), "--events", str(events), "--rate", str(rate)]
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ports = json.loads(proc.stdout.readline())["ports"]

        def go() -> None:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

        return asyncio.run(ingest(ports, events, redis_url, unbatched, go))
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--events", type=int, default=50000, help="events per server")
    parser.add_argument("--baseline-events", type=int, default=5000, help="per server, unbatched")
    parser.add_argument("--rate", type=float, default=20000, help="offered events/s, latency run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.servers, args.events, args.rate))
        return
    redis_url = os.environ.get("VB_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    ours = run_once(args.servers, args.events, redis_url, unbatched=False)
    paced = run_once(args.servers, args.events, redis_url, unbatched=False, rate=args.rate)
    base = run_once(args.servers, args.baseline_events, redis_url, unbatched=True)
    common = {"bench": "ami_ingest", "servers": args.servers}
    print(json.dumps({**common, "figure": "ours, saturated (throughput)", **ours}))
    print(
        json.dumps({**common, "figure": f"ours, offered {args.rate:g} events/s (latency)", **paced})
    )
    print(json.dumps({**common, "figure": "baseline: unbatched, one Redis call per event", **base}))
    ratio = (ours["events_per_s"] or 0) / (base["events_per_s"] or 1)  # type: ignore[operator]
    print(
        json.dumps(
            {
                **common,
                "figure": "comparison",
                "throughput_ratio_vs_unbatched": round(ratio, 1),
                "goal_events_per_s": 20000,
                "goal_met": (ours["events_per_s"] or 0) >= 20000  # type: ignore[operator]
                and (paced["delay_p99_ms"] or 1e9) <= 50,  # type: ignore[operator]
                "vicidial_poll_staleness_ms": {"interval": 400, "mean": 200, "worst": 400},
                "our_staleness_ms": {"p50": paced["delay_p50_ms"], "p99": paced["delay_p99_ms"]},
            }
        )
    )


if __name__ == "__main__":
    main()
