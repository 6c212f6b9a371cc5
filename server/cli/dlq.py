"""`chatstream dlq list|replay`: the dead-letter stream chat:turns:dlq (see `server.consumer.dlq`)."""

from __future__ import annotations

import asyncio

import click

from server.cli.progress import ProgressReporter
from server.cli.redisenv import open_redis, redis_env
from server.consumer.dlq import list_dead_letters, replay_dead_letters
from server.publisher import TurnPublisher


@click.group()
def dlq() -> None:
    """Inspect and replay the dead-letter stream chat:turns:dlq.

    Needs only CHATSTREAM_REDIS_URL (and CHATSTREAM_SHARDS if not 4); without it, the Redis of
    the `chatstream dev` running for this folder.
    """


@dlq.command("list")
@click.option("--count", default=100, show_default=True, help="How many entries to show, oldest first.")
def dlq_list(count: int) -> None:
    """List dead-lettered entries with their errors."""
    env = redis_env()

    async def show() -> None:
        async with open_redis(env) as redis:
            letters = await list_dead_letters(redis, count=count)
        for letter in letters:
            click.echo(
                f"{letter.id}  from {letter.source} {letter.source_entry_id}  "
                f"turn={letter.turn_id or '-'}  error={letter.error}"
            )
        click.echo(f"{len(letters)} dead letter(s)")

    asyncio.run(show())


@dlq.command("replay")
@click.argument("ids", nargs=-1)
def dlq_replay(ids: tuple[str, ...]) -> None:
    """Publish dead letters (all, or the given ids) to their shard again and remove them."""
    env = redis_env()

    async def replay() -> None:
        with ProgressReporter(label="replaying dead letters") as bar:
            async with open_redis(env) as redis:
                replayed, skipped = await replay_dead_letters(
                    redis, TurnPublisher(redis, shards=env.shards), ids=ids, progress=bar.update
                )
        click.echo(f"replayed {replayed}, skipped {skipped} undecodable")

    asyncio.run(replay())
