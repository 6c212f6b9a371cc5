"""The Chat RPC end to end: events, durability before the first event, context, errors."""

from __future__ import annotations

import contextlib
import itertools
import uuid

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError, TurnEvent, TurnStatus

from server.constants import PERSISTENCE_GROUP, turns_stream
from tests.conftest import Consume, StartServer, eventually, stream_lengths
from tests.fake_anthropic import FakeAnthropic, Gate, Stream

# Also on a real Redis Cluster (tests/conftest.py, CHATSTREAM_TEST_REDIS).
pytestmark = pytest.mark.redis_cluster


def _id(name: str) -> uuid.UUID:
    return uuid.UUID(name.rsplit("/", 1)[1])


async def _collect(client: AsyncChatClient, text: str) -> list[TurnEvent]:
    return [event async for event in client.chat(text)]


async def test_full_turn_streams_events_and_persists_both_messages(
    client: AsyncChatClient,
    fake: FakeAnthropic,
    consume: Consume,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
) -> None:
    # Deltas 20 ms apart: an idle stream writes each one as it comes, none held back.
    fake.script(Stream(["Hel", "lo", " there"], input_tokens=9, output_tokens=3, delay_s=0.02))

    events = await _collect(client, "hi")

    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds == ["started", "text_delta", "text_delta", "text_delta", "completed"]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert "".join(e.text_delta.text for e in events[1:-1]) == "Hello there"
    completed = events[-1].completed
    assert completed.status == TurnStatus.TURN_STATUS_COMPLETED
    assert completed.stop_reason == "end_turn"
    assert (completed.usage.input_tokens, completed.usage.output_tokens) == (9, 3)
    assert completed.model == "claude-test"

    stats = await consume()

    conversation_id = _id(events[0].started.conversation)
    rows = await db.fetch(
        "SELECT role, text, turn_status FROM chat.messages"
        " WHERE conversation_id = $1 ORDER BY turn_seq, role",
        conversation_id,
    )
    assert [tuple(r) for r in rows] == [(1, "hi", "COMPLETED"), (2, "Hello there", "COMPLETED")]
    assert stats.messages_inserted == 2
    for shard in range(4):
        pending = await redis.xpending(turns_stream(shard), PERSISTENCE_GROUP)
        assert pending["pending"] == 0
    count = await db.fetchval("SELECT message_count FROM chat.conversations WHERE id = $1", conversation_id)
    assert count == 2
    persisted = await db.fetchval("SELECT persisted_at IS NOT NULL FROM chat.turns")
    assert persisted


async def test_conversation_and_turn_are_committed_before_the_first_delta(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """I3: durable before the first event; I6: no connection idles in a transaction meanwhile."""
    gate = Gate()
    fake.script(Stream(["Hel", "lo"], hold=gate))

    async with contextlib.aclosing(client.chat("remember me")) as events:
        first = await anext(events)
        assert first.WhichOneof("kind") == "started"
        # The fake has sent message_start and holds every token: no TextDelta can exist yet.
        await gate.wait_reached(timeout=5)

        conversation_id = _id(first.started.conversation)
        turn_id = _id(first.started.turn)
        conversation = await db.fetchrow(
            "SELECT owner, turn_count FROM chat.conversations WHERE id = $1", conversation_id
        )
        assert conversation is not None
        assert conversation["turn_count"] == 1
        turn = await db.fetchrow(
            "SELECT status, user_text, conversation_id FROM chat.turns WHERE id = $1", turn_id
        )
        assert turn is not None
        assert (turn["status"], turn["user_text"], turn["conversation_id"]) == (
            "STREAMING",
            "remember me",
            conversation_id,
        )
        idle_in_transaction = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
        )
        assert idle_in_transaction == 0

        gate.open()
        rest = [event async for event in events]
    assert rest[0].WhichOneof("kind") == "text_delta"
    assert rest[-1].completed.status == TurnStatus.TURN_STATUS_COMPLETED


async def test_no_transaction_is_open_while_a_reply_is_held_mid_stream(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """I6: mid-reply, after tokens flowed, nothing of ours sits idle in a transaction."""
    fake.script(Stream(["a", "b"], then="stall", delay_s=0.02))
    async with contextlib.aclosing(client.chat("hold it")) as events:
        received = [await anext(events) for _ in range(3)]
        assert [e.WhichOneof("kind") for e in received] == ["started", "text_delta", "text_delta"]
        states = await db.fetch(
            "SELECT state, application_name FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND datname = current_database()"
        )
        assert not [s for s in states if (s["state"] or "").startswith("idle in transaction")], states
    # Leaving the stream cancels the call: the upstream request is closed promptly and
    # the turn ends CANCELLED with what was produced.
    await fake.wait_for_disconnect(timeout=2)

    async def cancelled() -> bool:
        row = await db.fetchrow("SELECT status, assistant_text FROM chat.turns")
        return row is not None and (row["status"], row["assistant_text"]) == ("CANCELLED", "ab")

    await eventually(cancelled, what="the turn to be recorded as CANCELLED with its partial text")


async def test_second_turn_sends_first_turn_as_context_without_a_consumer(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    """I11: read-your-writes comes from the turn row, not from the consumer's messages."""
    fake.script(Stream(["first", " answer"]), Stream(["second answer"]), Stream(["third answer"]))

    first = await client.chat_reply("first question")
    await client.chat_reply("second question", conversation=first.conversation)
    # Drop the context cache: the fallback to PostgreSQL must give the same prompt.
    await redis.flushdb()
    await client.chat_reply("third question", conversation=first.conversation)

    assert await db.fetchval("SELECT count(*) FROM chat.messages") == 0  # no consumer ran
    bodies = [r.body or {} for r in fake.requests]
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    assert bodies[2]["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "third question"},
    ]
    assert bodies[0]["model"] == "claude-test"
    assert bodies[0]["stream"] is True


async def test_system_prompt_and_max_tokens_come_from_settings(
    start_server: StartServer, fake: FakeAnthropic
) -> None:
    server = await start_server(system_prompt="Be brief.", max_tokens=77, model="claude-other")
    async with AsyncChatClient(server.address) as chat_client:
        await chat_client.chat_reply("hello")
    body = fake.requests[0].body
    assert body is not None
    assert (body["system"], body["max_tokens"], body["model"]) == ("Be brief.", 77, "claude-other")


async def _assert_no_side_effects(db: asyncpg.Connection, redis: aioredis.Redis, fake: FakeAnthropic) -> None:
    assert fake.requests == []
    assert await db.fetchval("SELECT count(*) FROM chat.conversations") == 0
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 0
    assert await stream_lengths(redis) == [0, 0, 0, 0]


async def test_chat_unknown_conversation_returns_not_found_without_side_effects(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    with pytest.raises(ChatClientError) as caught:
        await client.chat_reply("hi", conversation=f"conversations/{uuid.uuid4()}")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "CONVERSATION_NOT_FOUND"
    assert caught.value.domain == "chatstream.v1.ChatService"
    await _assert_no_side_effects(db, redis, fake)


@pytest.mark.parametrize(
    ("text", "conversation", "request_id", "field"),
    [
        ("", "", "", "text"),
        ("   ", "", "", "text"),
        ("nul \x00 byte", "", "", "text"),
        ("x" * 32_769, "", "", "text"),
        ("hi", "conversations/not-a-uuid", "", "conversation"),
        ("hi", "threads/8b0c1c64-3f0e-4a1b-9b8e-0c8f5d7c2a11", "", "conversation"),
        ("hi", "", "bad id with spaces", "request_id"),
        ("hi", "", "x" * 129, "request_id"),
    ],
)
async def test_chat_invalid_request_returns_invalid_argument_without_side_effects(
    client: AsyncChatClient,
    fake: FakeAnthropic,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    text: str,
    conversation: str,
    request_id: str,
    field: str,
) -> None:
    with pytest.raises(ChatClientError) as caught:
        await client.chat_reply(text, conversation=conversation, request_id=request_id or None)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert [f for f, _ in caught.value.field_violations] == [field]
    await _assert_no_side_effects(db, redis, fake)


async def test_retry_with_same_request_id_replays_the_stored_turn(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    fake.script(Stream(["once", " only"]))
    first = await client.chat_reply("hi", request_id="req-1")
    again = await client.chat_reply("hi", request_id="req-1")

    assert len(fake.requests) == 1
    assert (again.replay, first.replay) == (True, False)
    assert (again.conversation, again.turn, again.text) == (first.conversation, first.turn, "once only")
    assert again.status == TurnStatus.TURN_STATUS_COMPLETED
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 1
    assert await db.fetchval("SELECT count(*) FROM chat.conversations") == 1


async def test_request_id_reused_for_another_message_is_rejected(
    client: AsyncChatClient, fake: FakeAnthropic
) -> None:
    await client.chat_reply("hi", request_id="req-2")
    with pytest.raises(ChatClientError) as caught:
        await client.chat_reply("something else", request_id="req-2")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(fake.requests) == 1


async def test_second_concurrent_turn_on_a_conversation_is_aborted(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    first = await client.chat_reply("one")
    gate = Gate()
    fake.script(Stream(["slow"], hold=gate))
    async with contextlib.aclosing(client.chat("two", conversation=first.conversation)) as events:
        await anext(events)
        await gate.wait_reached(timeout=5)
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply("three", conversation=first.conversation)
        assert caught.value.code == grpc.StatusCode.ABORTED
        assert caught.value.reason == "TURN_IN_PROGRESS"
        gate.open()
        assert [e.WhichOneof("kind") async for e in events][-1] == "completed"
    assert len(fake.requests) == 2
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 2
    # Unit of work 1 is one statement, all or nothing: the refused turn did not bump the counter.
    conversation_id = _id(first.conversation)
    assert await db.fetchval("SELECT turn_count FROM chat.conversations WHERE id = $1", conversation_id) == 2
    third = await client.chat_reply("three", conversation=first.conversation)
    assert (
        await db.fetchval("SELECT max(seq) FROM chat.turns WHERE conversation_id = $1", conversation_id) == 3
    )
    assert third.conversation == first.conversation


async def test_a_burst_of_deltas_is_coalesced_into_fewer_messages_with_the_same_text(
    client: AsyncChatClient, fake: FakeAnthropic
) -> None:
    """Deltas that arrive while a write is in flight are joined, never dropped or reordered."""
    words = [f"w{i} " for i in range(200)]
    fake.script(Stream(words))
    events = await _collect(client, "burst")
    deltas = [e.text_delta.text for e in events if e.HasField("text_delta")]
    assert "".join(deltas) == "".join(words)
    assert len(deltas) < len(words)
    # Numbers are assigned where the turn is produced; a joined delta carries the number
    # of its last part, so they increase and may skip (TurnEvent.seq in the proto).
    seqs = [e.seq for e in events]
    assert seqs[0] == 1
    assert all(a < b for a, b in itertools.pairwise(seqs))
    offsets = [e.text_delta.offset for e in events if e.HasField("text_delta")]
    assert offsets == [sum(len(d) for d in deltas[:i]) for i in range(len(deltas))]


async def test_turns_of_one_conversation_are_numbered_in_order_with_matching_counters(
    client: AsyncChatClient, db: asyncpg.Connection
) -> None:
    """Unit of work 1's single statement numbers turns and bumps turn_count together."""
    first = await client.chat_reply("one")
    for text in ("two", "three", "four"):
        await client.chat_reply(text, conversation=first.conversation)
    conversation_id = _id(first.conversation)
    rows = await db.fetch(
        "SELECT seq, user_text FROM chat.turns WHERE conversation_id = $1 ORDER BY seq", conversation_id
    )
    assert [(r["seq"], r["user_text"]) for r in rows] == [(1, "one"), (2, "two"), (3, "three"), (4, "four")]
    assert await db.fetchval("SELECT turn_count FROM chat.conversations WHERE id = $1", conversation_id) == 4


async def test_chat_with_the_request_id_of_a_created_conversation_joins_it_and_leaves_no_orphan(
    client: AsyncChatClient, db: asyncpg.Connection
) -> None:
    """The new-conversation statement rolls back whole when (owner, request_id) names a conversation.

    The turn is inserted before its conversation; with the conversation insert skipped,
    the foreign key fails at the end of the statement, nothing is written, and the
    general path puts the turn into the conversation that request_id created.
    """
    created = await client.create_conversation(request_id="shared-key")
    reply = await client.chat_reply("hello", request_id="shared-key")
    assert reply.conversation == created.name
    assert await db.fetchval("SELECT count(*) FROM chat.conversations") == 1
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 1
