"""Engine and sessionmaker factories; nothing is created at import time."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from server.config import Settings

SessionMaker = async_sessionmaker[AsyncSession]


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    """An asyncpg engine whose pool is sized from Settings.

    ``pool_pre_ping`` lets a pool recover after PostgreSQL restarts instead of handing
    out dead connections; ``pool_timeout`` bounds how long a call waits for a connection.
    """
    size = pool_size or settings.db_pool_size
    return create_async_engine(
        settings.database_url,
        pool_size=size,
        max_overflow=size,
        pool_timeout=10,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": "chatstream"}},
    )


def create_sessionmaker(engine: AsyncEngine) -> SessionMaker:
    """Sessions for explicit units of work: ``async with sessionmaker.begin() as session``.

    ``expire_on_commit=False`` because results are read after the block commits, and an
    expired attribute would otherwise trigger implicit I/O.
    """
    return async_sessionmaker(engine, expire_on_commit=False)
