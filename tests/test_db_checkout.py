"""The pool's order when every connection is busy: a call's start first, then first come, first served.

A real ``Database`` on the test PostgreSQL, with a pool of one connection held by a statement
that waits on an event, so the order in which the waiters get it is decided by our queue alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy.exc

from server.config import DatabaseSettings
from server.db.engine import CheckoutQueue, Database
from server.db.outages import is_database_outage
from tests.conftest import Services


@pytest.fixture
async def database(services: Services) -> AsyncIterator[Database]:
    database = Database.from_settings(DatabaseSettings(database_url=services.database_url, db_pool_size=1))
    yield database
    await database.dispose()


async def _use(database: Database, name: str, order: list[str], *, priority: bool) -> None:
    async with database.autocommit(name, priority=priority) as conn:
        await conn.exec_driver_sql("SELECT 1")
        order.append(name)


async def _hold(database: Database, holding: asyncio.Event, release: asyncio.Event) -> None:
    async with database.autocommit("hold") as conn:
        await conn.exec_driver_sql("SELECT 1")
        holding.set()
        await release.wait()


async def _queued(*tasks: asyncio.Task[None]) -> None:
    """Lets each task reach its wait, in the order given."""
    for _ in tasks:
        await asyncio.sleep(0.05)


async def test_a_start_gets_the_next_connection_before_earlier_waiters(database: Database) -> None:
    holding, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(_hold(database, holding, release))
    await holding.wait()
    order: list[str] = []
    others = []
    for name in ("store outcome 1", "renew leases", "store outcome 2"):
        others.append(asyncio.create_task(_use(database, name, order, priority=False)))
        await _queued(others[-1])
    start = asyncio.create_task(_use(database, "start turn", order, priority=True))
    await _queued(start)

    release.set()
    await asyncio.gather(holder, start, *others)

    assert order == ["start turn", "store outcome 1", "renew leases", "store outcome 2"]


async def test_a_waiter_that_is_cancelled_takes_no_connection_with_it(database: Database) -> None:
    holding, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(_hold(database, holding, release))
    await holding.wait()
    order: list[str] = []
    gone = asyncio.create_task(_use(database, "gone", order, priority=True))
    await _queued(gone)
    gone.cancel()
    later = asyncio.create_task(_use(database, "later", order, priority=False))
    await _queued(later)

    release.set()
    await asyncio.gather(holder, later)

    assert order == ["later"]
    # The permit went back: the one connection serves another unit of work at once.
    async with asyncio.timeout(5):
        await _use(database, "again", order, priority=False)


async def test_a_permit_handed_to_a_waiter_that_was_cancelled_meanwhile_goes_on() -> None:
    queue = CheckoutQueue(1, timeout_s=5)
    order: list[str] = []

    async def take(name: str) -> None:
        async with queue.permit(priority=False):
            order.append(name)

    async with queue.permit(priority=False):
        first = asyncio.create_task(take("first"))
        second = asyncio.create_task(take("second"))
        await asyncio.sleep(0)
    # The block's exit handed its permit to ``first``, which has not run since: cancel it now.
    first.cancel()
    await asyncio.gather(first, second, return_exceptions=True)

    assert order == ["second"]


async def test_a_wait_past_the_timeout_is_a_database_outage() -> None:
    queue = CheckoutQueue(1, timeout_s=0.1)
    async with queue.permit(priority=False):
        with pytest.raises(sqlalchemy.exc.TimeoutError) as raised:
            async with queue.permit(priority=True):
                pass
    assert is_database_outage(raised.value)
    # The timed-out waiter left the queue: the permit is free again.
    async with asyncio.timeout(1), queue.permit(priority=False):
        pass
