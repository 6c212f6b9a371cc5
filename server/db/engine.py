"""Engine and sessionmaker factories; nothing is created at import time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from server.config import Settings

SessionMaker = async_sessionmaker[AsyncSession]

transaction_logger = logging.getLogger("server.db.transactions")


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    """An asyncpg engine whose pool is sized from Settings.

    ``pool_pre_ping`` lets a pool recover after PostgreSQL restarts instead of handing
    out dead connections; ``pool_timeout`` bounds how long a call waits for a connection.
    """
    size = pool_size or settings.db_pool_size
    engine = create_async_engine(
        settings.database_url,
        pool_size=size,
        max_overflow=size,
        pool_timeout=10,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": "chatstream"}},
    )
    if settings.log_transactions:
        log_transactions(engine)
    return engine


def log_transactions(engine: AsyncEngine) -> None:
    """Logs BEGIN, COMMIT and ROLLBACK of every transaction with how long it was open.

    This is the signal that would have caught the original incident in minutes: a
    streaming endpoint whose log shows BEGIN and never COMMIT, or a COMMIT only after
    the whole reply, is holding a transaction across the stream.
    """

    def began(conn: Connection) -> None:
        conn.info["chatstream_tx_started"] = time.perf_counter()
        transaction_logger.info("BEGIN (connection %x)", id(conn.connection))

    def ended(verb: str) -> Callable[[Connection], None]:
        def log(conn: Connection) -> None:
            started = conn.info.pop("chatstream_tx_started", None)
            held_ms = -1.0 if started is None else (time.perf_counter() - started) * 1000
            transaction_logger.info("%s after %.1f ms (connection %x)", verb, held_ms, id(conn.connection))

        return log

    sync_engine = engine.sync_engine
    event.listen(sync_engine, "begin", began)
    event.listen(sync_engine, "commit", ended("COMMIT"))
    event.listen(sync_engine, "rollback", ended("ROLLBACK"))


def create_sessionmaker(engine: AsyncEngine) -> SessionMaker:
    """Sessions for explicit units of work: ``async with sessionmaker.begin() as session``.

    ``expire_on_commit=False`` because results are read after the block commits, and an
    expired attribute would otherwise trigger implicit I/O.
    """
    return async_sessionmaker(engine, expire_on_commit=False)
