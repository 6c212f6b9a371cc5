"""I4 isolation: another owner's conversation is indistinguishable from one that does not exist."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError

from server.app import ChatServer
from server.config import AuthMode
from server.constants import context_key, turns_stream
from tests.conftest import Consume, StartServer
from tests.credentials import HS256_SECRET, api_key, bearer, jwt_token
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.probes import assert_clean_error


@dataclass
class Owners:
    """Two real owners on one server: A (an API key) and B (a JWT subject)."""

    server: ChatServer
    a: AsyncChatClient
    b: AsyncChatClient
    trusted_key: str
    """A key allowed to act for users."""


@pytest.fixture
async def owners(start_server: StartServer) -> AsyncIterator[Owners]:
    key_a, entry_a = api_key("tenant-a")
    trusted_key, trusted = api_key("frontend", act_for_users=True)
    server = await start_server(
        auth_mode=AuthMode.REQUIRED, api_keys=(entry_a, trusted), jwt_hs256_secret=HS256_SECRET
    )
    timeout = timedelta(seconds=10)
    async with (
        AsyncChatClient(server.address, metadata=bearer(key_a), timeout=timeout) as a,
        AsyncChatClient(server.address, metadata=bearer(jwt_token("tenant-b")), timeout=timeout) as b,
    ):
        yield Owners(server=server, a=a, b=b, trusted_key=trusted_key)


def _id(name: str) -> str:
    return name.rsplit("/", 1)[1]


def _calls(client: AsyncChatClient, name: str) -> dict[str, Callable[[], Awaitable[object]]]:
    """Every RPC that names one conversation."""
    return {
        "GetConversation": lambda: client.get_conversation(name),
        "ListMessages": lambda: client.list_messages_page(name),
        "Chat": lambda: client.chat_reply("let me in", conversation=name),
        "DeleteConversation": lambda: client.delete_conversation(name),
    }


async def _failure(call: Callable[[], Awaitable[object]]) -> ChatClientError:
    with pytest.raises(ChatClientError) as caught:
        await call()
    return caught.value


async def test_another_owners_conversation_looks_exactly_like_a_missing_one(
    owners: Owners, fake: FakeAnthropic, consume: Consume, db: asyncpg.Connection
) -> None:
    secret_reply = "A's private reply"
    fake.script(Stream([secret_reply]))
    reply = await owners.a.chat_reply("A's private question")
    await consume()
    a_name = reply.conversation
    missing_name = f"conversations/{uuid.uuid4()}"
    turns_before = await db.fetchval("SELECT count(*) FROM chat.turns")

    for rpc, call in _calls(owners.b, a_name).items():
        foreign = await _failure(call)
        missing = await _failure(_calls(owners.b, missing_name)[rpc])
        assert foreign.code == grpc.StatusCode.NOT_FOUND, rpc
        # Same code, message, reason, metadata and details: nothing tells them apart.
        assert (foreign.code, foreign.message, foreign.reason, foreign.domain, foreign.metadata) == (
            missing.code,
            missing.message,
            missing.reason,
            missing.domain,
            missing.metadata,
        ), rpc
        assert (foreign.field_violations, foreign.retry_delay) == (
            missing.field_violations,
            missing.retry_delay,
        )
        assert foreign.reason == "CONVERSATION_NOT_FOUND"
        assert_clean_error(foreign, forbidden=[_id(a_name), "tenant-a", secret_reply])
        assert_clean_error(missing, forbidden=[_id(missing_name)])

    # B's attempts changed nothing: A's conversation, turns and messages are intact.
    assert len(fake.requests) == 1
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == turns_before
    assert (await owners.a.get_conversation(a_name)).name == a_name
    page = await owners.a.list_messages_page(a_name)
    assert [m.text for m in page.messages] == ["A's private question", secret_reply]
    assert [c async for c in owners.b.list_conversations()] == []


async def test_lists_and_page_tokens_are_scoped_to_the_owner(owners: Owners) -> None:
    for _ in range(3):
        await owners.a.create_conversation()
    await owners.b.create_conversation()
    first = await owners.a.list_conversations_page(page_size=2)
    assert len(first.conversations) == 2
    assert len([c async for c in owners.b.list_conversations()]) == 1
    # A's page token is bound to A: in B's hands it is just an invalid token.
    with pytest.raises(ChatClientError) as caught:
        await owners.b.list_conversations_page(page_size=2, page_token=first.next_page_token)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert_clean_error(caught.value, forbidden=["tenant-a"])


async def test_the_same_request_id_never_replays_another_owners_turn(
    owners: Owners, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    fake.script(Stream(["for A only"]), Stream(["for B"]))
    a_reply = await owners.a.chat_reply("same words", request_id="shared-id")
    b_reply = await owners.b.chat_reply("same words", request_id="shared-id")
    assert (a_reply.replay, b_reply.replay) == (False, False)
    assert b_reply.text == "for B"
    assert b_reply.conversation != a_reply.conversation
    rows = await db.fetch("SELECT owner FROM chat.turns ORDER BY owner")
    assert [r["owner"] for r in rows] == ["tenant-a", "tenant-b"]


async def test_users_of_one_service_are_isolated_from_each_other_and_from_the_service(
    owners: Owners, db: asyncpg.Connection
) -> None:
    address = owners.server.address
    async with (
        AsyncChatClient(address, metadata=bearer(owners.trusted_key, user="alice")) as alice,
        AsyncChatClient(address, metadata=bearer(owners.trusted_key, user="bob")) as bob,
        AsyncChatClient(address, metadata=bearer(owners.trusted_key)) as service,
        AsyncChatClient(address, metadata=bearer(owners.trusted_key, user="frontend")) as impostor,
    ):
        alices = await alice.chat_reply("alice's note")
        services = await service.create_conversation()
        for other in (bob, service, owners.a):
            with pytest.raises(ChatClientError) as caught:
                await other.get_conversation(alices.conversation)
            assert caught.value.reason == "CONVERSATION_NOT_FOUND"
        # Acting for a user named like the service never reaches the service's own data.
        err = await _failure(lambda: impostor.get_conversation(services.name))
        assert err.code == grpc.StatusCode.NOT_FOUND
    owners_in_db = await db.fetch("SELECT owner FROM chat.conversations ORDER BY owner")
    assert [r["owner"] for r in owners_in_db] == ["frontend", "user:alice"]


async def test_relay_entries_and_context_cache_carry_the_owner_and_a_foreign_cache_entry_is_ignored(
    owners: Owners, fake: FakeAnthropic, redis: aioredis.Redis
) -> None:
    first = await owners.a.chat_reply("first")
    conversation_id = _id(first.conversation)

    entries = [e for k in range(4) for e in await redis.xrange(turns_stream(k)) or []]
    assert len(entries) == 1
    payload = b" ".join(v for v in (entries[0][1] or {}).values() if isinstance(v, bytes))
    assert b"tenant-a" in payload
    raw = await redis.get(context_key(conversation_id))
    assert isinstance(raw, bytes)
    cached = json.loads(raw)
    assert cached["owner"] == "tenant-a"

    # A cache entry written for another owner (a stale entry of a deleted and re-created
    # id, or any bug) must never reach this owner's prompt.
    cached["owner"] = "tenant-b"
    cached["x"] = [[1, "B's secret question", "B's secret answer"]]
    await redis.set(context_key(conversation_id), json.dumps(cached))
    await owners.a.chat_reply("second", conversation=first.conversation)
    prompt = json.dumps(fake.requests[-1].body)
    assert "B's secret" not in prompt
    assert "first" in prompt


async def test_another_owners_turn_cannot_be_watched_cancelled_or_followed(
    owners: Owners, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    fake.script(Stream(["A's private reply"]))
    reply = await owners.a.chat_reply("A's private question")
    missing_turn = f"conversations/{uuid.uuid4()}/turns/{uuid.uuid4()}"
    missing_conversation = f"conversations/{uuid.uuid4()}"

    async def watch(name: str) -> None:
        async for _ in owners.b.watch_turn(name):
            pass

    async def follow(name: str) -> None:
        async for _ in owners.b.watch_conversation(name, timeout=timedelta(seconds=5)):
            pass

    pairs = {
        "WatchTurn": (lambda: watch(reply.turn), lambda: watch(missing_turn)),
        "CancelTurn": (lambda: owners.b.cancel_turn(reply.turn), lambda: owners.b.cancel_turn(missing_turn)),
        "WatchConversation": (lambda: follow(reply.conversation), lambda: follow(missing_conversation)),
    }
    for rpc, (foreign_call, missing_call) in pairs.items():
        foreign = await _failure(foreign_call)
        missing = await _failure(missing_call)
        assert foreign.code == grpc.StatusCode.NOT_FOUND, rpc
        assert (foreign.code, foreign.message, foreign.reason, foreign.domain, foreign.metadata) == (
            missing.code,
            missing.message,
            missing.reason,
            missing.domain,
            missing.metadata,
        ), rpc
        assert_clean_error(foreign, forbidden=[_id(reply.turn), _id(reply.conversation), "tenant-a"])
    # B's cancel changed nothing.
    assert await db.fetchval("SELECT status FROM chat.turns") == "COMPLETED"
