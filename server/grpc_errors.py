"""How a ChatError travels over gRPC: the status code of each reason, the rich details, the abort.

The domain (``server/errors.py``) says what went wrong as an ``ErrorReason``; this module
is the one place that turns it into a gRPC status. ``STATUS_CODES`` is the table of
reason to code that the proto's ``ErrorReason`` comments promise to callers (a test
checks the two agree). Only this module, ``servicer.py`` and ``edge.py`` (the
interceptor) know about gRPC.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Final, TypeVar

import grpc
from chatstream.v1.chat_service_pb2 import ErrorReason
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.constants import ERROR_DOMAIN
from server.errors import (
    ChatError,
    InternalError,
    InvalidArgumentError,
    OverloadedError,
    RetryableError,
    UnavailableError,
    classify,
)

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

_R = ErrorReason
_C = grpc.StatusCode

STATUS_CODES: Final[Mapping[ErrorReason.ValueType, grpc.StatusCode]] = {
    _R.ERROR_REASON_INVALID_ARGUMENT: _C.INVALID_ARGUMENT,
    _R.ERROR_REASON_MALFORMED_REQUEST: _C.INVALID_ARGUMENT,
    _R.ERROR_REASON_INVALID_METADATA: _C.INVALID_ARGUMENT,
    _R.ERROR_REASON_IDEMPOTENCY_KEY_REUSED: _C.INVALID_ARGUMENT,
    _R.ERROR_REASON_METADATA_TOO_LARGE: _C.RESOURCE_EXHAUSTED,
    _R.ERROR_REASON_CREDENTIALS_MISSING: _C.UNAUTHENTICATED,
    _R.ERROR_REASON_CREDENTIALS_INVALID: _C.UNAUTHENTICATED,
    _R.ERROR_REASON_SUBJECT_RESERVED: _C.UNAUTHENTICATED,
    _R.ERROR_REASON_CREDENTIALS_EXPIRED: _C.UNAUTHENTICATED,
    _R.ERROR_REASON_DELEGATION_NOT_ALLOWED: _C.PERMISSION_DENIED,
    _R.ERROR_REASON_CONVERSATION_NOT_FOUND: _C.NOT_FOUND,
    _R.ERROR_REASON_TURN_NOT_FOUND: _C.NOT_FOUND,
    _R.ERROR_REASON_CONVERSATION_EXISTS: _C.ALREADY_EXISTS,
    _R.ERROR_REASON_TURN_IN_PROGRESS: _C.ABORTED,
    _R.ERROR_REASON_TOO_MANY_STREAMS: _C.RESOURCE_EXHAUSTED,
    _R.ERROR_REASON_DEADLINE_EXCEEDED: _C.DEADLINE_EXCEEDED,
    _R.ERROR_REASON_UPSTREAM_UNAVAILABLE: _C.UNAVAILABLE,
    _R.ERROR_REASON_STORAGE_UNAVAILABLE: _C.UNAVAILABLE,
    _R.ERROR_REASON_SERVER_OVERLOADED: _C.UNAVAILABLE,
    _R.ERROR_REASON_INTERNAL: _C.INTERNAL,
}
"""The gRPC status code of every reason the service sends; ``ErrorReason``'s comments say the same."""


def to_status(err: ChatError) -> status_pb2.Status:
    """Builds the rich status: ErrorInfo always, BadRequest and RetryInfo where they apply."""
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata))
    ]
    if isinstance(err, InvalidArgumentError) and err.field_violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in err.field_violations
            ]
        )
        details.append(_pack(bad_request))
    if isinstance(err, RetryableError):
        delay = duration_pb2.Duration()
        delay.FromTimedelta(err.retry_after)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    code_value: int = STATUS_CODES[err.error_reason].value[0]
    return status_pb2.Status(code=code_value, message=err.message, details=details)


def _pack(
    message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


@contextlib.asynccontextmanager
async def abort_on_error(context: grpc.aio.ServicerContext[RequestT, ResponseT]) -> AsyncIterator[None]:
    """Aborts the call with a rich status for any error raised inside the block.

    ``grpc.aio.AbortError`` (an abort already under way) and ``asyncio.CancelledError``
    (the call is gone) pass through untouched.
    """
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        err = classify(exc)
        if isinstance(err, InternalError) and err is not exc:
            logger.exception("unexpected error in RPC")
        elif isinstance(err, OverloadedError):
            # Hundreds a second while shedding: the load monitor logs when shedding starts
            # and stops, and chatstream_streams_refused_total counts them.
            pass
        elif isinstance(err, InternalError | UnavailableError):
            logger.warning("RPC failed: %s (%s)", err.reason, exc.__class__.__name__)
        status = rpc_status.to_status(to_status(err))
        await context.abort(status.code, status.details, status.trailing_metadata)


__all__ = ["STATUS_CODES", "abort_on_error", "to_status"]
