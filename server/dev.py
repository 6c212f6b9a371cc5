"""``chatstream dev``: the whole system in one process on a fresh machine."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from server.app import ChatServer
from server.auth import hash_api_key, new_api_key
from server.config import ApiKeyEntry, AuthMode, Settings
from server.consumer.process import run_consumer
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


DEV_SUBJECT = "dev"
"""The owner of what the dev API key creates."""


def dev_api_key(data_dir: Path) -> str:
    """The dev server's API key, made once and kept in the data folder (mode 0600).

    Dev mode authenticates like production, so what works against it works against a
    real deployment; keeping the key across restarts keeps the data reachable.
    """
    path = data_dir / "dev-api-key"
    if path.exists():
        return path.read_text().strip()
    key = new_api_key()
    data_dir.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


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
        dev_key = dev_api_key(data_dir)
        settings = Settings(
            auth_mode=AuthMode.REQUIRED,
            # The dev key may act for users, so x-chatstream-user can be tried out.
            api_keys=(ApiKeyEntry(subject=DEV_SUBJECT, sha256=hash_api_key(dev_key), act_for_users=True),),
            database_url=services.database_url,
            redis_url=services.redis_url,
            listen=listen,
            anthropic_api_key=api_key,
            anthropic_base_url=base_url,
            shutdown_grace_s=2.0,
            consumer_name="dev-consumer",
            metrics_listen=os.environ.get("CHATSTREAM_METRICS_LISTEN", "127.0.0.1:0"),
        )
        server = ChatServer(settings)
        consumer: asyncio.Task[None] | None = None
        try:
            await server.start()
            consumer = asyncio.create_task(
                run_consumer(settings, stop=stop, metrics=server.metrics), name="consumer and relay"
            )
            _print_banner(server.address, data_dir, demo is not None, dev_key, server.metrics_port)
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({consumer, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():
                consumer.result()  # a dead consumer is fatal in dev: surface why
        finally:
            stop.set()
            await server.stop()
            if consumer is not None:
                await asyncio.gather(consumer, return_exceptions=True)
            if demo is not None:
                await demo.close()


def _print_banner(address: str, data_dir: Path, demo: bool, api_key: str, metrics_port: int) -> None:
    auth = f"-H 'authorization: Bearer {api_key}'"
    lines = [
        "",
        f"chatstream dev server on {address} (data in {data_dir}); Ctrl-C stops it.",
        f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics"
        if metrics_port
        else "Metrics are off.",
        f"Dev API key (owner {DEV_SUBJECT!r}, kept in {data_dir / 'dev-api-key'}): {api_key}",
        "Try it with grpcurl (health and reflection need no key):",
        f"  grpcurl -plaintext {address} list",
        f"  grpcurl -plaintext {address} describe chatstream.v1.ChatService",
        f'  grpcurl -plaintext {auth} -d \'{{"text":"hello"}}\' {address} chatstream.v1.ChatService/Chat',
        f'  grpcurl -plaintext {auth} -d \'{{"parent":"conversations/<id>"}}\' {address} '
        "chatstream.v1.ChatService/ListMessages",
    ]
    if demo:
        lines.insert(0, _DEMO_BANNER)
    print("\n".join(lines), flush=True)
