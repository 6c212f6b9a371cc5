"""Versioned encoding of a completed turn as Redis Stream fields; shared by publisher and consumer."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Final

from server.domain import Turn, TurnStatus, Usage

FORMAT_VERSION: Final = "1"
_VERSION_FIELD: Final = b"v"
_TURN_FIELD: Final = b"turn"


class EventDecodeError(ValueError):
    """A stream entry that can never be decoded: poison, headed for the dead-letter stream."""


def encode_turn(turn: Turn) -> dict[bytes, bytes]:
    """The stream fields for one ended turn: ``v`` (format version) and ``turn`` (JSON)."""
    payload = {
        "id": str(turn.id),
        "conversation_id": str(turn.conversation_id),
        "owner": turn.owner,
        "seq": turn.seq,
        "request_id": turn.request_id,
        "user_text": turn.user_text,
        "assistant_text": turn.assistant_text,
        "status": turn.status.value,
        "stop_reason": turn.stop_reason,
        "input_tokens": turn.usage.input_tokens,
        "output_tokens": turn.usage.output_tokens,
        "model": turn.model,
        "created_at": turn.created_at.isoformat(),
        "completed_at": None if turn.completed_at is None else turn.completed_at.isoformat(),
    }
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return {_VERSION_FIELD: FORMAT_VERSION.encode(), _TURN_FIELD: body}


def decode_turn(fields: Mapping[bytes, bytes]) -> Turn:
    """Parses stream fields back into a Turn; EventDecodeError if they are not a valid turn."""
    version = fields.get(_VERSION_FIELD)
    if version != FORMAT_VERSION.encode():
        raise EventDecodeError(f"unsupported format version {version!r}")
    body = fields.get(_TURN_FIELD)
    if not body:
        raise EventDecodeError("empty turn payload")
    try:
        data = json.loads(body)
        completed_at = data["completed_at"]
        turn = Turn(
            id=uuid.UUID(data["id"]),
            conversation_id=uuid.UUID(data["conversation_id"]),
            owner=_str(data["owner"]),
            seq=_int(data["seq"]),
            request_id=data["request_id"],
            user_text=_str(data["user_text"]),
            assistant_text=_str(data["assistant_text"]),
            status=TurnStatus(data["status"]),
            stop_reason=data["stop_reason"],
            usage=Usage(input_tokens=_int(data["input_tokens"]), output_tokens=_int(data["output_tokens"])),
            model=_str(data["model"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            completed_at=None if completed_at is None else datetime.fromisoformat(completed_at),
        )
    # RecursionError: json's parser gives up on deeply nested values (in any field, even one
    # the turn does not use); such an entry can never be decoded, like any malformed one.
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise EventDecodeError(f"malformed turn payload: {exc.__class__.__name__}: {exc}") from exc
    if not turn.status.terminal:
        raise EventDecodeError("turn payload is not in a terminal status")
    return turn


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value
