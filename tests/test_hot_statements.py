"""Hot statements (``Database.hot``): the driver connection under a pooled connection.

A real ``Database`` with a pool of one connection, so every statement here uses the same
pooled connection and what one leaves behind is what the next one meets.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy.exc

from server.config import DatabaseSettings
from server.db.engine import Database, Statement
from server.db.outages import is_database_outage
from tests.conftest import Services, eventually

_APP = "chatstream-hot-test"
_PID = Statement("SELECT pg_backend_pid()")
_SLEEP = Statement("SELECT pg_sleep(:seconds)")
_ECHO = Statement("SELECT CAST(:a AS int) AS a, CAST(:b AS text) AS b, CAST(:a AS int) + 1 AS a_again")
_DUPLICATE = Statement(
    "INSERT INTO chat.conversations (id, owner) VALUES (:id, 'hot-test'), (:id, 'hot-test')"
)


@pytest.fixture
async def database(services: Services) -> AsyncIterator[Database]:
    database = Database.from_settings(
        DatabaseSettings(database_url=services.database_url, db_pool_size=1), application_name=_APP
    )
    yield database
    await database.dispose()


async def _terminate(services: Services, pid: int) -> None:
    """Ends one backend from outside, as a PostgreSQL restart or an operator would."""
    conn = await asyncpg.connect(services.asyncpg_dsn)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


async def _sleep(database: Database) -> None:
    """A statement that runs for 5 s on the pool's one connection."""
    async with database.hot("sleep") as conn:
        await conn.fetchval(_SLEEP, {"seconds": 5})


async def _until_sleeping(services: Services) -> None:
    """Waits until PostgreSQL runs ``_sleep``'s statement."""
    conn = await asyncpg.connect(services.asyncpg_dsn)
    try:

        async def running() -> bool:
            found = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
                _APP,
            )
            return bool(found)

        await eventually(running, what="the statement to run")
    finally:
        await conn.close()


async def _pid(database: Database) -> int:
    async with database.hot("pid") as conn:
        pid: int = await conn.fetchval(_PID, {})
    return pid


async def test_named_parameters_are_sent_in_their_positions_and_a_repeated_one_once(
    database: Database,
) -> None:
    async with database.hot("echo") as conn:
        row = await conn.fetchrow(_ECHO, {"a": 41, "b": "x"})
    assert row is not None
    assert (row["a"], row["b"], row["a_again"]) == (41, "x", 42)
    assert "$3" not in _ECHO.sql  # :a twice is one parameter


async def test_a_pooled_connection_whose_backend_died_while_idle_is_replaced_without_an_error(
    services: Services, database: Database
) -> None:
    before = await _pid(database)
    await _terminate(services, before)
    await asyncio.sleep(0.2)  # the driver reads the closed socket, as it would in an idle pool
    after = await _pid(database)  # no outage: the dead connection is noticed before use
    assert after != before


async def test_a_backend_that_dies_mid_statement_is_an_outage_and_its_connection_is_not_reused(
    services: Services, database: Database
) -> None:
    pid = await _pid(database)

    sleeping = asyncio.create_task(_sleep(database))
    await _until_sleeping(services)
    await _terminate(services, pid)
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)) as raised:
        await sleeping
    assert is_database_outage(raised.value)
    assert await _pid(database) != pid


async def test_a_constraint_violation_is_sqlalchemys_integrity_error_and_the_connection_goes_on(
    database: Database,
) -> None:
    pid = await _pid(database)
    async with database.hot("duplicate") as conn:
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            await conn.fetchval(_DUPLICATE, {"id": uuid.uuid4()})
    assert await _pid(database) == pid  # a statement error is not an outage: the connection stays


async def test_a_statement_cancelled_mid_flight_leaves_its_pooled_connection_usable(
    services: Services, database: Database
) -> None:
    sleeping = asyncio.create_task(_sleep(database))
    await _until_sleeping(services)
    sleeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeping
    async with asyncio.timeout(3):  # not after the 5 s sleep: the cancelled statement did not go on
        assert await _pid(database) > 0
