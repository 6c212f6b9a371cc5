"""One Chat turn: unit of work 1 -> stream the model -> unit of work 2 -> publish.

No database session is open while the model streams or while events are written to
the client: each unit of work is a short ``async with sessionmaker.begin()`` block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import redis.exceptions
from sqlalchemy.ext.asyncio import AsyncSession

from server.config import Settings
from server.context import ContextStore
from server.db import repository
from server.db.engine import SessionMaker
from server.domain import Exchange, TextDelta, Turn, TurnCompleted, TurnEvent, TurnStarted, TurnStatus
from server.errors import IdempotencyKeyReusedError, NotFoundError, TurnInProgressError, classify
from server.llm import LlmClient, ReplyOutcome
from server.publisher import TurnPublisher

logger = logging.getLogger(__name__)

Emit = Callable[[TurnEvent], Awaitable[None]]


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
    """Runs turns; one instance per server, shared by all calls."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessionmaker: SessionMaker,
        llm: LlmClient,
        context: ContextStore,
        publisher: TurnPublisher,
    ) -> None:
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._llm = llm
        self._context = context
        self._publisher = publisher
        self._finishing: set[asyncio.Task[Turn]] = set()

    async def run(self, request: ChatInput, emit: Emit) -> None:
        """Runs one turn, sending its events through ``emit``.

        Raises ChatError for failures the caller should see; a failure after
        ``TurnStarted`` still stores the turn in a terminal status first. A
        cancellation (client gone, deadline) stores the turn as CANCELLED and re-raises.
        """
        try:
            turn = await self._start(request)
        except _ReplayStoredTurnError as replay:
            await self._replay(replay.turn, emit)
            return
        await emit(TurnStarted(conversation_id=turn.conversation_id, turn_id=turn.id))

        outcome = ReplyOutcome(model=self._llm.model)
        parts: list[str] = []
        history: list[Exchange] = []
        try:
            history = await self._context.load(turn.conversation_id, owner=turn.owner, before_seq=turn.seq)
            chunks = self._llm.stream_reply(history=history, text=turn.user_text, outcome=outcome)
            # aclosing: a cancellation here must close the upstream HTTP stream now,
            # not whenever the generator is garbage-collected.
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    parts.append(chunk)
                    await emit(TextDelta(text=chunk))
        except asyncio.CancelledError:
            # The client went away or its deadline passed: record what was produced.
            await self._finish_shielded(
                turn, history, "".join(parts), TurnStatus.CANCELLED, outcome, "CANCELLED"
            )
            raise
        except Exception as exc:
            err = classify(exc)
            await self._finish_shielded(turn, history, "".join(parts), TurnStatus.FAILED, outcome, err.reason)
            raise err from exc

        stored = await self._finish(turn, history, "".join(parts), TurnStatus.COMPLETED, outcome, None)
        await emit(
            TurnCompleted(
                status=stored.status,
                stop_reason=stored.stop_reason or "",
                usage=stored.usage,
                model=stored.model,
            )
        )

    async def _start(self, request: ChatInput) -> Turn:
        """Unit of work 1: get or create the conversation and insert the STREAMING turn.

        Committed before anything is sent, so the conversation and the user's message
        are durable and visible to other connections when TurnStarted arrives (I3).
        """
        async with self._sessionmaker.begin() as session:
            if request.request_id is not None:
                existing = await repository.find_turn_by_request_id(
                    session, owner=request.owner, request_id=request.request_id
                )
                if existing is not None:
                    raise _ReplayStoredTurnError(self._check_retry(existing, request))
            conversation_id = request.conversation_id
            if conversation_id is None:
                conversation_id = await self._create_conversation(session, request)
            turn = await repository.insert_turn(
                session,
                owner=request.owner,
                conversation_id=conversation_id,
                turn_id=uuid.uuid4(),
                request_id=request.request_id,
                user_text=request.text,
                model=self._llm.model,
                lease=timedelta(seconds=self._settings.turn_lease_s),
            )
            if turn is None:
                # Lost a race: a concurrent call with the same request_id committed
                # first (retry semantics apply), or another turn is streaming.
                if request.request_id is not None:
                    existing = await repository.find_turn_by_request_id(
                        session, owner=request.owner, request_id=request.request_id
                    )
                    if existing is not None:
                        raise _ReplayStoredTurnError(self._check_retry(existing, request))
                raise TurnInProgressError(
                    "another turn of this conversation is still streaming; retry when it ends",
                    metadata={"conversation": f"conversations/{conversation_id}"},
                )
        return turn

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
    ) -> None:
        """``_finish`` in a task of its own that a cancellation of the call cannot stop.

        The task is tracked so that shutdown waits for it before closing the pools it uses.
        """
        task = asyncio.create_task(self._finish(turn, history, text, status, outcome, error_reason))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        await asyncio.shield(task)

    async def drain(self) -> None:
        """Waits for outcomes still being recorded for cancelled or failed calls."""
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    async def _finish(
        self,
        turn: Turn,
        history: list[Exchange],
        text: str,
        status: TurnStatus,
        outcome: ReplyOutcome,
        error_reason: str | None,
    ) -> Turn:
        """Unit of work 2, then publish: store the outcome, relay it, refresh the context cache."""
        async with self._sessionmaker.begin() as session:
            stored = await repository.update_turn_outcome(
                session,
                turn_id=turn.id,
                assistant_text=text,
                status=status,
                stop_reason=outcome.stop_reason,
                usage=outcome.usage,
                error_reason=error_reason,
            )
        if stored is None:
            # The conversation was deleted while the reply streamed: nothing to relay.
            return turn
        try:
            await self._publisher.publish(stored)
        except redis.exceptions.RedisError as exc:
            # The committed turn row is the outbox: the relay publishes it later.
            logger.warning(
                "publishing turn %s failed (%s); the relay will retry", stored.id, exc.__class__.__name__
            )
        await self._context.remember(
            stored.conversation_id,
            owner=stored.owner,
            through=stored.seq,
            exchanges=[
                *history,
                Exchange(seq=stored.seq, user_text=stored.user_text, assistant_text=stored.assistant_text),
            ],
        )
        return stored
