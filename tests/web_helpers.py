"""Live state written straight into a store, as the tracker would publish it (no AMI needed)."""

from __future__ import annotations

import time

from tracking_helpers import make_config

from balancer.daemon import Daemon
from balancer.db.url import DatabaseUrl
from balancer.store.base import Channel, ChannelClass, Health, ServerMeta, StateStore
from balancer.store.memory import MemoryStore

NO_DB = DatabaseUrl("127.0.0.1", 3306, "x", "x")


async def put_server(
    store: StateStore, ip: str, n: int, *, trunks: int = 0, health: Health = Health.UP
) -> None:
    """A server's meta and trunk channels, as the tracker would publish them."""
    await store.set_meta(
        ip,
        ServerMeta(
            server_id=f"ast{n}",
            address=f"127.0.0.1:{5000 + n}",
            health=health,
            last_event_at=time.time(),
            rtt_ms=0.4,
            max_trunks=60,
        ),
    )
    channels = [
        Channel(f"{n}.{i}", f"SIP/alpha-{i:08x}", ChannelClass.TRUNK, "alpha")
        for i in range(trunks)
    ]
    await store.replace_channels(ip, channels)


async def daemon_with(store: MemoryStore, servers: int = 2) -> Daemon:
    """A daemon that is not serving, over a store holding ``servers`` UP servers (n trunks
    on the n-th) and the daemon's heartbeat."""
    daemon = Daemon(make_config(NO_DB), store=store)
    await store.touch_daemon(daemon.name, 30)
    for n in range(1, servers + 1):
        await put_server(store, f"10.40.0.{n}", n, trunks=n)
    return daemon
