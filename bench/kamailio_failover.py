"""Failover benchmark: a server's failure to Kamailio's state change, balancer vs OPTIONS probing.

One run, one cluster of ``--servers`` simulated servers (AMI: the simulated Asterisk; SIP: a
SIPp UAS each) in front of two real Kamailios running the shipped config/kamailio.cfg:
  - "balancer": published to by a vici-balancer daemon (its shipped probing settings on too);
  - "seed probing": not managed, with the seed article's dispatcher settings exactly
    (ds_probing_mode 1, ds_ping_interval 15, ds_probing_threshold 3, its ds_ping_reply_codes
    string, tm fr_timer 5000) and a static dispatcher.list of the same destinations.
The same failures hit both, at random moments spread over one probing interval (so the seed's
probe phase varies): "box dead" kills a server's AMI and its SIP side at once (both Kamailios can
see it); "VICIdial dead" kills only the AMI, the SIP side keeps answering OPTIONS (the seed's
blind spot). Each Kamailio is polled over RPC every 20 ms; the figure is the time from the kill
to the destination leaving the active state (I, or D) there; p50/p99 nearest rank. Failures the
seed's probing never sees within ``--window`` seconds are counted as missed.

Prints one JSON line per (path, case). Usage:
  python bench/kamailio_failover.py [--servers 16] [--blind 4] [--window 75] [--seed 1]
Only loopback is used: MariaDB from VB_BENCH_DATABASE_URL (default
mysql://vbtest:vbtest@127.0.0.1:3306/vb_bench_kamailio, created and dropped), Kamailio and SIPp
on loopback ports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("VICI_BALANCER_LOOPBACK_ONLY", "1")

from kamailio_helpers import KamailioProcess, SippUas, flags_by_duid  # noqa: E402
from scratch import bench_database_url, scratch_databases  # noqa: E402
from tracking_helpers import FAST_AMI, make_config, running, seed_server  # noqa: E402

from balancer.config import (  # noqa: E402
    HealthConfig,
    KamailioConfig,
    KamailioEndpoint,
    KamailioSet,
)
from balancer.daemon import Daemon  # noqa: E402
from balancer.db.connection import connect  # noqa: E402
from balancer.db.url import DatabaseUrl  # noqa: E402
from balancer.sim.server import SimAsterisk  # noqa: E402

DEFAULT_URL = "mysql://vbtest:vbtest@127.0.0.1:3306/vb_bench_kamailio"
SEED_SETTINGS = {
    "DS_PROBING_MODE": "1",
    "DS_PING_INTERVAL": "15",
    "DS_PROBING_THRESHOLD": "3",
    "DS_INACTIVE_THRESHOLD": "1",
    "DS_REPLY_CODES": '"class2;class3;class4"',  # as the seed writes it (Kamailio parses 0 codes)
    "FR_TIMER": "5000",
}


def nearest_rank(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def figure(
    path: str, case: str, times: list[float], failures: int, window: float
) -> dict[str, object]:
    out: dict[str, object] = {
        "bench": "kamailio_failover",
        "path": path,
        "case": case,
        "failures": failures,
        "detected": len(times),
        "missed_within_s": None if len(times) == failures else window,
    }
    if times:
        out.update(
            p50_ms=round(nearest_rank(times, 50) * 1000, 1),
            p99_ms=round(nearest_rank(times, 99) * 1000, 1),
            max_ms=round(max(times) * 1000, 1),
        )
    return out


async def watch(
    kam: KamailioProcess,
    killed: dict[str, float],
    found: dict[str, float],
    expected: int,
    until: float,
) -> None:
    """Poll one Kamailio; record when each killed destination first leaves the active state."""
    while time.monotonic() < until and not (len(killed) == expected == len(found)):
        try:
            flags = await asyncio.to_thread(flags_by_duid, kam.url)
        except (OSError, RuntimeError, ValueError):
            flags = {}
        now = time.monotonic()
        for duid, at in list(killed.items()):
            if duid not in found and flags.get(duid, "A")[:1] in ("I", "D"):
                found[duid] = now - at
        await asyncio.sleep(0.02)


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    url = bench_database_url(DEFAULT_URL)
    with scratch_databases("bench/kamailio_failover.py", url):
        return await _run(args, url)


async def _run(args: argparse.Namespace, url: DatabaseUrl) -> list[dict[str, object]]:
    workdir = Path(tempfile.mkdtemp(prefix="vb-bench-kamailio-"))
    total = args.servers + args.blind
    sims: list[SimAsterisk] = []
    uases: list[SippUas] = []
    balanced = KamailioProcess(workdir / "balancer")
    seed = KamailioProcess(workdir / "seed", defines=SEED_SETTINGS)
    rng = random.Random(args.seed)
    try:
        conn = connect(url)
        for i in range(total):
            sim = SimAsterisk(f"10.10.{i // 200}.{i % 200 + 1}", host="127.0.0.1", port=0)
            await sim.start()
            sims.append(sim)
            seed_server(conn, sim, server_id=f"ast{i + 1}", max_trunks=30)
            uas = SippUas(workdir)
            uas.start()
            uases.append(uas)
        conn.close()
        seed.workdir.mkdir(parents=True)
        seed.list_file.write_text(
            "".join(f"1 {u.uri} 0 0 duid=ast{i + 1};rweight=10\n" for i, u in enumerate(uases))
        )
        balanced.start()
        seed.start()
        kconf = KamailioConfig(
            endpoints=(KamailioEndpoint("kam", balanced.url, str(balanced.list_file)),),
            sets=(KamailioSet(1, "trunks"),),
            uris={sim.server_ip: uas.uri for sim, uas in zip(sims, uases, strict=True)},
            max_reloads_per_minute=30,
        )
        # The shipped defaults for health and publishing; AMI addresses from telnet_host.
        ami = replace(FAST_AMI, registry_refresh_s=10.0)
        config = make_config(url, ami=ami, health=HealthConfig(), kamailio=kconf)
        async with running(Daemon(config)):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                flags = await asyncio.to_thread(flags_by_duid, balanced.url)
                seed_flags = await asyncio.to_thread(flags_by_duid, seed.url)
                if (
                    len(flags) == total
                    and all(f == "AP" for f in flags.values())
                    and all(f[:1] == "A" for f in seed_flags.values())
                    and len(seed_flags) == total
                ):
                    break
                await asyncio.sleep(0.1)
            else:
                raise SystemExit("the cluster did not come up in both Kamailios within 30 s")
            await asyncio.sleep(rng.uniform(0, 15))  # no alignment with the seed's probe timer
            killed: dict[str, float] = {}
            order = list(range(total))
            rng.shuffle(order)
            offsets = sorted(rng.uniform(0, 15) for _ in order)
            found_bal: dict[str, float] = {}
            found_seed: dict[str, float] = {}
            start = time.monotonic()
            until = start + 15 + args.window
            watchers = [
                asyncio.create_task(watch(balanced, killed, found_bal, total, until)),
                asyncio.create_task(watch(seed, killed, found_seed, total, until)),
            ]
            for index, offset in zip(order, offsets, strict=True):
                await asyncio.sleep(max(0.0, start + offset - time.monotonic()))
                duid = f"ast{index + 1}"
                killed[duid] = time.monotonic()
                await sims[index].stop()
                if index < args.servers:
                    uases[index].stop()  # the whole box: SIP side gone too
            await asyncio.gather(*watchers)
        box = [f"ast{i + 1}" for i in range(args.servers)]
        blind = [f"ast{i + 1}" for i in range(args.servers, total)]
        results = []
        for path, found in (("balancer", found_bal), ("seed probing", found_seed)):
            for case, duids in (("box dead", box), ("VICIdial dead, SIP answers", blind)):
                if duids:
                    times = [found[d] for d in duids if d in found]
                    results.append(figure(path, case, times, len(duids), args.window))
        return results
    finally:
        balanced.stop()
        seed.stop()
        for uas in uases:
            uas.stop()
        for sim in sims:
            await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=16, help="whole boxes that die")
    parser.add_argument("--blind", type=int, default=4, help="servers whose VICIdial only dies")
    parser.add_argument("--window", type=float, default=75.0, help="seconds to wait after kills")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the killed servers' reconnect warnings are noise
    for result in asyncio.run(run(args)):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
