"""Bounds on the streams of the public services (health and reflection), which need no credential.

Anyone who reaches the port may call ``grpc.health.v1.Health/Watch`` and server
reflection, so neither may hold more than a fixed number of streams: grpc_health's
reference servicer keeps every watcher until its client leaves, and a reflection
stream lives as long as its client keeps it open. ``PublicStreamCap`` counts the open
streams of each capped method in this process and refuses one more with
RESOURCE_EXHAUSTED / TOO_MANY_STREAMS (with ErrorInfo and RetryInfo), before the
servicer sees the call. ``BoundedHealthServicer`` bounds what one watcher can pin:
the service name it watches (the request stays referenced for the stream's life).

The connection-level bounds (connections per process, streams per connection,
keepalive, idle and age limits) are gRPC channel arguments: ``server.app.server_options``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from server.edge import run_streaming
from server.errors import ErrorReason, InvalidArgumentError, ResourceExhaustedError
from server.grpc_errors import abort_on_error

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

Context = grpc.aio.ServicerContext[object, object]

HEALTH_WATCH: Final = "/grpc.health.v1.Health/Watch"
REFLECTION_STREAMS: Final = (
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)
MAX_SERVICE_NAME_CHARS: Final = 256
"""Longest service name a health call may name; real ones (``package.Service``) are far shorter."""


@dataclass(slots=True)
class StreamCount:
    """Open streams of one group of methods, and how many it may hold."""

    scope: str
    """Named in the refusal's ErrorInfo metadata (``scope``)."""
    limit: int
    open: int = 0


class PublicStreamCap(grpc.aio.ServerInterceptor):
    """Refuses a stream of a capped method when its group is full; other methods pass through.

    Counters live on the event loop's thread and are checked and incremented without an
    await in between, so no lock is needed.
    """

    def __init__(self, caps: Mapping[str, StreamCount]) -> None:
        """Args:
        caps: Full method name (``/package.Service/Method``) to its counter; methods that
            share a counter share its limit (reflection v1 and v1alpha).
        """
        self._caps = dict(caps)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[RequestT, ResponseT] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        """Returns the method's handler, wrapped by the cap if the method has one."""
        handler = await continuation(handler_call_details)
        count = self._caps.get(handler_call_details.method)
        if handler is None or count is None:
            return handler
        return _capped(handler, count)


def _capped(
    handler: grpc.RpcMethodHandler[RequestT, ResponseT], count: StreamCount
) -> grpc.RpcMethodHandler[RequestT, ResponseT]:
    # grpc.aio accepts coroutine and async-generator behaviours, which the stubs (typed
    # for the sync server) do not describe; hence the casts to object, as in server/edge.py.
    if handler.unary_stream is not None:
        unary_stream = cast(Callable[[object, Context], object], handler.unary_stream)

        async def capped_unary_stream(request: object, context: Context) -> None:
            await _within(count, context, lambda: unary_stream(request, context))

        return grpc.unary_stream_rpc_method_handler(
            capped_unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None:
        stream_stream = cast(Callable[[object, Context], object], handler.stream_stream)

        async def capped_stream_stream(requests: object, context: Context) -> None:
            await _within(count, context, lambda: stream_stream(requests, context))

        return grpc.stream_stream_rpc_method_handler(
            capped_stream_stream, handler.request_deserializer, handler.response_serializer
        )
    # Unary responses end on their own; only streams can be held open.
    return handler


async def _within(count: StreamCount, context: Context, start: Callable[[], object]) -> None:
    """Runs a streaming behaviour while holding one of ``count``'s slots."""
    if count.open >= count.limit:
        async with abort_on_error(context):
            raise ResourceExhaustedError(
                "too many open streams of this kind; retry shortly",
                reason=ErrorReason.ERROR_REASON_TOO_MANY_STREAMS,
                metadata={"scope": count.scope, "limit": str(count.limit)},
            )
    count.open += 1
    try:
        await run_streaming(start(), context)
    finally:
        count.open -= 1


class BoundedHealthServicer(HealthServicer):  # type: ignore[misc]  # grpc_health ships no types
    """grpc_health's servicer, refusing service names no real service has.

    A watcher's request lives as long as its stream, so without this bound each of the
    capped watchers could pin a request of the full message size.
    """

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> health_pb2.HealthCheckResponse:
        """The status of one service (empty name: the whole server)."""
        await _check_service_name(request, context)
        response: health_pb2.HealthCheckResponse = await super().Check(request, context)
        return response

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> None:
        """Streams the status of one service whenever it changes, until the client leaves."""
        await _check_service_name(request, context)
        await super().Watch(request, context)


async def _check_service_name(
    request: health_pb2.HealthCheckRequest,
    context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
) -> None:
    if len(request.service) > MAX_SERVICE_NAME_CHARS:
        async with abort_on_error(context):
            raise InvalidArgumentError.for_field(
                "service", f"must be at most {MAX_SERVICE_NAME_CHARS} characters"
            )
