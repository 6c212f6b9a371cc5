"""The one exception the SDK raises for a failed call, with the server's rich status unpacked.

Exception tree::

    ChatClientError   any failed RPC: gRPC status code + google.rpc.ErrorInfo / BadRequest / RetryInfo

gRPC's own exceptions never reach the caller: both clients convert them here, in
`ChatClientError.from_rpc_error`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Final, Self

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

# The trailer that carries a serialized google.rpc.Status; the same key grpc_status reads.
_STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"


class ChatClientError(Exception):
    """A call to ChatService failed.

    Attributes:
        code: The gRPC status code, e.g. `grpc.StatusCode.NOT_FOUND`.
        message: The server's message for people; do not parse it.
        reason: `ErrorInfo.reason`, a stable UPPER_SNAKE identifier such as
            `CONVERSATION_NOT_FOUND`; "" when the status carried no ErrorInfo (for
            example a deadline or a connection failure seen by the client itself).
        domain: `ErrorInfo.domain`, `chatstream.v1.ChatService` for errors from the service.
        metadata: `ErrorInfo.metadata`, the dynamic parts of the message (e.g. `conversation`).
        field_violations: `(field, description)` pairs from `google.rpc.BadRequest`.
        retry_delay: How long the server asks the caller to wait before retrying
            (`google.rpc.RetryInfo`), or None.
    """

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: Mapping[str, str]
    field_violations: Sequence[tuple[str, str]]
    retry_delay: timedelta | None

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_delay: timedelta | None = None,
    ) -> None:
        """Builds the error; the clients use `from_rpc_error`, tests and fakes may call this directly."""
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.retry_delay = retry_delay

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> Self:
        """Converts a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`) into a ChatClientError.

        The rich status is read from the `grpc-status-details-bin` trailer directly, which
        works the same for both flavours of call; a missing or unreadable trailer leaves the
        detail attributes empty rather than hiding the original code and message.
        """
        # Parsed eagerly, unlike STYLE.md §5's lazy `rpc_status.from_call`: decoding three small
        # messages is cheap, and plain attributes outlive the call and survive pickling.
        code, message, status_bytes = _code_message_details(error)
        status = _parse_status(status_bytes)
        reason = domain = ""
        metadata: dict[str, str] = {}
        violations: list[tuple[str, str]] = []
        retry_delay: timedelta | None = None
        for detail in status.details if status is not None else ():
            # Unpack() is False for another type; unknown detail types are left alone.
            info = error_details_pb2.ErrorInfo()
            bad_request = error_details_pb2.BadRequest()
            retry_info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Unpack(bad_request):
                violations.extend((v.field, v.description) for v in bad_request.field_violations)
            elif detail.Unpack(retry_info):
                retry_delay = retry_info.retry_delay.ToTimedelta()
        return cls(
            code,
            message,
            reason=reason,
            domain=domain,
            metadata=metadata,
            field_violations=violations,
            retry_delay=retry_delay,
        )

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        if self.field_violations:
            violations = "; ".join(f"{field}: {description}" for field, description in self.field_violations)
            text += f" ({violations})"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code}, message={self.message!r}, reason={self.reason!r})"


def _code_message_details(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, bytes | None]:
    if isinstance(error, grpc.aio.AioRpcError):
        trailers = error.trailing_metadata()
        value = trailers.get(_STATUS_DETAILS_KEY) if trailers is not None else None
        return error.code(), error.details() or "", value if isinstance(value, bytes) else None
    if isinstance(error, grpc.Call):
        # Every sync RpcError raised by a call is also the grpc.Call that failed.
        value = next((v for k, v in error.trailing_metadata() or () if k == _STATUS_DETAILS_KEY), None)
        return error.code(), error.details() or "", value if isinstance(value, bytes) else None
    # A bare RpcError (e.g. from an interceptor) carries neither code nor trailers.
    return grpc.StatusCode.UNKNOWN, str(error), None


def _parse_status(status_bytes: bytes | None) -> status_pb2.Status | None:
    if status_bytes is None:
        return None
    try:
        return status_pb2.Status.FromString(status_bytes)
    except DecodeError:
        return None
