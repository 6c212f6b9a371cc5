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
from server.config import RedisSettings, SettingsError
from server.devenv import read_dev_env
from server.envvars import load_group
from server.redis_client import create_redis


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisEnv:
    """What a Redis-only command reads from the environment."""

    redis: RedisSettings
    """CHATSTREAM_REDIS_URL and CHATSTREAM_SHARDS: these commands never open the database."""
    source: str
    """Where the URL came from, for messages (the URL itself may hold a password)."""

    @property
    def shards(self) -> int:
        """CHATSTREAM_SHARDS: how many ``chat:turns:{k}`` streams there are."""
        return self.redis.shards

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
            redis=load_group(RedisSettings, {**env, constants.ENV_REDIS_URL: redis_url}), source=source
        )


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
    client = await create_redis(env.redis)
    try:
        yield client
    except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError) as exc:
        raise click.ClickException(f"cannot reach Redis at {env.source}: {exc}") from exc
    finally:
        await client.aclose()
