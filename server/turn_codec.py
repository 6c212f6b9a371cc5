"""Versioned encoding of a completed turn as Redis Stream fields; shared by publisher and consumer.

Two decoders read format 1: ``decode_turn`` builds a ``Turn`` (the dead-letter tools, tests),
and ``TurnColumns`` decodes the consumer's batches straight into the columns of its one
statement. ``decode_turn`` is the definition: ``TurnColumns`` accepts exactly the entries
it accepts, with the same values, and rejects the others with its error.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Final

import msgspec

from server.domain import Turn, TurnStatus, Usage
from server.message_ids import message_ids_hex

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


class _WireTurn(msgspec.Struct, forbid_unknown_fields=True):
    """Format 1's JSON body as ``encode_turn`` writes it: one flat object, typed as ``decode_turn`` checks it.

    Anything else ``decode_turn`` may still accept (unknown keys, any JSON value in
    ``request_id`` or ``stop_reason``, a UUID spelled otherwise, NaN, a UTF-8 BOM, ...) or
    reject is left to it: this schema only picks out the common case, and being flat it
    cannot meet the parser's nesting limit where ``json`` would not.
    """

    id: str
    conversation_id: str
    owner: str
    seq: int
    request_id: str | None
    user_text: str
    assistant_text: str
    status: str
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    model: str
    created_at: str
    completed_at: str | None


_decode_wire: Final = msgspec.json.Decoder(_WireTurn).decode
_VERSION: Final = FORMAT_VERSION.encode()
_TERMINAL: Final = frozenset(s.value for s in TurnStatus if s.terminal)
# str(uuid.UUID(x)) == x exactly for these; any other spelling uuid.UUID accepts (upper
# case, braces, "urn:uuid:", no hyphens) goes through decode_turn and is normalized there.
_canonical_uuid: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").fullmatch


class TurnColumns:
    """Ended turns decoded straight into the columns of the consumer's statement, one element per turn.

    The ids go as canonical strings and the message ids as hex, which the driver encodes
    without building UUID objects; ``created`` holds datetimes, as ``decode_turn`` parses them.
    """

    __slots__ = (
        "assistant_message_ids",
        "assistant_texts",
        "conversation_ids",
        "created",
        "seqs",
        "statuses",
        "turn_ids",
        "user_message_ids",
        "user_texts",
    )

    def __init__(self) -> None:
        self.turn_ids: list[str] = []
        self.conversation_ids: list[str] = []
        self.seqs: list[int] = []
        self.statuses: list[str] = []
        self.created: list[datetime] = []
        self.user_message_ids: list[str] = []
        self.user_texts: list[str] = []
        self.assistant_message_ids: list[str] = []
        self.assistant_texts: list[str] = []

    @classmethod
    def of(cls, turns: Iterable[Turn]) -> TurnColumns:
        """The columns of already decoded turns."""
        columns = cls()
        for turn in turns:
            columns.append_turn(turn)
        return columns

    def __len__(self) -> int:
        return len(self.turn_ids)

    def append(self, fields: Mapping[bytes, bytes]) -> None:
        """Decodes one stream entry onto the columns.

        Raises:
            EventDecodeError: exactly when ``decode_turn(fields)`` does, with its message;
                the columns are then unchanged.
        """
        if fields.get(_VERSION_FIELD) == _VERSION:
            body = fields.get(_TURN_FIELD)
            try:
                wire = _decode_wire(body) if body else None
            except (msgspec.DecodeError, RecursionError):
                wire = None
            if (
                wire is not None
                and wire.status in _TERMINAL
                and _canonical_uuid(wire.id)
                and _canonical_uuid(wire.conversation_id)
            ):
                try:
                    created = datetime.fromisoformat(wire.created_at)
                    if wire.completed_at is not None:
                        datetime.fromisoformat(wire.completed_at)
                except ValueError:
                    pass
                else:
                    self._append(wire.id, wire.conversation_id, wire.seq, wire.status, created, wire)
                    return
        self.append_turn(decode_turn(fields))

    def append_turn(self, turn: Turn) -> None:
        """Adds a decoded turn."""
        self._append(
            str(turn.id), str(turn.conversation_id), turn.seq, turn.status.value, turn.created_at, turn
        )

    def _append(
        self,
        turn_id: str,
        conversation_id: str,
        seq: int,
        status: str,
        created: datetime,
        texts: _WireTurn | Turn,
    ) -> None:
        user_message_id, assistant_message_id = message_ids_hex(turn_id)
        self.turn_ids.append(turn_id)
        self.conversation_ids.append(conversation_id)
        self.seqs.append(seq)
        self.statuses.append(status)
        self.created.append(created)
        self.user_message_ids.append(user_message_id)
        self.user_texts.append(texts.user_text)
        self.assistant_message_ids.append(assistant_message_id)
        self.assistant_texts.append(texts.assistant_text)
