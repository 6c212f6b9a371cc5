"""The live event log of a turn in Redis: written by its producer, read by watchers on any replica.

While a turn streams, its numbered events go to the stream ``chat:live:{<turn_id>}``, whose
entry ids are ``<seq>-0``: a resume point is an entry id, and XRANGE/XREAD from it give
exactly the events after it. One writer per process (``LiveLog``) writes every turn's
events in the background, a pipeline at a time (what piles up meanwhile, across turns, goes
together in the next one). While the process is busy it lets a flush interval pass between
pipelines (server/coalescer.py, ``FlushPolicy``), so that each turn's deltas of that interval
become one entry and one message to its caller; while it is idle it writes at once. The
writer refreshes each log's TTL (only the producer's process does) and reads each turn's
cancel flag, which is how ``CancelTurn`` on any replica reaches the producer. The log is
bounded (MAXLEN) and ends with the terminal event. Each turn's start is also noted in its
conversation's stream, ``chat:live:conv:{<conversation_id>}``, for WatchConversation.

The log is written ahead of the caller: the starting call gets an event once a pipeline has
written it (``on_written``), so that a turn whose server dies can be ended with at least the
text its caller saw (server/leases.py). A turn's events that a pipeline failed to write are
tried again, in order, until the turn ends; its caller meanwhile waits, and gets everything
once the outcome is stored. If Redis is down, watchers fall back to PostgreSQL, which has the
turn once it ended. All of one turn's keys share the hash tag ``{<turn_id>}``.
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

# How often the writer reads the cancel flag of every turn it writes for: CancelTurn on any
# replica reaches the producer within this much, plus one pipeline.
_CANCEL_CHECK_S: Final = 0.25
# How often a streaming turn's TTL is refreshed; its last write refreshes it too, so the
# log lives CHATSTREAM_LIVE_TTL_S after the turn ends.
_TTL_REFRESH_S: Final = 1.0
_WRITE_TIMEOUT_S: Final = 2.0
# After a pipeline that failed to write some turn's events: Redis is down or failing over.
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


class LiveLog:
    """The process's one writer of live logs: every turn's events go to Redis in shared pipelines.

    One background task writes for all the turns this process produces. Whatever piled up
    across turns while its last pipeline was in flight goes in the next one, so a busy
    process sends one round trip per tick rather than one per delta per turn; an idle one
    writes each event at once. A busy one also starts the next pipeline no sooner than
    ``flush_interval()`` after the last one began, which is what joins a turn's deltas when
    they come slower than a round trip (server/coalescer.py). Each turn's TTL is refreshed
    on its first and last write and at most every ``_TTL_REFRESH_S`` in between, and every
    open turn's cancel flag is read every ``_CANCEL_CHECK_S``, all in the same pipelines.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        ttl_s: float,
        maxlen: int,
        flush_interval: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """Args:
        redis: Where the logs go.
        ttl_s: How long a log lives after its last write.
        maxlen: The most entries one log keeps (approximately).
        flush_interval: Seconds to let pass, now, between the starts of two pipelines
            (``FlushPolicy.interval``); 0 writes what is queued as soon as the last pipeline is done.
        """
        self._redis = redis
        self._flush_interval = flush_interval
        self._ttl_ms = int(ttl_s * 1000)
        self._maxlen = maxlen
        self._open: dict[uuid.UUID, TurnLog] = {}
        self._dirty: dict[uuid.UUID, TurnLog] = {}
        self._wake = asyncio.Event()
        self._next_check = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the background writer."""
        self._task = asyncio.create_task(self._run(), name="live log writer")

    async def close(self) -> None:
        """Writes what is queued (bounded in time) and stops the writer."""
        logs = list(self._open.values())
        for log in logs:
            log.closing = True
            self._mark(log)
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(log.written.wait() for log in logs)), timeout=_WRITE_TIMEOUT_S * 2
                )
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def open(
        self,
        *,
        conversation_id: uuid.UUID,
        turn_id: uuid.UUID,
        on_cancel: Callable[[], None],
        on_written: Callable[[int], None] = lambda seq: None,
    ) -> TurnLog:
        """The live log of one turn this process starts producing.

        Args:
            conversation_id: The turn's conversation.
            turn_id: The turn.
            on_cancel: Called when the turn's cancel flag is seen.
            on_written: Called with the number of the turn's last event a pipeline wrote.
        """
        log = TurnLog(
            self, conversation_id=conversation_id, turn_id=turn_id, on_cancel=on_cancel, on_written=on_written
        )
        self._open[turn_id] = log
        return log

    def _mark(self, log: TurnLog) -> None:
        self._dirty[log.turn_id] = log
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        began = float("-inf")  # when the last pipeline began (the loop's clock)
        while True:
            if not self._dirty:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _CANCEL_CHECK_S)
            if self._dirty:
                # Busy: what the turns produce until then goes in this pipeline too, and
                # reaches each caller as one message. Idle, the interval is 0: no wait.
                wait = began + self._flush_interval() - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._wake.clear()
            batch, self._dirty = self._dirty, {}
            now = loop.time()
            checks: list[TurnLog] = []
            if now >= self._next_check:
                checks = list(self._open.values())
                self._next_check = now + _CANCEL_CHECK_S
            retry = False
            if batch or checks:
                began = now
                try:
                    retry = await self._write(list(batch.values()), checks, now)
                except Exception:
                    # One writer serves every turn of the process: it must outlive a bug.
                    logger.exception("live log writer: a pipeline failed")
            for log in batch.values():
                if log.closing and not log.pending:
                    self._open.pop(log.turn_id, None)
                    log.written.set()
            if retry:
                await asyncio.sleep(_RETRY_DELAY_S)

    async def _write(self, batch: list[TurnLog], checks: list[TurnLog], now: float) -> bool:
        """One pipeline: the batch's events and TTLs, and the cancel flags of ``checks``.

        Returns whether some turn's events are to be tried again.
        """
        owners: list[TurnLog] = []  # whose command each reply answers
        taken: dict[uuid.UUID, list[Sequenced]] = {}
        try:
            async with asyncio.timeout(_WRITE_TIMEOUT_S):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for log in batch:
                        # The deltas that piled up since its last write become one entry.
                        items, log.pending = join_deltas(log.pending), []
                        taken[log.turn_id] = items
                        for item in items:
                            pipe.xadd(
                                log.key,
                                encode(item),
                                id=f"{item.seq}-0",
                                maxlen=self._maxlen,
                                approximate=True,
                            )
                            owners.append(log)
                            if isinstance(item.event, TurnStarted):
                                conversation = conversation_key(log.conversation_id)
                                pipe.xadd(
                                    conversation,
                                    {"t": str(log.turn_id)},
                                    maxlen=_CONVERSATION_MAXLEN,
                                    approximate=True,
                                )
                                pipe.pexpire(conversation, self._ttl_ms)
                                owners += (log, log)
                        if items and (log.closing or now - log.refreshed >= _TTL_REFRESH_S):
                            pipe.pexpire(log.key, self._ttl_ms)
                            owners.append(log)
                            log.refreshed = now
                    for log in checks:
                        pipe.exists(log.cancel_key)
                    results = await pipe.execute(raise_on_error=False)
        except _REDIS_ERRORS as exc:
            for log in {id(log): log for log in [*batch, *checks]}.values():
                log.failed(exc)
            return self._settle(batch, taken, unwritten={log.turn_id for log in batch})
        unwritten: set[uuid.UUID] = set()
        for log, result in zip(owners, results, strict=False):
            if isinstance(result, Exception):
                log.failed(result)
                # Any other error is for good: an entry an earlier, timed-out try did write
                # (its id is taken), say; trying again cannot help.
                if is_redis_outage(result):
                    unwritten.add(log.turn_id)
        for log, flag in zip(checks, results[len(owners) :], strict=True):
            if not isinstance(flag, Exception) and flag and not log.closing:
                log.on_cancel()
        return self._settle(batch, taken, unwritten=unwritten)

    def _settle(
        self, batch: list[TurnLog], taken: dict[uuid.UUID, list[Sequenced]], *, unwritten: set[uuid.UUID]
    ) -> bool:
        """Releases what was written to its callers; queues again, in order, what was not."""
        retry = False
        for log in batch:
            items = taken.get(log.turn_id, [])
            if log.turn_id not in unwritten:
                if items:
                    log.on_written(items[-1].seq)
            elif not log.closing:
                # Closing, the turn's outcome is stored: watchers find it in PostgreSQL.
                log.pending[:0] = items
                self._dirty[log.turn_id] = log
                retry = True
        return retry


class TurnLog:
    """One turn's live log, written by the process's ``LiveLog``."""

    def __init__(
        self,
        writer: LiveLog,
        *,
        conversation_id: uuid.UUID,
        turn_id: uuid.UUID,
        on_cancel: Callable[[], None],
        on_written: Callable[[int], None],
    ) -> None:
        self._writer = writer
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self.key = live_key(turn_id)
        self.cancel_key = cancel_key(turn_id)
        self.on_cancel = on_cancel
        self.on_written = on_written
        self.pending: list[Sequenced] = []
        self.refreshed = float("-inf")
        """When the writer last refreshed the log's TTL (the loop's clock)."""
        self.closing = False
        self.written = asyncio.Event()
        self._failed_before = False

    def append(self, item: Sequenced) -> None:
        """Queues an event; never waits."""
        self.pending.append(item)
        self._writer._mark(self)

    async def close(self) -> None:
        """Waits until what is queued is written (bounded in time); the log stays for watchers."""
        self.closing = True
        self._writer._mark(self)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.written.wait(), timeout=_WRITE_TIMEOUT_S * 2)

    def failed(self, exc: BaseException) -> None:
        # Logged once per turn: a Redis outage must not flood the log at token rate.
        if not self._failed_before:
            self._failed_before = True
            logger.warning("live log of turn %s: write failed (%s)", self.turn_id, exc.__class__.__name__)


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
