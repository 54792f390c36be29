"""Tracker without sockets: classification, batching order, snapshot replay (memory store)."""

from __future__ import annotations

import asyncio

from balancer.config import HealthConfig
from balancer.live.tracker import Classifier, Tracker
from balancer.store.base import ChannelClass, Health, ServerMeta
from balancer.store.memory import MemoryStore

IP = "10.10.0.1"


def classifier() -> Classifier:
    return Classifier({"alpha": "alpha", "beta-trunk": "beta"}, {IP: {"101", "cc100"}})


def test_classify() -> None:
    c = classifier()
    assert c.classify(IP, "SIP/alpha-0000001a") == (ChannelClass.TRUNK, "alpha")
    assert c.classify(IP, "PJSIP/beta-trunk-00000001") == (ChannelClass.TRUNK, "beta")
    assert c.classify(IP, "SIP/101-00000002") == (ChannelClass.AGENT, None)
    assert c.classify("10.10.0.2", "SIP/101-00000002") == (ChannelClass.OTHER, None)
    assert c.classify(IP, "Local/8368@default-00000000;1") == (ChannelClass.LOCAL, None)
    assert c.classify(IP, "DAHDI/1-1") == (ChannelClass.OTHER, None)
    assert c.classify(IP, "garbage") == (ChannelClass.OTHER, None)


def new(uid: str, channel: str) -> dict[str, str]:
    return {"Event": "Newchannel", "Uniqueid": uid, "Channel": channel}


def hangup(uid: str) -> dict[str, str]:
    return {"Event": "Hangup", "Uniqueid": uid, "Cause": "16"}


async def make() -> tuple[Tracker, MemoryStore]:
    store = MemoryStore()
    tracker = Tracker(store, HealthConfig(), classifier())
    tracker.add_server(IP, ServerMeta(server_id="ast1", max_trunks=23))
    return tracker, store


async def test_events_batch_in_order() -> None:
    tracker, store = await make()
    tracker.on_event(IP, new("1.1", "SIP/alpha-00000001"))
    tracker.on_event(IP, new("1.2", "SIP/alpha-00000002"))
    tracker.on_event(IP, hangup("1.1"))
    tracker.on_event(IP, new("1.1", "SIP/101-00000003"))  # uniqueid reused after hangup
    tracker.on_event(IP, {"Event": "Rename", "Uniqueid": "1.2", "Newname": "SIP/101-00000009"})
    tracker.on_event(IP, {"Event": "VarSet", "Uniqueid": "1.2"})  # ignored
    tracker.on_event(IP, {"Event": "Newchannel"})  # malformed: ignored
    await tracker.flush()
    state = await store.server(IP)
    assert state is not None
    assert state.count(ChannelClass.TRUNK) == 0
    assert state.count(ChannelClass.AGENT) == 2
    assert set(await store.channels(IP)) == {"1.1", "1.2"}


async def test_snapshot_replaces_and_replays_events_seen_during_it() -> None:
    tracker, store = await make()
    tracker.on_event(IP, new("9.9", "SIP/alpha-00000009"))  # will be missing from the snapshot
    await tracker.flush()
    tracker.request_snapshot(IP)
    assert await asyncio.wait_for(tracker.next_snapshot_request(), 1) == IP
    tracker.on_event(IP, new("2.1", "SIP/alpha-00000021"))  # born during the snapshot
    await tracker.apply_snapshot(
        IP, [{"Event": "CoreShowChannel", "Uniqueid": "1.5", "Channel": "SIP/alpha-00000015"}]
    )
    await tracker.flush()
    assert set(await store.channels(IP)) == {"1.5", "2.1"}


async def test_health_changes_publish_meta() -> None:
    tracker, store = await make()
    tracker.on_health(IP, Health.UP, "logged in")
    tracker.on_rtt(IP, 1.234)
    await tracker.flush()
    state = await store.server(IP)
    assert state is not None and state.meta.health is Health.UP
    assert state.meta.rtt_ms == 1.23
    assert state.meta.connected_since is not None
    tracker.set_updater_age(IP, 1000.0)
    await tracker.flush()
    state = await store.server(IP)
    assert state is not None and state.meta.health is Health.DOWN
    assert "server_updater" in state.meta.health_reason


async def test_listener_ignores_unknown_server() -> None:
    tracker, _ = await make()
    tracker.on_event("10.9.9.9", new("1", "SIP/alpha-1"))
    tracker.on_health("10.9.9.9", Health.UP, "x")
    await tracker.flush()
