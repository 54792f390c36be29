"""A bounded call generator for the simulated Asterisk (benchmarks, demo, end-to-end tests)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

from balancer.sim.server import SimAsterisk


@dataclass
class TrafficResult:
    """What one run of traffic placed."""

    attempted: int = 0
    answered: int = 0
    failed: int = 0
    agents: int = 0


async def run_traffic(
    server: SimAsterisk,
    *,
    calls_per_s: float,
    duration_s: float,
    prefixes: Sequence[str],
    hold_s: tuple[float, float],
    agent_peers: Sequence[str] = (),
    rng: random.Random | None = None,
) -> TrafficResult:
    """Originate ``calls_per_s`` calls for ``duration_s`` (at most calls_per_s * duration_s calls).

    Each call dials a random number behind one of ``prefixes`` and is held for a time drawn from
    ``hold_s``; every peer in ``agent_peers`` gets an agent phone channel for the whole run.
    Returns once every originate has been answered or has failed; calls then live on in the server.
    """
    if not prefixes:
        raise ValueError("run_traffic: at least one dial prefix is needed")
    low, high = hold_s
    if low < 0 or high < low:
        raise ValueError(
            f"run_traffic: hold_s must be (low, high) with 0 <= low <= high, got {hold_s}"
        )
    rng = rng or random.Random()
    result = TrafficResult()
    for peer in agent_peers:
        # agents stay logged in until the last call of the run could have ended
        server.add_agent_channel(peer, duration_s=duration_s + high)
        result.agents += 1
    total = int(calls_per_s * duration_s) if calls_per_s > 0 and duration_s > 0 else 0
    if total == 0:
        return result
    interval = 1.0 / calls_per_s

    async def one_call(number: str, hold: float) -> None:
        uniqueid = await server.originate(
            number, duration_s=hold, callerid=f'"traffic" <{number[-10:]}>'
        )
        if uniqueid is None:
            result.failed += 1
        else:
            result.answered += 1

    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.TaskGroup() as group:
        for i in range(total):
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if loop.time() - start > duration_s:
                break  # running late: the time bound wins over the count
            number = f"{rng.choice(prefixes)}312555{rng.randrange(10_000):04d}"
            result.attempted += 1
            group.create_task(one_call(number, rng.uniform(low, high)))
    return result
