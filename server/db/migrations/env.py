"""Alembic environment: async engine, schema ``chat``, one migrator at a time."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from server.db.tables import SCHEMA, Base

# Any constant works; it only has to be the same for every migrator of this schema.
_MIGRATION_LOCK_KEY = 0x63686174  # "chat"


def _run(connection: Connection) -> None:
    # Serialise concurrent migrators (several replicas starting at once); the lock is
    # released when the connection closes.
    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table_schema=SCHEMA,
        include_schemas=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


async def _run_online() -> None:
    url = context.config.attributes["database_url"]
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `chatstream migrate`")
asyncio.run(_run_online())
