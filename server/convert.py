"""Pure conversions between protos and domain types, and parsing of request fields."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Final, assert_never

from chatstream.v1 import chat_service_pb2 as pb
from google.protobuf import timestamp_pb2

from server.domain import (
    Conversation,
    Message,
    Role,
    Sequenced,
    TextDelta,
    TurnCompleted,
    TurnStarted,
    TurnStatus,
    Usage,
)
from server.errors import InvalidArgumentError

_CONVERSATION_NAME: Final = re.compile(r"conversations/([0-9a-fA-F-]{32,36})")
_TURN_NAME: Final = re.compile(r"conversations/([0-9a-fA-F-]{32,36})/turns/([0-9a-fA-F-]{32,36})")
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_STATUS_TO_PROTO: Final = {
    TurnStatus.STREAMING: pb.TURN_STATUS_STREAMING,
    TurnStatus.COMPLETED: pb.TURN_STATUS_COMPLETED,
    TurnStatus.CANCELLED: pb.TURN_STATUS_CANCELLED,
    TurnStatus.FAILED: pb.TURN_STATUS_FAILED,
    TurnStatus.INTERRUPTED: pb.TURN_STATUS_INTERRUPTED,
}
_ROLE_TO_PROTO: Final = {Role.USER: pb.ROLE_USER, Role.ASSISTANT: pb.ROLE_ASSISTANT}


def parse_conversation_name(name: str, *, field: str) -> uuid.UUID:
    """``conversations/{uuid}`` -> the id; InvalidArgumentError naming ``field`` otherwise."""
    match = _CONVERSATION_NAME.fullmatch(name)
    if match is None:
        raise InvalidArgumentError.for_field(field, "must be conversations/{uuid}")
    try:
        return uuid.UUID(match.group(1))
    except ValueError:
        raise InvalidArgumentError.for_field(field, "must be conversations/{uuid}") from None


def parse_turn_name(name: str, *, field: str = "turn") -> tuple[uuid.UUID, uuid.UUID]:
    """``conversations/{uuid}/turns/{uuid}`` -> (conversation id, turn id)."""
    match = _TURN_NAME.fullmatch(name)
    if match is None:
        raise InvalidArgumentError.for_field(field, "must be conversations/{uuid}/turns/{uuid}")
    try:
        return uuid.UUID(match.group(1)), uuid.UUID(match.group(2))
    except ValueError:
        raise InvalidArgumentError.for_field(field, "must be conversations/{uuid}/turns/{uuid}") from None


def parse_resume_point(value: int, *, field: str) -> int:
    """``after_seq`` / ``after_offset``: zero or more."""
    if value < 0:
        raise InvalidArgumentError.for_field(field, "must not be negative")
    return value


def status_to_proto(status: TurnStatus) -> pb.TurnStatus.ValueType:
    """Domain turn status -> proto enum value."""
    return _STATUS_TO_PROTO[status]


def parse_conversation_id(value: str, *, field: str) -> uuid.UUID:
    """A bare conversation id (a UUID)."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgumentError.for_field(field, "must be a UUID") from None


def parse_request_id(value: str, *, field: str = "request_id") -> str | None:
    """An optional idempotency key: empty means none."""
    if not value:
        return None
    if _REQUEST_ID.fullmatch(value) is None:
        raise InvalidArgumentError.for_field(field, "must be 1-128 characters of [A-Za-z0-9._:-]")
    return value


def parse_text(value: str, *, max_chars: int, field: str = "text") -> str:
    """The user's message: required, bounded, no NUL bytes (PostgreSQL text cannot hold them)."""
    if not value.strip():
        raise InvalidArgumentError.for_field(field, "must not be empty")
    if len(value) > max_chars:
        raise InvalidArgumentError.for_field(field, f"must be at most {max_chars} characters")
    if "\x00" in value:
        raise InvalidArgumentError.for_field(field, "must not contain NUL characters")
    return value


def conversation_name(conversation_id: uuid.UUID) -> str:
    """Resource name of a conversation."""
    return f"conversations/{conversation_id}"


def turn_name(conversation_id: uuid.UUID, turn_id: uuid.UUID) -> str:
    """Resource name of a turn."""
    return f"conversations/{conversation_id}/turns/{turn_id}"


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def conversation_to_proto(conversation: Conversation) -> pb.Conversation:
    """Domain conversation -> proto."""
    return pb.Conversation(
        name=conversation_name(conversation.id),
        create_time=_timestamp(conversation.created_at),
        update_time=_timestamp(conversation.updated_at),
        turn_count=conversation.turn_count,
        message_count=conversation.message_count,
    )


def message_to_proto(message: Message) -> pb.Message:
    """Domain message -> proto."""
    return pb.Message(
        name=f"{conversation_name(message.conversation_id)}/messages/{message.id}",
        role=_ROLE_TO_PROTO[message.role],
        text=message.text,
        turn=turn_name(message.conversation_id, message.turn_id),
        turn_status=_STATUS_TO_PROTO[message.turn_status],
        create_time=_timestamp(message.created_at),
    )


def usage_to_proto(usage: Usage) -> pb.Usage:
    """Domain usage -> proto."""
    return pb.Usage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)


def event_to_proto(item: Sequenced) -> pb.ChatResponse:
    """One numbered domain event -> one ChatResponse."""
    seq, event = item.seq, item.event
    match event:
        case TextDelta(text=text, offset=offset):
            return pb.ChatResponse(
                event=pb.TurnEvent(seq=seq, text_delta=pb.TextDelta(text=text, offset=offset))
            )
        case TurnStarted(conversation_id=conversation_id, turn_id=turn_id, replay=replay):
            started = pb.TurnStarted(
                conversation=conversation_name(conversation_id),
                turn=turn_name(conversation_id, turn_id),
                replay=replay,
            )
            return pb.ChatResponse(event=pb.TurnEvent(seq=seq, started=started))
        case TurnCompleted(status=status, stop_reason=stop_reason, usage=usage, model=model):
            completed = pb.TurnCompleted(
                status=_STATUS_TO_PROTO[status],
                stop_reason=stop_reason,
                usage=usage_to_proto(usage),
                model=model,
                error_reason=event.error_reason or "",
            )
            return pb.ChatResponse(event=pb.TurnEvent(seq=seq, completed=completed))
        case _:
            assert_never(event)
