"""Persistence consumer: XREADGROUP -> insert messages in one unit of work -> commit -> XACK.

Delivery is at least once and the inserts are idempotent (unique (turn_id, role),
ON CONFLICT DO NOTHING), so a crash between commit and XACK only causes a harmless
redelivery. Each shard is read by its own task so one busy or broken shard does not
stall the others, and so the reads work on a Redis Cluster (one key per command).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
import redis.exceptions

from server.constants import DEAD_LETTER_STREAM, PERSISTENCE_GROUP, turns_stream
from server.db import repository
from server.db.engine import SessionMaker
from server.domain import Turn
from server.events import EventDecodeError, decode_turn

logger = logging.getLogger(__name__)

Entry = tuple[bytes, Mapping[bytes, bytes] | None]

_TRIM_INTERVAL_S = 5.0
_RETRY_DELAY_S = 0.5


@dataclass(slots=True)
class WorkerStats:
    """Counters for logs, tests and metrics."""

    entries: int = 0
    messages_inserted: int = 0
    dead_lettered: int = 0
    batches: int = 0
    failures: int = 0


class PersistenceWorker:
    """Consumes every ``chat:turns:{k}`` shard as a member of group ``chat-persistence``."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        sessionmaker: SessionMaker,
        shards: int,
        consumer_name: str,
        batch: int = 200,
        block_ms: int = 1000,
    ) -> None:
        self._redis = redis
        self._sessionmaker = sessionmaker
        self._streams = [turns_stream(k) for k in range(shards)]
        self._consumer = consumer_name
        self._batch = batch
        self._block_ms = block_ms
        self._stopping = asyncio.Event()
        self.stats = WorkerStats()

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
        await self.ensure_groups()
        async with asyncio.TaskGroup() as tasks:
            for stream in self._streams:
                tasks.create_task(self._consume(stream, burst=burst), name=f"consume {stream}")

    async def _consume(self, stream: str, *, burst: bool) -> None:
        # Our own pending entries first: delivered to this consumer name before a
        # restart, never acknowledged.
        read_pending = True
        last_trim = 0.0
        while not self._stopping.is_set():
            try:
                entries = await self._read(stream, "0" if read_pending else ">", block=not burst)
                if entries:
                    await self._process(stream, entries)
                elif read_pending:
                    read_pending = False
                    continue
                elif burst:
                    await self._trim(stream)
                    return
                if time.monotonic() - last_trim > _TRIM_INTERVAL_S:
                    await self._trim(stream)
                    last_trim = time.monotonic()
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis lost the stream and its group (restart without persistence):
                # recreate them; the relay re-publishes what was lost.
                logger.warning("group missing on %s; recreating it", stream)
                await self.ensure_groups()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                self.stats.failures += 1
                logger.warning(
                    "consumer on %s: redis unavailable (%s); retrying", stream, exc.__class__.__name__
                )
                read_pending = True
                await self._sleep(_RETRY_DELAY_S)
            except Exception:
                # A failed commit: nothing was acked, so the entries stay pending and
                # are read again from our pending list.
                self.stats.failures += 1
                logger.exception("consumer on %s: batch failed; retrying", stream)
                read_pending = True
                await self._sleep(_RETRY_DELAY_S)

    async def _read(self, stream: str, start: str, *, block: bool) -> list[Entry]:
        response = await self._redis.xreadgroup(
            PERSISTENCE_GROUP,
            self._consumer,
            {stream: start},
            count=self._batch,
            block=self._block_ms if block and start == ">" else None,
        )
        if not response:
            return []
        # RESP2 answers [[stream, entries]]; RESP3 answers {stream: entries}.
        if isinstance(response, dict):
            raw: object = next(iter(response.values()))
        else:
            raw = cast(Sequence[Sequence[object]], response)[0][1]
        return list(cast(Sequence[Entry], raw))

    async def _process(self, stream: str, entries: Sequence[Entry]) -> None:
        turns: list[Turn] = []
        poison: list[tuple[bytes, Mapping[bytes, bytes], str]] = []
        for entry_id, fields in entries:
            if not fields:
                # The entry was trimmed or deleted while pending: nothing left to persist.
                logger.warning("pending entry %s on %s has no content; acknowledging", entry_id, stream)
                continue
            try:
                turns.append(decode_turn(fields))
            except EventDecodeError as exc:
                poison.append((entry_id, fields, str(exc)))
        if turns:
            async with self._sessionmaker.begin() as session:
                inserted = await repository.insert_messages(session, turns)
            self.stats.messages_inserted += inserted
        if poison:
            await self._dead_letter(stream, poison)
        # Only after the commit returned: a crash before this line means redelivery,
        # never loss.
        await self._redis.xack(stream, PERSISTENCE_GROUP, *[entry_id for entry_id, _ in entries])
        self.stats.entries += len(entries)
        self.stats.batches += 1

    async def _dead_letter(
        self, stream: str, poison: Sequence[tuple[bytes, Mapping[bytes, bytes], str]]
    ) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, fields, error in poison:
                logger.error("dead-lettering %s from %s: %s", entry_id, stream, error)
                record: dict[bytes, bytes] = {
                    **fields,
                    b"dlq_source": stream.encode(),
                    b"dlq_entry_id": entry_id,
                    b"dlq_error": error.encode(),
                }
                pipe.xadd(DEAD_LETTER_STREAM, record)  # type: ignore[arg-type]
            await pipe.execute()
        self.stats.dead_lettered += len(poison)

    async def _trim(self, stream: str) -> None:
        """Drops entries every consumer has acknowledged; never anything still pending.

        MINID is the oldest pending entry, or the group's last-delivered id when
        nothing is pending: everything below it was persisted and acknowledged.
        """
        pending = await self._redis.xpending(stream, PERSISTENCE_GROUP)
        if pending["pending"]:
            floor = pending["min"]
        else:
            groups = await self._redis.xinfo_groups(stream)
            floor = next(
                (
                    g["last-delivered-id"]
                    for g in groups
                    if g["name"] in (PERSISTENCE_GROUP, PERSISTENCE_GROUP.encode())
                ),
                None,
            )
        if floor:
            await self._redis.xtrim(stream, minid=floor, approximate=False)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
