"""A turn being produced, in call order: number its events, read the model, store, publish.

The producer runs in a task of its own, apart from the call that started the turn: that
is what lets a turn go on when its client leaves (``ON_DISCONNECT_CONTINUE``), be
cancelled from any replica (its live log's cancel flag), and be drained by a shutdown.
It numbers each event where it is produced (``seq``), hands it to the starting call
(``Outbox``) and to the turn's live log in Redis (server/live.py), never waiting for
either. The starting call gets an event once the live log holds it: a turn whose server
dies is ended from its live log (server/leases.py), with at least what its caller saw.
Every way out stores the turn first (unit of work 2), which releases every event to the
caller, then publishes it, then sends the terminal event: ``TurnCompleted`` means the
outcome is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final, Protocol

import redis.asyncio as aioredis
import redis.exceptions

from server.coalescer import Outbox
from server.config import Settings
from server.context import ContextStore
from server.db import turn_store
from server.db.engine import Database
from server.domain import (
    Exchange,
    Sequenced,
    TextDelta,
    Turn,
    TurnCompleted,
    TurnEnding,
    TurnStarted,
    TurnStatus,
    Usage,
)
from server.errors import ChatError, InternalError, StorageUnavailableError, classify
from server.leases import TurnLeases
from server.live import LiveLog
from server.llm import LlmClient, ReplyEnded, ReplyStarted
from server.metrics import Metrics
from server.publisher import TurnPublisher

logger = logging.getLogger(__name__)

# Recording an outcome must finish even after the call is gone, but never hang a
# shutdown on a dead database: bounded, with a few retries for brief outages.
_FINISH_TIMEOUT_S: Final = 15.0
_FINISH_RETRY_DELAYS_S: Final = (0.2, 0.5, 1.0, 2.0, 4.0)
_PUBLISH_TIMEOUT_S: Final = 2.0
# The longest the upstream reader runs before it yields to the event loop.
_MAX_READER_STEP_S: Final = 0.002


class Production:
    """One turn being produced: its task, its events for the starting call, and how to stop it."""

    def __init__(self, turn: Turn, *, live_log: bool) -> None:
        self.turn = turn
        self.outbox = Outbox(gated=live_log)
        """With a live log, an event waits there until the log (or the stored outcome) holds it."""
        self.seq = 0
        """The number of the last event produced."""
        self.cancel_reason: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.running = False
        """Whether the task has begun: cancelling a task before its first step would skip
        the code that records the turn, so such a cancel is left for that code to see."""

    def cancel(self, reason: str) -> None:
        """Stops producing; the turn ends CANCELLED with ``reason`` and what was produced.

        Only the first call counts: the live log's writer sees the cancel flag on each of its
        pipelines, and a second ``Task.cancel`` would interrupt the recording of the turn's end
        (the caller's stream then closed without its terminal event).
        """
        if self.task is None or self.task.done() or self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        if self.running:
            self.task.cancel()


def _started(turn: Turn) -> Sequenced:
    """A turn's first event."""
    return Sequenced(1, TurnStarted(conversation_id=turn.conversation_id, turn_id=turn.id))


class Producer:
    """Produces turns; one per server process."""

    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        redis: aioredis.Redis,
        llm: LlmClient,
        context: ContextStore,
        publisher: TurnPublisher,
        leases: TurnLeases,
        metrics: Metrics,
        live_log: LiveLog | None,
    ) -> None:
        self._settings = settings
        self._database = database
        self._redis = redis
        self._live_log = live_log
        """Where each turn's events go for watchers and resumes; None with the live log off."""
        self._llm = llm
        self._context = context
        self.publisher = publisher
        """Where ended turns are relayed to the persistence consumer."""
        self._leases = leases
        self._metrics = metrics

    def start(self, turn: Turn, began: float) -> Production:
        """Starts producing ``turn`` in a task of its own; its caller can send TurnStarted at once.

        TurnStarted is in the outbox before the task's first step, so the caller does not
        wait a pass of a busy event loop for the task to be scheduled. It has no text, and
        unit of work 1 made the turn durable: it needs no live log to be sent.
        """
        production = Production(turn, live_log=self._live_log is not None)
        production.outbox.put(_started(turn))
        production.outbox.release(1)
        production.seq = 1
        production.task = asyncio.create_task(self._produce(production, began), name=f"turn {turn.id}")
        self._leases.track(production.task)
        return production

    async def _produce(self, production: Production, began: float) -> None:
        production.running = True
        turn = production.turn
        if production.cancel_reason is not None:
            # Its call was gone before the turn could start (unit of work 1 committed late).
            ending = _Reply(model=turn.model).ending(
                TurnStatus.CANCELLED, production.cancel_reason, production
            )
            await self._end(production, [], ending, lambda item, *, caller=True: None)
            return
        live = None
        if self._live_log is not None:
            live = self._live_log.open(
                conversation_id=turn.conversation_id,
                turn_id=turn.id,
                on_cancel=lambda: production.cancel("CANCELLED"),
                on_written=production.outbox.release,
            )

        def emit(item: Sequenced, *, caller: bool = True) -> None:
            production.seq = item.seq
            if caller:
                production.outbox.put(item)
            if live is not None:
                live.append(item)

        reply = _Reply(model=self._llm.model)
        history: list[Exchange] = []
        self._metrics.active_streams.inc()
        try:
            with self._leases.hold(turn.id):
                try:
                    async with asyncio.timeout(self._settings.turns.max_turn_s):
                        # The caller has it already (``start``); watchers get it from the live log.
                        emit(_started(turn), caller=False)
                        history = await self._context.load(
                            turn.conversation_id,
                            owner=turn.owner,
                            before_seq=turn.seq,
                            text_chars=len(turn.user_text),
                        )
                        await self._read(production, history, reply, emit, began)
                except asyncio.CancelledError:
                    # The client left (CANCEL), CancelTurn, or the server is stopping.
                    reason = production.cancel_reason or "CANCELLED"
                    await self._end(
                        production, history, reply.ending(TurnStatus.CANCELLED, reason, production), emit
                    )
                    raise
                except TimeoutError:
                    ending = reply.ending(TurnStatus.CANCELLED, "DEADLINE_EXCEEDED", production)
                    await self._end(production, history, ending, emit)
                except Exception as exc:  # any failure ends the turn FAILED; the caller gets it
                    err = classify(exc)
                    if isinstance(err, InternalError) and err is not exc:
                        # The caller gets a generic INTERNAL: the cause is only in this log.
                        logger.exception("turn %s failed unexpectedly", turn.id)
                    ending = reply.ending(TurnStatus.FAILED, err.reason, production)
                    await self._end(production, history, ending, emit, error=err)
                else:
                    ending = reply.ending(TurnStatus.COMPLETED, None, production)
                    await self._end(production, history, ending, emit)
        except BaseException as exc:
            # Recording the outcome itself failed (the database stayed away past every
            # retry): the turn is left to its lease, and the caller must not wait forever.
            if not production.outbox.closed:
                production.outbox.close(None if isinstance(exc, asyncio.CancelledError) else classify(exc))
            raise
        finally:
            self._metrics.active_streams.dec()
            if live is not None:
                await live.close()

    async def _read(
        self, production: Production, history: list[Exchange], reply: _Reply, emit: _Emit, began: float
    ) -> None:
        """Reads the model's reply, numbering each delta as it arrives; closes the upstream however it ends.

        Each delta is handed to the outbox and the live log at once; both join what piles up
        while their reader is busy, so nothing waits here and an idle stream holds nothing back.
        """
        turn = production.turn
        deltas = self._metrics.text_deltas
        # aclosing: a cancellation must close the upstream HTTP stream now, not whenever
        # the generator is garbage-collected (I8).
        async with contextlib.aclosing(self._llm.stream_reply(history=history, text=turn.user_text)) as parts:
            step_ends = time.monotonic() + _MAX_READER_STEP_S
            async for part in parts:
                match part:
                    case str():
                        if not reply.parts:
                            self._metrics.time_to_first_token.labels("upstream").observe(
                                asyncio.get_running_loop().time() - began
                            )
                        emit(Sequenced(production.seq + 1, TextDelta(text=part, offset=reply.offset)))
                        reply.add(part)
                        deltas.inc()
                    case ReplyStarted():
                        reply.started = part
                    case ReplyEnded():
                        reply.ended = part
                if time.monotonic() >= step_ends:
                    # A fast upstream's reply is parsed from buffered bytes without ever
                    # suspending: let the other calls (a new call's unit of work 1, other
                    # streams' writes) run in between.
                    await asyncio.sleep(0)
                    step_ends = time.monotonic() + _MAX_READER_STEP_S

    async def _end(
        self,
        production: Production,
        history: list[Exchange],
        ending: TurnEnding,
        emit: _Emit,
        *,
        error: ChatError | None = None,
    ) -> None:
        """Stores and publishes the outcome (shielded from cancellation), then the terminal event."""
        task = asyncio.create_task(self._finish(production, history, ending))
        self._leases.track(task)
        stored = await asyncio.shield(task)
        terminal = TurnCompleted(
            status=stored.status,
            stop_reason=stored.stop_reason or "",
            usage=stored.usage,
            model=stored.model,
            error_reason=ending.error_reason if stored.status is ending.status else "LEASE_EXPIRED",
        )
        if stored.status is ending.status:
            # The starting call gets a failure as its status; watchers get the terminal event.
            emit(Sequenced(stored.last_seq or ending.last_seq, terminal), caller=error is None)
        elif error is None:
            # A sweeper ended the turn while it still produced (this process was frozen, or
            # cut off from PostgreSQL, past the lease). The live log already ends with the
            # sweeper's terminal event, numbered after what the log held, which may be before
            # what this caller was sent: the caller gets its own, after its last event.
            production.outbox.put(Sequenced(production.seq + 1, terminal))
        production.outbox.close(error)

    async def _finish(self, production: Production, history: list[Exchange], ending: TurnEnding) -> Turn:
        """Unit of work 2, then publish; returns the turn as stored.

        A brief PostgreSQL outage is ridden out with a few retries; if the outcome still
        cannot be stored, the turn stays STREAMING, its lease expires and it ends
        INTERRUPTED, with the user's message and the live log's text kept.
        """
        turn = production.turn
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with asyncio.timeout(_FINISH_TIMEOUT_S):
            stored = await self._store(turn, ending)
        # The stored row holds every event now, whatever the live log could write.
        production.outbox.release_all()
        self._metrics.unit_of_work.labels("finish").observe(loop.time() - began)
        if stored is None:
            # The conversation was deleted while the reply streamed: nothing to relay, but
            # the caller still learns how its turn ended.
            return ending.applied_to(turn)
        self._metrics.turns.labels(stored.status.value).inc()
        self._metrics.output_tokens.inc(stored.usage.output_tokens)
        await self._publish_and_cache(stored, history)
        return stored

    async def _store(self, turn: Turn, ending: TurnEnding) -> Turn | None:
        for delay in (*_FINISH_RETRY_DELAYS_S, None):
            try:
                return await turn_store.store_outcome(self._database, turn_id=turn.id, ending=ending)
            except Exception as exc:
                if delay is None or not isinstance(classify(exc), StorageUnavailableError):
                    raise
                logger.warning(
                    "storing turn %s failed (database unavailable); retrying in %.1fs", turn.id, delay
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

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
                    self.publisher.queue(pipe, stored)
                    pipe.set(key, value, ex=self._context.ttl_s)
                    published, cached = await pipe.execute(raise_on_error=False)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            log_publish_failure(1, exc)
            return
        if isinstance(published, Exception):
            log_publish_failure(1, published)
        if isinstance(cached, Exception):
            logger.warning("context cache write failed: %s", cached.__class__.__name__)


class _Emit(Protocol):
    def __call__(self, item: Sequenced, *, caller: bool = True) -> None: ...


class _Reply:
    """What the model has produced for one turn so far."""

    def __init__(self, *, model: str) -> None:
        self.parts: list[str] = []
        """Every delta the model produced, written to anyone or not."""
        self.offset = 0
        """Characters produced so far: where the next delta starts."""
        self.started: ReplyStarted | None = None
        self.ended: ReplyEnded | None = None
        self._model = model

    def add(self, text: str) -> None:
        """Keeps a produced delta."""
        self.parts.append(text)
        self.offset += len(text)

    def ending(self, status: TurnStatus, error_reason: str | None, production: Production) -> TurnEnding:
        """The outcome to store if the turn ends now, with ``status``."""
        last = self.ended or self.started
        return TurnEnding(
            status=status,
            text="".join(self.parts),
            stop_reason=None if self.ended is None else self.ended.stop_reason,
            usage=Usage() if last is None else last.usage,
            model=self._model if self.started is None else self.started.model,
            error_reason=error_reason,
            last_seq=production.seq + 1,
        )


def log_publish_failure(count: int, exc: BaseException) -> None:
    """One line for a failed XADD; the committed turn rows are the outbox the relay reads."""
    logger.warning("publishing %d turn(s) failed (%s); the relay will retry", count, exc.__class__.__name__)
