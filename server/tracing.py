"""Optional OpenTelemetry tracing of gRPC calls, SQL and Redis, switched on by the standard OTEL_* variables.

gRPC server spans come from ``TracingInterceptor`` rather than OpenTelemetry's grpc.aio
instrumentation, which assumes response-streaming handlers are async generators; ours
is a coroutine that writes with ``context.write()`` (see ``server.servicer``).

Off unless ``OTEL_TRACES_EXPORTER`` (e.g. ``otlp`` or ``console``) or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and
``OTEL_SDK_DISABLED`` is not true. When off, none of our tracing code runs,
so it costs nothing: no provider, no instrumentation, no interceptor (redis-py itself
imports the OpenTelemetry API when it is installed, but records nothing). The packages
come with the ``tracing`` extra (``pip install 'chatstream[tracing]'``);
``OTEL_SERVICE_NAME`` and the other standard
variables (endpoint, headers, sampler) are honoured by the SDK itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextlib import AbstractContextManager
from typing import TypeVar, cast

import grpc

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
Context = grpc.aio.ServicerContext[object, object]

_state: dict[str, object] = {}


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* environment asks for traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(default_service_name: str) -> bool:
    """Installs a tracer provider and instruments grpc.aio servers, SQLAlchemy and redis-py.

    Idempotent, and a no-op returning False when tracing is not requested or the
    packages are missing (then a warning says how to install them).
    """
    if "provider" in _state:
        return True
    if not tracing_requested():
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        logger.warning(
            "OTEL_* asks for traces but OpenTelemetry is missing: pip install 'chatstream[tracing]'"
        )
        return False

    exporters: list[SpanExporter] = []
    for name in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(","):
        match name.strip().lower():
            case "console":
                exporters.append(ConsoleSpanExporter())
            case "otlp":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                exporters.append(OTLPSpanExporter())
            case other:
                logger.warning("ignoring unsupported OTEL_TRACES_EXPORTER %r", other)
    service_name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    # The instrumentation's declared SQLAlchemy range lags behind 2.1, which it handles.
    SQLAlchemyInstrumentor().instrument(skip_dep_check=True)
    # The hot statements run on the driver connection, out of SQLAlchemy's sight: they
    # get their span from statement_span (server/db/engine.py).
    RedisInstrumentor().instrument()
    _state["provider"] = provider
    _state["tracer"] = trace.get_tracer("chatstream")
    logger.info("OpenTelemetry tracing on (service %s)", service_name)
    return True


def statement_span(sql: str) -> AbstractContextManager[object]:
    """A CLIENT span for one SQL statement run on the driver connection; nothing when tracing is off.

    It carries what SQLAlchemy's instrumentation puts on the spans of every other
    statement (``db.system``, ``db.statement``), so a trace shows all of a turn's SQL.
    """
    tracer = _state.get("tracer")
    if tracer is None:
        return contextlib.nullcontext()
    from opentelemetry.trace import SpanKind, Tracer

    return cast(Tracer, tracer).start_as_current_span(
        sql.split(None, 1)[0],
        kind=SpanKind.CLIENT,
        attributes={"db.system": "postgresql", "db.statement": sql},
    )


def shutdown_tracing() -> None:
    """Flushes and stops the exporters, so the last spans are not lost at exit."""
    provider = _state.pop("provider", None)
    _state.pop("tracer", None)
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """One SERVER span per call of the traced services, continuing the caller's trace context.

    Goes first in the interceptor list, so the span covers authentication and limits too.
    Every behaviour it wraps is a coroutine (the edge interceptor makes them so).
    """

    def __init__(self, traced_services: Collection[str]) -> None:
        from opentelemetry import trace

        self._traced = frozenset(traced_services)
        self._tracer = trace.get_tracer("chatstream")

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[RequestT, ResponseT] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        """The method's handler, wrapped in a span when its service is traced."""
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        service, _, name = method.lstrip("/").rpartition("/")
        if handler is None or service not in self._traced:
            return handler
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        tracer = self._tracer

        def span() -> AbstractContextManager[object]:
            return tracer.start_as_current_span(
                method.lstrip("/"),
                context=propagate.extract(carrier),
                kind=SpanKind.SERVER,
                attributes=attributes,
            )

        if handler.unary_unary is not None:
            unary = cast(Callable[[object, Context], Awaitable[object]], handler.unary_unary)

            async def traced_unary(request: object, context: Context) -> object:
                with span():
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                traced_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            streaming = cast(Callable[[object, Context], Awaitable[None]], handler.unary_stream)

            async def traced_stream(request: object, context: Context) -> None:
                with span():
                    await streaming(request, context)

            return grpc.unary_stream_rpc_method_handler(
                traced_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
