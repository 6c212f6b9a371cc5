"""The number of a turn's terminal event, so a resume served from PostgreSQL keeps the live numbering.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("last_seq", sa.Integer(), nullable=True), schema="chat")


def downgrade() -> None:
    op.drop_column("turns", "last_seq", schema="chat")
