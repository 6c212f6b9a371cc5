"""Conversation RPCs: create (idempotent), get, list with page tokens, delete."""

from __future__ import annotations

import uuid

import asyncpg
import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError

from tests.conftest import Consume


async def test_create_get_and_delete_a_conversation(client: AsyncChatClient, db: asyncpg.Connection) -> None:
    created = await client.create_conversation()
    assert created.name.startswith("conversations/")
    assert (created.turn_count, created.message_count) == (0, 0)

    fetched = await client.get_conversation(created.name)
    assert fetched == created

    await client.delete_conversation(created.name)
    with pytest.raises(ChatClientError) as caught:
        await client.get_conversation(created.name)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert await db.fetchval("SELECT count(*) FROM chat.conversations") == 0


async def test_create_is_idempotent_on_request_id(client: AsyncChatClient, db: asyncpg.Connection) -> None:
    first = await client.create_conversation(request_id="create-1")
    again = await client.create_conversation(request_id="create-1")
    assert first.name == again.name
    assert await db.fetchval("SELECT count(*) FROM chat.conversations") == 1


async def test_create_with_a_taken_id_returns_already_exists(client: AsyncChatClient) -> None:
    conversation_id = str(uuid.uuid4())
    created = await client.create_conversation(conversation_id=conversation_id)
    assert created.name == f"conversations/{conversation_id}"
    with pytest.raises(ChatClientError) as caught:
        await client.create_conversation(conversation_id=conversation_id)
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert caught.value.reason == "CONVERSATION_EXISTS"


async def test_chat_continues_a_created_conversation(client: AsyncChatClient, consume: Consume) -> None:
    created = await client.create_conversation()
    reply = await client.chat_reply("hello", conversation=created.name)
    assert reply.conversation == created.name
    await consume()
    fetched = await client.get_conversation(created.name)
    assert (fetched.turn_count, fetched.message_count) == (1, 2)


async def test_list_conversations_pages_newest_first(client: AsyncChatClient) -> None:
    names = [(await client.create_conversation()).name for _ in range(5)]
    first = await client.list_conversations_page(page_size=2)
    second = await client.list_conversations_page(page_size=2, page_token=first.next_page_token)
    third = await client.list_conversations_page(page_size=2, page_token=second.next_page_token)
    listed = [c.name for page in (first, second, third) for c in page.conversations]
    assert listed == list(reversed(names))
    assert third.next_page_token == ""
    assert [c.name async for c in client.list_conversations(page_size=2)] == listed


@pytest.mark.parametrize(
    ("page_size", "page_token", "field"),
    [(-1, "", "page_size"), (10, "garbage!", "page_token"), (10, "eyJjIjpbXSwiYiI6IngifQ", "page_token")],
)
async def test_list_rejects_bad_page_parameters(
    client: AsyncChatClient, page_size: int, page_token: str, field: str
) -> None:
    with pytest.raises(ChatClientError) as caught:
        await client.list_conversations_page(page_size=page_size, page_token=page_token)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in caught.value.field_violations] == [field]


async def test_a_page_token_is_bound_to_its_parent(client: AsyncChatClient, consume: Consume) -> None:
    a = await client.chat_reply("a")
    await client.chat_reply("a2", conversation=a.conversation)
    b = await client.chat_reply("b")
    await consume()
    page = await client.list_messages_page(a.conversation, page_size=1)
    assert page.next_page_token
    with pytest.raises(ChatClientError) as caught:
        await client.list_messages_page(b.conversation, page_size=1, page_token=page.next_page_token)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in caught.value.field_violations] == ["page_token"]


async def test_page_size_above_the_maximum_is_coerced(client: AsyncChatClient) -> None:
    await client.create_conversation()
    page = await client.list_conversations_page(page_size=100_000)
    assert len(page.conversations) == 1


@pytest.mark.parametrize(
    "name", ["", "conversations/", "conversations/123", "users/1", "conversations/" + "a" * 36]
)
async def test_get_with_a_malformed_name_is_invalid_argument(client: AsyncChatClient, name: str) -> None:
    with pytest.raises(ChatClientError) as caught:
        await client.get_conversation(name)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in caught.value.field_violations] == ["name"]


async def test_messages_of_a_missing_conversation_are_not_found(client: AsyncChatClient) -> None:
    with pytest.raises(ChatClientError) as caught:
        await client.list_messages_page(f"conversations/{uuid.uuid4()}")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "CONVERSATION_NOT_FOUND"


async def test_deleting_a_conversation_removes_its_turns_and_messages(
    client: AsyncChatClient, consume: Consume, db: asyncpg.Connection
) -> None:
    reply = await client.chat_reply("to be deleted")
    await consume()
    await client.delete_conversation(reply.conversation)
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 0
    assert await db.fetchval("SELECT count(*) FROM chat.messages") == 0
    with pytest.raises(ChatClientError) as caught:
        await client.delete_conversation(reply.conversation)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
