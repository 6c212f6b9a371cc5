"""Leases: the turns this process is producing, and the end of turns whose producer died.

A STREAMING turn carries a lease that its server renews every third of the lease. A
server that dies stops renewing, so its turns' leases expire, and ``interrupt_expired``
(run by the relay's sweeper, by the next turn of the conversation, by a retry or a
watcher of the turn) ends them INTERRUPTED with the partial reply their live log kept.
That is the only way a turn ends without the process that produced it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server import live
from server.db import lease_store
from server.db.engine import Database
from server.domain import Sequenced, Turn, TurnCompleted
from server.errors import classify
from server.publisher import TurnPublisher

logger = logging.getLogger(__name__)


class TurnLeases:
    """Tracks the turns being produced here, renews their leases, and drains them at shutdown."""

    def __init__(self, database: Database, *, lease: timedelta) -> None:
        self._database = database
        self.lease = lease
        self._producing: set[uuid.UUID] = set()
        self._calls: set[asyncio.Task[object]] = set()
        self._finishing: set[asyncio.Future[object]] = set()

    @property
    def producing(self) -> int:
        """Turns this process is streaming right now."""
        return len(self._producing)

    @contextlib.contextmanager
    def hold(self, turn_id: uuid.UUID) -> Iterator[None]:
        """Keeps ``turn_id``'s lease renewed, and the calling task cancellable by shutdown."""
        call = asyncio.current_task()
        self._producing.add(turn_id)
        if call is not None:
            self._calls.add(call)
        try:
            yield
        finally:
            self._producing.discard(turn_id)
            if call is not None:
                self._calls.discard(call)

    def track(self, task: asyncio.Future[Any]) -> None:
        """A task that records an outcome: shutdown waits for it before the pools close."""
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def renew(self) -> None:
        """Extends the leases of every turn this process is producing (one statement)."""
        turn_ids = list(self._producing)
        if not turn_ids:
            return
        async with self._database.autocommit("renew leases") as conn:
            await lease_store.renew_leases(conn, turn_ids=turn_ids, lease=self.lease)

    async def renew_forever(self) -> None:
        """Renews every third of the lease; a dead process stops renewing, which is the point."""
        interval = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure
                # A missed renewal is survivable: two more happen before the lease ends.
                logger.warning("lease renewal failed: %s", classify(exc).reason)

    async def shutdown(self, *, wait_s: float = 0.0) -> None:
        """Lets the turns still producing finish for up to ``wait_s``, then cancels them and
        waits until every outcome is recorded.

        Called after the gRPC server's grace period: grpc aborts the calls towards their
        clients but does not reliably cancel their handlers before the process exits, and
        turns that continue without their caller have no call at all; cancelling them
        here records their turns as CANCELLED.
        """
        if self._calls and wait_s > 0:
            await asyncio.wait(list(self._calls), timeout=wait_s)
        calls = [call for call in self._calls if not call.done()]
        for call in calls:
            call.cancel()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
        while self._finishing:
            await asyncio.gather(*list(self._finishing), return_exceptions=True)


async def interrupt_expired(
    database: Database,
    redis: aioredis.Redis,
    publisher: TurnPublisher,
    *,
    live_ttl_s: float,
    limit: int,
    conversation_id: uuid.UUID | None = None,
) -> list[Turn]:
    """Ends turns whose lease expired INTERRUPTED, keeping the text their live log holds.

    Three short steps, none holding a transaction across Redis: find the expired turns,
    read their live logs, then one statement that ends only those still expired. The
    terminal event is appended to each log so that its watchers end at once, and the
    turns are published for the persistence consumer (best effort: the relay re-publishes
    what this misses).
    """
    async with database.autocommit("find expired turns") as conn:
        expired = await lease_store.find_expired(conn, limit=limit, conversation_id=conversation_id)
    if not expired:
        return []
    remains = [await _remains(redis, turn_id) for turn_id in expired]
    async with database.autocommit("interrupt expired turns") as conn:
        ended = await lease_store.interrupt(conn, remains)
    for turn in ended:
        await _append_terminal(redis, turn, ttl_s=live_ttl_s)
    if ended:
        try:
            await publisher.publish_many(ended)
        except (RedisError, OSError) as exc:
            logger.warning(
                "publishing %d interrupted turn(s) failed (%s); the relay will retry", len(ended), exc
            )
    return ended


async def _remains(redis: aioredis.Redis, turn_id: uuid.UUID) -> lease_store.Remains:
    try:
        events = await live.read_after(redis, turn_id, 0)
    except (RedisError, OSError) as exc:
        logger.warning("live log of turn %s unreadable (%s); its partial reply is lost", turn_id, exc)
        events = []
    return lease_store.Remains(
        turn_id=turn_id, text=live.text_of(events), last_seq=(events[-1].seq if events else 1) + 1
    )


async def _append_terminal(redis: aioredis.Redis, turn: Turn, *, ttl_s: float) -> None:
    if turn.last_seq is None:
        return
    event = TurnCompleted(
        status=turn.status, stop_reason="", usage=turn.usage, model=turn.model, error_reason="LEASE_EXPIRED"
    )
    key = live.live_key(turn.id)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, live.encode(Sequenced(turn.last_seq, event)), id=f"{turn.last_seq}-0")
            pipe.pexpire(key, int(ttl_s * 1000))
            await pipe.execute()
    except (RedisError, OSError) as exc:
        # Watchers notice the end through PostgreSQL instead.
        logger.info(
            "could not append the end of turn %s to its live log (%s)", turn.id, exc.__class__.__name__
        )
