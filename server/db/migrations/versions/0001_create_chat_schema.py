"""create chat schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-21 20:03:01.736499
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("create_request_id", sa.Text(), nullable=True),
        sa.Column("turn_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("message_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("owner", "create_request_id", name="uq_conversations_owner_request_id"),
        schema="chat",
    )
    op.create_index(
        "ix_conversations_owner_created",
        "conversations",
        ["owner", "created_at", "id"],
        unique=False,
        schema="chat",
    )
    op.create_table(
        "turns",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("conversation_id", sa.UUID(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("user_text", sa.Text(), nullable=False),
        sa.Column("assistant_text", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.Column("input_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("output_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("error_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("persisted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('STREAMING', 'COMPLETED', 'CANCELLED', 'FAILED', 'INTERRUPTED')",
            name="ck_turns_status",
        ),
        sa.ForeignKeyConstraint(["conversation_id"], ["chat.conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("conversation_id", "seq", name="uq_turns_conversation_seq"),
        sa.UniqueConstraint("owner", "request_id", name="uq_turns_owner_request_id"),
        schema="chat",
    )
    op.create_index(
        "ix_turns_streaming_lease",
        "turns",
        ["lease_expires_at"],
        unique=False,
        schema="chat",
        postgresql_where=sa.text("status = 'STREAMING'"),
    )
    op.create_index(
        "ix_turns_unpersisted",
        "turns",
        ["completed_at"],
        unique=False,
        schema="chat",
        postgresql_where=sa.text("persisted_at IS NULL AND status <> 'STREAMING'"),
    )
    op.create_index(
        "uq_turns_one_streaming",
        "turns",
        ["conversation_id"],
        unique=True,
        schema="chat",
        postgresql_where=sa.text("status = 'STREAMING'"),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("conversation_id", sa.UUID(), nullable=False),
        sa.Column("turn_id", sa.UUID(), nullable=False),
        sa.Column("turn_seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.SmallInteger(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("turn_status", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN (1, 2)", name="ck_messages_role"),
        sa.ForeignKeyConstraint(["conversation_id"], ["chat.conversations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["turn_id"], ["chat.turns.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("turn_id", "role", name="uq_messages_turn_role"),
        schema="chat",
    )
    op.create_index(
        "ix_messages_conversation_order",
        "messages",
        ["conversation_id", "turn_seq", "role"],
        unique=False,
        schema="chat",
    )


def downgrade() -> None:
    op.drop_index("ix_messages_conversation_order", table_name="messages", schema="chat")
    op.drop_table("messages", schema="chat")
    op.drop_index(
        "uq_turns_one_streaming",
        table_name="turns",
        schema="chat",
        postgresql_where=sa.text("status = 'STREAMING'"),
    )
    op.drop_index(
        "ix_turns_unpersisted",
        table_name="turns",
        schema="chat",
        postgresql_where=sa.text("persisted_at IS NULL AND status <> 'STREAMING'"),
    )
    op.drop_index(
        "ix_turns_streaming_lease",
        table_name="turns",
        schema="chat",
        postgresql_where=sa.text("status = 'STREAMING'"),
    )
    op.drop_table("turns", schema="chat")
    op.drop_index("ix_conversations_owner_created", table_name="conversations", schema="chat")
    op.drop_table("conversations", schema="chat")
