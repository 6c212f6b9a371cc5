"""Data access for conversations, turns and messages.

Every function takes the caller's ``AsyncSession`` first and never begins, commits or
rolls back: the use case owns the unit of work. ``get_*`` raises NotFoundError,
``find_*`` returns None, ``list_*`` returns a page, ``insert_*``/``update_*``/``delete_*``
mutate.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from server.db.tables import ConversationRow, MessageRow, TurnRow
from server.domain import Conversation, Message, Role, Turn, TurnStatus, Usage
from server.errors import NotFoundError

# The same message (turn, role) always gets the same id, so its resource name is
# stable whichever of several redundant deliveries wins the insert.
_MESSAGE_ID_NAMESPACE = uuid.UUID("0b8f7d4e-3c1a-4f55-9a43-7d1c2a9e6b10")


def message_id(turn_id: uuid.UUID, role: Role) -> uuid.UUID:
    """The deterministic id of one message of a turn."""
    return uuid.uuid5(_MESSAGE_ID_NAMESPACE, f"{turn_id}/{role.value}")


def _conversation(row: ConversationRow) -> Conversation:
    return Conversation(
        id=row.id,
        owner=row.owner,
        created_at=row.created_at,
        updated_at=row.updated_at,
        turn_count=row.turn_count,
        message_count=row.message_count,
    )


def _turn(row: TurnRow) -> Turn:
    return Turn(
        id=row.id,
        conversation_id=row.conversation_id,
        owner=row.owner,
        seq=row.seq,
        request_id=row.request_id,
        user_text=row.user_text,
        assistant_text=row.assistant_text,
        status=TurnStatus(row.status),
        stop_reason=row.stop_reason,
        usage=Usage(input_tokens=row.input_tokens, output_tokens=row.output_tokens),
        model=row.model,
        created_at=row.created_at,
        completed_at=row.completed_at,
    )


async def get_conversation(session: AsyncSession, *, owner: str, conversation_id: uuid.UUID) -> Conversation:
    """The owner's conversation; NotFoundError if it is missing or someone else's."""
    row = await session.scalar(
        select(ConversationRow).where(ConversationRow.id == conversation_id, ConversationRow.owner == owner)
    )
    if row is None:
        raise NotFoundError("conversation not found")
    return _conversation(row)


async def find_conversation_by_request_id(
    session: AsyncSession, *, owner: str, request_id: str
) -> Conversation | None:
    """The conversation a create with this idempotency key made, if any."""
    row = await session.scalar(
        select(ConversationRow).where(
            ConversationRow.owner == owner, ConversationRow.create_request_id == request_id
        )
    )
    return None if row is None else _conversation(row)


async def insert_conversation(
    session: AsyncSession, *, owner: str, conversation_id: uuid.UUID, request_id: str | None
) -> Conversation | None:
    """Inserts a conversation; None when the id or the (owner, request_id) is taken.

    ON CONFLICT DO NOTHING rather than catching IntegrityError: a failed statement
    would poison the caller's transaction, and racing creators are normal.
    """
    stmt = (
        insert(ConversationRow)
        .values(id=conversation_id, owner=owner, create_request_id=request_id)
        .on_conflict_do_nothing()
        .returning(ConversationRow)
    )
    row = await session.scalar(stmt)
    return None if row is None else _conversation(row)


async def list_conversations(
    session: AsyncSession, *, owner: str, limit: int, after: tuple[datetime, uuid.UUID] | None
) -> list[Conversation]:
    """Newest first; ``after`` is the (created_at, id) of the last row of the previous page."""
    stmt = select(ConversationRow).where(ConversationRow.owner == owner)
    if after is not None:
        stmt = stmt.where(tuple_(ConversationRow.created_at, ConversationRow.id) < tuple_(*after))
    stmt = stmt.order_by(ConversationRow.created_at.desc(), ConversationRow.id.desc()).limit(limit)
    return [_conversation(row) for row in await session.scalars(stmt)]


async def delete_conversation(session: AsyncSession, *, owner: str, conversation_id: uuid.UUID) -> None:
    """Deletes the conversation with its turns and messages (ON DELETE CASCADE)."""
    result = await session.execute(
        delete(ConversationRow)
        .where(ConversationRow.id == conversation_id, ConversationRow.owner == owner)
        .returning(ConversationRow.id)
    )
    if result.first() is None:
        raise NotFoundError("conversation not found")


async def next_turn_seq(session: AsyncSession, *, owner: str, conversation_id: uuid.UUID) -> int:
    """Allocates the next turn number of the owner's conversation.

    Bumping ``turn_count`` takes the conversation's row lock, which serialises turn
    starts on one conversation for the rest of the transaction. Raises NotFoundError
    if the conversation is missing or not the owner's.
    """
    seq: int | None = await session.scalar(
        update(ConversationRow)
        .where(ConversationRow.id == conversation_id, ConversationRow.owner == owner)
        .values(turn_count=ConversationRow.turn_count + 1, updated_at=func.now())
        .returning(ConversationRow.turn_count)
    )
    if seq is None:
        raise NotFoundError("conversation not found")
    return seq


async def insert_turn(
    session: AsyncSession,
    *,
    owner: str,
    conversation_id: uuid.UUID,
    seq: int,
    turn_id: uuid.UUID,
    request_id: str | None,
    user_text: str,
    model: str,
    lease: timedelta,
) -> Turn | None:
    """Inserts a STREAMING turn numbered ``seq``; None if it conflicts with another turn.

    A conflict is either the same (owner, request_id) or another STREAMING turn of the
    conversation; the caller tells them apart.
    """
    stmt = (
        insert(TurnRow)
        .values(
            id=turn_id,
            conversation_id=conversation_id,
            owner=owner,
            seq=seq,
            request_id=request_id,
            user_text=user_text,
            status=TurnStatus.STREAMING.value,
            model=model,
            lease_expires_at=func.now() + lease,
        )
        .on_conflict_do_nothing()
        .returning(TurnRow)
    )
    row = await session.scalar(stmt)
    return None if row is None else _turn(row)


async def find_turn_by_request_id(session: AsyncSession, *, owner: str, request_id: str) -> Turn | None:
    """The turn a Chat with this idempotency key started, if any."""
    row = await session.scalar(
        select(TurnRow).where(TurnRow.owner == owner, TurnRow.request_id == request_id)
    )
    return None if row is None else _turn(row)


async def list_messages(
    session: AsyncSession,
    *,
    owner: str,
    conversation_id: uuid.UUID,
    limit: int,
    after: tuple[int, int] | None,
) -> list[Message]:
    """Messages in conversation order; ``after`` is the (turn_seq, role) of the previous page's last."""
    await get_conversation(session, owner=owner, conversation_id=conversation_id)
    stmt = select(MessageRow).where(MessageRow.conversation_id == conversation_id)
    if after is not None:
        stmt = stmt.where(tuple_(MessageRow.turn_seq, MessageRow.role) > tuple_(*after))
    stmt = stmt.order_by(MessageRow.turn_seq, MessageRow.role).limit(limit)
    return [
        Message(
            id=row.id,
            conversation_id=row.conversation_id,
            turn_id=row.turn_id,
            turn_seq=row.turn_seq,
            role=Role(row.role),
            text=row.text,
            turn_status=TurnStatus(row.turn_status),
            created_at=row.created_at,
        )
        for row in await session.scalars(stmt)
    ]


async def renew_leases(session: AsyncSession, *, turn_ids: Sequence[uuid.UUID], lease: timedelta) -> int:
    """Extends the leases of turns this process is still streaming; returns how many."""
    if not turn_ids:
        return 0
    result = await session.execute(
        update(TurnRow)
        .where(TurnRow.id.in_(turn_ids), TurnRow.status == TurnStatus.STREAMING.value)
        .values(lease_expires_at=func.now() + lease)
        .returning(TurnRow.id)
    )
    return len(result.all())


async def interrupt_expired_turns(
    session: AsyncSession, *, limit: int, conversation_id: uuid.UUID | None = None
) -> list[Turn]:
    """Marks STREAMING turns whose lease expired (their server died) INTERRUPTED.

    SKIP LOCKED lets several sweepers run at once without waiting on each other.
    The user's text is kept; the partial reply died with the server.
    """
    expired = select(TurnRow.id).where(
        TurnRow.status == TurnStatus.STREAMING.value, TurnRow.lease_expires_at < func.now()
    )
    if conversation_id is not None:
        expired = expired.where(TurnRow.conversation_id == conversation_id)
    expired = expired.limit(limit).with_for_update(skip_locked=True)
    rows = await session.scalars(
        update(TurnRow)
        .where(TurnRow.id.in_(expired.scalar_subquery()))
        .values(
            status=TurnStatus.INTERRUPTED.value,
            completed_at=func.now(),
            lease_expires_at=None,
            error_reason="LEASE_EXPIRED",
        )
        .returning(TurnRow)
    )
    return [_turn(row) for row in rows]


async def claim_unpersisted_turns(session: AsyncSession, *, grace: timedelta, limit: int) -> list[Turn]:
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
    rows = await session.scalars(
        update(TurnRow)
        .where(TurnRow.id.in_(due.scalar_subquery()))
        .values(relayed_at=func.now(), relay_count=TurnRow.relay_count + 1)
        .returning(TurnRow)
    )
    return [_turn(row) for row in rows]
