"""``chatstream`` / ``python -m server``: migrate, serve, consume, or run everything in dev mode."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import click

from server import constants
from server.config import Settings, SettingsError

logger = logging.getLogger("server")


def _configure_logging() -> None:
    level = os.environ.get("CHATSTREAM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # httpx2 logs every upstream request at INFO; that is noise at our default level.
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def cli() -> None:
    """chatstream: streams LLM chat replies over gRPC and keeps every conversation."""
    _configure_logging()


@cli.command()
def migrate() -> None:
    """Migrate the database schema to the latest version."""
    from server.db.migrate import upgrade

    upgrade(_settings().database_url)
    click.echo("database is up to date")


@cli.command()
def serve() -> None:
    """Run the gRPC server until SIGTERM/SIGINT."""
    from server.app import ChatServer

    asyncio.run(ChatServer(_settings()).serve_until_signal())


@cli.command()
@click.option("--burst", is_flag=True, help="Drain what is in the streams, then exit.")
def consume(burst: bool) -> None:
    """Run the persistence consumer (group chat-persistence)."""
    asyncio.run(_consume(_settings(), burst=burst))


async def _consume(settings: Settings, *, burst: bool) -> None:
    from server.app import create_redis
    from server.consumer.worker import PersistenceWorker
    from server.db.engine import create_engine, create_sessionmaker

    engine = create_engine(settings)
    redis = create_redis(settings)
    worker = PersistenceWorker(
        redis=redis,
        sessionmaker=create_sessionmaker(engine),
        shards=settings.shards,
        consumer_name=settings.consumer_name,
        batch=settings.consumer_batch,
        block_ms=settings.consumer_block_ms,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run(burst=burst)
    finally:
        await redis.aclose()
        await engine.dispose()
    logger.info("consumer stopped: %s", worker.stats)


@cli.command()
@click.option("--listen", default=None, help="gRPC address (default: $CHATSTREAM_LISTEN or 127.0.0.1:50051).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Data folder of embedded PostgreSQL and Redis (default: $CHATSTREAM_DEV_DIR or .chatstream/).",
)
def dev(listen: str | None, data_dir: Path | None) -> None:
    """Run everything locally: embedded PostgreSQL and Redis, migrations, server and consumer."""
    from server.dev import run_dev

    listen = listen or os.environ.get(constants.ENV_LISTEN, "127.0.0.1:50051")
    data_dir = data_dir or Path(os.environ.get(constants.ENV_DEV_DIR, ".chatstream"))
    asyncio.run(run_dev(data_dir=data_dir.resolve(), listen=listen))


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
