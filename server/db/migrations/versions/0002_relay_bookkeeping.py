"""Relay bookkeeping: when a turn was last re-published, and how often.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("relayed_at", sa.DateTime(timezone=True), nullable=True), schema="chat")
    op.add_column(
        "turns",
        sa.Column("relay_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        schema="chat",
    )


def downgrade() -> None:
    op.drop_column("turns", "relay_count", schema="chat")
    op.drop_column("turns", "relayed_at", schema="chat")
