"""Conversation and message use cases; each is a single unit of work."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from server.context import ContextStore
from server.db import repository
from server.db.engine import Database
from server.domain import Conversation, Message
from server.errors import AlreadyExistsError, IdempotencyKeyReusedError, InvalidArgumentError
from server.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, decode_token, encode_token, page_size

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Page(Generic[T]):
    """One page of results and the token for the next (empty on the last page)."""

    items: list[T]
    next_page_token: str


class ConversationService:
    """Create, get, list and delete conversations; list their messages."""

    def __init__(
        self,
        database: Database,
        context: ContextStore,
        *,
        default_page_size: int = DEFAULT_PAGE_SIZE,
        max_page_size: int = MAX_PAGE_SIZE,
    ) -> None:
        self._database = database
        self._context = context
        self._default_page_size = default_page_size
        self._max_page_size = max_page_size

    async def create(
        self, *, owner: str, conversation_id: uuid.UUID | None, request_id: str | None
    ) -> Conversation:
        """Creates a conversation; a retry with the same request_id returns the first result."""
        async with self._database.begin("create conversation") as session:
            if request_id is not None:
                existing = await repository.find_conversation_by_request_id(
                    session, owner=owner, request_id=request_id
                )
                if existing is not None:
                    if conversation_id not in (None, existing.id):
                        raise IdempotencyKeyReusedError(
                            "request_id was already used to create another conversation",
                            field_violations=[("request_id", "already used for another conversation")],
                            metadata={"field": "request_id"},
                        )
                    return existing
            created = await repository.insert_conversation(
                session, owner=owner, conversation_id=conversation_id or uuid.uuid4(), request_id=request_id
            )
            if created is None and request_id is not None:
                # A concurrent twin with the same request_id won the race.
                created = await repository.find_conversation_by_request_id(
                    session, owner=owner, request_id=request_id
                )
            if created is None:
                raise AlreadyExistsError(
                    "a conversation with this id already exists",
                    metadata={"conversation": f"conversations/{conversation_id}"},
                )
            return created

    async def get(self, *, owner: str, conversation_id: uuid.UUID) -> Conversation:
        """The owner's conversation, or NotFoundError."""
        async with self._database.begin("get conversation") as session:
            return await repository.get_conversation(session, owner=owner, conversation_id=conversation_id)

    async def list(self, *, owner: str, size: int, token: str) -> Page[Conversation]:
        """A page of the owner's conversations, newest first."""
        limit = page_size(size, default=self._default_page_size, maximum=self._max_page_size)
        bound = ["conversations", owner]
        cursor = decode_token(token, bound_to=bound)
        after: tuple[datetime, uuid.UUID] | None = None
        if cursor is not None:
            try:
                after = (datetime.fromisoformat(str(cursor[0])), uuid.UUID(str(cursor[1])))
            except (ValueError, IndexError):
                raise InvalidArgumentError.for_field(
                    "page_token", "is not a token this service issued"
                ) from None
        async with self._database.begin("list conversations") as session:
            rows = await repository.list_conversations(session, owner=owner, limit=limit + 1, after=after)
        items = rows[:limit]
        next_token = ""
        if len(rows) > limit:
            last = items[-1]
            next_token = encode_token([last.created_at.isoformat(), str(last.id)], bound_to=bound)
        return Page(items=items, next_page_token=next_token)

    async def delete(self, *, owner: str, conversation_id: uuid.UUID) -> None:
        """Deletes the conversation with its turns and messages, and forgets its cached context."""
        async with self._database.begin("delete conversation") as session:
            await repository.delete_conversation(session, owner=owner, conversation_id=conversation_id)
        await self._context.forget(conversation_id)

    async def list_messages(
        self, *, owner: str, conversation_id: uuid.UUID, size: int, token: str
    ) -> Page[Message]:
        """A page of the conversation's persisted messages, in order."""
        limit = page_size(size, default=self._default_page_size, maximum=self._max_page_size)
        bound = ["messages", owner, str(conversation_id)]
        cursor = decode_token(token, bound_to=bound)
        after: tuple[int, int] | None = None
        if cursor is not None:
            if len(cursor) != 2 or not all(isinstance(v, int) for v in cursor):
                raise InvalidArgumentError.for_field("page_token", "is not a token this service issued")
            after = (int(cursor[0]), int(cursor[1]))
        async with self._database.begin("list messages") as session:
            rows = await repository.list_messages(
                session, owner=owner, conversation_id=conversation_id, limit=limit + 1, after=after
            )
        items = rows[:limit]
        next_token = ""
        if len(rows) > limit:
            last = items[-1]
            next_token = encode_token([last.turn_seq, last.role.value], bound_to=bound)
        return Page(items=items, next_page_token=next_token)
