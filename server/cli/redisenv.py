"""Redis for the commands that need nothing else (`lag`, `dlq`): its URL and shard count from the env."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from server import constants
from server.config import Settings, SettingsError
from server.redis_client import create_redis


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisEnv:
    """What a Redis-only command reads from the environment."""

    settings: Settings
    """CHATSTREAM_REDIS_URL and CHATSTREAM_SHARDS; every other field keeps its default, and
    ``database_url`` is empty: these commands never open the database."""

    @property
    def shards(self) -> int:
        """CHATSTREAM_SHARDS: how many ``chat:turns:{k}`` streams there are."""
        return self.settings.shards

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
        return cls(settings=Settings(database_url="", redis_url=redis_url, shards=_shards(env)))


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
    """The server's Redis client (`server.redis_client.create_redis`) for one command, closed on exit."""
    client = create_redis(env.settings)
    try:
        yield client
    finally:
        await client.aclose()
