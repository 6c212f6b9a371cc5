"""The gRPC edge: every ChatService call is authenticated, bounded and well-formed before its handler runs.

``EdgeInterceptor`` wraps each method handler of the protected services so that, in the
handler's own task and before the servicer sees the call, it

1. refuses metadata over ``max_metadata_bytes`` (RESOURCE_EXHAUSTED, METADATA_TOO_LARGE);
2. verifies the credential (``server.auth.CredentialVerifier``) and aborts with
   UNAUTHENTICATED, PERMISSION_DENIED or INVALID_ARGUMENT, each with ErrorInfo;
3. refuses text metadata values outside printable ASCII, CR, LF and NUL included
   (INVALID_ARGUMENT, INVALID_METADATA);
4. refuses a request message that did not parse (INVALID_ARGUMENT, MALFORMED_REQUEST)
   instead of letting gRPC answer with a bare INTERNAL;
5. admits a response stream only under the per-owner and per-server limits
   (RESOURCE_EXHAUSTED, TOO_MANY_STREAMS) and, for the methods that start new work
   (Chat), only while the process is not overloaded (UNAVAILABLE, SERVER_OVERLOADED);
6. publishes the verified principal for ``server.auth.CurrentPrincipal``.

Checks 1 and 3 repeat what gRPC's transport does for well-behaved peers: the transport
applies its header-list limit only once the peer has acknowledged our SETTINGS, and it
passes control characters in custom header values through. A hostile peer does neither.

Aborting from inside the wrapped behaviour (rather than returning a rejecting handler
from ``intercept_service``) is what makes one reject path work for unary and streaming
calls alike. Health and reflection are not wrapped: probes and grpcurl need no credential.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Final, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError

from server.auth import CredentialVerifier, Principal, bind_principal, unbind_principal
from server.errors import ChatError, ErrorReason, InvalidArgumentError, RequestTooLargeError
from server.grpc_errors import abort_on_error
from server.limits import StreamLimiter

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

Context = grpc.aio.ServicerContext[object, object]


# gRPC's ASCII-Value (PROTOCOL-HTTP2.md): printable ASCII, space included.
_TEXT_VALUE: Final = re.compile(r"[\x20-\x7e]*")
# RFC 7541 §4.1 counts 32 bytes of overhead per header.
_HEADER_OVERHEAD: Final = 32


class _Malformed:
    """Stands in for a request message whose bytes did not parse."""


_MALFORMED: Final = _Malformed()


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, validates and limits every call to the protected services."""

    def __init__(
        self,
        *,
        verifier: CredentialVerifier,
        limiter: StreamLimiter,
        public_services: Collection[str],
        sheddable_methods: Collection[str],
        max_metadata_bytes: int,
    ) -> None:
        """Args:
        verifier: Turns a call's credential into a principal.
        limiter: Bounds concurrent response streams, and sheds new work under load.
        public_services: Full service names reachable without a credential (health, reflection).
        sheddable_methods: Full method names (``/package.Service/Method``) whose streams start
            new work, which the limiter refuses while the process is overloaded.
        max_metadata_bytes: Largest total metadata, counted as HTTP/2 does.
        """
        self._verifier = verifier
        self._limiter = limiter
        self._public = frozenset(public_services)
        self._sheddable = frozenset(sheddable_methods)
        self._max_metadata_bytes = max_metadata_bytes

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[RequestT, ResponseT] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        """Returns the method's handler wrapped by the edge checks; public services pass through.

        Only unary-request methods can be guarded; any other method of a protected service
        gets no handler, so gRPC answers UNIMPLEMENTED.
        """
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if service in self._public:
            return handler
        return self._wrap(handler, handler_call_details.method)

    def _wrap(
        self, handler: grpc.RpcMethodHandler[RequestT, ResponseT], method: str
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        serializer = handler.response_serializer
        # grpc.aio accepts coroutine and async-generator behaviours, which the stubs
        # (typed for the sync server) do not describe; hence the casts to object.
        if handler.unary_unary is not None:
            unary_unary = cast(Callable[[object, Context], Awaitable[object]], handler.unary_unary)

            async def guarded_unary_unary(request: object, context: Context) -> object:
                principal = await self._admit(request, context, method)
                token = bind_principal(principal)
                try:
                    return await unary_unary(request, context)
                finally:
                    unbind_principal(token)

            return grpc.unary_unary_rpc_method_handler(
                guarded_unary_unary, _tolerant(handler.request_deserializer), serializer
            )
        if handler.unary_stream is not None:
            unary_stream = cast(Callable[[object, Context], object], handler.unary_stream)

            sheddable = method in self._sheddable

            async def guarded_unary_stream(request: object, context: Context) -> None:
                principal = await self._admit(request, context, method)
                await self._stream(
                    principal, context, lambda: unary_stream(request, context), sheddable=sheddable
                )

            return grpc.unary_stream_rpc_method_handler(
                guarded_unary_stream, _tolerant(handler.request_deserializer), serializer
            )
        # ChatService has no request-streaming method, so there is no guard for one; such a
        # method on a protected service is refused (UNIMPLEMENTED), never served unguarded.
        logger.error("%s streams requests, which the edge cannot guard; refusing it", method)
        return None

    async def _admit(self, request: object, context: Context, method: str) -> Principal:
        """The verified principal, or an abort: nothing of the call has run yet."""
        metadata = _metadata(context)
        async with abort_on_error(context):
            try:
                _check_metadata_size(metadata, self._max_metadata_bytes)
                principal = self._verifier.verify(metadata, _peer_identities(context))
            except ChatError as err:
                # The credential itself is never logged, only why it was refused.
                logger.info("call refused: %s %s from %s", method, err.reason, context.peer())
                raise
            _check_metadata_values(metadata)
            if request is _MALFORMED:
                raise InvalidArgumentError(
                    "the request message is malformed", reason=ErrorReason.ERROR_REASON_MALFORMED_REQUEST
                )
            return principal
        raise AssertionError("unreachable: abort_on_error aborts")

    async def _stream(
        self, principal: Principal, context: Context, start: Callable[[], object], *, sheddable: bool
    ) -> None:
        """Runs a response-streaming behaviour inside a stream slot of the principal's owner."""
        with contextlib.ExitStack() as slot:
            async with abort_on_error(context):
                slot.enter_context(self._limiter.admit(principal.owner, sheddable=sheddable))
            token = bind_principal(principal)
            try:
                await run_streaming(start(), context)
            finally:
                unbind_principal(token)


async def run_streaming(result: object, context: Context) -> None:
    """Drives a response-streaming handler's result: an async generator's responses are
    written to ``context``; a coroutine handler (one that writes itself) is awaited."""
    if inspect.isasyncgen(result):
        async for response in cast(AsyncIterator[object], result):
            await context.write(response)
    elif inspect.isawaitable(result):
        await result
    else:
        raise TypeError(f"unsupported streaming handler result {type(result).__name__}")


def _tolerant(
    deserializer: Callable[[bytes], RequestT] | None,
) -> Callable[[bytes], RequestT] | None:
    """A deserializer that turns undecodable bytes into ``_MALFORMED`` for ``_admit`` to refuse."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> RequestT:
        try:
            return parse(data)
        except DecodeError:
            return cast(RequestT, _MALFORMED)

    return deserialize


def _metadata(context: Context) -> Sequence[tuple[str, str | bytes]]:
    return tuple((key, value) for key, value in context.invocation_metadata() or ())


def _check_metadata_size(metadata: Sequence[tuple[str, str | bytes]], limit: int) -> None:
    size = sum(len(key) + len(value) + _HEADER_OVERHEAD for key, value in metadata)
    if size > limit:
        raise RequestTooLargeError(
            "request metadata is too large",
            reason=ErrorReason.ERROR_REASON_METADATA_TOO_LARGE,
            metadata={"limit": str(limit)},
        )


def _check_metadata_values(metadata: Sequence[tuple[str, str | bytes]]) -> None:
    for key, value in metadata:
        # Binary (-bin) values are bytes by definition; everything else must be ASCII-Value.
        if isinstance(value, str) and _TEXT_VALUE.fullmatch(value) is None:
            raise InvalidArgumentError(
                "request metadata must be printable ASCII",
                reason=ErrorReason.ERROR_REASON_INVALID_METADATA,
                field_violations=[(key, "must be printable ASCII")],
                metadata={"key": key},
            )


def _peer_identities(context: Context) -> Sequence[str]:
    """Identities of a client certificate the TLS handshake verified; empty without one."""
    identities = context.peer_identities()
    if not identities:
        return ()
    return tuple(identity.decode("utf-8", "replace") for identity in identities)
