"""One contract for both state stores (in process and Redis), plus Redis-only behaviour."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.config import RedisConfig
from balancer.errors import StoreError
from balancer.store.base import Channel, ChannelClass, Health, ServerMeta, StateStore
from balancer.store.factory import open_store
from balancer.store.keys import Keys
from balancer.store.memory import MemoryStore
from balancer.store.redis import RedisStore, decode_channel, encode_channel

IP = "10.0.0.11"
IP2 = "10.0.0.12"

MakeStore = Callable[..., StateStore]


def trunk(uid: str, carrier: str | None = "c1") -> Channel:
    return Channel(uid, f"SIP/{carrier}-{uid}", ChannelClass.TRUNK, carrier)


def agent(uid: str) -> Channel:
    return Channel(uid, f"SIP/agent{uid}-0001", ChannelClass.AGENT)


def local(uid: str) -> Channel:
    return Channel(uid, f"Local/8600051@default-{uid};1", ChannelClass.LOCAL)


def tally(channels: Iterable[Channel]) -> tuple[dict[ChannelClass, int], dict[str, int]]:
    """Counts by class and by carrier, computed from scratch (what the store must agree with)."""
    counts: dict[ChannelClass, int] = {}
    carriers: dict[str, int] = {}
    for ch in channels:
        counts[ch.cls] = counts.get(ch.cls, 0) + 1
        if ch.carrier:
            carriers[ch.carrier] = carriers.get(ch.carrier, 0) + 1
    return counts, carriers


async def assert_consistent(store: StateStore, server_ip: str) -> dict[str, Channel]:
    """The server's counts match its channel set; returns the channels."""
    channels = await store.channels(server_ip)
    state = await store.server(server_ip)
    assert state is not None
    assert (state.counts, state.carriers) == tally(channels.values())
    return channels


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def make_store(request: pytest.FixtureRequest, backend: str) -> AsyncIterator[MakeStore]:
    """Opens stores of the backend under test; for Redis, a fresh prefix in the flushed test DB."""
    url = request.getfixturevalue("redis_db") if backend == "redis" else "memory://"
    prefix = f"vbt-{uuid.uuid4().hex[:8]}:"
    opened: list[StateStore] = []

    def make(state_ttl_s: float = 10.0) -> StateStore:
        store = open_store(RedisConfig(url=url, key_prefix=prefix, state_ttl_s=state_ttl_s))
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest_asyncio.fixture
async def store(make_store: MakeStore) -> StateStore:
    return make_store()


@pytest_asyncio.fixture
async def redis_store(redis_db: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_db, "vbt:")
    yield store
    await store.close()


# --------------------------------------------------------------------------- contract


def test_open_store_picks_the_backend(redis_db: str) -> None:
    assert isinstance(open_store(RedisConfig()), MemoryStore)
    assert isinstance(open_store(RedisConfig(url=redis_db)), RedisStore)  # lazy: no connection


async def test_unknown_server_is_none_and_empty(store: StateStore) -> None:
    assert await store.server(IP) is None
    assert await store.servers() == []
    assert await store.channels(IP) == {}
    await store.apply(IP, [], [])  # an empty batch writes nothing, not even the server's name
    assert await store.server(IP) is None


async def test_add_and_remove_are_idempotent(store: StateStore) -> None:
    await store.apply(IP, [trunk("1.1"), agent("1.2")], [])
    await store.apply(IP, [trunk("1.1"), trunk("1.1")], [])  # replayed event: counted once
    await store.apply(IP, [], ["9.9"])  # remove of an absent channel: no-op
    channels = await assert_consistent(store, IP)
    assert set(channels) == {"1.1", "1.2"}
    state = await store.server(IP)
    assert state is not None
    assert state.counts == {ChannelClass.TRUNK: 1, ChannelClass.AGENT: 1}
    assert state.carriers == {"c1": 1}
    assert state.total == 2

    await store.apply(IP, [], ["1.1", "1.1"])
    state = await store.server(IP)
    assert state is not None
    assert state.counts == {ChannelClass.AGENT: 1}
    assert state.carriers == {}  # no zero entries left behind
    assert state.count(ChannelClass.TRUNK) == 0


async def test_add_of_present_uniqueid_keeps_the_first(store: StateStore) -> None:
    await store.apply(IP, [trunk("1.1", "c1")], [])
    await store.apply(IP, [agent("1.1")], [])
    assert (await store.channels(IP))["1.1"] == trunk("1.1", "c1")
    await assert_consistent(store, IP)


async def test_channels_round_trip(store: StateStore) -> None:
    chans = [
        trunk("1.1", "c1"),
        trunk("1.2", None),
        agent("1.3"),
        local("1.4"),
        Channel("1.5", "DAHDI/1-1", ChannelClass.OTHER),
        Channel("1.6", "odd name with spaces:and|pipes", ChannelClass.TRUNK, "carrier-x"),
    ]
    await store.apply(IP, chans, [])
    assert await store.channels(IP) == {c.uniqueid: c for c in chans}


async def test_counts_by_class_and_carrier(store: StateStore) -> None:
    chans = [trunk(f"1.{i}", "c1") for i in range(5)] + [trunk(f"2.{i}", "c2") for i in range(3)]
    chans += [trunk("3.1", None), agent("4.1"), agent("4.2"), local("5.1")]
    await store.apply(IP, chans, [], last_event_at=100.0)
    state = await store.server(IP)
    assert state is not None
    assert state.counts == {ChannelClass.TRUNK: 9, ChannelClass.AGENT: 2, ChannelClass.LOCAL: 1}
    assert state.carriers == {"c1": 5, "c2": 3}
    assert state.meta.last_event_at == 100.0
    await store.apply(IP, [], ["1.0", "2.0", "4.1"], last_event_at=101.0)
    state = await store.server(IP)
    assert state is not None
    assert state.carriers == {"c1": 4, "c2": 2}
    assert state.meta.last_event_at == 101.0
    await assert_consistent(store, IP)


async def test_apply_batch_adds_before_removes(store: StateStore) -> None:
    await store.apply(IP, [trunk("1.1"), trunk("1.2")], ["1.1"])
    channels = await assert_consistent(store, IP)
    assert set(channels) == {"1.2"}


async def test_replace_channels_wholesale(store: StateStore) -> None:
    await store.apply(IP, [trunk("1.1", "c1"), trunk("1.2", "c1"), agent("1.3")], [])
    snapshot = [trunk("2.1", "c2"), local("2.2"), trunk("2.1", "c2")]  # duplicate: counted once
    await store.replace_channels(IP, snapshot, at=50.0)
    channels = await assert_consistent(store, IP)
    assert set(channels) == {"2.1", "2.2"}
    state = await store.server(IP)
    assert state is not None
    assert state.counts == {ChannelClass.TRUNK: 1, ChannelClass.LOCAL: 1}
    assert state.carriers == {"c2": 1}
    assert state.meta.last_event_at == 50.0

    await store.replace_channels(IP, [])
    assert await store.channels(IP) == {}
    state = await store.server(IP)
    assert state is not None
    assert state.counts == {} and state.carriers == {}
    await store.apply(IP, [trunk("3.1", "c2")], [])  # counters resume from the snapshot
    await assert_consistent(store, IP)


async def test_large_snapshot(store: StateStore) -> None:
    # More values than Lua's unpack() takes at once.
    snapshot = [trunk(f"{i}.1", f"c{i % 7}") for i in range(5000)]
    await store.replace_channels(IP, snapshot)
    channels = await assert_consistent(store, IP)
    assert len(channels) == 5000


async def test_meta_round_trip(store: StateStore) -> None:
    await store.set_meta(IP, ServerMeta())
    state = await store.server(IP)
    assert state is not None
    assert state.meta == ServerMeta()  # None fields stay None, enum stays an enum

    meta = ServerMeta(
        server_id="dial1",
        address="127.0.0.1:5038",
        health=Health.SUSPECT,
        health_reason="2 pings unanswered",
        connected_since=1_700_000_000.125,
        last_event_at=1_700_000_001.5,
        rtt_ms=3.25,
        reconnects=4,
        max_trunks=96,
    )
    await store.set_meta(IP, meta)
    state = await store.server(IP)
    assert state is not None
    assert state.meta == meta
    assert isinstance(state.meta.health, Health)
    assert state.meta.health is Health.SUSPECT


async def test_last_event_at_only_moves_forward(store: StateStore) -> None:
    await store.apply(IP, [trunk("1.1")], [], last_event_at=200.0)
    await store.set_meta(IP, ServerMeta(health=Health.UP))  # None: keeps 200
    await store.apply(IP, [], ["1.1"], last_event_at=150.0)  # older: keeps 200
    await store.replace_channels(IP, [], at=120.0)
    state = await store.server(IP)
    assert state is not None
    assert state.meta.last_event_at == 200.0
    assert state.meta.health is Health.UP
    await store.set_meta(IP, ServerMeta(last_event_at=250.0))
    state = await store.server(IP)
    assert state is not None and state.meta.last_event_at == 250.0


async def test_heartbeat_expires_after_state_ttl(make_store: MakeStore) -> None:
    store = make_store(state_ttl_s=0.2)
    await store.apply(IP, [agent("1.1")], [])
    state = await store.server(IP)
    assert state is not None and not state.fresh  # channels alone are no heartbeat
    await store.set_meta(IP, ServerMeta(health=Health.UP))
    state = await store.server(IP)
    assert state is not None and state.fresh
    await asyncio.sleep(0.3)
    state = await store.server(IP)
    assert state is not None and not state.fresh
    assert state.meta.health is Health.UP  # the data stays; only freshness lapses
    await store.set_meta(IP, ServerMeta(health=Health.UP))
    assert [s.fresh for s in await store.servers()] == [True]


async def test_servers_ordered_by_server_ip(store: StateStore) -> None:
    ips = ["10.0.0.9", "10.0.0.10", "192.168.1.1", "10.0.0.11"]
    for n, ip in enumerate(ips):
        await store.set_meta(ip, ServerMeta(server_id=f"s{n}"))
        await store.apply(ip, [agent(f"{n}.1")] * (n + 1), [])
    await store.apply("10.0.0.1", [trunk("7.1")], [])  # channels alone make it known
    states = await store.servers()
    assert [s.server_ip for s in states] == sorted([*ips, "10.0.0.1"])
    by_ip = {s.server_ip: s for s in states}
    assert by_ip["10.0.0.10"].meta.server_id == "s1"
    assert by_ip["10.0.0.10"].counts == {ChannelClass.AGENT: 1}
    assert by_ip["10.0.0.1"].meta == ServerMeta()
    assert by_ip["10.0.0.1"].carriers == {"c1": 1}


async def test_forget_server(store: StateStore) -> None:
    await store.set_meta(IP, ServerMeta(server_id="a"))
    await store.apply(IP, [trunk("1.1")], [])
    await store.set_meta(IP2, ServerMeta(server_id="b"))
    await store.forget_server(IP)
    await store.forget_server("10.9.9.9")  # unknown: no-op
    assert await store.server(IP) is None
    assert await store.channels(IP) == {}
    assert [s.server_ip for s in await store.servers()] == [IP2]
    await store.apply(IP, [agent("2.1")], [])  # comes back clean
    state = await store.server(IP)
    assert state is not None
    assert state.counts == {ChannelClass.AGENT: 1} and state.carriers == {}
    assert state.meta == ServerMeta() and not state.fresh


async def test_drain_flag_survives_forget_server(store: StateStore) -> None:
    await store.set_meta(IP, ServerMeta())
    await store.set_drained(IP, True)
    await store.set_drained(IP, True)
    await store.set_drained("10.0.0.99", True)  # an unknown server may be drained ahead of time
    assert await store.drained() == {IP, "10.0.0.99"}
    state = await store.server(IP)
    assert state is not None and state.drained
    await store.forget_server(IP)
    assert IP in await store.drained()
    await store.set_meta(IP, ServerMeta())
    state = await store.server(IP)
    assert state is not None and state.drained
    await store.set_drained(IP, False)
    await store.set_drained(IP, False)
    assert await store.drained() == {"10.0.0.99"}
    assert [s.drained for s in await store.servers()] == [False]


async def test_daemon_heartbeats(store: StateStore) -> None:
    assert await store.daemons() == []
    await store.touch_daemon("host-b", 0.2)
    await store.touch_daemon("host-a", 10.0)
    assert await store.daemons() == ["host-a", "host-b"]
    await asyncio.sleep(0.3)
    assert await store.daemons() == ["host-a"]
    await store.touch_daemon("host-b", 10.0)  # a daemon that comes back is listed again
    assert await store.daemons() == ["host-a", "host-b"]


async def test_same_uniqueid_on_two_servers(store: StateStore) -> None:
    # Uniqueids are per-server counters: the same one lives on both servers independently.
    await store.apply(IP, [trunk("1700000000.1", "c1")], [])
    await store.apply(IP2, [agent("1700000000.1")], [])
    await store.apply(IP, [], ["1700000000.1"])
    assert await store.channels(IP) == {}
    assert await store.channels(IP2) == {"1700000000.1": agent("1700000000.1")}
    await assert_consistent(store, IP)
    await assert_consistent(store, IP2)


async def test_concurrent_applies_keep_counts_exact(store: StateStore) -> None:
    # 200 batches at once; every channel is added by two batches (two daemons reporting the
    # same events) and every third one is hung up by a third batch.
    batches = [[trunk(f"{b}.{i}", f"c{i % 3}") for i in range(20)] for b in range(100)]
    removes = [[f"{b}.{i}" for i in range(0, 20, 3)] for b in range(100)]
    await asyncio.gather(
        *(store.apply(IP, batch, []) for batch in batches),
        *(store.apply(IP, batch, []) for batch in batches),
    )
    await asyncio.gather(*(store.apply(IP, [], r) for r in removes))
    channels = await assert_consistent(store, IP)
    state = await store.server(IP)
    assert state is not None
    assert len(channels) == 100 * 13 == state.total == sum(state.carriers.values())


# --------------------------------------------------------------------------- model


uniqueids = st.sampled_from([f"1700000000.{i}" for i in range(6)])
channel_st = st.builds(
    Channel,
    uniqueid=uniqueids,
    name=st.sampled_from(["SIP/c1-0001", "Local/8600051@default-0001;1", "SIP/agent1-00a"]),
    cls=st.sampled_from(list(ChannelClass)),
    carrier=st.sampled_from([None, "c1", "c2"]),
)
operation_st: st.SearchStrategy[tuple[str, list[Channel], list[str]]] = st.one_of(
    st.tuples(
        st.just("apply"),
        st.lists(channel_st, max_size=5),
        st.lists(uniqueids, max_size=4),
    ),
    st.tuples(st.just("replace"), st.lists(channel_st, max_size=5), st.just([])),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(operations=st.lists(operation_st, max_size=8))
async def test_matches_a_pure_model(
    store: StateStore, operations: list[tuple[str, list[Channel], list[str]]]
) -> None:
    await store.forget_server(IP)  # the store fixture is shared by all examples
    await store.set_meta(IP, ServerMeta())  # known even when every operation is empty
    model: dict[str, Channel] = {}
    for kind, chans, removes in operations:
        if kind == "apply":
            await store.apply(IP, chans, removes)
            for ch in chans:
                model.setdefault(ch.uniqueid, ch)
            for uid in removes:
                model.pop(uid, None)
        else:
            await store.replace_channels(IP, chans)
            model = {ch.uniqueid: ch for ch in chans}
        assert await assert_consistent(store, IP) == model


# --------------------------------------------------------------------------- Redis only


def test_channel_encoding() -> None:
    ch = Channel("1.1", "SIP/c1-0001", ChannelClass.TRUNK, "c1")
    assert encode_channel(ch) == "trunk\x1fc1\x1fSIP/c1-0001"
    assert decode_channel("1.1", encode_channel(ch), "k") == ch
    assert encode_channel(agent("1.2")) == "agent\x1f\x1fSIP/agent1.2-0001"
    with pytest.raises(StoreError, match=r"vb:x field '1.3'"):
        decode_channel("1.3", "nonsense", "vb:x")


async def test_keys_live_under_the_prefix(redis_store: RedisStore, redis_db: str) -> None:
    await redis_store.apply(IP, [trunk("1.1")], [], last_event_at=1.0)
    await redis_store.set_meta(IP, ServerMeta())
    await redis_store.set_drained(IP, True)
    await redis_store.touch_daemon("d1", 10)
    keys = Keys("vbt:")
    client = redis.Redis.from_url(redis_db, decode_responses=True)
    try:
        assert set(client.keys("*")) == {
            *keys.server_keys(IP),
            keys.servers(),
            keys.drained(),
            keys.daemons(),
            keys.daemon("d1"),
        }
        assert client.hgetall(keys.counts(IP)) == {"trunk": "1", "carrier:c1": "1"}
        assert 0 < client.pttl(keys.heartbeat(IP)) <= 10_000
    finally:
        client.close()


async def test_second_instance_sees_the_same_view(redis_store: RedisStore, redis_db: str) -> None:
    other = RedisStore(redis_db, "vbt:")
    try:
        await redis_store.set_drained(IP, True)
        await redis_store.set_meta(IP, ServerMeta(health=Health.UP))
        await redis_store.apply(IP, [trunk("1.1")], [])
        await redis_store.forget_server(IP)
        assert await other.drained() == {IP}
        assert await other.servers() == []
        await other.apply(IP, [agent("1.2")], [])
        state = await redis_store.server(IP)
        assert state is not None and state.drained and state.total == 1
        await other.touch_daemon("other", 10)
        assert await redis_store.daemons() == ["other"]
    finally:
        await other.close()


async def test_key_prefixes_are_isolated(redis_db: str) -> None:
    a = RedisStore(redis_db, "vb:")
    b = RedisStore(redis_db, "vb:daemon:")  # even a prefix that extends another's keys
    try:
        await a.apply(IP, [trunk("1.1")], [])
        await a.set_meta(IP, ServerMeta(server_id="a"))
        await a.set_drained(IP, True)
        await a.touch_daemon("a", 10)
        await b.touch_daemon("b", 10)
        assert await b.servers() == []
        assert await b.server(IP) is None
        assert await b.channels(IP) == {}
        assert await b.drained() == set()
        assert await a.daemons() == ["a"]
        assert await b.daemons() == ["b"]
        await b.forget_server(IP)
        assert await a.channels(IP) == {"1.1": trunk("1.1")}
    finally:
        await a.close()
        await b.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_redis_raises_store_error() -> None:
    port = _closed_port()
    store = RedisStore(f"redis://vbuser:Sup3rSecretPw@127.0.0.1:{port}/3")
    try:
        for call in (
            store.apply(IP, [trunk("1.1")], []),
            store.servers(),
            store.server(IP),
            store.set_meta(IP, ServerMeta()),
        ):
            with pytest.raises(StoreError) as info:
                await call
            message = str(info.value)
            assert f"Redis at 127.0.0.1:{port}/3 is unreachable" in message
            assert "Sup3rSecretPw" not in message
            assert "Sup3rSecretPw" not in repr(store)
    finally:
        await store.close()


async def test_refused_login_hides_the_password(redis_db: str) -> None:
    where = urlsplit(redis_db)
    store = RedisStore(f"redis://nobody:Sup3rSecretPw@{where.hostname}:{where.port}/15")
    try:
        with pytest.raises(StoreError, match="refused the login") as info:
            await store.drained()
        assert "Sup3rSecretPw" not in str(info.value)
    finally:
        await store.close()


def test_bad_redis_url_names_it_without_password() -> None:
    with pytest.raises(StoreError) as info:
        RedisStore("redis://u:Sup3rSecretPw@127.0.0.1:notaport/0")
    assert "127.0.0.1:notaport" in str(info.value)
    assert "Sup3rSecretPw" not in str(info.value)


async def test_foreign_data_is_a_store_error(redis_store: RedisStore, redis_db: str) -> None:
    keys = Keys("vbt:")
    client = redis.Redis.from_url(redis_db)
    try:
        client.sadd(keys.servers(), IP)
        client.hset(keys.meta(IP), "health", "sideways")
        client.set(keys.channels(IP2), "a string, not a hash")
    finally:
        client.close()
    with pytest.raises(StoreError, match=rf"{keys.meta(IP)}: unexpected meta value"):
        await redis_store.server(IP)
    with pytest.raises(StoreError, match="rejected a command: WRONGTYPE"):
        await redis_store.apply(IP2, [trunk("1.1")], [])


async def test_documents_expire(make_store: MakeStore) -> None:
    store = make_store()
    assert await store.get_document("balance") is None
    await store.put_document("balance", '{"a": 1}', 0.2)
    assert await store.get_document("balance") == '{"a": 1}'
    await asyncio.sleep(0.3)
    assert await store.get_document("balance") is None
