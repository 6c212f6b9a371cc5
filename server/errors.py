"""Errors raised by use cases, and their translation into rich gRPC statuses.

Exception tree::

    ChatError
    ├── InvalidArgumentError          INVALID_ARGUMENT  BadRequest field violations
    │   └── IdempotencyKeyReusedError INVALID_ARGUMENT  request_id reused with another message
    ├── UnauthenticatedError          UNAUTHENTICATED   CREDENTIALS_MISSING / _INVALID / _EXPIRED
    ├── PermissionDeniedError         PERMISSION_DENIED DELEGATION_NOT_ALLOWED
    ├── NotFoundError                 NOT_FOUND         CONVERSATION_NOT_FOUND
    ├── AlreadyExistsError            ALREADY_EXISTS    CONVERSATION_EXISTS
    ├── TurnInProgressError           ABORTED           TURN_IN_PROGRESS
    ├── DeadlineExceededError         DEADLINE_EXCEEDED the call's deadline passed mid-turn
    ├── RetryableError                                  RetryInfo (when to try again)
    │   ├── ResourceExhaustedError    RESOURCE_EXHAUSTED TOO_MANY_STREAMS
    │   └── UnavailableError          UNAVAILABLE
    │       ├── UpstreamUnavailableError  the model is overloaded, rate limited or unreachable
    │       └── StorageUnavailableError   PostgreSQL or Redis is unreachable
    └── InternalError                 INTERNAL          generic message, details only in logs

Only this module, ``servicer.py`` and ``edge.py`` (the interceptor) know about gRPC.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import timedelta
from typing import ClassVar, TypeVar

import asyncpg.exceptions
import grpc
import redis.exceptions
import sqlalchemy.exc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.constants import ERROR_DOMAIN

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class ChatError(Exception):
    """Root of the errors a caller may see; each maps to one gRPC status code."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgumentError(ChatError):
    """A request field is malformed; raised before any side effect."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        field_violations: Sequence[tuple[str, str]] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.field_violations = list(field_violations)

    @classmethod
    def for_field(cls, field: str, description: str) -> InvalidArgumentError:
        """One bad field, described for the caller."""
        return cls(
            f"{field}: {description}", field_violations=[(field, description)], metadata={"field": field}
        )


class IdempotencyKeyReusedError(InvalidArgumentError):
    """The request_id was already used for a different message."""

    default_reason = "IDEMPOTENCY_KEY_REUSED"


class UnauthenticatedError(ChatError):
    """No valid credential."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(ChatError):
    """A valid credential asked for something it is not allowed to do (act for a user)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class RetryableError(ChatError):
    """A transient refusal: the status carries RetryInfo telling when to try again."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: timedelta = timedelta(seconds=1),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after


class ResourceExhaustedError(RetryableError):
    """A concurrency limit is reached; the caller may retry after ``retry_after``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class NotFoundError(ChatError):
    """The conversation does not exist, or belongs to someone else (indistinguishable)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "CONVERSATION_NOT_FOUND"


class AlreadyExistsError(ChatError):
    """A conversation with that id exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "CONVERSATION_EXISTS"


class TurnInProgressError(ChatError):
    """Another turn of the conversation (or the same request_id) is still streaming."""

    code = grpc.StatusCode.ABORTED
    default_reason = "TURN_IN_PROGRESS"


class DeadlineExceededError(ChatError):
    """The call's deadline passed; whatever the turn produced is stored as CANCELLED."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class UnavailableError(RetryableError):
    """A dependency is temporarily unavailable; the caller may retry after ``retry_after``."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class UpstreamUnavailableError(UnavailableError):
    """The model is overloaded, rate limited, timed out or unreachable."""

    default_reason = "UPSTREAM_UNAVAILABLE"


class StorageUnavailableError(UnavailableError):
    """PostgreSQL or Redis could not be reached."""

    default_reason = "STORAGE_UNAVAILABLE"


class InternalError(ChatError):
    """Our bug or misconfiguration (e.g. the model rejected our request); details stay in the logs."""


def to_status(err: ChatError) -> status_pb2.Status:
    """Builds the rich status: ErrorInfo always, BadRequest and RetryInfo where they apply."""
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata)
    details.append(_pack(info))
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
    code_value: int = err.code.value[0]
    return status_pb2.Status(code=code_value, message=err.message, details=details)


def _pack(
    message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def classify(exc: BaseException) -> ChatError:
    """Turns any exception into the ChatError a caller should see.

    Connection failures to PostgreSQL or Redis are transient (UNAVAILABLE); anything
    we did not anticipate is INTERNAL with a generic message, never internals.
    """
    if isinstance(exc, ChatError):
        return exc
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return StorageUnavailableError("storage is temporarily unavailable", metadata={"dependency": "redis"})
    if is_database_outage(exc):
        return StorageUnavailableError(
            "storage is temporarily unavailable", metadata={"dependency": "postgresql"}
        )
    return InternalError("internal error")


# asyncpg errors meaning "the server is gone, restarting or refusing connections":
# connection failures (SQLSTATE class 08) and operator intervention (57P01-57P03);
# no connection slot left (53300); a database not accepting connections (55000, e.g.
# ALLOW_CONNECTIONS false during maintenance); a primary that became a read-only
# standby in a failover (25006). All of them pass once the database is back, so
# they are retried like a refused connection (ConnectionRefusedError is an OSError).
_OUTAGE_ERRORS = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.InterfaceError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    ConnectionError,
    OSError,
)


def is_database_outage(exc: BaseException) -> bool:
    """True when ``exc`` means PostgreSQL is unreachable, not that a statement is wrong.

    SQLAlchemy wraps asyncpg's exceptions, so the whole cause chain is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, _OUTAGE_ERRORS):
            return True
        current = current.__cause__ or current.__context__
    return False


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
        elif isinstance(err, InternalError | UnavailableError):
            logger.warning("RPC failed: %s (%s)", err.reason, exc.__class__.__name__)
        status = rpc_status.to_status(to_status(err))
        await context.abort(status.code, status.details, status.trailing_metadata)


__all__ = [
    "AlreadyExistsError",
    "ChatError",
    "DeadlineExceededError",
    "IdempotencyKeyReusedError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryableError",
    "StorageUnavailableError",
    "TurnInProgressError",
    "UnauthenticatedError",
    "UnavailableError",
    "UpstreamUnavailableError",
    "abort_on_error",
    "classify",
    "is_database_outage",
    "to_status",
]
