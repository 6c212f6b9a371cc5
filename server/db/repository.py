"""Data access for conversations and their persisted messages (the List RPCs).

Every function takes the caller's session first and never begins, commits or rolls
back: the use case owns the unit of work. ``get_*`` raises NotFoundError, ``find_*``
returns None, ``list_*`` returns a page, ``insert_*``/``delete_*`` mutate. The turn's
own statements are in ``turn_store``, the consumer's batch in ``message_store``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final

from sqlalchemy import delete, select, tuple_
from sqlalchemy.dialects.postgresql import insert

from server.db import rows
from server.db.engine import Executor
from server.db.tables import Base
from server.domain import Conversation, Message
from server.errors import NotFoundError

_CONVERSATIONS: Final = Base.metadata.tables["chat.conversations"]
_MESSAGES: Final = Base.metadata.tables["chat.messages"]


async def get_conversation(executor: Executor, *, owner: str, conversation_id: uuid.UUID) -> Conversation:
    """The owner's conversation; NotFoundError if it is missing or someone else's."""
    result = await executor.execute(
        select(_CONVERSATIONS).where(_CONVERSATIONS.c.id == conversation_id, _CONVERSATIONS.c.owner == owner)
    )
    row = result.mappings().first()
    if row is None:
        raise NotFoundError("conversation not found")
    return rows.conversation(row)


async def find_conversation_by_request_id(
    executor: Executor, *, owner: str, request_id: str
) -> Conversation | None:
    """The conversation a create with this idempotency key made, if any."""
    result = await executor.execute(
        select(_CONVERSATIONS).where(
            _CONVERSATIONS.c.owner == owner, _CONVERSATIONS.c.create_request_id == request_id
        )
    )
    row = result.mappings().first()
    return None if row is None else rows.conversation(row)


async def insert_conversation(
    executor: Executor, *, owner: str, conversation_id: uuid.UUID, request_id: str | None
) -> Conversation | None:
    """Inserts a conversation; None when the id or the (owner, request_id) is taken.

    ON CONFLICT DO NOTHING rather than catching IntegrityError: a failed statement
    would poison the caller's transaction, and racing creators are normal.
    """
    result = await executor.execute(
        insert(_CONVERSATIONS)
        .values(id=conversation_id, owner=owner, create_request_id=request_id)
        .on_conflict_do_nothing()
        .returning(*_CONVERSATIONS.c)
    )
    row = result.mappings().first()
    return None if row is None else rows.conversation(row)


async def list_conversations(
    executor: Executor, *, owner: str, limit: int, after: tuple[datetime, uuid.UUID] | None
) -> list[Conversation]:
    """Newest first; ``after`` is the (created_at, id) of the last row of the previous page."""
    c = _CONVERSATIONS.c
    stmt = select(_CONVERSATIONS).where(c.owner == owner)
    if after is not None:
        stmt = stmt.where(tuple_(c.created_at, c.id) < tuple_(*after))
    stmt = stmt.order_by(c.created_at.desc(), c.id.desc()).limit(limit)
    result = await executor.execute(stmt)
    return [rows.conversation(row) for row in result.mappings()]


async def delete_conversation(executor: Executor, *, owner: str, conversation_id: uuid.UUID) -> None:
    """Deletes the conversation with its turns and messages (ON DELETE CASCADE)."""
    result = await executor.execute(
        delete(_CONVERSATIONS)
        .where(_CONVERSATIONS.c.id == conversation_id, _CONVERSATIONS.c.owner == owner)
        .returning(_CONVERSATIONS.c.id)
    )
    if result.first() is None:
        raise NotFoundError("conversation not found")


async def list_messages(
    executor: Executor,
    *,
    owner: str,
    conversation_id: uuid.UUID,
    limit: int,
    after: tuple[int, int] | None,
) -> list[Message]:
    """Messages in conversation order; ``after`` is the (turn_seq, role) of the previous page's last."""
    await get_conversation(executor, owner=owner, conversation_id=conversation_id)
    m = _MESSAGES.c
    stmt = select(_MESSAGES).where(m.conversation_id == conversation_id)
    if after is not None:
        stmt = stmt.where(tuple_(m.turn_seq, m.role) > tuple_(*after))
    stmt = stmt.order_by(m.turn_seq, m.role).limit(limit)
    result = await executor.execute(stmt)
    return [rows.message(row) for row in result.mappings()]
