"""Following and cancelling turns from any replica: WatchTurn, retries, CancelTurn, WatchConversation.

A watcher follows the turn's live log in Redis (server/live.py) from its resume point and
ends with the terminal event. What the live log no longer holds (it expired, was trimmed,
or Redis lost it) is served from PostgreSQL once the turn ended: the stored text after the
watcher's offset, then the terminal event, numbered as they were live. A watcher never
hangs on a dead producer: after a silence it looks at the turn's row, and once the lease
expired it ends the turn INTERRUPTED itself (server/leases.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Final, cast

import redis.asyncio as aioredis
import redis.exceptions

from server import live
from server.db import lease_store, repository, turn_store
from server.db.engine import Database
from server.domain import Sequenced, TextDelta, Turn, TurnCompleted, TurnStarted
from server.errors import ClientGoneError, ErrorReason, NotFoundError
from server.leases import interrupt_expired
from server.publisher import TurnPublisher

logger = logging.getLogger(__name__)

Emit = Callable[[Sequenced], Awaitable[None]]

_REDIS_ERRORS: Final = (redis.exceptions.RedisError, OSError)
# How long a watcher waits on a silent log before it looks at the turn's row.
_SILENCE_MS: Final = 1000
# A live producer sees a cancel flag within 0.25 s (server/live.py) and stores the turn at
# once: CancelTurn reads the row this often for a while, then once per silence period.
_CANCEL_POLL_S: Final = 0.05
_CANCEL_FAST_POLLS: Final = 40
# Events a conversation watcher may have waiting: one this far behind is not reading (its
# writes block), and it is ended rather than kept growing in memory.
_WATCHER_BACKLOG: Final = 4096


class TurnWatcher:
    """Follows turns for WatchTurn and attaching retries; ends turns for CancelTurn."""

    def __init__(
        self,
        *,
        database: Database,
        redis: aioredis.Redis,
        publisher: TurnPublisher,
        live_log: bool,
        live_ttl_s: float,
        lease_s: float,
    ) -> None:
        self._database = database
        self._redis = redis
        self._publisher = publisher
        self._live_log = live_log
        self._live_ttl_s = live_ttl_s
        self._lease_s = lease_s

    async def watch(
        self, *, owner: str, turn_id: uuid.UUID, after_seq: int, after_offset: int, emit: Emit
    ) -> None:
        """WatchTurn: the owner's turn from a resume point to its end; NotFoundError otherwise."""
        turn = await self._find(owner, turn_id)
        await self.follow(turn, after_seq=after_seq, after_offset=after_offset, emit=emit)

    async def follow(self, turn: Turn, *, after_seq: int, after_offset: int, emit: Emit) -> None:
        """Sends every event of ``turn`` after ``after_seq``, then follows it live until its end."""
        seq, offset = after_seq, after_offset
        # Whether ``offset`` is known to be where the caller is in the reply: it said so, or it
        # has no text yet. Then a log entry that starts past it means text the log no longer
        # holds; numbers that skip alone do not (the log's writer joins deltas as well).
        placed = after_offset > 0 or after_seq <= 1
        stored_end = turn.last_seq if turn.status.terminal else None
        if stored_end is not None and seq == stored_end:
            return  # the caller has every event already, the terminal one included
        # Past the stored end (a sweeper ended the turn while its producer streamed on to
        # this caller), the log has nothing for it: PostgreSQL gives it the terminal event,
        # numbered after what it has.
        past_end = stored_end is not None and seq > stored_end
        if not past_end and (
            (self._live_log and not turn.status.terminal) or await self._live_covers(turn, seq)
        ):
            try:
                async for batch in live.follow(self._redis, turn.id, seq, block_ms=_SILENCE_MS):
                    if not batch:
                        turn = await self._reload(turn)
                        if turn.status.terminal:
                            # A whole silent period after the turn ended: its end is not in the
                            # log after our seq (a producer killed before its last pipeline, or
                            # a log that lost entries we saw), so it comes from PostgreSQL.
                            break
                        continue
                    lost = False
                    for item in batch:
                        if item.seq <= seq:
                            continue
                        if await self._lost_before(turn, item, seq=seq, offset=offset, placed=placed):
                            lost = True
                            break
                        if seq == 0 and not isinstance(item.event, TurnStarted):
                            # The log never got the turn's first event (its producer died
                            # before writing it): the stream opens with one all the same.
                            await emit(_started(turn))
                        unseen = _unseen(item, offset)
                        seq = item.seq
                        if unseen is None:
                            continue
                        await emit(unseen)
                        if isinstance(unseen.event, TextDelta):
                            offset = unseen.event.offset + len(unseen.event.text)
                            placed = True
                    if lost:
                        break  # the log lacks what comes next (trimmed, or lost): PostgreSQL has it
                    if isinstance(batch[-1].event, TurnCompleted):
                        return
            except _REDIS_ERRORS as exc:
                logger.warning("live log of turn %s unreadable (%s); serving from PostgreSQL", turn.id, exc)
        turn = await self._until_ended(turn)
        for item in replay_events(turn, after_seq=seq, after_offset=offset):
            await emit(item)

    async def cancel(self, *, owner: str, turn_id: uuid.UUID) -> Turn:
        """CancelTurn: asks the turn's producer, wherever it runs, to stop; returns the ended turn.

        Idempotent: an ended turn is returned as it is, and nothing changes.
        """
        turn = await self._find(owner, turn_id)
        if turn.status.terminal:
            return turn
        await live.request_cancel(self._redis, turn_id, ttl_s=self._live_ttl_s)
        # A producer that died cannot see the flag: its turn ends once its lease expires
        # (``_reload`` ends it INTERRUPTED then), so the wait covers a whole lease.
        async with asyncio.timeout(self._lease_s + _SILENCE_MS / 1000 + 1):
            polls = 0
            while not turn.status.terminal:
                polls += 1
                await asyncio.sleep(_CANCEL_POLL_S if polls <= _CANCEL_FAST_POLLS else _SILENCE_MS / 1000)
                turn = await self._reload(turn)
        return turn

    async def _find(self, owner: str, turn_id: uuid.UUID) -> Turn:
        async with self._database.autocommit("find turn") as conn:
            turn = await turn_store.find_turn(conn, owner=owner, turn_id=turn_id)
        if turn is None:
            raise NotFoundError("turn not found", reason=ErrorReason.ERROR_REASON_TURN_NOT_FOUND)
        return turn

    async def _reload(self, turn: Turn) -> Turn:
        """The turn's row again; a turn whose producer died is ended INTERRUPTED first."""
        async with self._database.autocommit("find turn") as conn:
            expired = await lease_store.lease_expired(conn, turn.id)
        if expired:
            await interrupt_expired(
                self._database,
                self._redis,
                self._publisher,
                live_ttl_s=self._live_ttl_s,
                limit=10,
                conversation_id=turn.conversation_id,
            )
        async with self._database.autocommit("find turn") as conn:
            found = await turn_store.find_turn(conn, owner=turn.owner, turn_id=turn.id)
        if found is None:
            raise NotFoundError("turn not found", reason=ErrorReason.ERROR_REASON_TURN_NOT_FOUND)
        return found

    async def _until_ended(self, turn: Turn) -> Turn:
        """Waits, by reading the row once per silence period, until the turn ended."""
        while not turn.status.terminal:
            await asyncio.sleep(_SILENCE_MS / 1000)
            turn = await self._reload(turn)
        return turn

    async def _lost_before(self, turn: Turn, item: Sequenced, *, seq: int, offset: int, placed: bool) -> bool:
        """Whether the log lacks events between the caller's position and ``item``, the next it holds.

        The log's numbers skip where its writer joined deltas into one entry, numbered as the
        last of them, so a skip alone loses nothing: what tells is an entry whose text starts
        past the caller's offset. A caller not yet placed in the reply (it gave no offset) is
        placed by whether the log still starts at or before its resume point.
        """
        if item.seq == seq + 1 or isinstance(item.event, TurnCompleted):
            return False
        if placed:
            return isinstance(item.event, TextDelta) and item.event.offset > offset
        return not await self._live_covers(turn, seq)

    async def _live_covers(self, turn: Turn, after_seq: int) -> bool:
        """Whether the live log still holds everything after ``after_seq``."""
        if not self._live_log:
            return False
        try:
            first = await live.first_seq(self._redis, turn.id)
        except _REDIS_ERRORS:
            return False
        return first is not None and first <= after_seq + 1


class ConversationHub:
    """WatchConversation: one reader per watched conversation and process, fanned out to its watchers.

    The reader waits on the conversation's stream of turn starts, then follows each new
    turn's live log to its end. However many watchers a conversation has on this process,
    Redis serves one read for them, and no watcher polls PostgreSQL.
    """

    def __init__(self, *, database: Database, redis: aioredis.Redis) -> None:
        self._database = database
        self._redis = redis
        # Each watcher's events; None once it fell too far behind.
        self._watchers: dict[uuid.UUID, set[asyncio.Queue[Sequenced | None]]] = {}
        self._readers: dict[uuid.UUID, asyncio.Task[None]] = {}

    async def watch(self, *, owner: str, conversation_id: uuid.UUID, emit: Emit) -> None:
        """Streams the events of each new turn of the owner's conversation until the call ends."""
        async with self._database.begin("watch conversation") as session:
            await repository.get_conversation(session, owner=owner, conversation_id=conversation_id)
        queue: asyncio.Queue[Sequenced | None] = asyncio.Queue(maxsize=_WATCHER_BACKLOG)
        watchers = self._watchers.setdefault(conversation_id, set())
        watchers.add(queue)
        if conversation_id not in self._readers:
            self._readers[conversation_id] = asyncio.create_task(
                self._read(conversation_id), name=f"conversation reader {conversation_id}"
            )
        try:
            while (item := await queue.get()) is not None:
                await emit(item)
            raise ClientGoneError(f"{_WATCHER_BACKLOG} events behind")
        finally:
            watchers.discard(queue)
            # The last watcher of this set stops its reader. (Watchers that fell behind leave
            # the set before they end, so the set may be empty, or replaced by a newer one,
            # when they get here.)
            if not watchers and self._watchers.get(conversation_id) is watchers:
                del self._watchers[conversation_id]
                reader = self._readers.pop(conversation_id)
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    @property
    def readers(self) -> int:
        """Conversations this process reads for its watchers (one Redis reader each)."""
        return len(self._readers)

    async def _read(self, conversation_id: uuid.UUID) -> None:
        key = live.conversation_key(conversation_id)
        last = "$"
        while True:
            try:
                response = cast(
                    live.XReadReply, await self._redis.xread({key: last}, block=_SILENCE_MS * 5, count=10)
                )
                for _, entries in response:
                    for entry_id, fields in entries:
                        last = entry_id.decode()
                        await self._follow_turn(conversation_id, uuid.UUID(fields[b"t"].decode()))
            except _REDIS_ERRORS as exc:
                logger.warning("conversation %s: live read failed (%s); retrying", conversation_id, exc)
                await asyncio.sleep(1)
            except Exception:
                # A malformed entry, or a bug: the reader serves every watcher of the
                # conversation, so it outlives it and goes on with the next turn.
                logger.exception("conversation %s: live read failed; going on", conversation_id)
                await asyncio.sleep(1)

    async def _follow_turn(self, conversation_id: uuid.UUID, turn_id: uuid.UUID) -> None:
        # The watchers there when the turn is known get all of it, from its start; one that
        # joins while it streams waits for the next turn, as one that starts a reader does.
        receivers = set(self._watchers.get(conversation_id, ()))
        async for batch in live.follow(self._redis, turn_id, 0, block_ms=_SILENCE_MS * 5):
            watching = self._watchers.get(conversation_id, set())
            for item in batch:
                for queue in receivers & watching:
                    try:
                        queue.put_nowait(item)
                    except asyncio.QueueFull:
                        # It reads nothing: it ends (ClientGoneError), the others go on.
                        watching.discard(queue)
                        while not queue.empty():
                            queue.get_nowait()
                        queue.put_nowait(None)
            if batch and isinstance(batch[-1].event, TurnCompleted):
                return


def _started(turn: Turn) -> Sequenced:
    return Sequenced(1, TurnStarted(conversation_id=turn.conversation_id, turn_id=turn.id))


def _unseen(item: Sequenced, offset: int) -> Sequenced | None:
    """``item`` without the text before ``offset``, which the caller has; None if that is all of it.

    The live log and the caller's stream join deltas each in their own batches, so a log entry
    can start before the caller's resume offset.
    """
    if not isinstance(item.event, TextDelta) or item.event.offset >= offset:
        return item
    rest = item.event.text[offset - item.event.offset :]
    return Sequenced(item.seq, TextDelta(text=rest, offset=offset)) if rest else None


def replay_events(turn: Turn, *, after_seq: int, after_offset: int) -> list[Sequenced]:
    """An ended turn's events from PostgreSQL after a resume point, numbered as they were live.

    The stored text after ``after_offset`` comes as one TextDelta carrying the number of
    the last delta (one less than the terminal event's), so a client that resumes from the
    live log or from here ends up with exactly the whole reply, nothing repeated.
    """
    if turn.last_seq is not None and turn.last_seq > after_seq:
        last = turn.last_seq
    else:
        # Ended before its events were numbered, or by a sweeper that found no live log.
        last = after_seq + (3 if after_seq < 1 else 2)
    events: list[Sequenced] = []
    if after_seq < 1:
        events.append(
            Sequenced(1, TurnStarted(conversation_id=turn.conversation_id, turn_id=turn.id, replay=True))
        )
    rest = turn.assistant_text[after_offset:]
    if rest:
        events.append(Sequenced(last - 1, TextDelta(text=rest, offset=after_offset)))
    events.append(
        Sequenced(
            last,
            TurnCompleted(
                status=turn.status, stop_reason=turn.stop_reason or "", usage=turn.usage, model=turn.model
            ),
        )
    )
    return events
