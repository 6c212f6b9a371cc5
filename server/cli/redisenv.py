"""Redis for the commands that need nothing else (`lag`, `dlq`): its URL and shard count from the env."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from server import constants
from server.config import Settings, SettingsError


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisEnv:
    """What a Redis-only command reads from the environment."""

    redis_url: str = field(repr=False)
    """CHATSTREAM_REDIS_URL; may hold a password, so it is never printed."""
    shards: int
    """CHATSTREAM_SHARDS: how many ``chat:turns:{k}`` streams there are."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RedisEnv:
        """Reads CHATSTREAM_REDIS_URL and CHATSTREAM_SHARDS, with the errors of `Settings.from_env`.

        `Settings.from_env` would also demand CHATSTREAM_DATABASE_URL (and validate every
        other setting), which an operator looking at Redis should not need to have.

        Raises:
            SettingsError: A variable is missing or malformed; the message names it.
        """
        env = os.environ if environ is None else environ
        redis_url = env.get(constants.ENV_REDIS_URL, "")
        if not redis_url:
            raise SettingsError(f"{constants.ENV_REDIS_URL} is not set (redis://host:6379/0)")
        return cls(redis_url=redis_url, shards=_shards(env))


def _shards(env: Mapping[str, str]) -> int:
    raw = env.get(constants.ENV_SHARDS, "")
    if raw == "":
        return Settings(database_url="", redis_url="").shards
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{constants.ENV_SHARDS} must be an integer, got {raw!r}") from None
    if value < 1:
        raise SettingsError(f"{constants.ENV_SHARDS} must be at least 1, got {value}")
    return value


@contextlib.asynccontextmanager
async def open_redis(env: RedisEnv) -> AsyncIterator[aioredis.Redis]:
    """A Redis client for one command, closed on exit.

    The timeouts match `server.app.create_redis`, which is not reused because importing
    `server.app` loads the Anthropic SDK and takes seconds.
    """
    client = aioredis.from_url(env.redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()
