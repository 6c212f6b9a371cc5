"""Tables of schema ``chat``; the constraints here are what make retries and replays safe."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA = "chat"
TURN_STATUSES = ("STREAMING", "COMPLETED", "CANCELLED", "FAILED", "INTERRUPTED")

# Constraint names are spelled out rather than generated, so that they are the names
# the migrations (0001) created.
UQ_TURN_REQUEST_ID = "uq_turns_owner_request_id"
UQ_ONE_STREAMING_TURN = "uq_turns_one_streaming"
UQ_MESSAGE_TURN_ROLE = "uq_messages_turn_role"


class Base(DeclarativeBase):
    """Declarative base bound to schema ``chat``."""

    metadata = MetaData(schema=SCHEMA)


class ConversationRow(Base):
    """A conversation; ``turn_count`` is bumped under a row lock to number turns."""

    __tablename__ = "conversations"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    owner: Mapped[str] = mapped_column(Text)
    create_request_id: Mapped[str | None] = mapped_column(Text)
    turn_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    message_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        UniqueConstraint("owner", "create_request_id", name="uq_conversations_owner_request_id"),
        Index("ix_conversations_owner_created", "owner", "created_at", "id"),
    )


class TurnRow(Base):
    """One turn; after unit of work 2 it is also the outbox record for the relay."""

    __tablename__ = "turns"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("conversations.id", ondelete="CASCADE")
    )
    owner: Mapped[str] = mapped_column(Text)
    seq: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(Text)
    user_text: Mapped[str] = mapped_column(Text)
    assistant_text: Mapped[str] = mapped_column(Text, server_default=text("''"))
    status: Mapped[str] = mapped_column(Text)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    output_tokens: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    model: Mapped[str] = mapped_column(Text)
    error_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    persisted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    relayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the relay last re-published this turn; spaces out re-publishes while it stays unpersisted."""
    relay_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_seq: Mapped[int | None] = mapped_column(Integer)
    """The number of the turn's terminal event (its live numbering); set when it ends."""

    __table_args__ = (
        UniqueConstraint("conversation_id", "seq", name="uq_turns_conversation_seq"),
        UniqueConstraint("owner", "request_id", name=UQ_TURN_REQUEST_ID),
        CheckConstraint(f"status IN {TURN_STATUSES!r}", name="ck_turns_status"),
        # At most one STREAMING turn per conversation: concurrent Chats on one
        # conversation would otherwise interleave their context.
        Index(
            UQ_ONE_STREAMING_TURN,
            "conversation_id",
            unique=True,
            postgresql_where=text("status = 'STREAMING'"),
        ),
        # The relay's work list: ended turns the consumer has not persisted yet.
        Index(
            "ix_turns_unpersisted",
            "completed_at",
            postgresql_where=text("persisted_at IS NULL AND status <> 'STREAMING'"),
        ),
        # The lease sweeper's work list.
        Index("ix_turns_streaming_lease", "lease_expires_at", postgresql_where=text("status = 'STREAMING'")),
    )


class MessageRow(Base):
    """A persisted message, written only by the consumer."""

    __tablename__ = "messages"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("conversations.id", ondelete="CASCADE")
    )
    turn_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("turns.id", ondelete="CASCADE"))
    turn_seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[int] = mapped_column(SmallInteger)
    text: Mapped[str] = mapped_column(Text)
    turn_status: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("turn_id", "role", name=UQ_MESSAGE_TURN_ROLE),
        CheckConstraint("role IN (1, 2)", name="ck_messages_role"),
        Index("ix_messages_conversation_order", "conversation_id", "turn_seq", "role"),
    )
