"""Redis for the commands that need nothing else (`lag`, `dlq`): its URL and shard count from the env.

When CHATSTREAM_REDIS_URL is not set, the Redis of the `chatstream dev` running for this
folder is used (`server.devenv`), so that these commands work against dev with no setup.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import click
import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions

from server import constants
from server.config import RedisClusterMode, Settings, SettingsError
from server.devenv import read_dev_env
from server.redis_client import create_redis


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisEnv:
    """What a Redis-only command reads from the environment."""

    settings: Settings
    """CHATSTREAM_REDIS_URL, CHATSTREAM_REDIS_CLUSTER and CHATSTREAM_SHARDS; every other field
    keeps its default, and ``database_url`` is empty: these commands never open the database."""
    source: str
    """Where the URL came from, for messages (the URL itself may hold a password)."""

    @property
    def shards(self) -> int:
        """CHATSTREAM_SHARDS: how many ``chat:turns:{k}`` streams there are."""
        return self.settings.shards

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RedisEnv:
        """Reads CHATSTREAM_REDIS_URL (else dev's) and CHATSTREAM_SHARDS, with `Settings.from_env`'s errors.

        `Settings.from_env` would also demand CHATSTREAM_DATABASE_URL (and validate every
        other setting), which an operator looking at Redis should not need to have.

        Raises:
            SettingsError: A variable is missing or malformed; the message names it.
        """
        env = os.environ if environ is None else environ
        redis_url = env.get(constants.ENV_REDIS_URL, "")
        source = constants.ENV_REDIS_URL
        if not redis_url:
            dev = read_dev_env(env)
            redis_url = (dev and dev.get(constants.ENV_REDIS_URL)) or ""
            if dev is None or not redis_url:
                raise SettingsError(
                    f"{constants.ENV_REDIS_URL} is not set (redis://host:6379/0), and no `chatstream dev` "
                    "runs for this folder"
                )
            source = f"the Redis of `chatstream dev` ({dev.path})"
        return cls(
            settings=Settings(
                database_url="", redis_url=redis_url, shards=_shards(env), redis_cluster=_cluster_mode(env)
            ),
            source=source,
        )


def _cluster_mode(env: Mapping[str, str]) -> RedisClusterMode:
    raw = env.get(constants.ENV_REDIS_CLUSTER, "")
    if raw == "":
        return RedisClusterMode.AUTO
    try:
        return RedisClusterMode(raw.lower())
    except ValueError:
        allowed = "|".join(mode.value for mode in RedisClusterMode)
        raise SettingsError(f"{constants.ENV_REDIS_CLUSTER} must be one of {allowed}, got {raw!r}") from None


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


def redis_env() -> RedisEnv:
    """`RedisEnv.from_env` for a command: a bad or missing variable is a one-line error."""
    try:
        return RedisEnv.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


@contextlib.asynccontextmanager
async def open_redis(env: RedisEnv) -> AsyncIterator[aioredis.Redis]:
    """The server's Redis client (`server.redis_client.create_redis`) for one command, closed on exit.

    Raises:
        click.ClickException: Redis cannot be reached; the message says where it was looked for.
    """
    client = await create_redis(env.settings)
    try:
        yield client
    except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError) as exc:
        raise click.ClickException(f"cannot reach Redis at {env.source}: {exc}") from exc
    finally:
        await client.aclose()
