"""Names shared by the server, the consumer and operators: Redis keys, groups, env vars."""

from typing import Final

# Redis Streams that relay completed turns to the persistence consumer. The shard
# index sits in braces so it is a Redis Cluster hash tag: every key of one shard
# lands in one slot.
TURNS_STREAM_PREFIX: Final = "chat:turns"
DEAD_LETTER_STREAM: Final = "chat:turns:dlq"
PERSISTENCE_GROUP: Final = "chat-persistence"
CONTEXT_KEY_PREFIX: Final = "chat:ctx"
# Live turn events (server/live.py); one turn's keys share its hash tag.
LIVE_KEY_PREFIX: Final = "chat:live"

ENV_DATABASE_URL: Final = "CHATSTREAM_DATABASE_URL"
ENV_REDIS_URL: Final = "CHATSTREAM_REDIS_URL"
ENV_LISTEN: Final = "CHATSTREAM_LISTEN"
ENV_DEV_DIR: Final = "CHATSTREAM_DEV_DIR"
ENV_SHARDS: Final = "CHATSTREAM_SHARDS"
ENV_REDIS_CLUSTER: Final = "CHATSTREAM_REDIS_CLUSTER"
ENV_TOKEN: Final = "CHATSTREAM_TOKEN"  # noqa: S105  # the variable's name, not a token
"""The bearer token of the client commands (`chatstream chat`, `chatstream conversations`)."""

ERROR_DOMAIN: Final = "chatstream.v1.ChatService"


def turns_stream(shard: int) -> str:
    """The stream key of one shard, e.g. ``chat:turns:{2}``."""
    return f"{TURNS_STREAM_PREFIX}:{{{shard}}}"


def context_key(conversation_id: str) -> str:
    """The context-cache key of one conversation."""
    return f"{CONTEXT_KEY_PREFIX}:{{{conversation_id}}}"
