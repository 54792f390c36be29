"""Opening the store the configuration asks for."""

from __future__ import annotations

from balancer.config import RedisConfig
from balancer.store.base import StateStore
from balancer.store.memory import MemoryStore
from balancer.store.redis import RedisStore


def open_store(config: RedisConfig) -> StateStore:
    """The store the config asks for: in process for ``memory://``, else Redis (connects lazily)."""
    if config.is_memory:
        return MemoryStore(config.state_ttl_s)
    return RedisStore(config.url, config.key_prefix, config.state_ttl_s)
