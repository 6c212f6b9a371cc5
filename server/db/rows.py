"""Row to domain mappers: one per domain type, for every query that returns it, on either path."""

from __future__ import annotations

from server.db.engine import Row
from server.domain import Conversation, Message, Role, Turn, TurnStatus, Usage


def turn(row: Row) -> Turn:
    """A turn from a row of ``chat.turns`` (extra columns are ignored)."""
    return Turn(
        id=row["id"],
        conversation_id=row["conversation_id"],
        owner=row["owner"],
        seq=row["seq"],
        request_id=row["request_id"],
        user_text=row["user_text"],
        assistant_text=row["assistant_text"],
        status=TurnStatus(row["status"]),
        stop_reason=row["stop_reason"],
        usage=Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"]),
        model=row["model"],
        created_at=row["created_at"],
        completed_at=row["completed_at"],
        last_seq=row["last_seq"],
    )


def conversation(row: Row) -> Conversation:
    """A conversation from a row of ``chat.conversations``."""
    return Conversation(
        id=row["id"],
        owner=row["owner"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        turn_count=row["turn_count"],
        message_count=row["message_count"],
    )


def message(row: Row) -> Message:
    """A message from a row of ``chat.messages``."""
    return Message(
        id=row["id"],
        conversation_id=row["conversation_id"],
        turn_id=row["turn_id"],
        turn_seq=row["turn_seq"],
        role=Role(row["role"]),
        text=row["text"],
        turn_status=TurnStatus(row["turn_status"]),
        created_at=row["created_at"],
    )
