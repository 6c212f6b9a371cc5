"""ChatServicer: one method per RPC that validates, calls a use case and converts."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import grpc
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc

from server import convert
from server.auth import Authenticator
from server.config import Settings
from server.conversations import ConversationService
from server.domain import Sequenced
from server.errors import ClientGoneError, InvalidArgumentError
from server.grpc_errors import abort_on_error
from server.turns import ChatInput, Emit, TurnRunner
from server.watch import ConversationHub, TurnWatcher

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

Context = grpc.aio.ServicerContext

_ON_DISCONNECT: Final = frozenset(pb.OnDisconnect.values())


def _unary(
    body: Callable[[ChatServicer, RequestT, str], Awaitable[ResponseT]],
) -> Callable[[ChatServicer, RequestT, Context[RequestT, ResponseT]], Awaitable[ResponseT]]:
    """The one shape of every unary RPC: the caller's owner, then ``body``; any error aborts the call.

    ``body`` gets the owner the edge verified; a ChatError it raises becomes the rich
    status of ``server.grpc_errors``, anything else INTERNAL.
    """

    @functools.wraps(body)
    async def handler(
        self: ChatServicer, request: RequestT, context: Context[RequestT, ResponseT]
    ) -> ResponseT:
        async with abort_on_error(context):
            return await body(self, request, self._auth.owner(context))
        raise AssertionError("unreachable: abort_on_error aborts")

    return handler


def _streaming(
    body: Callable[[ChatServicer, RequestT, str, Emit, Context[RequestT, pb.ChatResponse]], Awaitable[None]],
) -> Callable[[ChatServicer, RequestT, Context[RequestT, pb.ChatResponse]], Awaitable[None]]:
    """The one shape of every streaming RPC: the owner and an ``emit`` of numbered events.

    A coroutine handler that writes with ``context.write()``, not an async generator, so
    that a cancellation surfaces in our own code, where the turn is recorded. A client
    that went away (ClientGoneError) ends the call quietly: there is nobody to send a
    status to, and the turn is already recorded.
    """

    @functools.wraps(body)
    async def handler(
        self: ChatServicer, request: RequestT, context: Context[RequestT, pb.ChatResponse]
    ) -> None:
        async with abort_on_error(context):
            try:
                await body(self, request, self._auth.owner(context), self._emitter(context), context)
            except ClientGoneError as gone:
                logger.info("client gone mid-stream (%s)", gone)

    return handler


class ChatServicer(pb_grpc.ChatServiceServicer):
    """The chatstream.v1.ChatService implementation. No SQL and no Redis here."""

    def __init__(
        self,
        *,
        settings: Settings,
        authenticator: Authenticator,
        turns: TurnRunner,
        watcher: TurnWatcher,
        hub: ConversationHub,
        conversations: ConversationService,
    ) -> None:
        self._settings = settings
        self._auth = authenticator
        self._turns = turns
        self._watcher = watcher
        self._hub = hub
        self._conversations = conversations

    # mypy-protobuf types streaming handlers as iterators only; grpc.aio also accepts a
    # coroutine that writes with context.write() (grpc/aio/_base_server.py
    # ServicerContext.write), which is what gives us cancellation in our own code.
    @_streaming
    async def Chat(  # type: ignore[override]
        self,
        request: pb.ChatRequest,
        owner: str,
        emit: Emit,
        context: Context[pb.ChatRequest, pb.ChatResponse],
    ) -> None:
        """Streams one turn, from unit of work 1 to its terminal event."""
        chat = ChatInput(
            owner=owner,
            conversation_id=(
                convert.parse_conversation_name(request.conversation, field="conversation")
                if request.conversation
                else None
            ),
            text=convert.parse_text(request.text, max_chars=self._settings.turns.max_text_chars),
            request_id=convert.parse_request_id(request.request_id),
        )
        if request.on_disconnect not in _ON_DISCONNECT:
            raise InvalidArgumentError.for_field("on_disconnect", "is not an OnDisconnect value")
        if self._settings.observability.log_user_content:
            # Off by default: users' messages stay out of the logs (docs/security.md).
            logger.debug("chat text from %s: %r", owner, chat.text)
        await self._turns.run(
            chat,
            emit,
            time_remaining_s=context.time_remaining(),
            continue_on_disconnect=request.on_disconnect == pb.ON_DISCONNECT_CONTINUE,
        )

    @_unary
    async def CreateConversation(
        self, request: pb.CreateConversationRequest, owner: str
    ) -> pb.CreateConversationResponse:
        """Creates a conversation, idempotently on request_id."""
        conversation_id = (
            convert.parse_conversation_id(request.conversation_id, field="conversation_id")
            if request.conversation_id
            else None
        )
        created = await self._conversations.create(
            owner=owner,
            conversation_id=conversation_id,
            request_id=convert.parse_request_id(request.request_id),
        )
        return pb.CreateConversationResponse(conversation=convert.conversation_to_proto(created))

    @_unary
    async def GetConversation(
        self, request: pb.GetConversationRequest, owner: str
    ) -> pb.GetConversationResponse:
        """Returns one of the caller's conversations."""
        conversation_id = convert.parse_conversation_name(request.name, field="name")
        found = await self._conversations.get(owner=owner, conversation_id=conversation_id)
        return pb.GetConversationResponse(conversation=convert.conversation_to_proto(found))

    @_unary
    async def ListConversations(
        self, request: pb.ListConversationsRequest, owner: str
    ) -> pb.ListConversationsResponse:
        """A page of the caller's conversations."""
        page = await self._conversations.list(owner=owner, size=request.page_size, token=request.page_token)
        return pb.ListConversationsResponse(
            conversations=[convert.conversation_to_proto(c) for c in page.items],
            next_page_token=page.next_page_token,
        )

    @_unary
    async def DeleteConversation(
        self, request: pb.DeleteConversationRequest, owner: str
    ) -> pb.DeleteConversationResponse:
        """Deletes one of the caller's conversations."""
        conversation_id = convert.parse_conversation_name(request.name, field="name")
        await self._conversations.delete(owner=owner, conversation_id=conversation_id)
        return pb.DeleteConversationResponse()

    @_unary
    async def ListMessages(self, request: pb.ListMessagesRequest, owner: str) -> pb.ListMessagesResponse:
        """A page of a conversation's persisted messages."""
        conversation_id = convert.parse_conversation_name(request.parent, field="parent")
        page = await self._conversations.list_messages(
            owner=owner, conversation_id=conversation_id, size=request.page_size, token=request.page_token
        )
        return pb.ListMessagesResponse(
            messages=[convert.message_to_proto(m) for m in page.items],
            next_page_token=page.next_page_token,
        )

    @_streaming
    async def WatchTurn(  # type: ignore[override]
        self,
        request: pb.WatchTurnRequest,
        owner: str,
        emit: Emit,
        context: Context[pb.WatchTurnRequest, pb.ChatResponse],
    ) -> None:
        """Follows one turn from a resume point to its end, from the live log or PostgreSQL."""
        _, turn_id = convert.parse_turn_name(request.turn)
        await self._watcher.watch(
            owner=owner,
            turn_id=turn_id,
            after_seq=convert.parse_resume_point(request.after_seq, field="after_seq"),
            after_offset=convert.parse_resume_point(request.after_offset, field="after_offset"),
            emit=emit,
        )

    @_unary
    async def CancelTurn(self, request: pb.CancelTurnRequest, owner: str) -> pb.CancelTurnResponse:
        """Ends a streaming turn CANCELLED from any replica; idempotent."""
        _, turn_id = convert.parse_turn_name(request.turn)
        ended = await self._watcher.cancel(owner=owner, turn_id=turn_id)
        return pb.CancelTurnResponse(status=convert.status_to_proto(ended.status))

    @_streaming
    async def WatchConversation(  # type: ignore[override]
        self,
        request: pb.WatchConversationRequest,
        owner: str,
        emit: Emit,
        context: Context[pb.WatchConversationRequest, pb.ChatResponse],
    ) -> None:
        """Streams each new turn of a conversation as it happens, until the caller leaves."""
        conversation_id = convert.parse_conversation_name(request.conversation, field="conversation")
        await self._hub.watch(owner=owner, conversation_id=conversation_id, emit=emit)

    def _emitter(self, context: Context[RequestT, pb.ChatResponse]) -> Emit:
        """Writes numbered events to ``context``; raises ClientGoneError when the client is gone."""
        write_timeout_s = self._settings.turns.write_timeout_s

        async def emit(item: Sequenced) -> None:
            try:
                # A client that stops reading (an HTTP/2 window of 0) must not hold its
                # turn, its conversation and a stream slot forever.
                async with asyncio.timeout(write_timeout_s):
                    await context.write(convert.event_to_proto(item))
            except TimeoutError:
                raise ClientGoneError(f"no write accepted for {write_timeout_s:g}s") from None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # grpc fails a write to a call whose peer is gone (reset, disconnect,
                # cancel) with its own exception types, not CancelledError.
                raise ClientGoneError(exc.__class__.__name__) from exc

        return emit
