"""The live event log of a turn in Redis: written by its producer, read by watchers on any replica.

While a turn streams, its numbered events go to the stream ``chat:live:{<turn_id>}``, whose
entry ids are ``<seq>-0``: a resume point is an entry id, and XRANGE/XREAD from it give
exactly the events after it. The producer writes in the background, a pipeline at a time
(events that pile up meanwhile go together in the next one). Each pipeline refreshes the
log's TTL (only the producer does) and reads the turn's cancel flag, which is how
``CancelTurn`` on any replica reaches the producer. The log is bounded (MAXLEN) and ends with
the terminal event. Each turn's start is also noted in its conversation's stream,
``chat:live:conv:{<conversation_id>}``, for WatchConversation.

The log is written ahead of the caller: the starting call gets an event once a pipeline has
written it (``on_written``), so that a turn whose server dies can be ended with at least the
text its caller saw (server/leases.py). A pipeline that fails is tried again, in order, until
the turn ends; its caller meanwhile waits, and gets everything once the outcome is stored.
If Redis is down, watchers fall back to PostgreSQL, which has the turn once it ended. All of
one turn's keys share the hash tag ``{<turn_id>}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Final, cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.typing import EncodableT, FieldT

from server.coalescer import join_deltas
from server.constants import LIVE_KEY_PREFIX
from server.domain import Sequenced, TextDelta, TurnCompleted, TurnStarted, TurnStatus, Usage
from server.redis_client import REDIS_OUTAGES, is_redis_outage

logger = logging.getLogger(__name__)

# How often the writer looks at the cancel flag while no event flows (a stalled upstream).
_IDLE_TICK_S: Final = 0.25
_WRITE_TIMEOUT_S: Final = 2.0
# Between two tries of a pipeline that failed: Redis is down or failing over.
_RETRY_DELAY_S: Final = 0.25
_CONVERSATION_MAXLEN: Final = 100

_REDIS_ERRORS: Final = (redis.exceptions.RedisError, TimeoutError, *REDIS_OUTAGES)

Entries = list[tuple[bytes, dict[bytes, bytes]]]
"""XRANGE's reply, typed as what the wire carries."""
XReadReply = list[tuple[bytes, Entries]]
"""XREAD's reply: (key, entries) per stream."""


def live_key(turn_id: uuid.UUID) -> str:
    """The live log of one turn, e.g. ``chat:live:{3f0c...}``."""
    return f"{LIVE_KEY_PREFIX}:{{{turn_id}}}"


def cancel_key(turn_id: uuid.UUID) -> str:
    """The flag ``CancelTurn`` sets; same hash tag as the turn's log."""
    return f"{LIVE_KEY_PREFIX}:{{{turn_id}}}:cancel"


def conversation_key(conversation_id: uuid.UUID) -> str:
    """The stream of turn starts of one conversation."""
    return f"{LIVE_KEY_PREFIX}:conv:{{{conversation_id}}}"


def encode(item: Sequenced) -> dict[FieldT, EncodableT]:
    """The stream fields of one numbered event."""
    match item.event:
        case TurnStarted(conversation_id=conversation_id, turn_id=turn_id):
            return {"k": "s", "c": str(conversation_id), "t": str(turn_id)}
        case TextDelta(text=text, offset=offset):
            return {"k": "d", "o": offset, "x": text}
        case TurnCompleted() as done:
            return {
                "k": "c",
                "st": done.status.value,
                "sr": done.stop_reason,
                "in": done.usage.input_tokens,
                "out": done.usage.output_tokens,
                "m": done.model,
                "er": done.error_reason or "",
            }


def decode(entry_id: bytes, fields: Mapping[bytes, bytes]) -> Sequenced:
    """A numbered event from a stream entry; raises ValueError/KeyError on a malformed one."""
    seq = int(entry_id.split(b"-", 1)[0])
    kind = fields[b"k"]
    if kind == b"d":
        return Sequenced(seq, TextDelta(text=fields[b"x"].decode(), offset=int(fields[b"o"])))
    if kind == b"s":
        return Sequenced(
            seq,
            TurnStarted(
                conversation_id=uuid.UUID(fields[b"c"].decode()), turn_id=uuid.UUID(fields[b"t"].decode())
            ),
        )
    if kind == b"c":
        return Sequenced(
            seq,
            TurnCompleted(
                status=TurnStatus(fields[b"st"].decode()),
                stop_reason=fields[b"sr"].decode(),
                usage=Usage(input_tokens=int(fields[b"in"]), output_tokens=int(fields[b"out"])),
                model=fields[b"m"].decode(),
                error_reason=fields[b"er"].decode() or None,
            ),
        )
    raise ValueError(f"unknown live event kind {kind!r}")


class LiveWriter:
    """Writes one turn's events to its live log in the background; see the module docstring."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        conversation_id: uuid.UUID,
        turn_id: uuid.UUID,
        ttl_s: float,
        maxlen: int,
        on_cancel: Callable[[], None],
        on_written: Callable[[int], None] = lambda seq: None,
    ) -> None:
        """Args:
        on_cancel: Called when the turn's cancel flag is seen.
        on_written: Called with the number of the last event a pipeline wrote.
        """
        self._redis = redis
        self._conversation_id = conversation_id
        self._turn_id = turn_id
        self._key = live_key(turn_id)
        self._cancel_key = cancel_key(turn_id)
        self._ttl_ms = int(ttl_s * 1000)
        self._maxlen = maxlen
        self._on_cancel = on_cancel
        self._on_written = on_written
        self._pending: list[Sequenced] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._failed_before = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the background writer."""
        self._task = asyncio.create_task(self._run(), name=f"live log {self._turn_id}")

    def append(self, item: Sequenced) -> None:
        """Queues an event; never waits."""
        self._pending.append(item)
        self._wake.set()

    async def close(self) -> None:
        """Writes what is queued, trying once, bounded in time; then stops the writer."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=_WRITE_TIMEOUT_S * 2)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def _run(self) -> None:
        while True:
            if not self._pending and not self._closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _IDLE_TICK_S)
                self._wake.clear()
            # The deltas that piled up during the last pipeline become one entry.
            batch, self._pending = join_deltas(self._pending), []
            written, cancelled = await self._write(batch)
            if cancelled:
                self._on_cancel()
            if written and batch:
                self._on_written(batch[-1].seq)
            elif not written and not self._closed:
                # Again in the next pipeline, in order: no hole in the log. Once the writer is
                # closing the outcome is stored, and watchers find it in PostgreSQL.
                self._pending[:0] = batch
                await asyncio.sleep(_RETRY_DELAY_S)
            if self._closed and not self._pending:
                return

    async def _write(self, batch: list[Sequenced]) -> tuple[bool, bool]:
        """One pipeline: the events, the TTL, and a look at the cancel flag.

        Returns whether the events are in the log, and whether the cancel flag is set.
        """
        try:
            async with asyncio.timeout(_WRITE_TIMEOUT_S):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for item in batch:
                        pipe.xadd(
                            self._key, encode(item), id=f"{item.seq}-0", maxlen=self._maxlen, approximate=True
                        )
                        if isinstance(item.event, TurnStarted):
                            pipe.xadd(
                                conversation_key(self._conversation_id),
                                {"t": str(self._turn_id)},
                                maxlen=_CONVERSATION_MAXLEN,
                                approximate=True,
                            )
                            pipe.pexpire(conversation_key(self._conversation_id), self._ttl_ms)
                    if batch:
                        pipe.pexpire(self._key, self._ttl_ms)
                    pipe.exists(self._cancel_key)
                    results = await pipe.execute(raise_on_error=False)
        except _REDIS_ERRORS as exc:
            self._log_failure(exc)
            return False, False
        written = True
        for result in results[:-1]:
            if isinstance(result, Exception):
                self._log_failure(result)
                # Any other error is for good: an entry an earlier, timed-out try did write
                # (its id is taken), say; trying again cannot help.
                written = written and not is_redis_outage(result)
        flag = results[-1]
        return written, not isinstance(flag, Exception) and bool(flag)

    def _log_failure(self, exc: BaseException) -> None:
        # Logged once per turn: a Redis outage must not flood the log at token rate.
        if not self._failed_before:
            self._failed_before = True
            logger.warning("live log of turn %s: write failed (%s)", self._turn_id, exc.__class__.__name__)


async def request_cancel(redis: aioredis.Redis, turn_id: uuid.UUID, *, ttl_s: float) -> None:
    """Sets the turn's cancel flag; its producer sees it within a fraction of a second."""
    await redis.set(cancel_key(turn_id), b"1", px=int(ttl_s * 1000))


async def read_after(redis: aioredis.Redis, turn_id: uuid.UUID, after_seq: int) -> list[Sequenced]:
    """The events of the live log after ``after_seq`` that are there now."""
    entries = cast(
        Entries, await redis.xrange(live_key(turn_id), min=f"({after_seq}-0" if after_seq else "-", max="+")
    )
    return [decode(entry_id, fields) for entry_id, fields in entries]


def text_of(events: Sequence[Sequenced]) -> str:
    """The reply a log's events hold, each delta placed at its offset, up to the first hole.

    A log can miss entries (writes a Redis failover lost) or hold text twice (a pipeline that
    timed out after writing, tried again with more): never glue pieces around a hole, never
    repeat text.
    """
    text = ""
    for event in (item.event for item in events if isinstance(item.event, TextDelta)):
        if event.offset > len(text):
            break
        text += event.text[len(text) - event.offset :]
    return text


async def first_seq(redis: aioredis.Redis, turn_id: uuid.UUID) -> int | None:
    """The number of the oldest event the log still holds; None if the log is gone or empty."""
    entries = cast(Entries, await redis.xrange(live_key(turn_id), min="-", max="+", count=1))
    return None if not entries else int(entries[0][0].split(b"-", 1)[0])


async def follow(
    redis: aioredis.Redis, turn_id: uuid.UUID, after_seq: int, *, block_ms: int
) -> AsyncIterator[list[Sequenced]]:
    """Yields the log's events after ``after_seq`` as they come; an empty list after ``block_ms`` of silence.

    Ends after the terminal event. The caller decides what silence means (a dead producer).
    """
    last = after_seq
    for_now = await read_after(redis, turn_id, last)
    while True:
        if for_now:
            yield for_now
            last = for_now[-1].seq
            if isinstance(for_now[-1].event, TurnCompleted):
                return
        else:
            yield []
        response = cast(
            XReadReply, await redis.xread({live_key(turn_id): f"{last}-0"}, block=block_ms, count=500)
        )
        for_now = [decode(entry_id, fields) for _, entries in response for entry_id, fields in entries]
