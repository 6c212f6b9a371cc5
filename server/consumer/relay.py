"""The outbox relay: re-publishes ended turns that never reached PostgreSQL's messages.

PostgreSQL is the truth and Redis only relays it. A turn row that ended (unit of
work 2) but was never marked persisted by the consumer is published again after a
grace period. That covers: Redis down when the server published; the server dying
between unit of work 2 and its XADD; Redis restarting without persistence and losing
streams and group. The relay also ends turns whose server died mid-stream: once a
STREAMING turn's lease expires it becomes INTERRUPTED (user message kept) and is
published like any other ended turn.

Re-publishing is always safe: the consumer's writes are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import redis.asyncio as aioredis

from server.db import turn_store
from server.db.engine import Database
from server.errors import classify
from server.leases import interrupt_expired
from server.metrics import Metrics
from server.publisher import TurnPublisher

logger = logging.getLogger(__name__)

_BATCH: Final = 500


@dataclass(slots=True)
class RelayStats:
    """Counters for logs, tests and metrics."""

    republished: int = 0
    interrupted: int = 0
    failures: int = 0


class Relay:
    """Periodically sweeps expired leases and re-publishes unpersisted turns."""

    def __init__(
        self,
        *,
        database: Database,
        redis: aioredis.Redis,
        publisher: TurnPublisher,
        interval: timedelta,
        grace: timedelta,
        live_ttl_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._database = database
        self._redis = redis
        self._live_ttl_s = live_ttl_s
        self._publisher = publisher
        self._interval = interval
        self._grace = grace
        self._stopping = asyncio.Event()
        self.stats = RelayStats()
        self._metrics = metrics or Metrics()

    def stop(self) -> None:
        """Asks ``run()`` to return after the current pass; idempotent."""
        self._stopping.set()

    async def run(self) -> None:
        """Runs passes every ``interval`` until ``stop()``; failures are logged and retried."""
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any outage
                self.stats.failures += 1
                logger.warning("relay pass failed: %s", classify(exc).reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval.total_seconds())

    async def run_once(self) -> int:
        """One pass: interrupt expired turns, then re-publish what is due; returns turns published."""
        published = 0
        while True:
            interrupted = await interrupt_expired(
                self._database, self._redis, self._publisher, live_ttl_s=self._live_ttl_s, limit=_BATCH
            )
            if interrupted:
                logger.warning(
                    "interrupted %d turn(s) whose server stopped renewing their lease", len(interrupted)
                )
                self.stats.interrupted += len(interrupted)
                self._metrics.relay_interrupted.inc(len(interrupted))
            # Claiming stamps relayed_at in the same transaction, so if the XADD fails
            # the turn waits one backoff period and is claimed again.
            async with self._database.autocommit("claim unpersisted turns") as conn:
                due = await turn_store.claim_unpersisted_turns(conn, grace=self._grace, limit=_BATCH)
            # interrupt_expired published the interrupted turns itself.
            published += len(interrupted)
            if due:
                await self._publisher.publish_many(due)
                published += len(due)
                self.stats.republished += len(due)
                self._metrics.relay_republished.inc(len(due))
            if len(due) < _BATCH and len(interrupted) < _BATCH:
                return published
