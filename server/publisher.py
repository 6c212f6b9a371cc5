"""Publishes ended turns to the sharded ``chat:turns:{k}`` streams for the persistence consumer."""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from server.constants import turns_stream
from server.domain import Turn
from server.turn_codec import encode_turn


def shard_for(conversation_id: uuid.UUID, shards: int) -> int:
    """The shard of a conversation: stable across processes and restarts (CRC-32 of the id).

    One conversation always lands on one shard, so its turns are consumed in order.
    """
    return zlib.crc32(conversation_id.bytes) % shards


class TurnPublisher:
    """XADDs ended turns. Never trims by MAXLEN: only the consumer trims what is persisted."""

    def __init__(self, redis: aioredis.Redis, *, shards: int) -> None:
        self._redis = redis
        self._shards = shards

    def stream_for(self, conversation_id: uuid.UUID) -> str:
        """The stream key a conversation's turns go to."""
        return turns_stream(shard_for(conversation_id, self._shards))

    async def publish(self, turn: Turn) -> None:
        """Appends one turn to its shard."""
        # redis-py types stream fields as str-keyed; bytes keys are equally valid on the wire.
        await self._redis.xadd(self.stream_for(turn.conversation_id), encode_turn(turn))  # type: ignore[arg-type]

    async def publish_many(self, turns: Sequence[Turn]) -> None:
        """Appends several turns in one round trip (the relay's batch path)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for turn in turns:
                self.queue(pipe, turn)
            await pipe.execute()

    def queue(self, pipe: Pipeline, turn: Turn) -> None:
        """Queues the XADD of ``turn`` on a pipeline the caller executes with its other commands."""
        pipe.xadd(self.stream_for(turn.conversation_id), encode_turn(turn))  # type: ignore[arg-type]
