"""One Chat turn: unit of work 1 -> stream the model -> unit of work 2 -> publish.

No database session is open while the model streams or while events are written to
the client: each unit of work is a short ``async with sessionmaker.begin()`` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from sqlalchemy.ext.asyncio import AsyncSession

from server.config import Settings
from server.context import ContextStore
from server.db import repository
from server.db.engine import SessionMaker
from server.db.hot import HotPath
from server.domain import Exchange, TextDelta, Turn, TurnCompleted, TurnEvent, TurnStarted, TurnStatus
from server.errors import (
    DeadlineExceededError,
    IdempotencyKeyReusedError,
    NotFoundError,
    StorageUnavailableError,
    TurnInProgressError,
    classify,
    is_database_outage,
)
from server.llm import LlmClient, ReplyOutcome
from server.logs import bind_log_fields, unbind_log_fields
from server.metrics import Metrics
from server.publisher import TurnPublisher

logger = logging.getLogger(__name__)

Emit = Callable[[TurnEvent], Awaitable[None]]

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


class _ReplayStoredTurnError(Exception):
    """Unwinds unit of work 1 (rolling it back) when the request_id names a stored turn."""

    def __init__(self, turn: Turn) -> None:
        super().__init__("replay")
        self.turn = turn


class TurnRunner:
    """Runs turns; one instance per server process, shared by all calls."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessionmaker: SessionMaker,
        hot: HotPath,
        redis: aioredis.Redis,
        llm: LlmClient,
        context: ContextStore,
        publisher: TurnPublisher,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._sessionmaker = sessionmaker
        self._hot = hot
        self._redis = redis
        self._llm = llm
        self._context = context
        self._publisher = publisher
        self._lease = timedelta(seconds=settings.turn_lease_s)
        self._streaming: set[uuid.UUID] = set()
        self._calls: set[asyncio.Task[object]] = set()
        self._finishing: set[asyncio.Task[Turn]] = set()

    @property
    def streaming(self) -> int:
        """Turns this process is streaming right now."""
        return len(self._streaming)

    async def run(self, request: ChatInput, emit: Emit, *, time_remaining_s: float | None = None) -> None:
        """Runs one turn, sending its events through ``emit``.

        Raises ChatError for failures the caller should see; a failure after
        ``TurnStarted`` still stores the turn in a terminal status first. A
        cancellation (client gone, server stopping) stores the turn as CANCELLED and
        re-raises. ``time_remaining_s`` is the call's deadline: unit of work 1 and the
        model stream are cut off by it, so no work outlives what the caller waits for.
        """
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        deadline = None if time_remaining_s is None else started_at + time_remaining_s
        try:
            async with asyncio.timeout_at(deadline):
                turn = await self._start(request)
                self._metrics.unit_of_work.labels("start").observe(loop.time() - started_at)
        except _ReplayStoredTurnError as replay:
            await self._replay(replay.turn, emit)
            return
        except TimeoutError:
            raise DeadlineExceededError("the call's deadline passed before the turn started") from None

        log_token = bind_log_fields(conversation_id=str(turn.conversation_id), turn_id=str(turn.id))
        self._streaming.add(turn.id)
        self._metrics.active_streams.inc()
        call = asyncio.current_task()
        if call is not None:
            self._calls.add(call)
        try:
            await self._stream(turn, emit, deadline, started_at)
        finally:
            self._streaming.discard(turn.id)
            self._metrics.active_streams.dec()
            if call is not None:
                self._calls.discard(call)
            unbind_log_fields(log_token)

    async def _stream(self, turn: Turn, emit: Emit, deadline: float | None, started_at: float) -> None:
        loop = asyncio.get_running_loop()
        await emit(TurnStarted(conversation_id=turn.conversation_id, turn_id=turn.id))
        self._metrics.time_to_turn_started.observe(loop.time() - started_at)
        outcome = ReplyOutcome(model=self._llm.model)
        parts: list[str] = []
        history: list[Exchange] = []
        try:
            async with asyncio.timeout_at(deadline):
                history = await self._context.load(
                    turn.conversation_id, owner=turn.owner, before_seq=turn.seq
                )
                await self._relay_reply(turn, history, outcome, parts, emit, started_at)
        except asyncio.CancelledError:
            # The client went away or the server is stopping: record what was produced.
            await self._finish_shielded(
                turn, history, "".join(parts), TurnStatus.CANCELLED, outcome, "CANCELLED"
            )
            raise
        except TimeoutError:
            await self._finish_shielded(
                turn, history, "".join(parts), TurnStatus.CANCELLED, outcome, "DEADLINE_EXCEEDED"
            )
            raise DeadlineExceededError("the call's deadline passed while the reply streamed") from None
        except Exception as exc:
            err = classify(exc)
            await self._finish_shielded(turn, history, "".join(parts), TurnStatus.FAILED, outcome, err.reason)
            raise err from exc

        # Shielded too: a cancel arriving while the outcome is stored must not leave the
        # turn STREAMING (to be INTERRUPTED by lease expiry) or unpublished.
        stored = await self._finish_shielded(
            turn, history, "".join(parts), TurnStatus.COMPLETED, outcome, None
        )
        await emit(
            TurnCompleted(
                status=stored.status,
                stop_reason=stored.stop_reason or "",
                usage=stored.usage,
                model=stored.model,
            )
        )

    async def _relay_reply(
        self,
        turn: Turn,
        history: list[Exchange],
        outcome: ReplyOutcome,
        parts: list[str],
        emit: Emit,
        started_at: float,
    ) -> None:
        """Streams the model's reply to the client, coalescing deltas only under back-pressure.

        A child task reads the upstream stream while this task writes. A delta that
        arrives when no write is in flight is written at once, so an idle stream holds
        nothing back; deltas that arrive while a write is in flight (a slow client or a
        busy server) are joined into the next TextDelta. Under load that cuts the gRPC
        messages, and their per-message CPU, without adding latency when idle. Every
        delta the model produced is appended to ``parts``, written or not.
        """
        loop = asyncio.get_running_loop()
        first_token = self._metrics.time_to_first_token
        deltas = self._metrics.text_deltas
        waiting: list[str] = []
        arrived = asyncio.Event()
        ended = False

        async def read() -> None:
            nonlocal ended
            chunks = self._llm.stream_reply(history=history, text=turn.user_text, outcome=outcome)
            try:
                # aclosing: a cancellation must close the upstream HTTP stream now, not
                # whenever the generator is garbage-collected.
                async with contextlib.aclosing(chunks):
                    step_ends = time.monotonic() + _MAX_READER_STEP_S
                    async for chunk in chunks:
                        if not parts:
                            first_token.labels("upstream").observe(loop.time() - started_at)
                        parts.append(chunk)
                        waiting.append(chunk)
                        deltas.inc()
                        arrived.set()
                        if time.monotonic() >= step_ends:
                            # A fast upstream's reply is parsed from buffered bytes without
                            # ever suspending: let the other calls (a new call's unit of
                            # work 1, other streams' writes) run in between.
                            await asyncio.sleep(0)
                            step_ends = time.monotonic() + _MAX_READER_STEP_S
            finally:
                ended = True
                arrived.set()

        reader = asyncio.create_task(read(), name=f"upstream reader {turn.id}")
        try:
            written = False
            while True:
                if not waiting and not ended:
                    await arrived.wait()
                    arrived.clear()
                if waiting:
                    text = "".join(waiting)
                    waiting.clear()
                    await emit(TextDelta(text=text))
                    if not written:
                        written = True
                        first_token.labels("written").observe(loop.time() - started_at)
                elif ended:
                    break
            await reader  # raises what the upstream raised
        finally:
            if not reader.done():
                reader.cancel()
                # The reader's own cancellation is expected; ours, if any, propagates after.
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def renew_leases(self) -> None:
        """Extends the leases of every turn this process is streaming (one statement)."""
        turn_ids = list(self._streaming)
        if not turn_ids:
            return
        async with self._sessionmaker.begin() as session:
            await repository.renew_leases(session, turn_ids=turn_ids, lease=self._lease)

    async def renew_leases_forever(self) -> None:
        """Renews leases every third of the lease; a dead process stops renewing, which is the point."""
        interval = self._settings.turn_lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew_leases()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure
                # A missed renewal is survivable: two more happen before the lease ends.
                logger.warning("lease renewal failed: %s", classify(exc).reason)

    async def shutdown(self) -> None:
        """Cancels turns still streaming and waits until every outcome is recorded.

        Called after the gRPC server's grace period: grpc aborts those calls towards
        the client but does not reliably cancel their handlers before the process
        exits, so the turns are cancelled here, which records them as CANCELLED.
        """
        calls = list(self._calls)
        for call in calls:
            call.cancel()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    async def _start(self, request: ChatInput) -> Turn:
        """Unit of work 1: get or create the conversation and insert the STREAMING turn.

        Committed before anything is sent, so the conversation and the user's message
        are durable and visible to other connections when TurnStarted arrives (I3).
        The common case is one statement (``HotPath.start_turn``); the rest (retries,
        takeovers, conflicts, errors) goes through the general path below.
        """
        turn = await self._start_fast(request)
        if turn is not None:
            return turn
        interrupted: list[Turn] = []
        async with self._sessionmaker.begin() as session:
            if request.request_id is not None:
                existing = await repository.find_turn_by_request_id(
                    session, owner=request.owner, request_id=request.request_id
                )
                if existing is not None and not (
                    existing.status is TurnStatus.STREAMING and await self._expired(session, existing)
                ):
                    raise _ReplayStoredTurnError(self._check_retry(existing, request))
            conversation_id = request.conversation_id
            if conversation_id is None:
                conversation_id = await self._create_conversation(session, request)
            seq = await repository.next_turn_seq(
                session, owner=request.owner, conversation_id=conversation_id
            )
            turn = await self._insert_turn(session, request, conversation_id, seq)
            if turn is None:
                # Lost a race: a concurrent call with the same request_id committed
                # first (retry semantics apply), or another turn is streaming. If that
                # turn's server died (lease expired), take the conversation over.
                if request.request_id is not None:
                    existing = await repository.find_turn_by_request_id(
                        session, owner=request.owner, request_id=request.request_id
                    )
                    if existing is not None:
                        raise _ReplayStoredTurnError(self._check_retry(existing, request))
                interrupted = await repository.interrupt_expired_turns(
                    session, limit=10, conversation_id=conversation_id
                )
                if interrupted:
                    turn = await self._insert_turn(session, request, conversation_id, seq)
            if turn is None:
                raise TurnInProgressError(
                    "another turn of this conversation is still streaming; retry when it ends",
                    metadata={"conversation": f"conversations/{conversation_id}"},
                )
        if interrupted:
            await self._publish(interrupted)
        return turn

    async def _start_fast(self, request: ChatInput) -> Turn | None:
        """The one-statement unit of work 1; None when the general path must decide."""
        try:
            return await self._hot.start_turn(
                owner=request.owner,
                conversation_id=request.conversation_id,
                turn_id=uuid.uuid4(),
                request_id=request.request_id,
                user_text=request.text,
                model=self._llm.model,
                lease=self._lease,
            )
        except asyncpg.ForeignKeyViolationError:
            # A new conversation whose (owner, request_id) is taken: the statement rolled
            # back, and the general path finds what that request_id already made.
            return None
        except Exception as exc:
            if not is_database_outage(exc):
                raise
            # The general path's pool pings its connections first; if PostgreSQL is
            # really gone it fails there with the same UNAVAILABLE.
            logger.info("fast unit of work 1 hit a database outage (%s)", exc.__class__.__name__)
            return None

    async def _expired(self, session: AsyncSession, turn: Turn) -> bool:
        """Interrupts ``turn``'s conversation's expired STREAMING turn; True if ``turn`` was one."""
        interrupted = await repository.interrupt_expired_turns(
            session, limit=10, conversation_id=turn.conversation_id
        )
        return any(t.id == turn.id for t in interrupted)

    async def _insert_turn(
        self, session: AsyncSession, request: ChatInput, conversation_id: uuid.UUID, seq: int
    ) -> Turn | None:
        return await repository.insert_turn(
            session,
            owner=request.owner,
            conversation_id=conversation_id,
            seq=seq,
            turn_id=uuid.uuid4(),
            request_id=request.request_id,
            user_text=request.text,
            model=self._llm.model,
            lease=self._lease,
        )

    @staticmethod
    async def _create_conversation(session: AsyncSession, request: ChatInput) -> uuid.UUID:
        conversation = await repository.insert_conversation(
            session, owner=request.owner, conversation_id=uuid.uuid4(), request_id=request.request_id
        )
        if conversation is None and request.request_id is not None:
            # A retry (or a concurrent twin) of a Chat that already created it.
            conversation = await repository.find_conversation_by_request_id(
                session, owner=request.owner, request_id=request.request_id
            )
        if conversation is None:
            raise NotFoundError("conversation not found")
        return conversation.id

    @staticmethod
    def _check_retry(existing: Turn, request: ChatInput) -> Turn:
        """Decides what a repeated request_id means; returns the turn to replay."""
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
        return existing

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

    async def _finish_shielded(
        self,
        turn: Turn,
        history: list[Exchange],
        text: str,
        status: TurnStatus,
        outcome: ReplyOutcome,
        error_reason: str | None,
    ) -> Turn:
        """``_finish`` in a task of its own that a cancellation of the call cannot stop.

        The task is tracked so that shutdown waits for it before closing the pools it uses.
        """
        task = asyncio.create_task(self._finish(turn, history, text, status, outcome, error_reason))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        return await asyncio.shield(task)

    async def _finish(
        self,
        turn: Turn,
        history: list[Exchange],
        text: str,
        status: TurnStatus,
        outcome: ReplyOutcome,
        error_reason: str | None,
    ) -> Turn:
        """Unit of work 2, then publish: store the outcome, relay it, refresh the context cache.

        A brief PostgreSQL outage is ridden out with a few retries; if the outcome
        still cannot be stored, the turn stays STREAMING, its lease expires and it
        ends INTERRUPTED, with the user's message kept.
        """
        began = asyncio.get_running_loop().time()
        async with asyncio.timeout(_FINISH_TIMEOUT_S):
            stored = await self._store_outcome(turn, text, status, outcome, error_reason)
        self._metrics.unit_of_work.labels("finish").observe(asyncio.get_running_loop().time() - began)
        if stored is not None:
            self._metrics.turns.labels(stored.status.value).inc()
            self._metrics.output_tokens.inc(stored.usage.output_tokens)
        if stored is None:
            # The conversation was deleted while the reply streamed: nothing to relay.
            return turn
        await self._publish_and_cache(stored, history)
        return stored

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
            logger.warning(
                "publishing turn %s failed (%s); the relay will retry", stored.id, exc.__class__.__name__
            )
            return
        if isinstance(published, Exception):
            logger.warning(
                "publishing turn %s failed (%s); the relay will retry",
                stored.id,
                published.__class__.__name__,
            )
        if isinstance(cached, Exception):
            logger.warning("context cache write failed: %s", cached.__class__.__name__)

    async def _store_outcome(
        self, turn: Turn, text: str, status: TurnStatus, outcome: ReplyOutcome, error_reason: str | None
    ) -> Turn | None:
        for delay in (*_FINISH_RETRY_DELAYS_S, None):
            try:
                return await self._hot.store_outcome(
                    turn_id=turn.id,
                    assistant_text=text,
                    status=status,
                    stop_reason=outcome.stop_reason,
                    usage=outcome.usage,
                    error_reason=error_reason,
                )
            except Exception as exc:
                if delay is None or not isinstance(classify(exc), StorageUnavailableError):
                    raise
                logger.warning(
                    "storing turn %s failed (database unavailable); retrying in %.1fs", turn.id, delay
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _publish(self, turns: list[Turn]) -> None:
        """Relays ended turns to the consumer; a failure is logged, never raised.

        The committed turn row is the outbox: the relay re-publishes what this misses.
        """
        try:
            async with asyncio.timeout(_PUBLISH_TIMEOUT_S):
                if len(turns) == 1:
                    await self._publisher.publish(turns[0])
                else:
                    await self._publisher.publish_many(turns)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            logger.warning(
                "publishing %d turn(s) failed (%s); the relay will retry", len(turns), exc.__class__.__name__
            )
