"""``chatstream dev``: the whole system in one process on a fresh machine."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from server.app import ChatServer, create_redis
from server.config import Settings
from server.consumer.worker import PersistenceWorker
from server.db.engine import create_engine, create_sessionmaker
from server.db.migrate import upgrade_async
from server.demo_model import DemoModelServer
from server.embedded import embedded_services

logger = logging.getLogger(__name__)

_DEMO_BANNER = """
************************************************************************
*  DEMO MODEL: ANTHROPIC_API_KEY is not set, so replies come from an   *
*  offline demo model that speaks the Anthropic streaming protocol.    *
*  They are NOT Claude's. Set ANTHROPIC_API_KEY to talk to Claude.     *
************************************************************************"""


async def run_dev(*, data_dir: Path, listen: str) -> None:
    """Starts embedded services, migrates, and serves until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    with embedded_services(data_dir) as services:
        await upgrade_async(services.database_url)
        api_key = os.environ.get("ANTHROPIC_API_KEY") or None
        demo: DemoModelServer | None = None
        base_url = os.environ.get("ANTHROPIC_BASE_URL") or None
        if api_key is None:
            demo = DemoModelServer()
            base_url = await demo.start()
            api_key = "demo"
        settings = Settings(
            database_url=services.database_url,
            redis_url=services.redis_url,
            listen=listen,
            anthropic_api_key=api_key,
            anthropic_base_url=base_url,
            shutdown_grace_s=2.0,
        )
        server = ChatServer(settings)
        engine = create_engine(settings, pool_size=2)
        redis = create_redis(settings)
        worker = PersistenceWorker(
            redis=redis,
            sessionmaker=create_sessionmaker(engine),
            shards=settings.shards,
            consumer_name="dev-consumer",
        )
        try:
            await server.start()
            consumer = asyncio.create_task(worker.run(), name="persistence consumer")
            _print_banner(server.address, data_dir, demo is not None)
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({consumer, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():
                consumer.result()  # a dead consumer is fatal in dev: surface why
        finally:
            worker.stop()
            await server.stop()
            await asyncio.gather(consumer, return_exceptions=True)
            await redis.aclose()
            await engine.dispose()
            if demo is not None:
                await demo.close()


def _print_banner(address: str, data_dir: Path, demo: bool) -> None:
    lines = [
        "",
        f"chatstream dev server on {address} (data in {data_dir}); Ctrl-C stops it.",
        "Try it with grpcurl:",
        f"  grpcurl -plaintext {address} list",
        f"  grpcurl -plaintext {address} describe chatstream.v1.ChatService",
        f'  grpcurl -plaintext -d \'{{"text":"hello"}}\' {address} chatstream.v1.ChatService/Chat',
        f'  grpcurl -plaintext -d \'{{"parent":"conversations/<id>"}}\' {address} '
        "chatstream.v1.ChatService/ListMessages",
    ]
    if demo:
        lines.insert(0, _DEMO_BANNER)
    print("\n".join(lines), flush=True)
