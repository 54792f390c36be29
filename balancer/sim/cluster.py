"""Several simulated Asterisk servers side by side (``10.10.0.1``, ``10.10.0.2``, ...)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from balancer.config_values import is_loopback
from balancer.sim.model import SimCarrier
from balancer.sim.server import SimAsterisk


class SimCluster:
    """``count`` SimAsterisk servers: server i is 10.10.0.<i+1> on port base_port+i (or 0)."""

    def __init__(
        self,
        count: int,
        *,
        base_port: int = 0,
        host: str = "127.0.0.1",
        username: str = "cron",
        secret: str = "1234",
        carriers: Sequence[SimCarrier] | None = None,
        max_lines: int = 100,
        call_duration_s: float = 5.0,
        answer_delay_s: float = 0.02,
        legacy_command_output: bool = False,
    ) -> None:
        """Configure the servers; they share a boot time, so Uniqueids collide as in real ones."""
        if not 1 <= count <= 254:
            raise ValueError(f"a simulated cluster has 1 to 254 servers, not {count}")
        if base_port and not 1 <= base_port <= 65535 - count + 1:
            raise ValueError(f"base port {base_port} leaves no room for {count} servers")
        if not is_loopback(host):
            raise ValueError(f"simulated cluster: host {host!r} is not loopback")
        epoch = int(time.time())
        self.servers: list[SimAsterisk] = [
            SimAsterisk(
                f"10.10.0.{i + 1}",
                host=host,
                port=base_port + i if base_port else 0,
                username=username,
                secret=secret,
                carriers=carriers,  # each server copies them: faults stay per server
                max_lines=max_lines,
                call_duration_s=call_duration_s,
                answer_delay_s=answer_delay_s,
                legacy_command_output=legacy_command_output,
                start_epoch=epoch,
            )
            for i in range(count)
        ]

    def __getitem__(self, server_ip: str) -> SimAsterisk:
        """The server with this server_ip."""
        for server in self.servers:
            if server.server_ip == server_ip:
                return server
        raise KeyError(server_ip)

    async def start(self) -> None:
        """Start every server (stopping the ones already started if one fails)."""
        try:
            for server in self.servers:
                await server.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every server."""
        await asyncio.gather(*(server.stop() for server in self.servers))

    async def __aenter__(self) -> SimCluster:
        """Start on entry."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop on exit."""
        await self.stop()


async def serve_cluster(
    count: int,
    base_port: int,
    host: str = "127.0.0.1",
    print_fn: Callable[[str], object] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a simulated cluster until ``stop`` is set or cancelled; prints a line per server."""
    async with SimCluster(count, base_port=base_port, host=host) as cluster:
        for server in cluster.servers:
            print_fn(f"{server.server_ip} {server.address} (login {server.username}/****)")
        if stop is None:
            await asyncio.Event().wait()  # until cancelled
        else:
            await stop.wait()
