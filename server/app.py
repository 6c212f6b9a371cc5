"""Composition root: builds every resource, wires the gRPC server, and stops it in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions
from chatstream.v1 import chat_service_pb2, chat_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import tls
from server.auth import Authenticator, CredentialVerifier, CurrentPrincipal
from server.config import AuthMode, Settings
from server.context import ContextStore
from server.context_budget import check_prompt_budget, history_budget
from server.conversations import ConversationService
from server.db.engine import create_engine, create_sessionmaker
from server.db.hot import HotPath, create_pool
from server.edge import EdgeInterceptor
from server.limits import StreamLimiter
from server.llm import LlmClient
from server.metrics import Metrics, serve_metrics
from server.public_streams import (
    HEALTH_WATCH,
    REFLECTION_STREAMS,
    BoundedHealthServicer,
    PublicStreamCap,
    StreamCount,
)
from server.publisher import TurnPublisher
from server.readiness import (
    ReadinessMonitor,
    database_probe,
    file_descriptor_probe,
    warn_if_too_few_file_descriptors,
)
from server.servicer import ChatServicer
from server.tracing import TracingInterceptor, configure_tracing, shutdown_tracing
from server.turns import TurnRunner

logger = logging.getLogger(__name__)

SERVICE_NAME = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Reachable without credentials: load-balancer probes and grpcurl's reflection.
PUBLIC_SERVICES = frozenset(
    {HEALTH_SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"}
)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Bounds on what one peer can make us hold (docs/security.md, "Limits").

    The default request-size limit is far above the largest valid ChatRequest (32k
    characters of text is at most ~128 KiB of UTF-8).
    """
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        # Soft and hard limit alike: above it a call is refused, never randomly.
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
        # Every connection and every stream is bounded, health and reflection included
        # (docs/security.md, "Connections and streams").
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        # In grpc core the unanswered keepalive PING is timed by the ping timeout (one
        # minute by default), not by keepalive_timeout_ms alone: set both.
        ("grpc.http2.ping_timeout_ms", _ms(settings.keepalive_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace_s)),
        # Keepalive enforcement: a client pinging more often than this without data, or
        # at all without a call in flight, earns strikes and then a GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.keepalive_min_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", 0),
        # A connection that has not finished its TLS and HTTP/2 handshake by then is closed.
        ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_s * 1000)),
    ]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _public_stream_cap(settings: Settings) -> PublicStreamCap:
    """Caps the streams anyone may open without a credential: health watches and reflection."""
    reflection_streams = StreamCount(scope="reflection", limit=settings.max_reflection_streams)
    return PublicStreamCap(
        {
            HEALTH_WATCH: StreamCount(scope="health_watch", limit=settings.max_health_watches),
            **dict.fromkeys(REFLECTION_STREAMS, reflection_streams),
        }
    )


class RedisEvictionPolicyError(RuntimeError):
    """Redis may evict keys, and with them unpersisted turns or the consumer group."""


# Policies that evict any key, streams included. volatile-* policies only evict keys
# with a TTL (the context cache), never the streams, so they are safe.
_EVICTING_POLICIES = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})


async def check_redis_eviction_policy(redis: aioredis.Redis) -> None:
    """Refuses a Redis that may silently evict turn streams under memory pressure.

    Managed services often forbid CONFIG; then the policy cannot be read and a
    warning is logged instead of refusing to start.
    """
    try:
        config = await redis.config_get("maxmemory-policy")
    except redis_exceptions.ResponseError as exc:
        logger.warning("cannot read Redis maxmemory-policy (%s); make sure it is noeviction", exc)
        return
    policy = next(iter(config.values()), "")
    policy = policy.decode() if isinstance(policy, bytes) else str(policy)
    if policy in _EVICTING_POLICIES:
        raise RedisEvictionPolicyError(
            f"Redis maxmemory-policy is {policy!r}, which can evict the chat:turns streams and lose "
            "unpersisted turns; set it to 'noeviction' (or a volatile-* policy) and restart"
        )


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

    def __init__(
        self,
        settings: Settings,
        *,
        authenticator: Authenticator | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self.metrics = metrics or Metrics()
        self._authenticator = authenticator or CurrentPrincipal()
        self._stack = contextlib.AsyncExitStack()
        self._server: grpc.aio.Server | None = None
        self._health = BoundedHealthServicer()
        self._port = 0
        self.metrics_port = 0
        """The bound metrics port; 0 when metrics are off."""
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
        # Before any engine, client or server exists, so they are all instrumented.
        tracing_on = configure_tracing("chatstream-server")
        if tracing_on:
            self._stack.callback(shutdown_tracing)
        # Credentials and TLS first: a misconfiguration fails before anything is opened.
        verifier = CredentialVerifier(settings)
        credentials = tls.server_credentials(settings)
        check_prompt_budget(settings)
        warn_if_too_few_file_descriptors(settings)
        engine = create_engine(settings)
        self._stack.push_async_callback(engine.dispose)
        sessionmaker = create_sessionmaker(engine)
        redis = create_redis(settings)
        self._stack.push_async_callback(redis.aclose)
        try:
            await check_redis_eviction_policy(redis)
        except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError, OSError) as exc:
            # Serving without Redis is degraded, not broken: turns are still stored and
            # the relay publishes them once Redis is back.
            logger.warning("Redis is unreachable at start-up (%s); serving anyway", exc.__class__.__name__)
        llm = LlmClient(settings)
        self._stack.push_async_callback(llm.close)

        hot_pool = await create_pool(settings)
        self._stack.push_async_callback(hot_pool.close)
        hot = HotPath(hot_pool, log_transactions=settings.log_transactions)
        context = ContextStore(
            redis,
            hot,
            max_turns=settings.context_max_turns,
            ttl_s=settings.context_cache_ttl_s,
            max_chars=history_budget(settings, text_chars=0),
            max_text_chars=settings.max_text_chars,
        )
        runner = TurnRunner(
            settings=settings,
            sessionmaker=sessionmaker,
            hot=hot,
            redis=redis,
            llm=llm,
            context=context,
            publisher=TurnPublisher(redis, shards=settings.shards),
            metrics=self.metrics,
        )
        self._runner = runner
        renewals = asyncio.create_task(runner.renew_leases_forever(), name="lease renewal")
        self._stack.push_async_callback(_cancel_and_wait, renewals)
        servicer = ChatServicer(
            settings=settings,
            authenticator=self._authenticator,
            turns=runner,
            conversations=ConversationService(
                sessionmaker,
                context,
                default_page_size=settings.default_page_size,
                max_page_size=settings.max_page_size,
            ),
        )

        edge = EdgeInterceptor(
            verifier=verifier,
            limiter=StreamLimiter(
                max_streams=settings.max_streams,
                # With authentication off every call has the same owner; a per-owner cap
                # would only be a second, lower server cap.
                max_per_owner=(
                    settings.max_streams_per_owner
                    if verifier.mode is AuthMode.REQUIRED
                    else settings.max_streams
                ),
            ),
            public_services=PUBLIC_SERVICES,
            max_metadata_bytes=settings.max_metadata_bytes,
        )
        interceptors: list[grpc.aio.ServerInterceptor] = [edge, _public_stream_cap(settings)]
        if tracing_on:
            interceptors.insert(0, TracingInterceptor([SERVICE_NAME]))
        server = grpc.aio.server(
            options=server_options(settings),
            interceptors=interceptors,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                HEALTH_SERVICE_NAME,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        self._port = (
            server.add_insecure_port(settings.listen)
            if credentials is None
            else server.add_secure_port(settings.listen, credentials)
        )
        if self._port == 0:
            raise OSError(f"cannot listen on {settings.listen}")
        await server.start()
        self._server = server
        endpoint = serve_metrics(self.metrics, settings.metrics_listen)
        if endpoint is not None:
            self.metrics_port = endpoint.port
            self._stack.callback(endpoint.close)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        # Readiness drives the service's status only: "" stays the liveness signal (the
        # process answers), so a database outage never gets every replica restarted.
        readiness = ReadinessMonitor(
            health=self._health,
            services=(SERVICE_NAME,),
            probes=(file_descriptor_probe(settings.min_free_fds), database_probe(engine)),
            interval_s=settings.readiness_interval_s,
            metrics=self.metrics,
        )
        monitor = asyncio.create_task(readiness.run(), name="readiness")
        self._stack.push_async_callback(_cancel_and_wait, monitor)
        logger.info(
            "serving %s on %s (tls=%s, mtls=%s, auth=%s)",
            SERVICE_NAME,
            self.address,
            credentials is not None,
            settings.tls_client_ca_file is not None,
            verifier.mode,
        )

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
            if self._settings.shutdown_drain_s > 0:
                # Health says NOT_SERVING while calls are still accepted, so load
                # balancers move traffic away before the port refuses it.
                await asyncio.sleep(self._settings.shutdown_drain_s)
            if self._server is not None:
                await self._server.stop(grace)
            if self._runner is not None:
                # Turns still streaming past the grace period are cancelled and recorded
                # while the pools they use are still open.
                await self._runner.shutdown()
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


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
