"""The process's one database engine and pool, and the three ways to use it.

- A unit of work of several statements: ``async with database.begin() as session``.
- A unit of work that is one statement: ``async with database.autocommit("what") as conn``,
  an AUTOCOMMIT connection of the same pool. A single statement is its own transaction,
  atomic and committed when it returns, so no BEGIN/COMMIT round trips are paid and no
  transaction outlives the statement.
- The per-turn statements (units of work 1 and 2, the context read) and the consumer's
  batch: ``async with database.hot("what") as conn``, the asyncpg connection under a
  pooled connection, running a ``Statement`` compiled once. They run for every turn, and
  SQLAlchemy's execution and result layers cost about 130 µs of CPU per statement on top of
  the driver's 60 (docs/benchmarks.md, "the hot statements"); the pool, its checkout
  order, the transaction log and the outage errors are the same as for the other two.

When every connection is in use, a call's start (unit of work 1, ``priority=True``) gets
the next free one before every other waiter (``CheckoutQueue``).

All three log to one transaction logger. SQLAlchemy's instrumentation traces the first two;
``hot`` statements get the same kind of span from ``server.tracing`` (it sees no SQLAlchemy
execution). Nothing is created at import time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

import asyncpg
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext import asyncio as sqlalchemy_asyncio
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from server import tracing
from server.config import DatabaseSettings
from server.db.outages import is_database_outage

Executor = AsyncSession | AsyncConnection
"""What the data-access functions take: a unit of work's session or a single-statement connection."""

transaction_logger = logging.getLogger("server.db.transactions")

# How long a call waits for a pooled connection before it fails UNAVAILABLE.
_POOL_TIMEOUT_S: Final = 10


class Row(Protocol):
    """A result row read by column name: SQLAlchemy's ``RowMapping`` or the driver's record."""

    def __getitem__(self, key: str, /) -> Any: ...


class Statement:
    """A hot statement, written with ``:named`` parameters and compiled once to asyncpg's ``$n`` form.

    The SQL is a literal of the module that declares it, never built from input; asyncpg
    prepares it once per connection and reuses it.
    """

    __slots__ = ("_names", "clause", "sql")

    def __init__(self, sql: str) -> None:
        self.clause: Final = text(sql)
        """The same statement for a SQLAlchemy session (a unit of work of several statements)."""
        compiled = self.clause.compile(dialect=asyncpg_dialect.dialect())  # type: ignore[no-untyped-call]
        self.sql: Final = str(compiled)
        # A name used twice is one $n: positiontup lists each name once, in $n order.
        self._names: Final = tuple(compiled.positiontup or ())

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """The parameters in ``$n`` order."""
        return tuple(params[name] for name in self._names)


class HotConnection:
    """The driver connection under one pooled connection, for one hot statement.

    Errors keep the one family of the rest of the path: a constraint violation is raised as
    SQLAlchemy's ``IntegrityError``; an outage stays the driver's error (``is_database_outage``
    knows it), and the pooled connection is invalidated so that it is not handed out again.
    """

    __slots__ = ("_conn", "_driver")

    def __init__(self, conn: AsyncConnection, driver: asyncpg.Connection) -> None:
        self._conn = conn
        self._driver = driver

    async def fetchrow(self, statement: Statement, params: Mapping[str, Any]) -> Row | None:
        """The statement's first row, or None."""
        row: Row | None = await self._run(self._driver.fetchrow, statement, params)
        return row

    async def fetch(self, statement: Statement, params: Mapping[str, Any]) -> list[Row]:
        """Every row of the statement."""
        rows: list[Row] = await self._run(self._driver.fetch, statement, params)
        return rows

    async def fetchval(self, statement: Statement, params: Mapping[str, Any]) -> Any:
        """The first column of the statement's first row."""
        return await self._run(self._driver.fetchval, statement, params)

    async def _run(
        self, method: Callable[..., Awaitable[Any]], statement: Statement, params: Mapping[str, Any]
    ) -> Any:
        try:
            with tracing.statement_span(statement.sql):
                return await method(statement.sql, *statement.args(params))
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise sqlalchemy.exc.IntegrityError(statement.sql, None, exc) from exc
        except Exception as exc:
            if is_database_outage(exc) or self._driver.is_closed():
                # What SQLAlchemy does when one of its statements meets a dead connection.
                await self._conn.invalidate(exc)
            raise


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
    connects afresh. A hot statement (``Database.hot``) does not even pay that failure for
    a connection that died idle: the driver saw its socket close, and it is replaced first.
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


class CheckoutQueue:
    """The order in which units of work get the pool's connections: call start-ups first.

    A busy server holds every connection for longer than its statement: each is handed
    back only when the event loop next runs the task that used it, which on a saturated
    loop is tens of milliseconds later. The pool's own queue is first come, first served,
    so a new call's unit of work 1 queued behind every turn's unit of work 2, lease
    renewal and context read, and its TurnStarted came seconds late (P2,
    docs/benchmarks.md). This queue sits in front of the pool and holds as many permits
    as the pool has connections: the pool itself never has a waiter, and a free
    connection goes to the longest-waiting start-up, if any, else to the longest-waiting
    other unit of work. Others can starve only while starts keep every connection busy,
    which admission (server/load.py) bounds.
    """

    def __init__(self, size: int, *, timeout_s: float) -> None:
        self._free = size
        self._timeout_s = timeout_s
        # Start-ups first; each waiter is a future that is resolved with its permit.
        self._waiting: tuple[collections.deque[asyncio.Future[None]], ...] = (
            collections.deque(),
            collections.deque(),
        )

    @contextlib.asynccontextmanager
    async def permit(self, *, priority: bool) -> AsyncIterator[None]:
        """Holds one connection's permit for the block."""
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: bool) -> None:
        if self._free > 0 and not any(self._waiting):
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        queue = self._waiting[0 if priority else 1]
        queue.append(waiter)
        try:
            async with asyncio.timeout(self._timeout_s):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # The permit came with the cancellation or the timeout: hand it on.
                self._release()
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
            if isinstance(exc, TimeoutError):
                # What the pool raises when it times out: an outage to every caller.
                raise sqlalchemy.exc.TimeoutError(
                    f"no database connection free within {self._timeout_s:g} s"
                ) from exc
            raise

    def _release(self) -> None:
        for queue in self._waiting:
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._free += 1


class Database:
    """The engine with its sessions and its single-statement connections.

    Results are read after the unit of work ends (``expire_on_commit=False``), so no
    attribute access ever triggers implicit I/O.
    """

    def __init__(self, engine: AsyncEngine, *, pool_size: int, log_transactions: bool = False) -> None:
        """Args:
        engine: The process's engine.
        pool_size: Its pool's number of connections (``create_engine``'s, no overflow).
        log_transactions: Log each unit of work's BEGIN and COMMIT or ROLLBACK.
        """
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Shares the pool: execution_options() makes a view of the same engine.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._log = log_transactions
        self._queue = CheckoutQueue(pool_size, timeout_s=_POOL_TIMEOUT_S)

    @classmethod
    def from_settings(cls, settings: DatabaseSettings, *, application_name: str = "chatstream") -> Database:
        """The process's database, configured from its settings group."""
        return cls(
            create_engine(settings, application_name=application_name),
            pool_size=settings.db_pool_size,
            log_transactions=settings.log_transactions,
        )

    async def ping(self) -> None:
        """One trivial statement on a pooled connection; raises if PostgreSQL is away.

        A connection that died with a PostgreSQL restart fails once and invalidates the
        pool; the second try then connects afresh, so only a server that is really away fails.
        """
        for attempt in (1, 2):
            try:
                async with self._queue.permit(priority=False), self._autocommit.connect() as conn:
                    await conn.exec_driver_sql("SELECT 1")
                return
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise

    async def dispose(self) -> None:
        """Closes every pooled connection."""
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def begin(
        self, what: str = "unit of work", *, priority: bool = False
    ) -> AsyncIterator[AsyncSession]:
        """A unit of work: commits when the block ends, rolls back if it raises.

        Args:
            what: What it does, for the transaction log.
            priority: It starts a call (unit of work 1): it gets the next free connection
                before every other waiter.
        """
        async with (
            self._queue.permit(priority=priority),
            self._logged(what),
            self._sessions.begin() as session,
        ):
            yield session

    @contextlib.asynccontextmanager
    async def autocommit(self, what: str, *, priority: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection for one statement that is its own transaction.

        Use it only for a single statement: each statement commits as it returns, so
        several would not be atomic together. ``priority`` as for ``begin``.
        """
        async with (
            self._queue.permit(priority=priority),
            self._logged(what, single=True),
            self._autocommit.connect() as conn,
        ):
            yield conn

    @contextlib.asynccontextmanager
    async def hot(self, what: str, *, priority: bool = False) -> AsyncIterator[HotConnection]:
        """The driver connection of a pooled connection, for one hot ``Statement``.

        Like ``autocommit``, each statement is its own transaction. A connection whose
        server went away while it sat in the pool is noticed here, without a round trip
        (the driver saw the socket close), and replaced. ``priority`` as for ``begin``.
        """
        async with (
            self._queue.permit(priority=priority),
            self._logged(what, single=True),
            self._autocommit.connect() as conn,
        ):
            driver = (await conn.get_raw_connection()).driver_connection
            if driver is None or driver.is_closed():
                await conn.invalidate()
                driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            yield HotConnection(conn, driver)

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
