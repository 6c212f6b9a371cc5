"""Redis Cluster: the client chosen by CHATSTREAM_REDIS_CLUSTER, slots of the keys, a primary failing over.

Runs on the session's real cluster (tests/redis_cluster.py: 3 primaries, 3 replicas); the
rest of the Redis-facing suite runs there too through the ``redis_cluster`` marker.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from datetime import timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from chatstream import AsyncChatClient, TurnStatus
from redis.asyncio.cluster import RedisCluster as RedisClusterClient
from redis.crc import key_slot

from server import live
from server.config import RedisClusterMode, Settings
from server.constants import PERSISTENCE_GROUP, context_key, turns_stream
from server.consumer.relay import Relay
from server.db.engine import Database
from server.publisher import TurnPublisher, shard_for
from server.redis_client import create_redis
from tests.conftest import Consume, Services
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.redis_cluster import PRIMARIES, RedisCluster

pytestmark = pytest.mark.skipif(
    os.environ.get("CHATSTREAM_TEST_REDIS", "both") == "single", reason="CHATSTREAM_TEST_REDIS=single"
)


@pytest.fixture
def redis_kind() -> str:
    """Every test here runs against the cluster."""
    return "cluster"


async def test_auto_mode_asks_the_server_whether_it_is_a_cluster(
    settings: Settings, services: Services
) -> None:
    on_cluster = await create_redis(settings.redis)
    on_single = await create_redis(replace(settings.redis, redis_url=services.redis_url))
    try:
        assert isinstance(on_cluster, RedisClusterClient)
        assert not isinstance(on_single, RedisClusterClient)
        assert await on_cluster.xadd(turns_stream(0), {"k": "v"})
    finally:
        await on_cluster.aclose()
        await on_single.aclose()


async def test_a_single_redis_client_on_a_cluster_is_redirected_by_the_other_primaries(
    settings: Settings,
) -> None:
    """Why the mode matters: CHATSTREAM_REDIS_CLUSTER=false against a cluster fails on other nodes' keys."""
    plain = await create_redis(replace(settings.redis, redis_cluster=RedisClusterMode.FALSE))
    try:
        assert not isinstance(plain, RedisClusterClient)
        redirected = 0
        for shard in range(4):
            try:
                await plain.xadd(turns_stream(shard), {"k": "v"})
            except redis.exceptions.MovedError:
                redirected += 1
        # Four shards on three primaries: at most two live on the node the URL names.
        assert redirected >= 2
    finally:
        await plain.aclose()


def test_the_four_turn_shards_spread_over_the_three_primaries(redis_cluster: RedisCluster) -> None:
    owners = {
        turns_stream(k): redis_cluster.port_serving(key_slot(turns_stream(k).encode())) for k in range(4)
    }
    print({key: f"slot {key_slot(key.encode())} on 127.0.0.1:{port}" for key, port in owners.items()})
    assert set(owners.values()) == redis_cluster.primaries()
    assert len(set(owners.values())) == PRIMARIES


def test_keys_of_one_turn_share_a_slot() -> None:
    """The live log and its cancel flag are read in one pipeline by the producer (server/live.py)."""
    turn_id = uuid.uuid4()
    assert key_slot(live.live_key(turn_id).encode()) == key_slot(live.cancel_key(turn_id).encode())


async def test_a_primary_failing_over_mid_conversation_loses_no_completed_turn(
    client: AsyncChatClient,
    fake: FakeAnthropic,
    consume: Consume,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    redis_cluster: RedisCluster,
    settings: Settings,
) -> None:
    """A kill -9 of the primary serving the conversation's shard, while the server keeps serving.

    Turns that ended while the primary was gone are published by the relay (the turn row is
    the outbox); afterwards every completed turn has exactly its two rows and nothing is pending.
    """
    fake.script(*(Stream([f"reply {n}"]) for n in range(3)))
    first = [event async for event in client.chat("turn 0")]
    conversation = first[0].started.conversation
    conversation_id = uuid.UUID(conversation.rsplit("/", 1)[1])
    shard_key = turns_stream(shard_for(conversation_id, settings.redis.shards))
    primary = redis_cluster.port_serving(key_slot(shard_key.encode()))

    # The relay's client and this test's own exist before the kill, as a running consumer's
    # does: a client that first connects while the one node its URL names is down cannot
    # read the slot map (the URL should name several nodes then: docs/deployment.md).
    database = Database.from_settings(settings.database)
    relay_redis = await create_redis(settings.redis)
    await redis.xlen(shard_key)
    redis_cluster.kill(primary)
    killed_at = time.monotonic()
    try:
        during = [event async for event in client.chat("turn 1", conversation=conversation)]
        redis_cluster.wait_failover(primary)
        failover_s = time.monotonic() - killed_at
        after = [event async for event in client.chat("turn 2", conversation=conversation)]
        for events in (first, during, after):
            assert events[-1].completed.status == TurnStatus.TURN_STATUS_COMPLETED

        relay = Relay(
            database=database,
            redis=relay_redis,
            live_ttl_s=settings.turns.live_ttl_s,
            publisher=TurnPublisher(relay_redis, shards=settings.redis.shards),
            interval=timedelta(seconds=1),
            grace=timedelta(0),
        )
        assert await relay.run_once() >= 1
        await consume()

        rows = await db.fetch(
            "SELECT turn_seq, role, text FROM chat.messages"
            " WHERE conversation_id = $1 ORDER BY turn_seq, role",
            conversation_id,
        )
        assert [tuple(r) for r in rows] == [
            (seq, role, text)
            for seq, (user, reply) in enumerate(
                [("turn 0", "reply 0"), ("turn 1", "reply 1"), ("turn 2", "reply 2")], start=1
            )
            for role, text in ((1, user), (2, reply))
        ]
        for shard in range(settings.redis.shards):
            assert (await redis.xpending(turns_stream(shard), PERSISTENCE_GROUP))["pending"] == 0
        # The context cache of the conversation is on some primary; it answers again too.
        await redis.get(context_key(str(conversation_id)))
        print(f"failover took {failover_s:.1f}s")
    finally:
        await relay_redis.aclose()
        await database.dispose()
        redis_cluster.restart(primary)
