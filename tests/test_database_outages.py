"""PostgreSQL outages beyond a refused connection: no slot left, a database not accepting
connections, a read-only primary after a failover, a server that is down; and a conversation
deleted under a streaming turn. Every error here comes from a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta

import asyncpg
import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError, TurnEvent, TurnStatus
from grpc_health.v1 import health_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from server.app import SERVICE_NAME, ChatServer
from server.config import Settings
from server.db.migrate import upgrade_async
from server.errors import StorageUnavailableError, classify, is_database_outage
from tests.conftest import Services, StartServer, eventually
from tests.fake_anthropic import FakeAnthropic, Gate, Stream
from tests.probes import health_status
from tests.processes import PostgresProcess, free_port

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def _assert_outage(exc: BaseException) -> None:
    assert is_database_outage(exc), repr(exc)
    assert isinstance(classify(exc), StorageUnavailableError), repr(exc)


async def _failure(attempt: Awaitable[object]) -> BaseException:
    try:
        await attempt
    except Exception as exc:  # noqa: BLE001 - the failure is what the test inspects
        return exc
    raise AssertionError("expected the database to refuse")


@contextlib.asynccontextmanager
async def _role_without_slots(db: asyncpg.Connection) -> AsyncIterator[tuple[str, str]]:
    role, password = f"cs_noslots_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await db.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' CONNECTION LIMIT 0")
    try:
        yield role, password
    finally:
        await db.execute(f"DROP ROLE {role}")


@contextlib.asynccontextmanager
async def _closed_database(db: asyncpg.Connection) -> AsyncIterator[str]:
    name = f"cs_closed_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE DATABASE {name} ALLOW_CONNECTIONS false")
    try:
        yield name
    finally:
        await db.execute(f"DROP DATABASE {name}")


async def test_refused_full_closed_and_read_only_databases_are_outages_not_internal_errors(
    db: asyncpg.Connection, services: Services
) -> None:
    """Each one passes once the database is back, so it is UNAVAILABLE and retried, never INTERNAL."""
    dsn = services.asyncpg_dsn
    url = services.database_url

    # Connection refused: nothing listens.
    _assert_outage(await _failure(asyncpg.connect(host="127.0.0.1", port=free_port(), user="x", timeout=5)))

    # 53300 too_many_connections: no slot left for the role.
    async with _role_without_slots(db) as (role, password):
        full = await _failure(asyncpg.connect(dsn, user=role, password=password))
        assert isinstance(full, asyncpg.TooManyConnectionsError)
        _assert_outage(full)
        engine = create_async_engine(url, connect_args={"user": role, "password": password})
        try:
            _assert_outage(await _failure(engine.connect().start()))
        finally:
            await engine.dispose()

    # 55000: the database is not accepting connections (ALLOW_CONNECTIONS false).
    async with _closed_database(db) as name:
        closed = await _failure(asyncpg.connect(dsn, database=name))
        assert isinstance(closed, asyncpg.ObjectNotInPrerequisiteStateError)
        _assert_outage(closed)

    # 25006: a primary demoted to a read-only standby answers writes like this.
    read_only = await _failure(_write_in_read_only_transaction(db))
    assert isinstance(read_only, asyncpg.ReadOnlySQLTransactionError)
    _assert_outage(read_only)
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            wrapped = await _failure(conn.execute(text("UPDATE chat.conversations SET owner = owner")))
        _assert_outage(wrapped)  # SQLAlchemy's wrapper, the asyncpg error as its cause
    finally:
        await engine.dispose()

    # 57P03 cannot_connect_now ("the database system is starting up") cannot be provoked on
    # demand; its class is what asyncpg raises for it.
    _assert_outage(asyncpg.CannotConnectNowError("the database system is starting up"))

    # A wrong statement is not an outage.
    wrong = await _failure(db.execute("SELECT * FROM chat.no_such_table"))
    assert not is_database_outage(wrong)


async def _write_in_read_only_transaction(db: asyncpg.Connection) -> None:
    async with db.transaction(readonly=True):
        await db.execute("UPDATE chat.conversations SET owner = owner")


async def test_unit_of_work_2_rides_out_a_read_only_database_and_stores_the_turn(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """A failover leaves the server's new connections on a read-only database for a moment:
    the outcome is retried like any outage, and stored once writes are accepted again."""
    server = await start_server()
    gate = Gate()
    fake.script(Stream(["stored ", "after ", "the failover"], hold=gate))
    database = await db.fetchval("SELECT current_database()")
    async with AsyncChatClient(server.address, chat_timeout=timedelta(seconds=30)) as client:
        events = client.chat("outlive a failover")
        started = await anext(events)
        await gate.wait_reached(timeout=5)
        await db.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        try:
            # Every server connection is replaced by one that is read-only, as after a failover.
            await _terminate_server_connections(db)
            rollbacks = await _rollbacks(db)
            gate.open()
            rest = asyncio.create_task(_collect(events))

            async def refused_or_done() -> bool:
                return rest.done() or await _rollbacks(db) > rollbacks

            await eventually(
                refused_or_done, timeout_s=10, what="unit of work 2 refused by the read-only database"
            )
        finally:
            await db.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
            await _terminate_server_connections(db)
        kinds = await rest
    assert kinds[-1].completed.status is TurnStatus.COMPLETED
    row = await db.fetchrow(
        "SELECT status, assistant_text FROM chat.turns WHERE id = $1",
        uuid.UUID(started.started.turn.split("/")[-1]),
    )
    assert row is not None
    assert (row["status"], row["assistant_text"]) == ("COMPLETED", "stored after the failover")


async def _collect(events: AsyncIterator[TurnEvent]) -> list[TurnEvent]:
    return [event async for event in events]


async def _terminate_server_connections(db: asyncpg.Connection) -> None:
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'chatstream' AND pid <> pg_backend_pid()"
    )


async def _rollbacks(db: asyncpg.Connection) -> int:
    value: int = await db.fetchval(
        "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    )
    return value


async def test_health_is_not_serving_while_postgresql_is_down_and_serving_again_by_itself(
    settings: Settings,
) -> None:
    pg = PostgresProcess()
    try:
        await upgrade_async(pg.url)
        server = ChatServer(settings.with_overrides(database_url=pg.url, readiness_interval_s=0.2))
        await server.start()
        try:
            assert await health_status(server.address) == SERVING

            def degraded() -> float | None:
                return server.metrics.registry.get_sample_value(
                    "chatstream_degraded", {"reason": "postgresql"}
                )

            assert degraded() == 0
            await asyncio.to_thread(pg.stop)

            async def statuses() -> tuple[int, int]:
                return (
                    await health_status(server.address),
                    await health_status(server.address, service=SERVICE_NAME),
                )

            # The service is not ready; the process ("", the liveness probe's) stays alive, so
            # a database outage does not get every replica restarted.
            async def not_serving() -> bool:
                return await statuses() == (SERVING, NOT_SERVING)

            await eventually(not_serving, timeout_s=15, what="NOT_SERVING while PostgreSQL is down")
            assert degraded() == 1
            await asyncio.to_thread(pg.start)

            async def serving() -> bool:
                return await statuses() == (SERVING, SERVING)

            await eventually(serving, timeout_s=15, what="SERVING once PostgreSQL is back")
            assert degraded() == 0
        finally:
            await server.stop(grace_s=0)
    finally:
        pg.close()


async def test_a_turn_whose_conversation_is_deleted_mid_stream_ends_with_a_terminal_status(
    client: AsyncChatClient, fake: FakeAnthropic
) -> None:
    gate = Gate()
    fake.script(Stream(["never ", "stored"], hold=gate))
    events = client.chat("delete me while you answer")
    started = await anext(events)
    await gate.wait_reached(timeout=5)
    await client.delete_conversation(started.started.conversation)
    gate.open()
    outcome: list[TurnEvent] | ChatClientError
    try:
        outcome = await _collect(events)
    except ChatClientError as err:
        outcome = err
    if isinstance(outcome, ChatClientError):
        # Ending the call with a status instead of a TurnCompleted is terminal too.
        assert outcome.code in {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED}
    else:
        assert outcome[-1].WhichOneof("kind") == "completed"
        assert outcome[-1].completed.status not in {TurnStatus.STREAMING, TurnStatus.UNSPECIFIED}


async def test_the_readiness_probe_stays_out_of_the_transaction_log(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The transaction log is how an operator spots a transaction held across a stream: a probe
    every few seconds must not add BEGIN/ROLLBACK lines to it."""
    caplog.set_level(logging.INFO, logger="server.db.transactions")
    server = await start_server(log_transactions=True, readiness_interval_s=0.05)
    await asyncio.sleep(0.5)  # about ten probes; there is no event to wait for when nothing is logged
    assert await health_status(server.address, service=SERVICE_NAME) == SERVING
    assert [r.getMessage() for r in caplog.records if r.name == "server.db.transactions"] == []
