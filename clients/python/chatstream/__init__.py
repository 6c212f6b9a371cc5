"""Typed Python client for chatstream.v1.ChatService, blocking (`ChatClient`) and asyncio (`AsyncChatClient`).

Usage::

    from chatstream import AsyncChatClient, ChatClientError

    async with AsyncChatClient("localhost:50051", metadata=[("authorization", "Bearer <token>")]) as client:
        reply = await client.chat_reply("Hello! Who are you?")
        print(reply.text, reply.status, reply.usage.output_tokens)  # ... COMPLETED 42
        async for event in client.chat("Tell me more.", conversation=reply.conversation):
            if event.HasField("text_delta"):
                print(event.text_delta.text, end="", flush=True)
        try:
            await client.get_conversation("conversations/unknown")
        except ChatClientError as err:
            print(err.code.name, err.reason)  # NOT_FOUND CONVERSATION_NOT_FOUND

`ChatClient` has the same methods, blocking. Every failed call raises `ChatClientError`.
`Role` and `TurnStatus` are `IntEnum`s over the proto's numbers that print their names:
`reply.status`, `event.completed.status`, `message.role` and `message.turn_status` are members.
`chat()` and the watches yield `TurnEvent`s and `list_messages()` yields `Message`s: views that
read like the generated messages and hold them as `.proto`. The generated classes are in
`chatstream.v1.chat_service_pb2`.
"""

from chatstream._async_client import AsyncChatClient
from chatstream._common import ChatReply, RetryPolicy
from chatstream._enums import ListMessagesResponse, Message, Role, TurnCompleted, TurnEvent, TurnStatus
from chatstream._errors import ChatClientError
from chatstream._sync_client import ChatClient
from chatstream.v1.chat_service_pb2 import (
    Conversation,
    ListConversationsResponse,
    TextDelta,
    TurnStarted,
    Usage,
)

__all__ = [
    "AsyncChatClient",
    "ChatClient",
    "ChatClientError",
    "ChatReply",
    "Conversation",
    "ListConversationsResponse",
    "ListMessagesResponse",
    "Message",
    "RetryPolicy",
    "Role",
    "TextDelta",
    "TurnCompleted",
    "TurnEvent",
    "TurnStarted",
    "TurnStatus",
    "Usage",
]
