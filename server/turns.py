"""One Chat call, in call order: start the turn, then produce it, attach to it, or replay it.

1. Start (unit of work 1, one statement): the conversation and the STREAMING turn are
   committed before anything is sent (I3).
2. Produce (server/production.py): in a task of its own, the model's reply is numbered,
   logged live and stored (unit of work 2), then published. No database session or
   transaction is open while it streams.
3. Relay: the call writes the produced events to its client, joined under back-pressure.

A retry with the same request_id attaches to its turn while it streams, and replays it
once it ended. Every way a call can end records the turn at once: a client gone (a
cancel, a disconnect, a failed write) ends it CANCELLED, unless the caller asked that it
continue (``continue_on_disconnect``); a deadline ends it CANCELLED with
DEADLINE_EXCEEDED. Only a dead process leaves its turns to the lease sweeper
(server/leases.py), which ends them INTERRUPTED with what their live log kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, assert_never

import redis.asyncio as aioredis

from server.db import turn_store
from server.db.engine import Database
from server.db.turn_store import Busy, ConversationNotFound, Existing, Started, TurnRequest
from server.domain import Sequenced, TextDelta, Turn, TurnStarted, TurnStatus
from server.errors import (
    ClientGoneError,
    DeadlineExceededError,
    IdempotencyKeyReusedError,
    NotFoundError,
    TurnInProgressError,
)
from server.leases import TurnLeases, interrupt_expired
from server.logs import bind_log_fields, unbind_log_fields
from server.metrics import Metrics
from server.production import Producer, Production
from server.watch import TurnWatcher, replay_events

logger = logging.getLogger(__name__)


Emit = Callable[[Sequenced], Awaitable[None]]
"""Sends one numbered event to the caller; raises ClientGoneError when the caller is gone."""

_PUBLISH_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatInput:
    """A validated Chat request."""

    owner: str
    conversation_id: uuid.UUID | None
    text: str
    request_id: str | None


class TurnRunner:
    """Runs Chat calls; one instance per server process, shared by all calls."""

    def __init__(
        self,
        *,
        database: Database,
        redis: aioredis.Redis,
        producer: Producer,
        watcher: TurnWatcher,
        leases: TurnLeases,
        llm_model: str,
        live_ttl_s: float,
        metrics: Metrics,
    ) -> None:
        self._database = database
        self._redis = redis
        self._producer = producer
        self._watcher = watcher
        self._leases = leases
        self._model = llm_model
        self._live_ttl_s = live_ttl_s
        self._metrics = metrics

    async def run(
        self,
        request: ChatInput,
        emit: Emit,
        *,
        time_remaining_s: float | None = None,
        continue_on_disconnect: bool = False,
    ) -> None:
        """Runs one Chat call, sending its events through ``emit``.

        Raises ChatError for failures the caller should see, and ClientGoneError or
        CancelledError when the caller went away; either way the turn is stored in its
        terminal status first, unless it continues without its caller.
        ``time_remaining_s`` is the call's deadline: unit of work 1 and the relay are cut
        off by it, so no work outlives what the caller waits for (unless it continues).
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = None if time_remaining_s is None else began + time_remaining_s
        match await self._start(request, deadline):
            case Existing(turn=stored) if stored.status is TurnStatus.STREAMING:
                # A retry while its turn streams: attach, as WatchTurn from the start.
                await self._watcher.follow(stored, after_seq=0, after_offset=0, emit=emit)
            case Existing(turn=stored):
                await self._replay(stored, emit)
            case Started(turn=turn):
                log_token = bind_log_fields(conversation_id=str(turn.conversation_id), turn_id=str(turn.id))
                try:
                    production = self._producer.start(turn, began)
                    await self._relay(production, emit, deadline, began, continue_on_disconnect)
                finally:
                    unbind_log_fields(log_token)

    # 1. Start ---------------------------------------------------------------------------

    async def _start(self, request: ChatInput, deadline: float | None) -> Started | Existing:
        """Unit of work 1: the new STREAMING turn, or the stored turn a retry attaches to or replays.

        The statement runs in a task of its own: if the call ends while it commits, the
        turn it made is ended CANCELLED as soon as it is known, instead of holding the
        conversation until its lease expires.
        """
        loop = asyncio.get_running_loop()
        began = loop.time()
        for attempt in range(2):
            unit = asyncio.create_task(self._unit_of_work_1(request), name="unit of work 1")
            # Shutdown waits for it: it may outlive its call, and it holds a connection.
            self._leases.track(unit)
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
            match result:
                case Started():
                    return result
                case Existing(turn=existing, expired=True) if attempt == 0:
                    # A retry after its producer died: end that turn now, then look again.
                    await self._interrupt_expired(existing.conversation_id)
                case Existing(turn=existing):
                    _check_retry(existing, request)
                    return result
                case Busy(conversation_id=conversation_id, expired=True) if attempt == 0:
                    await self._interrupt_expired(conversation_id)
                case Busy(conversation_id=conversation_id):
                    raise TurnInProgressError(
                        "another turn of this conversation is still streaming; retry when it ends",
                        metadata={"conversation": f"conversations/{conversation_id}"},
                    )
                case ConversationNotFound():
                    raise NotFoundError("conversation not found")
                case _:
                    assert_never(result)
        raise TurnInProgressError("the conversation is busy; retry when its turn ends")

    async def _unit_of_work_1(self, request: ChatInput) -> turn_store.StartResult:
        return await turn_store.start_turn(
            self._database,
            TurnRequest(
                owner=request.owner,
                conversation_id=request.conversation_id,
                request_id=request.request_id,
                user_text=request.text,
                model=self._model,
                lease=self._leases.lease,
            ),
        )

    async def _interrupt_expired(self, conversation_id: uuid.UUID) -> None:
        """Ends the conversation's turn whose producer died (the relay's sweeper would, later)."""
        await interrupt_expired(
            self._database,
            self._redis,
            self._producer.publisher,
            live_ttl_s=self._live_ttl_s,
            limit=10,
            conversation_id=conversation_id,
        )

    def _end_when_started(self, unit: asyncio.Task[turn_store.StartResult], reason: str) -> None:
        """Once unit of work 1 commits for a call that is already gone, ends its turn CANCELLED."""

        def ended(task: asyncio.Task[turn_store.StartResult]) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            result = task.result()
            if isinstance(result, Started):
                production = self._producer.start(result.turn, asyncio.get_running_loop().time())
                production.cancel(reason)

        unit.add_done_callback(ended)

    async def _replay(self, turn: Turn, emit: Emit) -> None:
        """Sends a stored turn again instead of calling the model a second time."""
        for item in replay_events(turn, after_seq=0, after_offset=0):
            await emit(item)

    # 3. Relay ---------------------------------------------------------------------------

    async def _relay(
        self,
        production: Production,
        emit: Emit,
        deadline: float | None,
        began: float,
        continue_on_disconnect: bool,
    ) -> None:
        """Writes the produced events to the caller; decides what the caller leaving means."""
        loop = asyncio.get_running_loop()
        first_delta = True
        try:
            async with asyncio.timeout_at(deadline):
                async for item in production.outbox.items():
                    await emit(item)
                    if isinstance(item.event, TurnStarted):
                        self._metrics.time_to_turn_started.observe(loop.time() - began)
                    elif isinstance(item.event, TextDelta) and first_delta:
                        first_delta = False
                        self._metrics.time_to_first_token.labels("written").observe(loop.time() - began)
        except TimeoutError:
            if not continue_on_disconnect:
                await _stop(production, "DEADLINE_EXCEEDED")
            raise DeadlineExceededError("the call's deadline passed while the reply streamed") from None
        except (asyncio.CancelledError, ClientGoneError):
            if not continue_on_disconnect:
                await _stop(production, "CANCELLED")
            raise


async def _stop(production: Production, reason: str) -> None:
    """Cancels the production and waits until its turn is recorded, even if this call is cancelled."""
    production.cancel(reason)
    if production.task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(production.task)


def _check_retry(existing: Turn, request: ChatInput) -> None:
    """A repeated request_id attaches to, or replays, only the same message."""
    same_conversation = request.conversation_id in (None, existing.conversation_id)
    if existing.user_text != request.text or not same_conversation:
        raise IdempotencyKeyReusedError(
            "request_id was already used for a different message",
            field_violations=[("request_id", "already used for a different message")],
            metadata={"field": "request_id"},
        )
