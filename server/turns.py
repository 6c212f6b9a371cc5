"""One Chat turn, in call order: start -> stream -> finish -> publish.

1. Start (unit of work 1, one statement): the conversation and the STREAMING turn are
   committed before anything is sent (I3).
2. Stream: ``TurnStarted``, then the model's reply relayed as ``TextDelta`` events. No
   database session or transaction is open meanwhile.
3. Finish (unit of work 2, one statement): the outcome is stored on the turn row, which
   is the next turn's context (I11) and the relay's outbox.
4. Publish: XADD to the turn's shard and refresh the context cache; ``TurnCompleted``.

Every way a call can end records the turn at once, with what was produced: a client
gone (a cancel, a disconnect, a failed write) is CANCELLED, a deadline is CANCELLED with
DEADLINE_EXCEEDED, an error is FAILED. Only a dead process leaves its turns to the lease
sweeper (server/leases.py), which ends them INTERRUPTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, assert_never

import redis.asyncio as aioredis
import redis.exceptions

from server.coalescer import DeltaCoalescer
from server.context import ContextStore
from server.db import turn_store
from server.db.engine import Database
from server.db.turn_store import Busy, ConversationNotFound, Existing, Started, TurnRequest
from server.domain import Exchange, TextDelta, Turn, TurnCompleted, TurnEvent, TurnStarted, TurnStatus, Usage
from server.errors import (
    DeadlineExceededError,
    IdempotencyKeyReusedError,
    NotFoundError,
    StorageUnavailableError,
    TurnInProgressError,
    classify,
)
from server.leases import TurnLeases
from server.llm import LlmClient, ReplyEnded, ReplyStarted
from server.logs import bind_log_fields, unbind_log_fields
from server.metrics import Metrics
from server.publisher import TurnPublisher

logger = logging.getLogger(__name__)


class ClientGoneError(Exception):
    """The call's receiver is gone: an event could not be written (disconnect, reset, cancel)."""


Emit = Callable[[TurnEvent], Awaitable[None]]
"""Sends one event to the caller; raises ClientGoneError when the caller is gone."""

# Recording an outcome must finish even after the call is gone, but never hang a
# shutdown on a dead database: bounded, with a few retries for brief outages.
_FINISH_TIMEOUT_S: Final = 15.0
_FINISH_RETRY_DELAYS_S: Final = (0.2, 0.5, 1.0, 2.0, 4.0)
_PUBLISH_TIMEOUT_S: Final = 2.0
# The longest the upstream reader runs before it yields to the event loop.
_MAX_READER_STEP_S: Final = 0.002


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatInput:
    """A validated Chat request."""

    owner: str
    conversation_id: uuid.UUID | None
    text: str
    request_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnEnding:
    """How a turn ended and what it produced: everything unit of work 2 stores."""

    status: TurnStatus
    text: str
    stop_reason: str | None
    usage: Usage
    model: str
    error_reason: str | None


class TurnRunner:
    """Runs turns; one instance per server process, shared by all calls."""

    def __init__(
        self,
        *,
        database: Database,
        redis: aioredis.Redis,
        llm: LlmClient,
        context: ContextStore,
        publisher: TurnPublisher,
        leases: TurnLeases,
        metrics: Metrics,
    ) -> None:
        self._database = database
        self._redis = redis
        self._llm = llm
        self._context = context
        self._publisher = publisher
        self._leases = leases
        self._metrics = metrics

    async def run(self, request: ChatInput, emit: Emit, *, time_remaining_s: float | None = None) -> None:
        """Runs one turn, sending its events through ``emit``.

        Raises ChatError for failures the caller should see, and ClientGoneError when the
        caller went away; either way the turn is stored in its terminal status first. A
        cancellation (client gone, server stopping) stores the turn as CANCELLED and is
        re-raised. ``time_remaining_s`` is the call's deadline: unit of work 1 and the
        model stream are cut off by it, so no work outlives what the caller waits for.
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = None if time_remaining_s is None else began + time_remaining_s
        match await self._start(request, deadline):
            case Existing(turn=stored):
                await self._replay(stored, emit)
            case Started(turn=turn):
                log_token = bind_log_fields(conversation_id=str(turn.conversation_id), turn_id=str(turn.id))
                self._metrics.active_streams.inc()
                try:
                    with self._leases.hold(turn.id):
                        await self._stream(turn, emit, deadline, began)
                finally:
                    self._metrics.active_streams.dec()
                    unbind_log_fields(log_token)

    # 1. Start ---------------------------------------------------------------------------

    async def _start(self, request: ChatInput, deadline: float | None) -> Started | Existing:
        """Unit of work 1: the new STREAMING turn, or the stored turn a retry replays.

        The statement runs in a task of its own: if the call ends while it commits, the
        turn it made is ended CANCELLED as soon as it is known, instead of holding the
        conversation until its lease expires.
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        unit = asyncio.create_task(
            turn_store.start_turn(
                self._database,
                TurnRequest(
                    owner=request.owner,
                    conversation_id=request.conversation_id,
                    request_id=request.request_id,
                    user_text=request.text,
                    model=self._llm.model,
                    lease=self._leases.lease,
                ),
            ),
            name="unit of work 1",
        )
        try:
            async with asyncio.timeout_at(deadline):
                result = await asyncio.shield(unit)
        except TimeoutError:
            self._end_when_started(unit, "DEADLINE_EXCEEDED")
            raise DeadlineExceededError("the call's deadline passed before the turn started") from None
        except asyncio.CancelledError:
            self._end_when_started(unit, "CANCELLED")
            raise
        self._metrics.unit_of_work.labels("start").observe(loop.time() - began)
        if isinstance(result, Started | Existing) and result.interrupted:
            await self._publish(list(result.interrupted))
        match result:
            case Started():
                return result
            case Existing(turn=existing):
                _check_retry(existing, request)
                return result
            case Busy(conversation_id=conversation_id):
                raise TurnInProgressError(
                    "another turn of this conversation is still streaming; retry when it ends",
                    metadata={"conversation": f"conversations/{conversation_id}"},
                )
            case ConversationNotFound():
                raise NotFoundError("conversation not found")
            case _:
                assert_never(result)

    def _end_when_started(self, unit: asyncio.Task[turn_store.StartResult], reason: str) -> None:
        """Once unit of work 1 commits for a call that is already gone, ends its turn CANCELLED."""

        def ended(task: asyncio.Task[turn_store.StartResult]) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            result = task.result()
            if isinstance(result, Started):
                ending = TurnEnding(
                    status=TurnStatus.CANCELLED,
                    text="",
                    stop_reason=None,
                    usage=Usage(),
                    model=result.turn.model,
                    error_reason=reason,
                )
                self._leases.track(asyncio.create_task(self._finish(result.turn, [], ending)))

        unit.add_done_callback(ended)

    async def _replay(self, turn: Turn, emit: Emit) -> None:
        """Sends a stored turn again instead of calling the model a second time."""
        await emit(TurnStarted(conversation_id=turn.conversation_id, turn_id=turn.id, replay=True))
        if turn.assistant_text:
            await emit(TextDelta(text=turn.assistant_text))
        await emit(
            TurnCompleted(
                status=turn.status, stop_reason=turn.stop_reason or "", usage=turn.usage, model=turn.model
            )
        )

    # 2. Stream --------------------------------------------------------------------------

    async def _stream(self, turn: Turn, emit: Emit, deadline: float | None, began: float) -> None:
        """Sends TurnStarted and relays the reply; every way out stores the turn first."""
        reply = _Reply(model=self._llm.model)
        history: list[Exchange] = []
        try:
            async with asyncio.timeout_at(deadline):
                await emit(TurnStarted(conversation_id=turn.conversation_id, turn_id=turn.id))
                self._metrics.time_to_turn_started.observe(asyncio.get_running_loop().time() - began)
                history = await self._context.load(
                    turn.conversation_id, owner=turn.owner, before_seq=turn.seq
                )
                await self._relay(turn, history, reply, emit, began)
        except (asyncio.CancelledError, ClientGoneError):
            # The client went away or the server is stopping: record what was produced.
            await self._finish_shielded(turn, history, reply.ending(TurnStatus.CANCELLED, "CANCELLED"))
            raise
        except TimeoutError:
            await self._finish_shielded(
                turn, history, reply.ending(TurnStatus.CANCELLED, "DEADLINE_EXCEEDED")
            )
            raise DeadlineExceededError("the call's deadline passed while the reply streamed") from None
        except Exception as exc:
            err = classify(exc)
            await self._finish_shielded(turn, history, reply.ending(TurnStatus.FAILED, err.reason))
            raise err from exc
        # Shielded too: a cancel arriving while the outcome is stored must not leave the
        # turn STREAMING (to be INTERRUPTED by lease expiry) or unpublished.
        stored = await self._finish_shielded(turn, history, reply.ending(TurnStatus.COMPLETED, None))
        await emit(
            TurnCompleted(
                status=stored.status,
                stop_reason=stored.stop_reason or "",
                usage=stored.usage,
                model=stored.model,
            )
        )

    async def _relay(
        self, turn: Turn, history: list[Exchange], reply: _Reply, emit: Emit, began: float
    ) -> None:
        """Writes the reply as it is read: a child task reads upstream while this one writes."""
        reader = asyncio.create_task(
            self._read(turn, history, reply, began), name=f"upstream reader {turn.id}"
        )
        try:
            written = False
            async for text in reply.text.batches():
                await emit(TextDelta(text=text))
                if not written:
                    written = True
                    self._metrics.time_to_first_token.labels("written").observe(
                        asyncio.get_running_loop().time() - began
                    )
            await reader  # raises what the upstream raised
        finally:
            if not reader.done():
                reader.cancel()
                # The reader's own cancellation is expected; ours, if any, propagates after.
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _read(self, turn: Turn, history: list[Exchange], reply: _Reply, began: float) -> None:
        """Reads the model's reply into ``reply``; closes the upstream stream however it ends."""
        deltas = self._metrics.text_deltas
        try:
            # aclosing: a cancellation must close the upstream HTTP stream now, not
            # whenever the generator is garbage-collected (I8).
            async with contextlib.aclosing(
                self._llm.stream_reply(history=history, text=turn.user_text)
            ) as parts:
                step_ends = time.monotonic() + _MAX_READER_STEP_S
                async for part in parts:
                    match part:
                        case str():
                            if not reply.text.started:
                                self._metrics.time_to_first_token.labels("upstream").observe(
                                    asyncio.get_running_loop().time() - began
                                )
                            reply.text.put(part)
                            deltas.inc()
                        case ReplyStarted():
                            reply.started = part
                        case ReplyEnded():
                            reply.ended = part
                    if time.monotonic() >= step_ends:
                        # A fast upstream's reply is parsed from buffered bytes without ever
                        # suspending: let the other calls (a new call's unit of work 1,
                        # other streams' writes) run in between.
                        await asyncio.sleep(0)
                        step_ends = time.monotonic() + _MAX_READER_STEP_S
        finally:
            reply.text.close()

    # 3. Finish --------------------------------------------------------------------------

    async def _finish_shielded(self, turn: Turn, history: list[Exchange], ending: TurnEnding) -> Turn:
        """``_finish`` in a task that a cancellation of the call cannot stop, tracked for shutdown."""
        task = asyncio.create_task(self._finish(turn, history, ending))
        self._leases.track(task)
        return await asyncio.shield(task)

    async def _finish(self, turn: Turn, history: list[Exchange], ending: TurnEnding) -> Turn:
        """Unit of work 2, then publish; returns the turn as stored.

        A brief PostgreSQL outage is ridden out with a few retries; if the outcome still
        cannot be stored, the turn stays STREAMING, its lease expires and it ends
        INTERRUPTED, with the user's message kept.
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with asyncio.timeout(_FINISH_TIMEOUT_S):
            stored = await self._store(turn, ending)
        self._metrics.unit_of_work.labels("finish").observe(loop.time() - began)
        if stored is None:
            # The conversation was deleted while the reply streamed: nothing to relay, but
            # the caller still learns how its turn ended.
            return dataclasses.replace(
                turn,
                status=ending.status,
                assistant_text=ending.text,
                stop_reason=ending.stop_reason,
                usage=ending.usage,
                model=ending.model,
            )
        self._metrics.turns.labels(stored.status.value).inc()
        self._metrics.output_tokens.inc(stored.usage.output_tokens)
        await self._publish_and_cache(stored, history)
        return stored

    async def _store(self, turn: Turn, ending: TurnEnding) -> Turn | None:
        for delay in (*_FINISH_RETRY_DELAYS_S, None):
            try:
                return await turn_store.store_outcome(
                    self._database,
                    turn_id=turn.id,
                    status=ending.status,
                    assistant_text=ending.text,
                    stop_reason=ending.stop_reason,
                    usage=ending.usage,
                    model=ending.model,
                    error_reason=ending.error_reason,
                )
            except Exception as exc:
                if delay is None or not isinstance(classify(exc), StorageUnavailableError):
                    raise
                logger.warning(
                    "storing turn %s failed (database unavailable); retrying in %.1fs", turn.id, delay
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # 4. Publish -------------------------------------------------------------------------

    async def _publish_and_cache(self, stored: Turn, history: list[Exchange]) -> None:
        """XADDs the turn and refreshes the context cache in one Redis round trip.

        Each command's failure is logged, never raised: the committed turn row is the
        outbox (the relay re-publishes what this misses), and a missing or stale cache
        entry only costs the next turn a read from PostgreSQL.
        """
        key, value = self._context.entry(
            stored.conversation_id,
            owner=stored.owner,
            through=stored.seq,
            exchanges=[
                *history,
                Exchange(seq=stored.seq, user_text=stored.user_text, assistant_text=stored.assistant_text),
            ],
        )
        try:
            async with asyncio.timeout(_PUBLISH_TIMEOUT_S):
                async with self._redis.pipeline(transaction=False) as pipe:
                    self._publisher.queue(pipe, stored)
                    pipe.set(key, value, ex=self._context.ttl_s)
                    published, cached = await pipe.execute(raise_on_error=False)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            _log_publish_failure(1, exc)
            return
        if isinstance(published, Exception):
            _log_publish_failure(1, published)
        if isinstance(cached, Exception):
            logger.warning("context cache write failed: %s", cached.__class__.__name__)

    async def _publish(self, turns: list[Turn]) -> None:
        """Relays turns ended on the way (expired leases); a failure is logged, never raised."""
        try:
            async with asyncio.timeout(_PUBLISH_TIMEOUT_S):
                await self._publisher.publish_many(turns)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            _log_publish_failure(len(turns), exc)


class _Reply:
    """What the model has produced for one turn so far."""

    def __init__(self, *, model: str) -> None:
        self.text = DeltaCoalescer()
        self.started: ReplyStarted | None = None
        self.ended: ReplyEnded | None = None
        self._model = model

    def ending(self, status: TurnStatus, error_reason: str | None) -> TurnEnding:
        """The outcome to store if the turn ends now, with ``status``."""
        last = self.ended or self.started
        return TurnEnding(
            status=status,
            text=self.text.produced,
            stop_reason=None if self.ended is None else self.ended.stop_reason,
            usage=Usage() if last is None else last.usage,
            model=self._model if self.started is None else self.started.model,
            error_reason=error_reason,
        )


def _check_retry(existing: Turn, request: ChatInput) -> None:
    """A repeated request_id replays only the same message, and only once its turn ended."""
    same_conversation = request.conversation_id in (None, existing.conversation_id)
    if existing.user_text != request.text or not same_conversation:
        raise IdempotencyKeyReusedError(
            "request_id was already used for a different message",
            field_violations=[("request_id", "already used for a different message")],
            metadata={"field": "request_id"},
        )
    if existing.status is TurnStatus.STREAMING:
        raise TurnInProgressError(
            "a turn with this request_id is still streaming; retry when it ends",
            metadata={"conversation": f"conversations/{existing.conversation_id}"},
        )


def _log_publish_failure(count: int, exc: BaseException) -> None:
    # The committed turn rows are the outbox: the relay re-publishes what this missed.
    logger.warning("publishing %d turn(s) failed (%s); the relay will retry", count, exc.__class__.__name__)
