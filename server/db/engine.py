"""The process's one database engine and pool, and the two ways to use it.

- A unit of work of several statements: ``async with database.begin() as session``.
- A unit of work that is one statement (units of work 1 and 2, the consumer's batch):
  ``async with database.autocommit("what") as conn``, an AUTOCOMMIT connection of the same
  pool. A single statement is its own transaction, atomic and committed when it returns,
  so no BEGIN/COMMIT round trips are paid and no transaction outlives the statement.

Both log to one transaction logger and are traced by one instrumentation (SQLAlchemy's).
Nothing is created at import time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Final

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext import asyncio as sqlalchemy_asyncio
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from server.config import DatabaseSettings

Executor = AsyncSession | AsyncConnection
"""What the data-access functions take: a unit of work's session or a single-statement connection."""

transaction_logger = logging.getLogger("server.db.transactions")

# How long a call waits for a pooled connection before it fails UNAVAILABLE.
_POOL_TIMEOUT_S: Final = 10


def create_engine(settings: DatabaseSettings, *, application_name: str = "chatstream") -> AsyncEngine:
    """An asyncpg engine whose pool holds at most ``db_pool_size`` connections.

    It is the process's only pool, so ``db_pool_size`` is the process's whole claim on
    PostgreSQL's connections; a call that finds every connection busy waits up to
    ``pool_timeout``. Every unit of work is short (most are one round trip), so a small
    pool serves many streams.

    No ``pool_pre_ping``: it doubled the round trips of every single-statement unit of
    work (5 % of the server's samples in P4, docs/benchmarks.md). After PostgreSQL
    restarts, the first statement on a dead connection fails as an outage (callers already
    ride those out: UNAVAILABLE with RetryInfo, unit of work 2's retries, the consumer's
    back-off), and SQLAlchemy then invalidates the whole pool, so the next checkout
    connects afresh.
    """
    size = settings.db_pool_size
    # Looked up at call time: OpenTelemetry's SQLAlchemy instrumentation wraps the module
    # attribute when tracing is configured, after this module was imported.
    return sqlalchemy_asyncio.create_async_engine(
        settings.database_url,
        pool_size=size,
        max_overflow=0,
        pool_timeout=_POOL_TIMEOUT_S,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": application_name}},
    )


class Database:
    """The engine with its sessions and its single-statement connections.

    Results are read after the unit of work ends (``expire_on_commit=False``), so no
    attribute access ever triggers implicit I/O.
    """

    def __init__(self, engine: AsyncEngine, *, log_transactions: bool = False) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Shares the pool: execution_options() makes a view of the same engine.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._log = log_transactions

    @classmethod
    def from_settings(cls, settings: DatabaseSettings, *, application_name: str = "chatstream") -> Database:
        """The process's database, configured from its settings group."""
        return cls(
            create_engine(settings, application_name=application_name),
            log_transactions=settings.log_transactions,
        )

    async def ping(self) -> None:
        """One trivial statement on a pooled connection; raises if PostgreSQL is away.

        A connection that died with a PostgreSQL restart fails once and invalidates the
        pool; the second try then connects afresh, so only a server that is really away fails.
        """
        for attempt in (1, 2):
            try:
                async with self._autocommit.connect() as conn:
                    await conn.exec_driver_sql("SELECT 1")
                return
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise

    async def dispose(self) -> None:
        """Closes every pooled connection."""
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def begin(self, what: str = "unit of work") -> AsyncIterator[AsyncSession]:
        """A unit of work: commits when the block ends, rolls back if it raises."""
        async with self._logged(what), self._sessions.begin() as session:
            yield session

    @contextlib.asynccontextmanager
    async def autocommit(self, what: str) -> AsyncIterator[AsyncConnection]:
        """A connection for one statement that is its own transaction.

        Use it only for a single statement: each statement commits as it returns, so
        several would not be atomic together.
        """
        async with self._logged(what, single=True), self._autocommit.connect() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _logged(self, what: str, *, single: bool = False) -> AsyncIterator[None]:
        """Logs BEGIN, then COMMIT or ROLLBACK with how long the transaction was open.

        This is the signal that would have caught the original incident in minutes: a
        streaming endpoint whose log shows BEGIN and never COMMIT, or a COMMIT only after
        the whole reply, is holding a transaction across the stream.
        """
        if not self._log:
            yield
            return
        kind = "single statement" if single else "transaction"
        began = time.perf_counter()
        transaction_logger.info("BEGIN (%s %s)", kind, what)
        try:
            yield
        except BaseException:
            held_ms = (time.perf_counter() - began) * 1000
            transaction_logger.info("ROLLBACK after %.1f ms (%s %s)", held_ms, kind, what)
            raise
        held_ms = (time.perf_counter() - began) * 1000
        transaction_logger.info("COMMIT after %.1f ms (%s %s)", held_ms, kind, what)
