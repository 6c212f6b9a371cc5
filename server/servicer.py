"""ChatServicer: one method per RPC that validates, calls a use case and converts."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc

from server import convert
from server.auth import Authenticator
from server.config import Settings
from server.conversations import ConversationService
from server.domain import TurnEvent
from server.grpc_errors import abort_on_error
from server.turns import ChatInput, TurnRunner

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

Context = grpc.aio.ServicerContext


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


class ChatServicer(pb_grpc.ChatServiceServicer):
    """The chatstream.v1.ChatService implementation. No SQL and no Redis here."""

    def __init__(
        self,
        *,
        settings: Settings,
        authenticator: Authenticator,
        turns: TurnRunner,
        conversations: ConversationService,
    ) -> None:
        self._settings = settings
        self._auth = authenticator
        self._turns = turns
        self._conversations = conversations

    # mypy-protobuf types streaming handlers as iterators only; grpc.aio also accepts a
    # coroutine that writes with context.write() (grpc/aio/_base_server.py
    # ServicerContext.write), which is what gives us cancellation in our own code.
    async def Chat(  # type: ignore[override]
        self, request: pb.ChatRequest, context: Context[pb.ChatRequest, pb.ChatResponse]
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
            if self._settings.log_user_content:
                # Off by default: users' messages stay out of the logs (docs/security.md).
                logger.debug("chat text from %s: %r", owner, chat.text)
            seq = 0

            async def emit(event: TurnEvent) -> None:
                nonlocal seq
                seq += 1
                await context.write(convert.event_to_proto(seq, event))

            await self._turns.run(chat, emit, time_remaining_s=context.time_remaining())

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
