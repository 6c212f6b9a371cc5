"""ChatServicer: one method per RPC that validates, calls a use case and converts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final, TypeVar

import grpc
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc

from server import convert
from server.auth import Authenticator
from server.config import Settings
from server.conversations import ConversationService
from server.domain import Sequenced
from server.errors import InvalidArgumentError, abort_on_error
from server.turns import ChatInput, ClientGoneError, Emit, TurnRunner
from server.watch import ConversationHub, TurnWatcher

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")

_ON_DISCONNECT: Final = frozenset(pb.OnDisconnect.values())


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
    async def Chat(  # type: ignore[override]
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[pb.ChatRequest, pb.ChatResponse]
    ) -> None:
        """Streams one turn. A coroutine handler, not an async generator, so that a
        cancellation surfaces inside TurnRunner, where the partial turn is recorded."""
        async with abort_on_error(context):
            owner = self._auth.owner(context)
            chat = ChatInput(
                owner=owner,
                conversation_id=(
                    convert.parse_conversation_name(request.conversation, field="conversation")
                    if request.conversation
                    else None
                ),
                text=convert.parse_text(request.text, max_chars=self._settings.max_text_chars),
                request_id=convert.parse_request_id(request.request_id),
            )
            if request.on_disconnect not in _ON_DISCONNECT:
                raise InvalidArgumentError.for_field("on_disconnect", "is not an OnDisconnect value")
            if self._settings.log_user_content:
                # Off by default: users' messages stay out of the logs (docs/security.md).
                logger.debug("chat text from %s: %r", owner, chat.text)
            try:
                await self._turns.run(
                    chat,
                    self._emitter(context),
                    time_remaining_s=context.time_remaining(),
                    continue_on_disconnect=request.on_disconnect == pb.ON_DISCONNECT_CONTINUE,
                )
            except ClientGoneError as gone:
                # The turn is recorded; there is nobody left to send a status to.
                logger.info("client gone mid-turn (%s)", gone)

    async def WatchTurn(  # type: ignore[override]
        self,
        request: pb.WatchTurnRequest,
        context: grpc.aio.ServicerContext[pb.WatchTurnRequest, pb.ChatResponse],
    ) -> None:
        """Follows one turn from a resume point to its end, from the live log or PostgreSQL."""
        async with abort_on_error(context):
            owner = self._auth.owner(context)
            _, turn_id = convert.parse_turn_name(request.turn)
            after_seq = convert.parse_resume_point(request.after_seq, field="after_seq")
            after_offset = convert.parse_resume_point(request.after_offset, field="after_offset")
            with contextlib.suppress(ClientGoneError):
                await self._watcher.watch(
                    owner=owner,
                    turn_id=turn_id,
                    after_seq=after_seq,
                    after_offset=after_offset,
                    emit=self._emitter(context),
                )

    async def CancelTurn(
        self,
        request: pb.CancelTurnRequest,
        context: grpc.aio.ServicerContext[pb.CancelTurnRequest, pb.CancelTurnResponse],
    ) -> pb.CancelTurnResponse:
        """Ends a streaming turn CANCELLED from any replica; idempotent."""
        async with abort_on_error(context):
            owner = self._auth.owner(context)
            _, turn_id = convert.parse_turn_name(request.turn)
            ended = await self._watcher.cancel(owner=owner, turn_id=turn_id)
            return pb.CancelTurnResponse(status=convert.status_to_proto(ended.status))
        raise AssertionError("unreachable: abort_on_error aborts")

    async def WatchConversation(  # type: ignore[override]
        self,
        request: pb.WatchConversationRequest,
        context: grpc.aio.ServicerContext[pb.WatchConversationRequest, pb.ChatResponse],
    ) -> None:
        """Streams each new turn of a conversation as it happens, until the caller leaves."""
        async with abort_on_error(context):
            owner = self._auth.owner(context)
            conversation_id = convert.parse_conversation_name(request.conversation, field="conversation")
            with contextlib.suppress(ClientGoneError):
                await self._hub.watch(
                    owner=owner, conversation_id=conversation_id, emit=self._emitter(context)
                )

    def _emitter(self, context: grpc.aio.ServicerContext[RequestT, pb.ChatResponse]) -> Emit:
        """Writes numbered events to ``context``; raises ClientGoneError when the client is gone."""
        write_timeout_s = self._settings.write_timeout_s

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

    async def CreateConversation(
        self,
        request: pb.CreateConversationRequest,
        context: grpc.aio.ServicerContext[pb.CreateConversationRequest, pb.CreateConversationResponse],
    ) -> pb.CreateConversationResponse:
        """Creates a conversation, idempotently on request_id."""
        async with abort_on_error(context):
            owner = self._auth.owner(context)
            conversation_id = (
                convert.parse_conversation_id(request.conversation_id, field="conversation_id")
                if request.conversation_id
                else None
            )
            request_id = convert.parse_request_id(request.request_id)
            created = await self._conversations.create(
                owner=owner, conversation_id=conversation_id, request_id=request_id
            )
            return pb.CreateConversationResponse(conversation=convert.conversation_to_proto(created))
        raise AssertionError("unreachable: abort_on_error aborts")

    async def GetConversation(
        self,
        request: pb.GetConversationRequest,
        context: grpc.aio.ServicerContext[pb.GetConversationRequest, pb.GetConversationResponse],
    ) -> pb.GetConversationResponse:
        """Returns one of the caller's conversations."""
        async with abort_on_error(context):
            owner = self._auth.owner(context)
            conversation_id = convert.parse_conversation_name(request.name, field="name")
            found = await self._conversations.get(owner=owner, conversation_id=conversation_id)
            return pb.GetConversationResponse(conversation=convert.conversation_to_proto(found))
        raise AssertionError("unreachable: abort_on_error aborts")

    async def ListConversations(
        self,
        request: pb.ListConversationsRequest,
        context: grpc.aio.ServicerContext[pb.ListConversationsRequest, pb.ListConversationsResponse],
    ) -> pb.ListConversationsResponse:
        """A page of the caller's conversations."""
        async with abort_on_error(context):
            owner = self._auth.owner(context)
            page = await self._conversations.list(
                owner=owner, size=request.page_size, token=request.page_token
            )
            return pb.ListConversationsResponse(
                conversations=[convert.conversation_to_proto(c) for c in page.items],
                next_page_token=page.next_page_token,
            )
        raise AssertionError("unreachable: abort_on_error aborts")

    async def DeleteConversation(
        self,
        request: pb.DeleteConversationRequest,
        context: grpc.aio.ServicerContext[pb.DeleteConversationRequest, pb.DeleteConversationResponse],
    ) -> pb.DeleteConversationResponse:
        """Deletes one of the caller's conversations."""
        async with abort_on_error(context):
            owner = self._auth.owner(context)
            conversation_id = convert.parse_conversation_name(request.name, field="name")
            await self._conversations.delete(owner=owner, conversation_id=conversation_id)
            return pb.DeleteConversationResponse()
        raise AssertionError("unreachable: abort_on_error aborts")

    async def ListMessages(
        self,
        request: pb.ListMessagesRequest,
        context: grpc.aio.ServicerContext[pb.ListMessagesRequest, pb.ListMessagesResponse],
    ) -> pb.ListMessagesResponse:
        """A page of a conversation's persisted messages."""
        async with abort_on_error(context):
            owner = self._auth.owner(context)
            conversation_id = convert.parse_conversation_name(request.parent, field="parent")
            page = await self._conversations.list_messages(
                owner=owner, conversation_id=conversation_id, size=request.page_size, token=request.page_token
            )
            return pb.ListMessagesResponse(
                messages=[convert.message_to_proto(m) for m in page.items],
                next_page_token=page.next_page_token,
            )
        raise AssertionError("unreachable: abort_on_error aborts")
