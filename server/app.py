"""Composition root: builds every resource, wires the gRPC server, and stops it in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

import grpc
import redis.exceptions as redis_exceptions
from chatstream.v1 import chat_service_pb2, chat_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import tls
from server.auth import Authenticator, CredentialVerifier, CurrentPrincipal
from server.coalescer import FlushPolicy
from server.config import AuthMode, Settings
from server.context import ContextStore
from server.context_budget import check_prompt_budget, history_budget
from server.conversations import ConversationService
from server.db.engine import Database
from server.edge import EdgeInterceptor
from server.leases import TurnLeases
from server.limits import StreamLimiter
from server.live import LiveLog
from server.llm import LlmClient
from server.load import LoadMonitor
from server.metrics import Metrics, serve_metrics
from server.production import Producer
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
from server.redis_client import check_redis_eviction_policy, create_redis
from server.reflection import SERVICE_NAMES as REFLECTION_SERVICE_NAMES
from server.reflection import enable_reflection
from server.servicer import ChatServicer
from server.tracing import TracingInterceptor, configure_tracing, shutdown_tracing
from server.turns import TurnRunner
from server.watch import ConversationHub, TurnWatcher

logger = logging.getLogger(__name__)

SERVICE_NAME = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Reachable without credentials: load-balancer probes and the reflection that grpcurl and buf curl use.
PUBLIC_SERVICES = frozenset({HEALTH_SERVICE_NAME, *REFLECTION_SERVICE_NAMES})


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Bounds on what one peer can make us hold (docs/security.md, "Limits").

    The default request-size limit is far above the largest valid ChatRequest (32k
    characters of text is at most ~128 KiB of UTF-8).
    """
    return [
        ("grpc.max_receive_message_length", settings.limits.max_request_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        # Soft and hard limit alike: above it a call is refused, never randomly.
        ("grpc.max_metadata_size", settings.limits.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.limits.max_metadata_bytes),
        # Every connection and every stream is bounded, health and reflection included
        # (docs/security.md, "Connections and streams").
        ("grpc.max_allowed_incoming_connections", settings.limits.max_connections),
        ("grpc.max_concurrent_streams", settings.limits.max_streams_per_connection),
        ("grpc.keepalive_time_ms", _ms(settings.connections.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.connections.keepalive_timeout_s)),
        # In grpc core the unanswered keepalive PING is timed by the ping timeout (one
        # minute by default), not by keepalive_timeout_ms alone: set both.
        ("grpc.http2.ping_timeout_ms", _ms(settings.connections.keepalive_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(settings.connections.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", _ms(settings.connections.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.connections.max_connection_age_grace_s)),
        # Keepalive enforcement: a client pinging more often than this without data, or
        # at all without a call in flight, earns strikes and then a GOAWAY.
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(settings.connections.keepalive_min_ping_interval_s * 1000),
        ),
        ("grpc.http2.max_ping_strikes", settings.connections.keepalive_max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", 0),
        # A connection that has not finished its TLS and HTTP/2 handshake by then is closed.
        ("grpc.server_handshake_timeout_ms", int(settings.connections.handshake_timeout_s * 1000)),
    ]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _public_stream_cap(settings: Settings) -> PublicStreamCap:
    """Caps the streams anyone may open without a credential: health watches and reflection."""
    reflection_streams = StreamCount(scope="reflection", limit=settings.limits.max_reflection_streams)
    return PublicStreamCap(
        {
            HEALTH_WATCH: StreamCount(scope="health_watch", limit=settings.limits.max_health_watches),
            **dict.fromkeys(REFLECTION_STREAMS, reflection_streams),
        }
    )


class ChatServer:
    """The ChatService gRPC server and everything it owns.

    ``start()`` acquires resources in an exit stack; ``stop()`` drains calls and then
    closes them in reverse order: gRPC server, LLM client, Redis, engine. A
    `server.runtime.Component`: ``runtime.serve_until_signal`` runs it until SIGTERM/SIGINT.
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
        self._leases: TurnLeases | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen`` port 0)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` clients should dial."""
        host = self._settings.server.listen.rsplit(":", 1)[0]
        return f"{host}:{self._port}"

    async def start(self) -> None:
        """Builds the resources, binds the port and starts serving."""
        settings = self._settings
        # Before any engine, client or server exists, so they are all instrumented.
        tracing_on = configure_tracing("chatstream-server")
        if tracing_on:
            self._stack.callback(shutdown_tracing)
        # Credentials, TLS and the model first: a misconfiguration fails before anything is opened.
        verifier = CredentialVerifier(settings)
        credentials = tls.server_credentials(settings.tls)
        check_prompt_budget(settings)
        warn_if_too_few_file_descriptors(settings)
        llm = LlmClient(settings.llm)
        self._stack.push_async_callback(llm.close)
        database = Database.from_settings(settings.database)
        self._stack.push_async_callback(database.dispose)
        redis = await create_redis(settings.redis)
        self._stack.push_async_callback(redis.aclose)
        try:
            await check_redis_eviction_policy(redis)
        except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError, OSError) as exc:
            # Serving without Redis is degraded, not broken: turns are still stored and
            # the relay publishes them once Redis is back.
            logger.warning("Redis is unreachable at start-up (%s); serving anyway", exc.__class__.__name__)

        context = ContextStore(
            redis,
            database,
            max_turns=settings.turns.context_max_turns,
            ttl_s=settings.turns.context_cache_ttl_s,
            max_chars=history_budget(settings, text_chars=0),
            max_text_chars=settings.turns.max_text_chars,
        )
        leases = TurnLeases(database, lease=timedelta(seconds=settings.turns.turn_lease_s))
        self._leases = leases
        renewals = asyncio.create_task(leases.renew_forever(), name="lease renewal")
        self._stack.push_async_callback(_cancel_and_wait, renewals)
        publisher = TurnPublisher(redis, shards=settings.redis.shards)
        # Measured load: admission (the edge) and the live log's flush interval both follow it.
        load = LoadMonitor(
            max_lag_s=settings.admission.admission_max_lag_ms / 1000,
            max_cpu=settings.admission.admission_max_cpu,
            window_s=settings.admission.admission_window_s,
            retry_after_s=settings.admission.admission_retry_after_s,
            metrics=self.metrics,
        )
        sampling = asyncio.create_task(load.run(), name="load monitor")
        self._stack.push_async_callback(_cancel_and_wait, sampling)
        live_log = None
        if settings.turns.live_log:
            flush = FlushPolicy(load, max_s=settings.turns.flush_max_ms / 1000)
            self.metrics.flush_interval.set_function(flush.interval)
            live_log = LiveLog(
                redis,
                ttl_s=settings.turns.live_ttl_s,
                maxlen=settings.turns.live_maxlen,
                flush_interval=flush.interval,
            )
            live_log.start()
            self._stack.push_async_callback(live_log.close)
        producer = Producer(
            settings=settings,
            database=database,
            redis=redis,
            llm=llm,
            context=context,
            publisher=publisher,
            leases=leases,
            metrics=self.metrics,
            live_log=live_log,
        )
        watcher = TurnWatcher(
            database=database,
            redis=redis,
            publisher=publisher,
            live_log=settings.turns.live_log,
            live_ttl_s=settings.turns.live_ttl_s,
            lease_s=settings.turns.turn_lease_s,
        )
        runner = TurnRunner(
            database=database,
            redis=redis,
            producer=producer,
            watcher=watcher,
            leases=leases,
            llm_model=llm.model,
            live_ttl_s=settings.turns.live_ttl_s,
            metrics=self.metrics,
        )
        servicer = ChatServicer(
            settings=settings,
            authenticator=self._authenticator,
            turns=runner,
            watcher=watcher,
            hub=ConversationHub(database=database, redis=redis),
            conversations=ConversationService(
                database,
                context,
                default_page_size=settings.limits.default_page_size,
                max_page_size=settings.limits.max_page_size,
            ),
        )

        edge = EdgeInterceptor(
            verifier=verifier,
            limiter=StreamLimiter(
                max_streams=settings.limits.max_streams,
                # With authentication off every call has the same owner; a per-owner cap
                # would only be a second, lower server cap.
                max_per_owner=(
                    settings.limits.max_streams_per_owner
                    if verifier.mode is AuthMode.REQUIRED
                    else settings.limits.max_streams
                ),
                metrics=self.metrics,
                load=load,
            ),
            public_services=PUBLIC_SERVICES,
            # Only a Chat starts new work; a watch follows a turn that is already running.
            sheddable_methods={f"/{SERVICE_NAME}/Chat"},
            max_metadata_bytes=settings.limits.max_metadata_bytes,
        )
        interceptors: list[grpc.aio.ServerInterceptor] = [edge, _public_stream_cap(settings)]
        if tracing_on:
            interceptors.insert(0, TracingInterceptor([SERVICE_NAME]))
        server = grpc.aio.server(
            options=server_options(settings),
            interceptors=interceptors,
            maximum_concurrent_rpcs=settings.limits.max_concurrent_rpcs,
        )
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection(server, [SERVICE_NAME, HEALTH_SERVICE_NAME])
        self._port = (
            server.add_insecure_port(settings.server.listen)
            if credentials is None
            else server.add_secure_port(settings.server.listen, credentials)
        )
        if self._port == 0:
            raise OSError(f"cannot listen on {settings.server.listen}")
        await server.start()
        self._server = server
        endpoint = serve_metrics(self.metrics, settings.observability.metrics_listen)
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
            probes=(file_descriptor_probe(settings.server.min_free_fds), database_probe(database)),
            interval_s=settings.server.readiness_interval_s,
            metrics=self.metrics,
        )
        monitor = asyncio.create_task(readiness.run(), name="readiness")
        self._stack.push_async_callback(_cancel_and_wait, monitor)
        logger.info(
            "serving %s on %s (tls=%s, mtls=%s, auth=%s)",
            SERVICE_NAME,
            self.address,
            credentials is not None,
            settings.tls.tls_client_ca_file is not None,
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
        grace = self._settings.server.shutdown_grace_s if grace_s is None else grace_s
        if self._server is not None:
            # A start that failed (a refused setting, an unreachable port) served nothing:
            # its own error is the one line the operator should read, not a stop.
            logger.info("stopping: grace period %.1fs", grace)
        try:
            await self._health.enter_graceful_shutdown()
            if self._settings.server.shutdown_drain_s > 0:
                # Health says NOT_SERVING while calls are still accepted, so load
                # balancers move traffic away before the port refuses it.
                await asyncio.sleep(self._settings.server.shutdown_drain_s)
            began = asyncio.get_running_loop().time()
            if self._server is not None:
                await self._server.stop(grace)
            if self._leases is not None:
                # Turns that go on without their caller (ON_DISCONNECT_CONTINUE) get what is
                # left of the grace period too; then every turn still streaming is
                # cancelled and recorded while the pool it uses is still open.
                left = grace - (asyncio.get_running_loop().time() - began)
                await self._leases.shutdown(wait_s=max(0.0, left))
        finally:
            await self._stack.aclose()

    async def wait_stopped(self) -> None:
        """Returns once ``stop()`` has been called."""
        await self._stopped.wait()


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
