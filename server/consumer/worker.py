"""Persistence consumer: XREADGROUP -> insert messages in one unit of work -> commit -> XACK.

Delivery is at least once and the inserts are idempotent (unique (turn_id, role),
ON CONFLICT DO NOTHING), so a crash between commit and XACK only causes a harmless
redelivery. Each shard is read by its own task so one busy or broken shard does not
stall the others, and so the reads work on a Redis Cluster (one key per command).

What happens to an entry that cannot be persisted:

- undecodable or empty payload: dead-lettered at once (it can never succeed);
- PostgreSQL or Redis unreachable: nothing is acked, the batch is retried after a
  pause, and these failures never count toward the delivery limit;
- any other error: the batch is retried entry by entry; an entry that keeps failing
  on its own is dead-lettered once it has been delivered ``max_deliveries`` times.

Entries left pending by a consumer that died are claimed with XAUTOCLAIM once they
have been idle for ``claim_idle_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, cast

import redis.asyncio as aioredis
import redis.exceptions

from server.config import ConsumerSettings
from server.constants import DEAD_LETTER_STREAM, PERSISTENCE_GROUP, turns_stream
from server.db import message_store
from server.db.engine import Database
from server.errors import is_database_outage
from server.metrics import Metrics
from server.redis_client import REDIS_OUTAGES
from server.turn_codec import EventDecodeError, TurnColumns

logger = logging.getLogger(__name__)

Entry = tuple[bytes, Mapping[bytes, bytes] | None]

_TRIM_INTERVAL_S: Final = 5.0
_CLAIM_INTERVAL_S: Final = 5.0
_RETRY_DELAY_S: Final = 0.5
_MAX_RETRY_DELAY_S: Final = 5.0


@dataclass(slots=True)
class WorkerStats:
    """Counters for logs, tests and metrics."""

    entries: int = 0
    """Entries acknowledged (persisted, duplicates and dead letters alike)."""
    messages_inserted: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    """Entries taken over from other consumers with XAUTOCLAIM."""
    deleted_while_pending: int = 0
    """Pending ids whose entry no longer existed (trimmed or deleted by hand)."""
    batches: int = 0
    failures: int = 0


class _OutageError(Exception):
    """PostgreSQL or Redis is unreachable: back off and retry, count nothing against entries."""


class PersistenceWorker:
    """Consumes every ``chat:turns:{k}`` shard as a member of group ``chat-persistence``."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        database: Database,
        shards: int,
        consumer_name: str,
        batch: int = 200,
        block_ms: int = 1000,
        max_deliveries: int = 5,
        claim_idle_ms: int = 30_000,
        metrics: Metrics | None = None,
    ) -> None:
        self._redis = redis
        self._database = database
        self._streams = [turns_stream(k) for k in range(shards)]
        self._consumer = consumer_name
        self._batch = batch
        self._block_ms = block_ms
        self._max_deliveries = max_deliveries
        self._claim_idle_ms = claim_idle_ms
        self._stopping = asyncio.Event()
        self.stats = WorkerStats()
        self.metrics = metrics or Metrics()

    @classmethod
    def from_settings(
        cls,
        settings: ConsumerSettings,
        *,
        shards: int,
        redis: aioredis.Redis,
        database: Database,
        consumer_name: str | None = None,
        metrics: Metrics | None = None,
    ) -> PersistenceWorker:
        """A worker configured by its settings group (batch, blocking, delivery limit, claim idle time)."""
        return cls(
            redis=redis,
            database=database,
            shards=shards,
            consumer_name=consumer_name or settings.consumer_name,
            batch=settings.consumer_batch,
            block_ms=settings.consumer_block_ms,
            max_deliveries=settings.consumer_max_deliveries,
            claim_idle_ms=settings.consumer_claim_idle_ms,
            metrics=metrics,
        )

    async def ensure_groups(self) -> None:
        """Creates the group on every shard (and the shard itself); idempotent.

        The group starts at id 0 so entries published before the first consumer ever
        ran are persisted too: that is the failure this project exists to prevent.
        """
        for stream in self._streams:
            try:
                await self._redis.xgroup_create(stream, PERSISTENCE_GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def stop(self) -> None:
        """Asks the worker to finish its in-flight batches and return; idempotent."""
        self._stopping.set()

    async def run(self, *, burst: bool = False) -> None:
        """Consumes until ``stop()``; with ``burst``, drains what is there and returns.

        Fatal errors (in any shard task) are re-raised.
        """
        await self._retry_outages(self.ensure_groups)
        async with asyncio.TaskGroup() as tasks:
            for stream in self._streams:
                tasks.create_task(_Shard(self, stream).run(burst=burst), name=f"consume {stream}")

    async def _retry_outages(self, operation: Callable[[], Awaitable[None]]) -> None:
        delay = _RETRY_DELAY_S
        while True:
            try:
                await operation()
                return
            except REDIS_OUTAGES as exc:
                if self._stopping.is_set():
                    raise
                logger.warning("redis unavailable (%s); retrying in %.1fs", exc.__class__.__name__, delay)
                await self.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY_S)

    async def sleep(self, seconds: float) -> None:
        """Sleeps, waking early when the worker is asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called."""
        return self._stopping.is_set()


class _Shard:
    """The consuming loop of one stream."""

    def __init__(self, worker: PersistenceWorker, stream: str) -> None:
        self.w = worker
        self.stream = stream
        self.redis = worker._redis
        self.claim_cursor = "0-0"
        self.next_claim = 0.0
        self.next_trim = 0.0

    async def run(self, *, burst: bool) -> None:
        # Our own pending entries first: delivered to this consumer name before a
        # restart (or a failed batch), never acknowledged.
        read_pending = True
        delay = _RETRY_DELAY_S
        while not self.w.stopping:
            try:
                progressed = await self._claim_abandoned()
                entries = await self._read("0" if read_pending else ">", block=not burst and not progressed)
                if entries:
                    read_pending = await self._process(entries) or read_pending
                elif read_pending:
                    read_pending = False
                elif burst and not progressed:
                    await self._trim()
                    return
                await self._maybe_trim()
                delay = _RETRY_DELAY_S
            # Before ResponseError: CLUSTERDOWN, while a replica is being promoted, is one.
            except (_OutageError, *REDIS_OUTAGES) as exc:
                self.w.stats.failures += 1
                logger.warning(
                    "consumer on %s: %s unavailable (%s); retrying in %.1fs",
                    self.stream,
                    "postgresql" if isinstance(exc, _OutageError) else "redis",
                    exc.__class__.__name__,
                    delay,
                )
                read_pending = True
                await self.w.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY_S)
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis lost the stream and its group (restart without persistence):
                # recreate them; the relay re-publishes what was lost.
                logger.warning("group missing on %s; recreating it", self.stream)
                self.claim_cursor = "0-0"
                await self.w.ensure_groups()

    async def _read(self, start: str, *, block: bool) -> list[Entry]:
        response = await self.redis.xreadgroup(
            PERSISTENCE_GROUP,
            self.w._consumer,
            {self.stream: start},
            count=self.w._batch,
            block=self.w._block_ms if block and start == ">" else None,
        )
        if not response:
            return []
        # RESP2 answers [[stream, entries]]; RESP3 answers {stream: entries}.
        if isinstance(response, dict):
            raw: object = next(iter(response.values()))
        else:
            raw = cast(Sequence[Sequence[object]], response)[0][1]
        return list(cast(Sequence[Entry], raw))

    async def _claim_abandoned(self) -> bool:
        """One XAUTOCLAIM step over entries idle longer than claim_idle_ms; True if it claimed any.

        The cursor is kept between calls, so a long pending list is walked a page
        at a time; a full pass is followed by a pause.
        """
        now = time.monotonic()
        if now < self.next_claim:
            return False
        response = await self.redis.xautoclaim(
            self.stream,
            PERSISTENCE_GROUP,
            self.w._consumer,
            min_idle_time=self.w._claim_idle_ms,
            start_id=self.claim_cursor,
            count=self.w._batch,
        )
        cursor = response[0]
        claimed = cast(list[Entry], response[1])
        # Redis 7 also reports ids that were pending but whose entries were deleted;
        # it drops them from the pending list itself.
        deleted = response[2] if len(response) > 2 else []
        if deleted:
            self.w.stats.deleted_while_pending += len(deleted)
            logger.warning(
                "%d pending entries of %s no longer exist: %s", len(deleted), self.stream, deleted[:10]
            )
        self.claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self.claim_cursor == "0-0":
            self.next_claim = now + _CLAIM_INTERVAL_S
        if not claimed:
            return False
        self.w.stats.claimed += len(claimed)
        logger.info("claimed %d abandoned entries on %s", len(claimed), self.stream)
        await self._process(claimed)
        return True

    async def _process(self, entries: Sequence[Entry]) -> bool:
        """Persists and acks a batch; returns True if some entries stay pending for a retry."""
        # Decoded straight into the statement's columns; ``decoded`` keeps each row's entry
        # (id and fields as received) for the one-by-one retry and the dead-letter stream.
        columns = TurnColumns()
        decoded: list[tuple[bytes, Mapping[bytes, bytes]]] = []
        poison: list[tuple[bytes, Mapping[bytes, bytes], str]] = []
        for entry_id, fields in entries:
            if not fields:
                # Trimmed or deleted while pending: dead-letter the id so it is not lost silently.
                self.w.stats.deleted_while_pending += 1
                poison.append((entry_id, {}, "entry no longer exists (deleted while pending)"))
                continue
            try:
                columns.append(fields)
            except EventDecodeError as exc:
                poison.append((entry_id, fields, str(exc)))
            else:
                decoded.append((entry_id, fields))

        acked = [entry_id for entry_id, _ in entries]
        retry: set[bytes] = set()
        if decoded:
            try:
                await self._insert(columns)
            except _OutageError:
                raise
            except Exception:
                logger.exception(
                    "batch on %s failed; retrying its %d entries one by one", self.stream, len(decoded)
                )
                retry = await self._isolate(decoded, poison)
                acked = [entry_id for entry_id in acked if entry_id not in retry]
        if poison:
            await self._dead_letter(poison)
        # Only after the commit returned: a crash before this line means redelivery,
        # never loss.
        if acked:
            await self.redis.xack(self.stream, PERSISTENCE_GROUP, *acked)
        self.w.stats.entries += len(acked)
        self.w.stats.batches += 1
        if retry:
            await self.w.sleep(_RETRY_DELAY_S)
        return bool(retry)

    async def _insert(self, columns: TurnColumns) -> None:
        began = time.monotonic()
        try:
            inserted = await message_store.insert_messages(self.w._database, columns)
            self.w.stats.messages_inserted += inserted
            self.w.metrics.messages_persisted.inc(inserted)
            self.w.metrics.unit_of_work.labels("persist").observe(time.monotonic() - began)
        except Exception as exc:
            if is_database_outage(exc):
                raise _OutageError(str(exc)) from exc
            raise

    async def _isolate(
        self,
        decoded: list[tuple[bytes, Mapping[bytes, bytes]]],
        poison: list[tuple[bytes, Mapping[bytes, bytes], str]],
    ) -> set[bytes]:
        """Inserts entries one at a time to find the one that fails; returns ids to retry later."""
        retry: set[bytes] = set()
        for entry_id, fields in decoded:
            one = TurnColumns()
            one.append(fields)  # decoded once already: decoding is deterministic
            try:
                await self._insert(one)
            except _OutageError:
                raise
            except Exception as exc:  # noqa: BLE001 - any other failure is this entry's own
                deliveries = await self._deliveries(entry_id)
                if deliveries >= self.w._max_deliveries:
                    poison.append((entry_id, fields, f"{exc.__class__.__name__}: {exc}"[:500]))
                else:
                    retry.add(entry_id)
        return retry

    async def _deliveries(self, entry_id: bytes) -> int:
        pending = await self.redis.xpending_range(
            self.stream, PERSISTENCE_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 0

    async def _dead_letter(self, poison: Sequence[tuple[bytes, Mapping[bytes, bytes], str]]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, fields, error in poison:
                logger.error("dead-lettering %s from %s: %s", entry_id, self.stream, error)
                record: dict[bytes, bytes] = {
                    **fields,
                    b"dlq_source": self.stream.encode(),
                    b"dlq_entry_id": entry_id,
                    b"dlq_error": error.encode(),
                }
                pipe.xadd(DEAD_LETTER_STREAM, record)  # type: ignore[arg-type]
            await pipe.execute()
        self.w.stats.dead_lettered += len(poison)
        self.w.metrics.dead_lettered.inc(len(poison))

    async def _maybe_trim(self) -> None:
        now = time.monotonic()
        if now >= self.next_trim:
            await self._trim()
            self.next_trim = now + _TRIM_INTERVAL_S

    async def _trim(self) -> None:
        """Drops entries every consumer has acknowledged; never anything still pending.

        MINID is the oldest pending entry, or the group's last-delivered id when
        nothing is pending: everything below it was persisted and acknowledged.
        """
        pending = await self.redis.xpending(self.stream, PERSISTENCE_GROUP)
        if pending["pending"]:
            floor = pending["min"]
        else:
            groups = await self.redis.xinfo_groups(self.stream)
            names = (PERSISTENCE_GROUP, PERSISTENCE_GROUP.encode())
            floor = next((g["last-delivered-id"] for g in groups if g["name"] in names), None)
        if floor:
            await self.redis.xtrim(self.stream, minid=floor, approximate=False)
