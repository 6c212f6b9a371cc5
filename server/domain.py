"""Domain types: conversations, turns, messages and turn events. No proto, no ORM."""

from __future__ import annotations

import dataclasses
import enum
import uuid
from dataclasses import dataclass
from datetime import datetime


class TurnStatus(enum.StrEnum):
    """Lifecycle of a turn; every turn ends in exactly one terminal status."""

    STREAMING = "STREAMING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"

    @property
    def terminal(self) -> bool:
        """True once the turn can no longer change."""
        return self is not TurnStatus.STREAMING


class Role(enum.IntEnum):
    """Author of a message; the value orders a turn's two messages (user first)."""

    USER = 1
    ASSISTANT = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token counts reported by the model."""

    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversation:
    """A chat session owned by one caller."""

    id: uuid.UUID
    owner: str
    created_at: datetime
    updated_at: datetime
    turn_count: int
    """Turns started, whatever their outcome; also allocates each turn's ``seq``."""
    message_count: int
    """Messages persisted by the consumer (eventually consistent)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Turn:
    """One user message and the assistant's reply to it, as stored on the turn row."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    owner: str
    seq: int
    """1, 2, 3, ... within the conversation; the order of turns."""
    request_id: str | None
    user_text: str
    assistant_text: str
    status: TurnStatus
    stop_reason: str | None
    usage: Usage
    model: str
    created_at: datetime
    completed_at: datetime | None
    last_seq: int | None = None
    """The number of the turn's terminal event, once it ended (None for turns that ended
    before events were numbered by the producer)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnEnding:
    """How a turn ended and what it produced: everything unit of work 2 stores."""

    status: TurnStatus
    text: str
    stop_reason: str | None
    usage: Usage
    model: str
    error_reason: str | None
    last_seq: int
    """The number of the terminal event."""

    def applied_to(self, turn: Turn) -> Turn:
        """``turn`` as it reads once this ending is stored."""
        return dataclasses.replace(
            turn,
            status=self.status,
            assistant_text=self.text,
            stop_reason=self.stop_reason,
            usage=self.usage,
            model=self.model,
            last_seq=self.last_seq,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One persisted message, as written by the consumer."""

    id: uuid.UUID
    conversation_id: uuid.UUID
    turn_id: uuid.UUID
    turn_seq: int
    role: Role
    text: str
    turn_status: TurnStatus
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Exchange:
    """An earlier turn as the model sees it in the prompt."""

    seq: int
    user_text: str
    assistant_text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnStarted:
    """The turn is durable; sent first."""

    conversation_id: uuid.UUID
    turn_id: uuid.UUID
    replay: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TextDelta:
    """A piece of the reply."""

    text: str
    offset: int = 0
    """Where ``text`` starts in the whole reply, in characters (Unicode code points)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnCompleted:
    """The turn ended and its outcome is stored; sent last."""

    status: TurnStatus
    stop_reason: str
    usage: Usage
    model: str
    error_reason: str | None = None
    """Why a turn that did not complete ended (CANCELLED, a failure's reason, LEASE_EXPIRED)."""


TurnEvent = TurnStarted | TextDelta | TurnCompleted


@dataclass(frozen=True, slots=True)
class Sequenced:
    """A turn event with its number, assigned where the turn is produced.

    Every client and watcher of a turn sees the same number for the same event. An event
    that joins several produced deltas carries the number of the last one, so numbers
    increase but may skip.
    """

    seq: int
    event: TurnEvent
