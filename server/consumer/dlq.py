"""The dead-letter stream ``chat:turns:dlq``: list what is there, replay it after a fix."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from server.constants import DEAD_LETTER_STREAM
from server.publisher import TurnPublisher
from server.turn_codec import EventDecodeError, decode_turn

_META_FIELDS = (b"dlq_source", b"dlq_entry_id", b"dlq_error")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """One dead-lettered entry and why it got there."""

    id: str
    source: str
    source_entry_id: str
    error: str
    turn_id: str
    """Empty when the payload cannot be decoded."""
    conversation_id: str
    fields: Mapping[bytes, bytes]
    """The original entry's fields, as the consumer received them."""


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


async def list_dead_letters(redis: aioredis.Redis, *, count: int = 100) -> list[DeadLetter]:
    """The oldest ``count`` dead letters."""
    raw = cast(
        Sequence[tuple[bytes, dict[bytes, bytes]]], await redis.xrange(DEAD_LETTER_STREAM, count=count)
    )
    letters = []
    for entry_id, fields in raw:
        original = {k: v for k, v in fields.items() if k not in _META_FIELDS}
        turn_id = conversation_id = ""
        try:
            turn = decode_turn(original)
            turn_id, conversation_id = str(turn.id), str(turn.conversation_id)
        except EventDecodeError:
            pass
        letters.append(
            DeadLetter(
                id=_text(entry_id),
                source=_text(fields.get(b"dlq_source")),
                source_entry_id=_text(fields.get(b"dlq_entry_id")),
                error=_text(fields.get(b"dlq_error")),
                turn_id=turn_id,
                conversation_id=conversation_id,
                fields=original,
            )
        )
    return letters


async def replay_dead_letters(
    redis: aioredis.Redis,
    publisher: TurnPublisher,
    *,
    ids: Sequence[str] = (),
    count: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Publishes decodable dead letters to their shard again and removes them from the DLQ.

    Returns (replayed, skipped); undecodable ones are skipped and stay for a human.
    Replaying is safe to repeat: the consumer's writes are idempotent.

    Args:
        redis: Where the dead-letter stream is.
        publisher: Publishes each replayed turn to its shard.
        ids: Only these dead letters; all of them (up to ``count``) when empty.
        count: How many of the oldest dead letters to look at.
        progress: Called as ``progress(handled, total)`` once before the first letter and
            after each one, e.g. to draw a progress bar.
    """
    wanted = set(ids)
    letters = [
        letter for letter in await list_dead_letters(redis, count=count) if not wanted or letter.id in wanted
    ]
    replayed = skipped = 0
    if progress is not None:
        progress(0, len(letters))
    for handled, letter in enumerate(letters, start=1):
        try:
            turn = decode_turn(letter.fields)
        except EventDecodeError:
            skipped += 1
        else:
            await publisher.publish(turn)
            await redis.xdel(DEAD_LETTER_STREAM, letter.id)
            replayed += 1
        if progress is not None:
            progress(handled, len(letters))
    return replayed, skipped
