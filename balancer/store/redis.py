r"""Redis state store: the live view shared by every daemon and the CLI.

Channel writes run as Lua scripts so that the channel hash and the counts hash never disagree,
even with several daemons tracking the same server. A channel is stored as one hash field,
``uniqueid -> "cls\x1fcarrier\x1fname"`` (carrier empty when none): compact, and the scripts can
find the class and carrier to decrement without a second lookup.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from balancer.errors import StoreError
from balancer.store.base import (
    Channel,
    ChannelClass,
    Health,
    ServerMeta,
    ServerState,
    StateStore,
)
from balancer.store.keys import CARRIER_FIELD, Keys

SEP = "\x1f"  # ASCII unit separator: never part of a class, a carrier id or a channel name

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 32  # a daemon's tasks share these; more would only queue inside Redis
POOL_WAIT_S = 5.0
RETRIES = 2

_CLASSES = {c.value: c for c in ChannelClass}
_HEALTHS = {h.value: h for h in Health}

# last_event_at is a high-water mark: several writers report it and it never moves back.
_ADVANCE_LUA = """
local function advance(key, t)
  if t ~= '' then
    local cur = tonumber(redis.call('HGET', key, 'last_event_at'))
    if not cur or tonumber(t) > cur then redis.call('HSET', key, 'last_event_at', t) end
  end
end
"""

# KEYS: channels, counts, meta, servers
# ARGV: server_ip, last_event_at ('' = none), n_adds, n_adds (uniqueid, encoded) pairs,
#       then the uniqueids to remove.
# Counts move only when a field really appeared or disappeared, so replays and two daemons
# reporting the same event count once. Deltas are summed per field first: a batch touches a
# handful of classes/carriers, so this saves one HINCRBY per event.
_APPLY_LUA = (
    _ADVANCE_LUA
    + """
local chans = KEYS[1]
local delta = {}
local function bump(enc, by)
  local i = string.find(enc, '\\31', 1, true)
  local j = string.find(enc, '\\31', i + 1, true)
  local f = string.sub(enc, 1, i - 1)
  delta[f] = (delta[f] or 0) + by
  if j > i + 1 then
    f = '"""
    + CARRIER_FIELD
    + """' .. string.sub(enc, i + 1, j - 1)
    delta[f] = (delta[f] or 0) + by
  end
end
local stop = 3 + 2 * tonumber(ARGV[3])
for k = 4, stop, 2 do
  if redis.call('HSETNX', chans, ARGV[k], ARGV[k + 1]) == 1 then bump(ARGV[k + 1], 1) end
end
for k = stop + 1, #ARGV do
  local enc = redis.call('HGET', chans, ARGV[k])
  if enc then
    redis.call('HDEL', chans, ARGV[k])
    bump(enc, -1)
  end
end
for f, d in pairs(delta) do
  if d ~= 0 and redis.call('HINCRBY', KEYS[2], f, d) <= 0 then redis.call('HDEL', KEYS[2], f) end
end
advance(KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[1])
return 0
"""
)


# KEYS: channels, counts, meta, servers
# ARGV: server_ip, at ('' = none), n_channels, n (uniqueid, encoded) pairs, then the counts
#       hash as (field, n) pairs, computed by the caller.
# HSET in slices: Lua's unpack() is limited to a few thousand values.
_REPLACE_LUA = (
    _ADVANCE_LUA
    + """
redis.call('DEL', KEYS[1], KEYS[2])
local stop = 3 + 2 * tonumber(ARGV[3])
for k = 4, stop, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, k, math.min(k + 999, stop)))
end
for k = stop + 1, #ARGV, 1000 do
  redis.call('HSET', KEYS[2], unpack(ARGV, k, math.min(k + 999, #ARGV)))
end
advance(KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[1])
return 0
"""
)

# KEYS: meta, servers, heartbeat
# ARGV: server_ip, ttl_ms, heartbeat value, last_event_at ('' = none), then (field, value) pairs.
# A script rather than MULTI because last_event_at must be compared with the stored value.
_SET_META_LUA = (
    _ADVANCE_LUA
    + """
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
advance(KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[2])
return 0
"""
)


def encode_channel(channel: Channel) -> str:
    """The hash value stored for a channel: class, carrier ('' for none) and name."""
    return f"{channel.cls.value}{SEP}{channel.carrier or ''}{SEP}{channel.name}"


def decode_channel(uniqueid: str, raw: str, key: str) -> Channel:
    """Inverse of encode_channel; StoreError names the key and field when the value is foreign."""
    parts = raw.split(SEP, 2)
    cls = _CLASSES.get(parts[0])
    if cls is None or len(parts) != 3:
        raise StoreError(f"Redis key {key} field {uniqueid!r}: not an encoded channel: {raw!r}")
    return Channel(uniqueid, parts[2], cls, parts[1] or None)


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _encode_meta(meta: ServerMeta) -> list[str]:
    """Field/value pairs of everything but last_event_at (which only moves forward)."""
    return [
        "server_id",
        meta.server_id,
        "address",
        meta.address,
        "health",
        meta.health.value,
        "health_reason",
        meta.health_reason,
        "connected_since",
        _number(meta.connected_since),
        "rtt_ms",
        _number(meta.rtt_ms),
        "reconnects",
        str(meta.reconnects),
        "max_trunks",
        str(meta.max_trunks),
    ]


def _decode_meta(raw: Mapping[str, str], key: str) -> ServerMeta:
    def number(field: str) -> float | None:
        text = raw.get(field, "")
        return float(text) if text else None

    try:
        health = raw.get("health", "")
        if health and health not in _HEALTHS:
            raise ValueError(f"health {health!r}")
        return ServerMeta(
            server_id=raw.get("server_id", ""),
            address=raw.get("address", ""),
            health=_HEALTHS[health] if health else Health.DOWN,
            health_reason=raw.get("health_reason", ""),
            connected_since=number("connected_since"),
            last_event_at=number("last_event_at"),
            rtt_ms=number("rtt_ms"),
            reconnects=int(raw.get("reconnects") or 0),
            max_trunks=int(raw.get("max_trunks") or 0),
        )
    except ValueError as exc:
        raise StoreError(f"Redis key {key}: unexpected meta value: {exc}") from None


def _decode_counts(
    raw: Mapping[str, str], key: str
) -> tuple[dict[ChannelClass, int], dict[str, int]]:
    counts: dict[ChannelClass, int] = {}
    carriers: dict[str, int] = {}
    for field, text in raw.items():
        try:
            n = int(text)
        except ValueError:
            raise StoreError(f"Redis key {key} field {field!r}: not a count: {text!r}") from None
        if n <= 0:  # the scripts delete zero entries; never report one anyway
            continue
        if field.startswith(CARRIER_FIELD):
            carriers[field[len(CARRIER_FIELD) :]] = n
        elif field in _CLASSES:
            counts[_CLASSES[field]] = n
        else:
            raise StoreError(f"Redis key {key}: unknown channel class {field!r}")
    return counts, carriers


def _public_url(url: str) -> str:
    """The URL without user and password (for error messages)."""
    try:
        parts = urlsplit(url)
        return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()
    except ValueError:
        return "<unparsable URL>"


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


class _Translate:
    """Context manager turning redis-py errors into StoreError naming the Redis address."""

    __slots__ = ("secret", "where")

    def __init__(self, where: str, secret: str | None) -> None:
        self.where = where
        self.secret = secret

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, RedisError):
            raise StoreError(self.describe(exc)) from exc

    def describe(self, exc: RedisError) -> str:
        """A message naming the address and the failure, never the password."""
        detail = str(exc) or type(exc).__name__
        if self.secret:
            detail = detail.replace(self.secret, "***")
        if isinstance(exc, AuthenticationError):
            return f"Redis at {self.where} refused the login: {detail}"
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            return f"Redis at {self.where} is unreachable: {detail}"
        if isinstance(exc, ResponseError):
            return f"Redis at {self.where} rejected a command: {detail}"
        return f"Redis at {self.where}: {detail}"


class RedisStore(StateStore):
    """State in Redis under a key prefix; connects lazily, on the first command."""

    def __init__(self, url: str, key_prefix: str = "vb:", state_ttl_s: float = 10.0) -> None:
        self.keys = Keys(key_prefix)
        self.state_ttl_s = state_ttl_s
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=MAX_CONNECTIONS,
                timeout=POOL_WAIT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=COMMAND_TIMEOUT_S,
                # One or two quick retries ride over a pooled connection that Redis closed
                # (restart, idle timeout); longer waits are the caller's call, so a dead Redis
                # fails fast. A Retry per store: connections update it in place.
                retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=RETRIES),
                decode_responses=True,
            )
        except ValueError as exc:
            detail = str(exc)
            secret = _url_password(url)
            if secret:
                detail = detail.replace(secret, "***")
            raise StoreError(f"Redis URL {_public_url(url)}: {detail}") from None
        kwargs = pool.connection_kwargs
        if "path" in kwargs:
            where = f"unix:{kwargs['path']}"
        else:
            where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        self.where = f"{where}/{kwargs.get('db', 0)}"
        self._errors = _Translate(self.where, kwargs.get("password"))
        # The client owns the pool: aclose() disconnects it.
        self._client = aioredis.Redis.from_pool(pool)
        self._apply = self._client.register_script(_APPLY_LUA)
        self._replace = self._client.register_script(_REPLACE_LUA)
        self._set_meta = self._client.register_script(_SET_META_LUA)

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, key_prefix={self.keys.prefix!r})"

    def _server_keys(self, server_ip: str) -> list[str]:
        k = self.keys
        return [k.channels(server_ip), k.counts(server_ip), k.meta(server_ip), k.servers()]

    async def apply(
        self,
        server_ip: str,
        adds: Iterable[Channel],
        removes: Iterable[str],
        last_event_at: float | None = None,
    ) -> None:
        """Apply a batch in one script call: every add, then every remove."""
        args = [server_ip, _number(last_event_at), ""]
        for channel in adds:
            args.append(channel.uniqueid)
            args.append(encode_channel(channel))
        args[2] = str((len(args) - 3) >> 1)
        args.extend(removes)
        if len(args) == 3 and last_event_at is None:
            return
        with self._errors:
            await self._apply(keys=self._server_keys(server_ip), args=args)

    async def replace_channels(
        self, server_ip: str, channels: Iterable[Channel], at: float | None = None
    ) -> None:
        """Replace the channel set and its counts in one script call."""
        unique = {c.uniqueid: c for c in channels}
        tally: dict[str, int] = {}
        pairs: list[str] = []
        for uniqueid, channel in unique.items():
            pairs.append(uniqueid)
            pairs.append(encode_channel(channel))
            tally[channel.cls.value] = tally.get(channel.cls.value, 0) + 1
            if channel.carrier:
                field = Keys.carrier_field(channel.carrier)
                tally[field] = tally.get(field, 0) + 1
        args = [server_ip, _number(at), str(len(unique)), *pairs]
        for field, n in tally.items():
            args.append(field)
            args.append(str(n))
        with self._errors:
            await self._replace(keys=self._server_keys(server_ip), args=args)

    async def channels(self, server_ip: str) -> dict[str, Channel]:
        """The server's live channels by Uniqueid."""
        key = self.keys.channels(server_ip)
        with self._errors:
            raw = cast(dict[str, str], await self._client.hgetall(key))
        return {uid: decode_channel(uid, value, key) for uid, value in raw.items()}

    async def set_meta(self, server_ip: str, meta: ServerMeta) -> None:
        """Write the meta, mark the server known and refresh its heartbeat, atomically."""
        k = self.keys
        ttl_ms = max(1, round(self.state_ttl_s * 1000))
        args = [
            server_ip,
            str(ttl_ms),
            repr(time.time()),
            _number(meta.last_event_at),
            *_encode_meta(meta),
        ]
        keys = [k.meta(server_ip), k.servers(), k.heartbeat(server_ip)]
        with self._errors:
            await self._set_meta(keys=keys, args=args)

    def _state(
        self,
        server_ip: str,
        meta: Mapping[str, str],
        counts: Mapping[str, str],
        fresh: int,
        drained: bool,
    ) -> ServerState:
        by_class, by_carrier = _decode_counts(counts, self.keys.counts(server_ip))
        return ServerState(
            server_ip=server_ip,
            meta=_decode_meta(meta, self.keys.meta(server_ip)),
            counts=by_class,
            carriers=by_carrier,
            drained=drained,
            fresh=bool(fresh),
        )

    async def server(self, server_ip: str) -> ServerState | None:
        """One server's state in one round trip, or None when it is unknown."""
        k = self.keys
        with self._errors:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.sismember(k.servers(), server_ip)
                pipe.hgetall(k.meta(server_ip))
                pipe.hgetall(k.counts(server_ip))
                pipe.exists(k.heartbeat(server_ip))
                pipe.sismember(k.drained(), server_ip)
                known, meta, counts, fresh, drained = await pipe.execute()
        if not known:
            return None
        return self._state(server_ip, meta, counts, fresh, bool(drained))

    async def servers(self) -> list[ServerState]:
        """Every known server's state, ordered by server_ip, in two round trips."""
        k = self.keys
        with self._errors:
            ips = sorted(cast(set[str], await self._client.smembers(k.servers())))
            if not ips:
                return []
            async with self._client.pipeline(transaction=True) as pipe:
                # Re-read the set inside the transaction: a server forgotten since the first
                # read must not come back as an empty default.
                pipe.smembers(k.servers())
                pipe.smembers(k.drained())
                for ip in ips:
                    pipe.hgetall(k.meta(ip))
                    pipe.hgetall(k.counts(ip))
                    pipe.exists(k.heartbeat(ip))
                results: list[Any] = await pipe.execute()
        known: set[str] = results[0]
        drained: set[str] = results[1]
        states: list[ServerState] = []
        for i, ip in enumerate(ips):
            if ip in known:
                meta, counts, fresh = results[2 + 3 * i : 5 + 3 * i]
                states.append(self._state(ip, meta, counts, fresh, ip in drained))
        return states

    async def forget_server(self, server_ip: str) -> None:
        """Delete the server's keys and its membership; the drain flag stays."""
        k = self.keys
        with self._errors:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(*k.server_keys(server_ip))
                pipe.srem(k.servers(), server_ip)
                await pipe.execute()

    async def set_drained(self, server_ip: str, drained: bool) -> None:
        """Set or clear the operator's drain flag."""
        key = self.keys.drained()
        with self._errors:
            if drained:
                await self._client.sadd(key, server_ip)
            else:
                await self._client.srem(key, server_ip)

    async def drained(self) -> set[str]:
        """Server_ips currently drained."""
        with self._errors:
            return cast(set[str], await self._client.smembers(self.keys.drained()))

    async def touch_daemon(self, name: str, ttl_s: float) -> None:
        """Refresh daemon ``name``'s heartbeat key and list it among the daemons."""
        k = self.keys
        with self._errors:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(k.daemon(name), repr(time.time()), px=max(1, round(ttl_s * 1000)))
                pipe.sadd(k.daemons(), name)
                await pipe.execute()

    async def daemons(self) -> list[str]:
        """Names of daemons whose heartbeat key still exists, sorted; dead names are pruned."""
        # A set of names plus EXISTS, rather than SCAN over the keyspace: O(daemons), not
        # O(keys in this Redis), and immune to one prefix being the start of another.
        k = self.keys
        with self._errors:
            names = sorted(cast(set[str], await self._client.smembers(k.daemons())))
            if not names:
                return []
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.exists(k.daemon(name))
                alive: list[int] = await pipe.execute()
            dead = [name for name, up in zip(names, alive, strict=True) if not up]
            if dead:
                # A daemon touching right now re-adds itself on its next heartbeat.
                await self._client.srem(k.daemons(), *dead)
        return [name for name, up in zip(names, alive, strict=True) if up]

    async def put_document(self, name: str, text: str, ttl_s: float) -> None:
        """SET with a TTL."""
        with self._errors:
            await self._client.set(self.keys.document(name), text, px=max(1, round(ttl_s * 1000)))

    async def get_document(self, name: str) -> str | None:
        """GET; None when absent or expired."""
        with self._errors:
            return cast(str | None, await self._client.get(self.keys.document(name)))

    async def close(self) -> None:
        """Close the client and its connection pool."""
        await self._client.aclose()
