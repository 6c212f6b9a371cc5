"""Leases of STREAMING turns: renewal by their producer, and the end of those whose producer died.

Each is one statement. The decisions around them (when to renew, reading a dead
producer's live log first) are in server/leases.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from sqlalchemy import func, select, text, update

from server.db import rows
from server.db.engine import Executor
from server.db.tables import TurnRow
from server.domain import Turn, TurnStatus


async def renew_leases(executor: Executor, *, turn_ids: Sequence[uuid.UUID], lease: timedelta) -> int:
    """Extends the leases of turns this process is still streaming; returns how many."""
    if not turn_ids:
        return 0
    result = await executor.execute(
        update(TurnRow)
        .where(TurnRow.id.in_(turn_ids), TurnRow.status == TurnStatus.STREAMING.value)
        .values(lease_expires_at=func.now() + lease)
        .returning(TurnRow.id)
    )
    return len(result.all())


async def find_expired(
    executor: Executor, *, limit: int, conversation_id: uuid.UUID | None = None
) -> list[uuid.UUID]:
    """STREAMING turns whose lease expired: their server died (or stalled past the lease)."""
    expired = select(TurnRow.id).where(
        TurnRow.status == TurnStatus.STREAMING.value, TurnRow.lease_expires_at < func.now()
    )
    if conversation_id is not None:
        expired = expired.where(TurnRow.conversation_id == conversation_id)
    return list(await executor.scalars(expired.order_by(TurnRow.lease_expires_at).limit(limit)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Remains:
    """What a dead producer left of a turn in its live log."""

    turn_id: uuid.UUID
    text: str
    last_seq: int
    """The number the terminal INTERRUPTED event gets."""


_INTERRUPT: Final = text("""
UPDATE chat.turns AS t SET
    status = 'INTERRUPTED', assistant_text = r.text, last_seq = r.last_seq, completed_at = now(),
    lease_expires_at = NULL, error_reason = 'LEASE_EXPIRED'
FROM unnest(CAST(:ids AS uuid[]), CAST(:texts AS text[]), CAST(:last_seqs AS int[])) AS r(id, text, last_seq)
WHERE t.id = r.id AND t.status = 'STREAMING' AND t.lease_expires_at < now()
RETURNING t.*
""")


async def interrupt(executor: Executor, remains: Sequence[Remains]) -> list[Turn]:
    """Ends expired turns INTERRUPTED with the partial reply their live log kept (one statement).

    A turn whose lease was renewed or that ended meanwhile is left alone, so several
    sweepers, or a producer that was only slow, never overwrite each other.
    """
    if not remains:
        return []
    result = await executor.execute(
        _INTERRUPT,
        {
            "ids": [r.turn_id for r in remains],
            "texts": [r.text for r in remains],
            "last_seqs": [r.last_seq for r in remains],
        },
    )
    return [rows.turn(row) for row in result.mappings()]


async def lease_expired(executor: Executor, turn_id: uuid.UUID) -> bool:
    """Whether the turn is STREAMING with an expired lease (its producer died)."""
    expired = await executor.scalar(
        select(TurnRow.lease_expires_at < func.now()).where(
            TurnRow.id == turn_id, TurnRow.status == TurnStatus.STREAMING.value
        )
    )
    return bool(expired)
