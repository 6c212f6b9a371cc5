"""``chatstream consume``: the persistence worker, the relay and the lag gauges in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions

from server.config import Settings
from server.consumer.lag import measure_lag
from server.consumer.relay import Relay
from server.consumer.worker import PersistenceWorker
from server.db.engine import Database
from server.metrics import Metrics, serve_metrics
from server.publisher import TurnPublisher
from server.redis_client import REDIS_OUTAGES, check_redis_eviction_policy, create_redis
from server.tracing import configure_tracing, shutdown_tracing

logger = logging.getLogger(__name__)

_LAG_INTERVAL_S = 5.0


class ConsumerProcess:
    """The persistence consumer and the outbox relay, and everything they own.

    Built like `server.app.ChatServer`: ``start()`` acquires the resources in an exit stack
    and starts the worker, the relay and the lag gauges; ``stop()`` (idempotent) asks the
    worker to stop reading and to finish, commit and ack its in-flight batches, and the
    relay to finish its pass, then closes the resources in reverse order.
    ``runtime.serve_until_signal`` runs it until SIGTERM/SIGINT; ``drain()`` is burst mode.
    """

    def __init__(self, settings: Settings, *, relay: bool = True, metrics: Metrics | None = None) -> None:
        """Args:
        settings: What to connect to and how to consume.
        relay: Also run the outbox relay and lease sweeper.
        metrics: The registry to report to. None makes one and serves it on
            ``settings.observability.metrics_listen``; dev mode passes the server's, so that one
            process has one endpoint.
        """
        self._settings = settings
        self._relay_on = relay
        self._metrics = metrics
        self._stack = contextlib.AsyncExitStack()
        self._worker: PersistenceWorker | None = None
        self._relay: Relay | None = None
        self._running: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Opens the database pool and Redis, checks Redis, and starts consuming."""
        redis, metrics = await self._open()
        self._running = asyncio.create_task(self._run(redis, metrics), name="consumer")

    async def drain(self) -> None:
        """Burst mode: one relay pass (if on), then consumes until every shard is drained, then stops."""
        try:
            await self._open()
            assert self._worker is not None
            assert self._relay is not None
            if self._relay_on:
                await self._relay.run_once()
            await self._worker.run(burst=True)
            logger.info("consumer drained: %s; relay: %s", self._worker.stats, self._relay.stats)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stops consuming gracefully and closes everything; idempotent.

        The in-flight batches are committed and acked before the pools and Redis close.

        Raises:
            Exception: The error that ended the worker, the relay or the gauges, if one did
                (once: a second call returns quietly).
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._worker is not None:
                self._worker.stop()
            if self._relay is not None:
                self._relay.stop()
            if self._running is not None:
                await asyncio.wait({self._running})
                if self._worker is not None and self._relay is not None:
                    logger.info("consumer stopped: %s; relay: %s", self._worker.stats, self._relay.stats)
                self._running.result()
        finally:
            await self._stack.aclose()

    async def wait_stopped(self) -> None:
        """Returns once consuming has ended: after ``stop()``, or by itself when it failed."""
        if self._running is not None:
            # asyncio.wait, not await: cancelling this waiter must not cancel the consumer.
            await asyncio.wait({self._running})

    async def _open(self) -> tuple[aioredis.Redis, Metrics]:
        settings = self._settings
        if configure_tracing("chatstream-consumer"):
            self._stack.callback(shutdown_tracing)
        # Connects lazily: creating it needs no database yet.
        database = Database.from_settings(settings.database, application_name="chatstream-consumer")
        self._stack.push_async_callback(database.dispose)
        redis = await create_redis(settings.redis)
        self._stack.push_async_callback(redis.aclose)
        metrics = self._metrics
        if metrics is None:
            metrics = Metrics()
            endpoint = serve_metrics(metrics, settings.observability.metrics_listen)
            if endpoint is not None:
                self._stack.callback(endpoint.close)
        await check_redis_eviction_policy(redis)
        self._worker = PersistenceWorker.from_settings(
            settings.consumer, shards=settings.redis.shards, redis=redis, database=database, metrics=metrics
        )
        self._relay = Relay(
            database=database,
            redis=redis,
            live_ttl_s=settings.turns.live_ttl_s,
            publisher=TurnPublisher(redis, shards=settings.redis.shards),
            interval=timedelta(seconds=settings.consumer.relay_interval_s),
            grace=timedelta(seconds=settings.consumer.relay_grace_s),
            metrics=metrics,
        )
        return redis, metrics

    async def _run(self, redis: aioredis.Redis, metrics: Metrics) -> None:
        assert self._worker is not None
        assert self._relay is not None
        async with asyncio.TaskGroup() as tasks:
            worker = tasks.create_task(self._worker.run(), name="persistence worker")
            if self._relay_on:
                tasks.create_task(self._relay.run(), name="relay")
            gauges = tasks.create_task(_observe_lag(redis, self._settings, metrics), name="lag gauges")
            # The worker only returns once stopped; the gauges end with it.
            worker.add_done_callback(lambda _: gauges.cancel())


async def _observe_lag(redis: aioredis.Redis, settings: Settings, metrics: Metrics) -> None:
    """Keeps the per-shard lag, pending and dead-letter gauges current (every few seconds)."""
    while True:
        try:
            report = await measure_lag(redis, shards=settings.redis.shards)
        except (redis_exceptions.RedisError, *REDIS_OUTAGES) as exc:
            logger.debug("lag measurement failed: %s", exc.__class__.__name__)
        else:
            for shard in report.shards:
                label = str(shard.shard)
                metrics.consumer_lag.labels(label).set(shard.undelivered)
                metrics.consumer_pending.labels(label).set(shard.pending)
                metrics.consumer_oldest_pending.labels(label).set(shard.oldest_pending_age_s or 0)
            metrics.dead_letters.set(report.dead_letters)
        await asyncio.sleep(_LAG_INTERVAL_S)
