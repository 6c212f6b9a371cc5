"""Composition root: builds every resource, wires the gRPC server, and stops it in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
import redis.asyncio as aioredis
from chatstream.v1 import chat_service_pb2, chat_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from server.auth import Authenticator, SingleOwner
from server.config import Settings
from server.context import ContextStore
from server.conversations import ConversationService
from server.db.engine import create_engine, create_sessionmaker
from server.llm import LlmClient
from server.publisher import TurnPublisher
from server.servicer import ChatServicer
from server.turns import TurnRunner

logger = logging.getLogger(__name__)

SERVICE_NAME = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name

# Bounds on what one peer can make us hold; the request-size limit is far above the
# largest valid ChatRequest (32k characters of text is at most ~128 KiB of UTF-8).
_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
]


def create_redis(settings: Settings) -> aioredis.Redis:
    """The Redis client; short socket timeouts so an outage fails fast instead of hanging turns."""
    return aioredis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
        max_connections=256,
    )


class ChatServer:
    """The ChatService gRPC server and everything it owns.

    ``start()`` acquires resources in an exit stack; ``stop()`` drains calls and then
    closes them in reverse order: gRPC server, LLM client, Redis, engine.
    """

    def __init__(self, settings: Settings, *, authenticator: Authenticator | None = None) -> None:
        self._settings = settings
        self._authenticator = authenticator or SingleOwner()
        self._stack = contextlib.AsyncExitStack()
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._port = 0
        self._stopped = asyncio.Event()
        self._runner: TurnRunner | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen`` port 0)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` clients should dial."""
        host = self._settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self._port}"

    async def start(self) -> None:
        """Builds the resources, binds the port and starts serving."""
        settings = self._settings
        engine = create_engine(settings)
        self._stack.push_async_callback(engine.dispose)
        sessionmaker = create_sessionmaker(engine)
        redis = create_redis(settings)
        self._stack.push_async_callback(redis.aclose)
        llm = LlmClient(settings)
        self._stack.push_async_callback(llm.close)

        context = ContextStore(
            redis, sessionmaker, max_turns=settings.context_max_turns, ttl_s=settings.context_cache_ttl_s
        )
        runner = TurnRunner(
            settings=settings,
            sessionmaker=sessionmaker,
            llm=llm,
            context=context,
            publisher=TurnPublisher(redis, shards=settings.shards),
        )
        self._runner = runner
        servicer = ChatServicer(
            settings=settings,
            authenticator=self._authenticator,
            turns=runner,
            conversations=ConversationService(sessionmaker, context),
        )

        server = grpc.aio.server(options=_SERVER_OPTIONS)
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        self._port = server.add_insecure_port(settings.listen)
        if self._port == 0:
            raise OSError(f"cannot listen on {settings.listen}")
        await server.start()
        self._server = server
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %s on %s", SERVICE_NAME, self.address)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, let in-flight calls finish, close.

        Idempotent. Calls still running after the grace period are cancelled, which
        records their turns as CANCELLED.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self._settings.shutdown_grace_s if grace_s is None else grace_s
        try:
            await self._health.enter_graceful_shutdown()
            if self._server is not None:
                await self._server.stop(grace)
            if self._runner is not None:
                # Cancelled calls record their turns in shielded tasks that outlive the
                # call; the pools they use must stay open until they are done.
                await self._runner.drain()
        finally:
            await self._stack.aclose()

    async def wait_stopped(self) -> None:
        """Returns once ``stop()`` has been called."""
        await self._stopped.wait()

    async def serve_until_signal(self) -> None:
        """Starts, serves until SIGTERM or SIGINT, then stops gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        try:
            await stop_requested.wait()
            logger.info("stopping: grace period %.1fs", self._settings.shutdown_grace_s)
        finally:
            await self.stop()
