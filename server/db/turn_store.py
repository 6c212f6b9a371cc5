"""The turn's rows: start (unit of work 1), outcome (unit of work 2), reads, relay work.

Units of work 1 and 2 run for every turn, so their cost is the service's per-turn floor:
each is one statement whose CTEs do all of it, sent as a hot statement (one round trip,
atomic, committed when it returns; ``Database.hot``). The statements are plain literals
(schema ``chat`` spelled out), never built from input; asyncpg prepares each once per
connection.

Turns are numbered by one algorithm, ``_START_IN_CONVERSATION``: under the
conversation's row lock, the turn gets ``turn_count + 1`` and the counter moves only if
the turn went in. When that statement cannot decide (a request_id seen before, another
turn streaming, a conversation not found), ``start_turn`` finds out why in one short
transaction and returns the answer as a value.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError

from server.db import rows
from server.db.engine import Database, Executor, Statement
from server.db.tables import Base, ConversationRow, TurnRow
from server.domain import Exchange, Turn, TurnEnding, TurnStatus

_TURNS: Final = Base.metadata.tables["chat.turns"]

# An existing conversation: lock it, insert the turn numbered after the last one, and
# bump the counter only if the turn went in. ON CONFLICT DO NOTHING turns both "this
# request_id was used" and "another turn is streaming" into an empty result.
_START_IN_CONVERSATION: Final = Statement("""
WITH c AS MATERIALIZED (
    SELECT id, turn_count FROM chat.conversations
    WHERE id = :conversation_id AND owner = :owner
    FOR UPDATE
), t AS (
    INSERT INTO chat.turns
        (id, conversation_id, owner, seq, request_id, user_text, status, model, lease_expires_at)
    SELECT :turn_id, c.id, :owner, c.turn_count + 1, :request_id, :user_text, 'STREAMING', :model,
        now() + CAST(:lease AS interval)
    FROM c
    ON CONFLICT DO NOTHING
    RETURNING *
), u AS (
    UPDATE chat.conversations AS conv SET turn_count = t.seq, updated_at = now()
    FROM t WHERE conv.id = :conversation_id
)
SELECT * FROM t
""")

# A new conversation: the turn is inserted first and the conversation only if the
# turn went in. Foreign keys are checked at the end of the statement, so if the
# conversation insert is skipped (its (owner, request_id) is taken) the turn's
# reference fails and the whole statement rolls back: never a conversation without
# its first turn, nor a turn without its conversation.
_START_NEW_CONVERSATION: Final = Statement("""
WITH t AS (
    INSERT INTO chat.turns
        (id, conversation_id, owner, seq, request_id, user_text, status, model, lease_expires_at)
    VALUES (:turn_id, :conversation_id, :owner, 1, :request_id, :user_text, 'STREAMING', :model,
        now() + CAST(:lease AS interval))
    ON CONFLICT DO NOTHING
    RETURNING *
), c AS (
    INSERT INTO chat.conversations (id, owner, create_request_id, turn_count)
    SELECT :conversation_id, :owner, :request_id, 1 FROM t
    ON CONFLICT DO NOTHING
)
SELECT * FROM t
""")

# Unit of work 2: store the outcome of a turn that is still STREAMING; if it is not
# (the lease sweeper marked it INTERRUPTED), return the stored row untouched.
_STORE_OUTCOME: Final = Statement("""
WITH u AS (
    UPDATE chat.turns SET
        assistant_text = :assistant_text, status = :status, stop_reason = :stop_reason,
        input_tokens = :input_tokens, output_tokens = :output_tokens, model = :model,
        error_reason = :error_reason, last_seq = :last_seq, completed_at = now(), lease_expires_at = NULL
    WHERE id = :turn_id AND status = 'STREAMING'
    RETURNING *
)
SELECT * FROM u
UNION ALL
SELECT * FROM chat.turns WHERE id = :turn_id AND NOT EXISTS (SELECT 1 FROM u)
""")

_LIST_EXCHANGES: Final = Statement("""
SELECT seq, user_text, assistant_text FROM chat.turns
WHERE conversation_id = :conversation_id AND seq < :before_seq AND status <> 'STREAMING'
ORDER BY seq DESC
LIMIT :limit
""")


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnRequest:
    """What unit of work 1 needs to start a turn."""

    owner: str
    conversation_id: uuid.UUID | None
    """None starts a new conversation."""
    request_id: str | None
    user_text: str
    model: str
    lease: timedelta


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """The turn is inserted as STREAMING and committed."""

    turn: Turn


@dataclass(frozen=True, slots=True, kw_only=True)
class Existing:
    """The request_id already names a turn (a retry, or a reuse of the key): nothing was inserted."""

    turn: Turn
    expired: bool = False
    """The turn is STREAMING but its producer stopped renewing its lease (it died)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Busy:
    """Another turn of the conversation is streaming."""

    conversation_id: uuid.UUID
    expired: bool = False
    """That turn's producer stopped renewing its lease: end the turn and start again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationNotFound:
    """The conversation does not exist or belongs to someone else."""


StartResult = Started | Existing | Busy | ConversationNotFound


async def start_turn(database: Database, request: TurnRequest) -> StartResult:
    """Unit of work 1: the turn inserted as STREAMING, or why it was not.

    The common case is one statement. Anything it cannot decide is settled in one short,
    read-mostly transaction. Ending a dead producer's turn needs its live log from Redis,
    which no transaction may wait for, so that is reported (``expired``) for the caller
    to do (server/leases.py) before it starts again.
    """
    turn_id = uuid.uuid4()
    statement, params = _start_statement(request, turn_id, request.conversation_id)
    try:
        async with database.hot("start turn", priority=True) as conn:
            row = await conn.fetchrow(statement, params)
    except IntegrityError:
        # A new conversation whose (owner, request_id) was taken by CreateConversation:
        # the statement rolled back; the slow path finds that conversation.
        row = None
    if row is not None:
        return Started(turn=rows.turn(row))
    async with database.begin("start turn, contended", priority=True) as session:
        return await _start_contended(session, request, turn_id)


async def _start_contended(session: Executor, request: TurnRequest, turn_id: uuid.UUID) -> StartResult:
    if request.request_id is not None:
        existing = await _find_by_request_id(session, request)
        if existing is not None:
            return existing
    conversation_id = request.conversation_id
    if conversation_id is None:
        # Only an (owner, request_id) conflict stops a new conversation's statement, and
        # no turn has that request_id: CreateConversation made a conversation with it.
        assert request.request_id is not None
        conversation_id = await session.scalar(
            select(ConversationRow.id).where(
                ConversationRow.owner == request.owner,
                ConversationRow.create_request_id == request.request_id,
            )
        )
        if conversation_id is None:
            return ConversationNotFound()
    statement, params = _start_statement(request, turn_id, conversation_id)
    row = (await session.execute(statement.clause, params)).mappings().first()
    if row is not None:
        return Started(turn=rows.turn(row))
    owned = await session.scalar(
        select(ConversationRow.id).where(
            ConversationRow.id == conversation_id, ConversationRow.owner == request.owner
        )
    )
    if owned is None:
        return ConversationNotFound()
    if request.request_id is not None:
        # A concurrent twin with the same request_id committed first.
        existing = await _find_by_request_id(session, request)
        if existing is not None:
            return existing
    expired = await session.scalar(
        select(TurnRow.lease_expires_at < func.now()).where(
            TurnRow.conversation_id == conversation_id, TurnRow.status == TurnStatus.STREAMING.value
        )
    )
    return Busy(conversation_id=conversation_id, expired=bool(expired))


async def _find_by_request_id(session: Executor, request: TurnRequest) -> Existing | None:
    assert request.request_id is not None
    result = await session.execute(
        select(_TURNS, (_TURNS.c.lease_expires_at < func.now()).label("expired")).where(
            _TURNS.c.owner == request.owner, _TURNS.c.request_id == request.request_id
        )
    )
    row = result.mappings().first()
    return None if row is None else Existing(turn=rows.turn(row), expired=bool(row["expired"]))


def _start_statement(
    request: TurnRequest, turn_id: uuid.UUID, conversation_id: uuid.UUID | None
) -> tuple[Statement, dict[str, Any]]:
    params: dict[str, Any] = {
        "conversation_id": conversation_id or uuid.uuid4(),
        "owner": request.owner,
        "turn_id": turn_id,
        "request_id": request.request_id,
        "user_text": request.user_text,
        "model": request.model,
        "lease": request.lease,
    }
    statement = _START_NEW_CONVERSATION if conversation_id is None else _START_IN_CONVERSATION
    return statement, params


async def store_outcome(database: Database, *, turn_id: uuid.UUID, ending: TurnEnding) -> Turn | None:
    """Unit of work 2 in one statement: the stored turn, or None if it is gone (deleted).

    ``ending.model`` is the model that answered, as the upstream reported it;
    ``ending.last_seq`` the number of the turn's terminal event. A turn that is no longer
    STREAMING (the sweeper interrupted it) is returned as stored.
    """
    async with database.hot("store outcome") as conn:
        row = await conn.fetchrow(
            _STORE_OUTCOME,
            {
                "turn_id": turn_id,
                "assistant_text": ending.text,
                "status": ending.status.value,
                "stop_reason": ending.stop_reason,
                "input_tokens": ending.usage.input_tokens,
                "output_tokens": ending.usage.output_tokens,
                "model": ending.model,
                "error_reason": ending.error_reason,
                "last_seq": ending.last_seq,
            },
        )
    return None if row is None else rows.turn(row)


async def find_turn_by_request_id(executor: Executor, *, owner: str, request_id: str) -> Turn | None:
    """The turn a Chat with this idempotency key started, if any."""
    result = await executor.execute(
        select(_TURNS).where(TurnRow.owner == owner, TurnRow.request_id == request_id)
    )
    row = result.mappings().first()
    return None if row is None else rows.turn(row)


async def list_exchanges(
    database: Database, *, conversation_id: uuid.UUID, before_seq: int, limit: int
) -> list[Exchange]:
    """The last ``limit`` ended turns before ``before_seq``, oldest first (read from turn rows, I11).

    One read-only hot statement, run before the model is called.
    """
    if limit <= 0:
        return []
    async with database.hot("list exchanges") as conn:
        found = await conn.fetch(
            _LIST_EXCHANGES, {"conversation_id": conversation_id, "before_seq": before_seq, "limit": limit}
        )
    exchanges = [
        Exchange(seq=r["seq"], user_text=r["user_text"], assistant_text=r["assistant_text"]) for r in found
    ]
    exchanges.reverse()
    return exchanges


async def find_turn(executor: Executor, *, owner: str, turn_id: uuid.UUID) -> Turn | None:
    """The owner's turn; None if it is missing or someone else's."""
    result = await executor.execute(select(_TURNS).where(_TURNS.c.id == turn_id, _TURNS.c.owner == owner))
    row = result.mappings().first()
    return None if row is None else rows.turn(row)


async def claim_unpersisted_turns(executor: Executor, *, grace: timedelta, limit: int) -> list[Turn]:
    """Ended turns the consumer has not persisted ``grace`` after they ended, for re-publishing.

    Each claimed turn is stamped, and is claimed again only after a backoff that
    doubles with every re-publish (capped at 64 x grace), so a stopped consumer does
    not make the relay flood the streams with copies. SKIP LOCKED keeps concurrent
    relays from claiming the same turns.
    """
    grace_s = grace.total_seconds()
    due = (
        select(TurnRow.id)
        .where(
            TurnRow.persisted_at.is_(None),
            TurnRow.status != TurnStatus.STREAMING.value,
            TurnRow.completed_at < func.now() - grace,
            or_(
                TurnRow.relayed_at.is_(None),
                TurnRow.relayed_at
                < func.now()
                - func.make_interval(
                    0, 0, 0, 0, 0, 0, grace_s * func.power(2, func.least(TurnRow.relay_count, 6))
                ),
            ),
        )
        .order_by(TurnRow.completed_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = await executor.execute(
        update(TurnRow)
        .where(TurnRow.id.in_(due.scalar_subquery()))
        .values(relayed_at=func.now(), relay_count=TurnRow.relay_count + 1)
        .returning(*_TURNS.c)
    )
    return [rows.turn(row) for row in result.mappings()]
