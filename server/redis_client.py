"""The Redis client of every process (server, consumer, operator commands) and its start-up check.

Importing this module loads only redis-py and `server.config`, so an operator command such as
`chatstream lag` can use the same client as the server without the seconds the Anthropic SDK
takes to import through `server.app`.
"""

from __future__ import annotations

import logging
from typing import Final

import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions

from server.config import RedisSettings

logger = logging.getLogger(__name__)


class RedisEvictionPolicyError(RuntimeError):
    """Redis may evict keys, and with them unpersisted turns or the consumer group."""


# Policies that evict any key, streams included. volatile-* policies only evict keys
# with a TTL (the context cache), never the streams, so they are safe.
_EVICTING_POLICIES: Final = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})


def create_redis(settings: RedisSettings) -> aioredis.Redis:
    """The Redis client; short socket timeouts so an outage fails fast instead of hanging turns."""
    return aioredis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
        max_connections=256,
    )


async def check_redis_eviction_policy(redis: aioredis.Redis) -> None:
    """Refuses a Redis that may silently evict turn streams under memory pressure.

    Managed services often forbid CONFIG; then the policy cannot be read and a
    warning is logged instead of refusing to start.

    Raises:
        RedisEvictionPolicyError: ``maxmemory-policy`` is one of the ``allkeys-*`` policies.
    """
    try:
        config = await redis.config_get("maxmemory-policy")
    except redis_exceptions.ResponseError as exc:
        logger.warning("cannot read Redis maxmemory-policy (%s); make sure it is noeviction", exc)
        return
    policy = next(iter(config.values()), "")
    policy = policy.decode() if isinstance(policy, bytes) else str(policy)
    if policy in _EVICTING_POLICIES:
        raise RedisEvictionPolicyError(
            f"Redis maxmemory-policy is {policy!r}, which can evict the chat:turns streams and lose "
            "unpersisted turns; set it to 'noeviction' (or a volatile-* policy) and restart"
        )
