"""The Redis client of every process (server, consumer, operator commands) and its start-up check.

Importing this module loads only redis-py and `server.config`, so an operator command such as
`chatstream lag` can use the same client as the server without the seconds the Anthropic SDK
takes to import through `server.app`.

On a Redis Cluster the client is a `redis.asyncio.cluster.RedisCluster`. It follows MOVED and
ASK redirects, re-reads the slot map after a failover, and splits a pipeline per node. The code
that uses it needs no cluster branch because every key it touches together shares a hash tag
(`server/constants.py`), and nothing reads several streams in one command (the consumer reads
each shard with its own XREADGROUP).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final, cast

import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, SlotNotCoveredError

from server.config import RedisClusterMode, RedisSettings

logger = logging.getLogger(__name__)


REDIS_OUTAGES: Final = (
    redis_exceptions.ConnectionError,
    redis_exceptions.TimeoutError,
    # CLUSTERDOWN and MASTERDOWN: a cluster between two states, as while a replica is promoted.
    redis_exceptions.ClusterDownError,
    redis_exceptions.TryAgainError,
    SlotNotCoveredError,
    OSError,
)
"""Redis unreachable, or a Redis Cluster failing over: transient, for the caller to wait out.

What the RedisCluster client raises once its own retries are spent. The cluster errors are not
ConnectionErrors (ClusterDownError is a ResponseError, SlotNotCoveredError not even a
RedisError), so every outage path must name this tuple rather than ConnectionError alone.
"""


def is_redis_outage(exc: BaseException) -> bool:
    """True when ``exc`` means Redis is unreachable for now, not that a command is wrong."""
    return isinstance(exc, REDIS_OUTAGES)


class RedisEvictionPolicyError(RuntimeError):
    """Redis may evict keys, and with them unpersisted turns or the consumer group."""


# Policies that evict any key, streams included. volatile-* policies only evict keys
# with a TTL (the context cache), never the streams, so they are safe.
_EVICTING_POLICIES: Final = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})


# Short socket timeouts so an outage fails fast instead of hanging turns. socket_timeout
# must stay above the longest blocking XREAD/XREADGROUP (server/watch.py, the consumer).
_CONNECTION_OPTIONS: Final = {
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
    "health_check_interval": 30,
    "max_connections": 256,  # per node on a cluster
}
# How often a cluster command is tried again after a connection error, a timeout or
# CLUSTERDOWN, each time on a freshly read slot map (redis-py uses the count of this Retry).
# Bounded: past it the caller's own outage handling takes over (the consumer backs off
# and retries without acking, a failed publish leaves the turn row to the relay).
_CLUSTER_RETRIES: Final = 3


async def create_redis(settings: RedisSettings) -> aioredis.Redis:
    """The Redis client of one process: a single Redis or a Redis Cluster (CHATSTREAM_REDIS_CLUSTER).

    With ``auto`` the server is asked once, here, whether it runs in cluster mode.

    The cluster client is typed as ``aioredis.Redis``: both classes are built from redis-py's
    same command mixins, and the code uses only commands and pipeline methods they share,
    on keys that never span slots in one command.
    """
    if not await _is_cluster(settings):
        single = aioredis.from_url(settings.redis_url, **_CONNECTION_OPTIONS)
        pool = single.connection_pool
        pool.connection_class = _GUARDED.get(pool.connection_class, pool.connection_class)
        return single
    cluster = _RedisCluster.from_url(
        settings.redis_url,
        retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), retries=_CLUSTER_RETRIES),
        **_CONNECTION_OPTIONS,
    )
    # Nodes are created from these keyword arguments as they are discovered (redis-py itself
    # updates them so); the startup node exists already.
    kwargs = cluster.nodes_manager.connection_kwargs
    kwargs["connection_class"] = _GUARDED.get(kwargs["connection_class"], kwargs["connection_class"])
    for node in cluster.nodes_manager.startup_nodes.values():
        node.connection_class = kwargs["connection_class"]
    try:
        # Now, not at the first command: reading the slot map also replaces the one node the URL
        # names by every node of the cluster, so losing that node later does not matter.
        await cluster.initialize()
    except redis_exceptions.ConnectionError as exc:
        logger.warning("Redis Cluster unreachable (%s); its first command will try again", exc)
    return cast(aioredis.Redis, cluster)


class _ClosedTransportGuard(AbstractConnection):
    """A write to a connection that is closed already is a ConnectionError, as redis-py means it.

    Two ways redis-py lets it out as something else, both met by tests/test_failover.py when a
    cluster primary was killed, and both escaping every outage path (the consumer's back-off,
    a publish left to the relay, the live log's retries):

    - The processes run on uvloop (server/runtime.py), whose transports raise RuntimeError
      ("unable to perform operation on <TCPTransport closed=True ...>; the handler is closed",
      MagicStack/uvloop#506) where asyncio's ignore the write; redis-py only turns OSError into
      ConnectionError. It ended a consumer process.
    - The cluster pipeline, retrying after a node failed, closes every connection of its client,
      those other tasks are writing to included; their write then meets ``_writer`` None, an
      AttributeError. It ended a live-log writer.
    """

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            if "handler is closed" not in str(exc):
                raise
            # redis-py has disconnected the connection already (its BaseException branch).
            raise redis_exceptions.ConnectionError(f"Error while writing to socket: {exc}") from exc
        except AttributeError as exc:
            if self._writer is not None:
                raise
            raise redis_exceptions.ConnectionError("Connection closed while writing to socket") from exc


class _GuardedConnection(_ClosedTransportGuard, Connection):
    """redis:// connections."""


class _GuardedSSLConnection(_ClosedTransportGuard, SSLConnection):
    """rediss:// connections."""


class _GuardedUnixConnection(_ClosedTransportGuard, UnixDomainSocketConnection):
    """unix:// connections."""


_GUARDED: Final[dict[type[AbstractConnection], type[AbstractConnection]]] = {
    Connection: _GuardedConnection,
    SSLConnection: _GuardedSSLConnection,
    UnixDomainSocketConnection: _GuardedUnixConnection,
}


class _RedisCluster(RedisCluster):
    """A RedisCluster whose "no node reachable" is a ConnectionError, as for a single Redis.

    redis-py raises RedisClusterException, which is not a RedisError, when it cannot read the
    slot map from any node; every outage path of ours (a publish left to the relay, the
    consumer's back-off, readiness) catches RedisError and ConnectionError.
    """

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> RedisCluster:
        try:
            return await super().initialize(additional_startup_nodes_info, last_failed_node_name)
        except RedisClusterException as exc:
            raise redis_exceptions.ConnectionError(str(exc)) from exc


async def _is_cluster(settings: RedisSettings) -> bool:
    match settings.redis_cluster:
        case RedisClusterMode.TRUE:
            return True
        case RedisClusterMode.FALSE:
            return False
        case RedisClusterMode.AUTO:
            pass
    probe = aioredis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        info = await probe.info("cluster")
    except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError, OSError) as exc:
        # The server starts without Redis (degraded, not broken), so this cannot wait for it.
        logger.warning(
            "Redis is unreachable (%s): cannot tell whether it is a cluster; using a single-Redis "
            "client (set CHATSTREAM_REDIS_CLUSTER=true or false to skip this question)",
            exc.__class__.__name__,
        )
        return False
    except redis_exceptions.ResponseError as exc:
        logger.warning("Redis refused INFO cluster (%s); using a single-Redis client", exc)
        return False
    finally:
        await probe.aclose()
    return bool(info.get("cluster_enabled"))


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
