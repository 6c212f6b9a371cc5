"""``chatstream consume``: the persistence consumer and the relay in one process."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta

import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions

from server.config import Settings
from server.consumer.lag import measure_lag
from server.consumer.relay import Relay
from server.consumer.worker import PersistenceWorker
from server.db.engine import create_engine, create_sessionmaker
from server.db.hot import HotPath, create_pool
from server.metrics import Metrics, serve_metrics
from server.publisher import TurnPublisher
from server.redis_client import check_redis_eviction_policy, create_redis
from server.tracing import configure_tracing, shutdown_tracing

logger = logging.getLogger(__name__)


async def run_consumer(
    settings: Settings,
    *,
    burst: bool = False,
    relay: bool = True,
    stop: asyncio.Event | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Consumes until SIGTERM/SIGINT, or ``stop`` when given (or, with ``burst``, until drained).

    On a signal the worker stops reading, finishes, commits and acks its in-flight
    batches, and returns; the relay finishes its current pass.
    """
    tracing = configure_tracing("chatstream-consumer")
    engine = create_engine(settings, pool_size=4)
    # Connects lazily (min_size 0): creating it needs no database yet.
    hot_pool = await create_pool(settings, application_name="chatstream-consumer")
    redis = create_redis(settings)
    endpoint = None
    if metrics is None:
        metrics = Metrics()
        endpoint = serve_metrics(metrics, settings.metrics_listen)
    # else dev mode passed the server's Metrics: one process, one endpoint.
    try:
        await check_redis_eviction_policy(redis)
        sessionmaker = create_sessionmaker(engine)
        worker = PersistenceWorker.from_settings(
            settings, redis=redis, hot=HotPath(hot_pool), metrics=metrics
        )
        relayer = Relay(
            sessionmaker=sessionmaker,
            publisher=TurnPublisher(redis, shards=settings.shards),
            interval=timedelta(seconds=settings.relay_interval_s),
            grace=timedelta(seconds=settings.relay_grace_s),
            metrics=metrics,
        )

        def stop_all() -> None:
            worker.stop()
            relayer.stop()

        async def stop_on_request(requested: asyncio.Event) -> None:
            await requested.wait()
            stop_all()

        if burst:
            if relay:
                await relayer.run_once()
            await worker.run(burst=True)
        else:
            if stop is None:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
            async with asyncio.TaskGroup() as tasks:
                watcher = tasks.create_task(stop_on_request(stop), name="stop watcher")
                worker_task = tasks.create_task(worker.run(), name="persistence worker")
                if relay:
                    tasks.create_task(relayer.run(), name="relay")
                lag_task = tasks.create_task(_observe_lag(redis, settings, metrics), name="lag gauges")

                def release(_: object) -> None:
                    # The worker only returns once stopped; the watcher and gauges end with it.
                    watcher.cancel()
                    lag_task.cancel()

                worker_task.add_done_callback(release)
        logger.info("consumer stopped: %s; relay: %s", worker.stats, relayer.stats)
    finally:
        if endpoint is not None:
            endpoint.close()
        await redis.aclose()
        await hot_pool.close()
        await engine.dispose()
        if tracing:
            shutdown_tracing()


_LAG_INTERVAL_S = 5.0


async def _observe_lag(redis: aioredis.Redis, settings: Settings, metrics: Metrics) -> None:
    """Keeps the per-shard lag, pending and dead-letter gauges current (every few seconds)."""
    while True:
        try:
            report = await measure_lag(redis, shards=settings.shards)
        except (redis_exceptions.RedisError, OSError) as exc:
            logger.debug("lag measurement failed: %s", exc.__class__.__name__)
        else:
            for shard in report.shards:
                label = str(shard.shard)
                metrics.consumer_lag.labels(label).set(shard.undelivered)
                metrics.consumer_pending.labels(label).set(shard.pending)
                metrics.consumer_oldest_pending.labels(label).set(shard.oldest_pending_age_s or 0)
            metrics.dead_letters.set(report.dead_letters)
        await asyncio.sleep(_LAG_INTERVAL_S)
