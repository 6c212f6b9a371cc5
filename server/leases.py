"""The turns this process is producing: their leases, and what a shutdown must wait for.

A STREAMING turn carries a lease that its server renews every third of the lease. A
server that dies stops renewing, so its turns' leases expire and the sweeper (or the next
turn of the conversation) ends them INTERRUPTED. That is the only way a turn ends without
the process that produced it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from server.db import turn_store
from server.db.engine import Database
from server.errors import classify

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
            await turn_store.renew_leases(conn, turn_ids=turn_ids, lease=self.lease)

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

    async def shutdown(self) -> None:
        """Cancels the calls still producing and waits until every outcome is recorded.

        Called after the gRPC server's grace period: grpc aborts those calls towards the
        client but does not reliably cancel their handlers before the process exits, so
        they are cancelled here, which records their turns as CANCELLED.
        """
        calls = list(self._calls)
        for call in calls:
            call.cancel()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
        while self._finishing:
            await asyncio.gather(*list(self._finishing), return_exceptions=True)
