"""Drop the foreign key from messages to conversations: a message's conversation is its turn's.

The consumer's statement takes each message's ``conversation_id`` from its turn's row, and
``messages.turn_id -> turns.id`` (ON DELETE CASCADE) with ``turns.conversation_id ->
conversations.id`` (ON DELETE CASCADE) already keeps a message from outliving its
conversation. The dropped key checked each message row against ``chat.conversations`` and
took a lock on the conversation's row, which the same statement then updates (its
``message_count``): a quarter of the statement's time in P5 (docs/benchmarks.md).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("messages_conversation_id_fkey", "messages", schema="chat", type_="foreignkey")


def downgrade() -> None:
    op.create_foreign_key(
        "messages_conversation_id_fkey",
        "messages",
        "conversations",
        ["conversation_id"],
        ["id"],
        source_schema="chat",
        referent_schema="chat",
        ondelete="CASCADE",
    )
