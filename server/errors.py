"""Errors raised by use cases: what went wrong, as a reason from the proto's ``ErrorReason``.

These are domain values. How they travel (the gRPC status code of each reason, the
``google.rpc`` details) is the gRPC layer's business: ``server/grpc_errors.py``.

Exception tree, with the reasons each sends (``ErrorReason`` without its prefix)::

    ChatError
    ├── InvalidArgumentError          INVALID_ARGUMENT (field violations), MALFORMED_REQUEST, INVALID_METADATA
    │   └── IdempotencyKeyReusedError IDEMPOTENCY_KEY_REUSED
    ├── RequestTooLargeError          METADATA_TOO_LARGE
    ├── UnauthenticatedError          CREDENTIALS_MISSING / _INVALID / _EXPIRED (no default: say which)
    ├── PermissionDeniedError         DELEGATION_NOT_ALLOWED
    ├── NotFoundError                 CONVERSATION_NOT_FOUND
    ├── AlreadyExistsError            CONVERSATION_EXISTS
    ├── DeadlineExceededError         DEADLINE_EXCEEDED: the call's deadline passed mid-turn
    ├── RetryableError                a transient refusal; ``retry_after`` says when to try again
    │   ├── TurnInProgressError       TURN_IN_PROGRESS
    │   ├── ResourceExhaustedError    TOO_MANY_STREAMS
    │   └── UnavailableError
    │       ├── UpstreamUnavailableError  UPSTREAM_UNAVAILABLE: the model is overloaded or unreachable
    │       ├── StorageUnavailableError   STORAGE_UNAVAILABLE: PostgreSQL or Redis is unreachable
    │       └── OverloadedError           SERVER_OVERLOADED: this process sheds new turns (server/load.py)
    └── InternalError                 INTERNAL: generic message, details only in logs

    ClientGoneError                   not a ChatError: nobody is left to send a status to

A reason is an ``ErrorReason`` value of the generated proto module, never a string typed
here, so the server can send only reasons the contract lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import ClassVar, Final

from chatstream.v1.chat_service_pb2 import ErrorReason

from server.db.outages import is_database_outage
from server.redis_client import is_redis_outage

REASON_PREFIX: Final = "ERROR_REASON_"
"""What the proto's enum values carry and ``ErrorInfo.reason`` does not (buf's enum naming rule)."""


def reason_name(reason: ErrorReason.ValueType) -> str:
    """The ``ErrorInfo.reason`` string of an ``ErrorReason`` value: its name without the prefix."""
    return ErrorReason.Name(reason).removeprefix(REASON_PREFIX)


class ChatError(Exception):
    """Root of the errors a caller may see; each carries one ``ErrorReason``."""

    default_reason: ClassVar[ErrorReason.ValueType] = ErrorReason.ERROR_REASON_INTERNAL
    """The reason when none is given; UNSPECIFIED means the raiser must name one."""
    error_reason: ErrorReason.ValueType
    """What went wrong, as the contract names it."""

    def __init__(
        self,
        message: str,
        *,
        reason: ErrorReason.ValueType | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.error_reason = self.default_reason if reason is None else reason
        if self.error_reason == ErrorReason.ERROR_REASON_UNSPECIFIED:
            raise TypeError(f"{type(self).__name__} needs a reason")
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def reason(self) -> str:
        """The reason as ``ErrorInfo.reason`` spells it, e.g. ``CONVERSATION_NOT_FOUND``."""
        return reason_name(self.error_reason)


class InvalidArgumentError(ChatError):
    """A request field is malformed; raised before any side effect."""

    default_reason = ErrorReason.ERROR_REASON_INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        *,
        field_violations: Sequence[tuple[str, str]] = (),
        reason: ErrorReason.ValueType | None = None,
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

    default_reason = ErrorReason.ERROR_REASON_IDEMPOTENCY_KEY_REUSED


class RequestTooLargeError(ChatError):
    """A part of the request is over a size limit; only a smaller request can succeed."""

    default_reason = ErrorReason.ERROR_REASON_METADATA_TOO_LARGE


class UnauthenticatedError(ChatError):
    """No valid credential; the raiser says which way it is not (missing, invalid, expired)."""

    default_reason = ErrorReason.ERROR_REASON_UNSPECIFIED


class PermissionDeniedError(ChatError):
    """A valid credential asked for something it is not allowed to do (act for a user)."""

    default_reason = ErrorReason.ERROR_REASON_DELEGATION_NOT_ALLOWED


class NotFoundError(ChatError):
    """The conversation does not exist, or belongs to someone else (indistinguishable)."""

    default_reason = ErrorReason.ERROR_REASON_CONVERSATION_NOT_FOUND


class AlreadyExistsError(ChatError):
    """A conversation with that id exists."""

    default_reason = ErrorReason.ERROR_REASON_CONVERSATION_EXISTS


class DeadlineExceededError(ChatError):
    """The call's deadline passed; whatever the turn produced is stored as CANCELLED."""

    default_reason = ErrorReason.ERROR_REASON_DEADLINE_EXCEEDED


class RetryableError(ChatError):
    """A transient refusal: the caller may try again after ``retry_after`` (sent as RetryInfo)."""

    default_reason = ErrorReason.ERROR_REASON_UNSPECIFIED

    def __init__(
        self,
        message: str,
        *,
        retry_after: timedelta = timedelta(seconds=1),
        reason: ErrorReason.ValueType | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after


class TurnInProgressError(RetryableError):
    """Another turn of the conversation (or the same request_id) is still streaming.

    Retryable: a conversation streams one turn at a time, and the other turn ends.
    """

    default_reason = ErrorReason.ERROR_REASON_TURN_IN_PROGRESS


class ResourceExhaustedError(RetryableError):
    """A concurrency limit is reached; the caller may retry after ``retry_after``."""

    default_reason = ErrorReason.ERROR_REASON_TOO_MANY_STREAMS


class UnavailableError(RetryableError):
    """A dependency is temporarily unavailable; the caller may retry after ``retry_after``."""


class UpstreamUnavailableError(UnavailableError):
    """The model is overloaded, rate limited, timed out or unreachable."""

    default_reason = ErrorReason.ERROR_REASON_UPSTREAM_UNAVAILABLE


class StorageUnavailableError(UnavailableError):
    """PostgreSQL or Redis could not be reached."""

    default_reason = ErrorReason.ERROR_REASON_STORAGE_UNAVAILABLE


class OverloadedError(UnavailableError):
    """This process's measured load is past what it can carry; new turns are refused before any side effect.

    UNAVAILABLE rather than RESOURCE_EXHAUSTED: the condition is the server's and passes
    within seconds, and another replica may serve the call now; clients and proxies retry
    UNAVAILABLE (after ``retry_after``), not a quota error.
    """

    default_reason = ErrorReason.ERROR_REASON_SERVER_OVERLOADED


class InternalError(ChatError):
    """Our bug or misconfiguration (e.g. the model rejected our request); details stay in the logs."""


def classify(exc: BaseException) -> ChatError:
    """Turns any exception into the ChatError a caller should see.

    Connection failures to PostgreSQL or Redis are transient (UNAVAILABLE); anything
    we did not anticipate is INTERNAL with a generic message, never internals.
    """
    if isinstance(exc, ChatError):
        return exc
    # A bare OSError may come from any socket; the database's own check below knows its errors.
    if is_redis_outage(exc) and not isinstance(exc, OSError):
        return StorageUnavailableError("storage is temporarily unavailable", metadata={"dependency": "redis"})
    if is_database_outage(exc):
        return StorageUnavailableError(
            "storage is temporarily unavailable", metadata={"dependency": "postgresql"}
        )
    return InternalError("internal error")


__all__ = [
    "REASON_PREFIX",
    "AlreadyExistsError",
    "ChatError",
    "DeadlineExceededError",
    "ErrorReason",
    "IdempotencyKeyReusedError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RequestTooLargeError",
    "ResourceExhaustedError",
    "RetryableError",
    "StorageUnavailableError",
    "TurnInProgressError",
    "UnauthenticatedError",
    "UnavailableError",
    "UpstreamUnavailableError",
    "classify",
    "is_database_outage",
    "reason_name",
]


class ClientGoneError(Exception):
    """The call's receiver is gone: an event could not be written (disconnect, reset, cancel,
    a client that accepts no write for ``CHATSTREAM_WRITE_TIMEOUT_S``, a watcher far behind)."""
