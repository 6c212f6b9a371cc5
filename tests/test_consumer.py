"""The persistence consumer: idempotent writes, shards, ordering, counters, poison entries."""

from __future__ import annotations

import uuid
from typing import cast

import asyncpg
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, Role

from server.constants import DEAD_LETTER_STREAM, PERSISTENCE_GROUP, turns_stream
from server.turn_codec import decode_turn
from tests.conftest import Consume
from tests.fake_anthropic import FakeAnthropic, Stream

# Also on a real Redis Cluster (tests/conftest.py, CHATSTREAM_TEST_REDIS).
pytestmark = pytest.mark.redis_cluster

StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


async def _all_entries(redis: aioredis.Redis, shards: int = 4) -> dict[int, StreamEntries]:
    return {k: cast(StreamEntries, await redis.xrange(turns_stream(k))) for k in range(shards)}


async def test_consuming_twice_or_redelivering_an_entry_keeps_one_row_per_turn_and_role(
    client: AsyncChatClient, consume: Consume, db: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    """I2: unique (turn_id, role) plus ON CONFLICT DO NOTHING, not luck."""
    reply = await client.chat_reply("hi")
    await client.chat_reply("again", conversation=reply.conversation)
    published = await _all_entries(redis)
    assert sum(len(e) for e in published.values()) == 2

    await consume()
    await consume()
    # Re-add every entry, as a relay re-publish or a producer retry would.
    for stream_k, shard_entries in published.items():
        for _, fields in shard_entries:
            await redis.xadd(turns_stream(stream_k), fields)  # type: ignore[arg-type]
    stats = await consume()

    assert stats.entries == 2
    assert stats.messages_inserted == 0
    rows = await db.fetch("SELECT turn_id, role, count(*) AS n FROM chat.messages GROUP BY turn_id, role")
    assert len(rows) == 4
    assert all(r["n"] == 1 for r in rows)
    assert await db.fetchval("SELECT message_count FROM chat.conversations") == 4


async def test_duplicate_message_rows_are_impossible_at_the_schema_level(
    client: AsyncChatClient, consume: Consume, db: asyncpg.Connection
) -> None:
    await client.chat_reply("hi")
    await consume()
    row = await db.fetchrow("SELECT * FROM chat.messages LIMIT 1")
    assert row is not None
    with pytest.raises(asyncpg.UniqueViolationError) as caught:
        await db.execute(
            "INSERT INTO chat.messages"
            " (id, conversation_id, turn_id, turn_seq, role, text, turn_status, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            uuid.uuid4(),
            row["conversation_id"],
            row["turn_id"],
            row["turn_seq"],
            row["role"],
            "dup",
            row["turn_status"],
            row["created_at"],
        )
    assert caught.value.constraint_name == "uq_messages_turn_role"


async def test_turns_of_a_conversation_are_listed_in_order_across_pages(
    client: AsyncChatClient, fake: FakeAnthropic, consume: Consume
) -> None:
    """I12: 20 turns (40 messages) come back in order, 7 per page."""
    fake.script(*[Stream([f"answer {i}"]) for i in range(20)])
    conversation = ""
    for i in range(20):
        reply = await client.chat_reply(f"question {i}", conversation=conversation)
        conversation = reply.conversation
    await consume()

    pages = []
    token = ""
    while True:
        page = await client.list_messages_page(conversation, page_size=7, page_token=token)
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    assert [len(p.messages) for p in pages] == [7, 7, 7, 7, 7, 5]
    assert pages[-1].next_page_token == ""
    texts = [m.text for p in pages for m in p.messages]
    expected = [t for i in range(20) for t in (f"question {i}", f"answer {i}")]
    assert texts == expected
    roles = [m.role for p in pages for m in p.messages]
    assert roles == [Role.ROLE_USER, Role.ROLE_ASSISTANT] * 20
    # The SDK's iterator walks the same pages.
    assert [m.text async for m in client.list_messages(conversation, page_size=7)] == expected


async def test_conversations_spread_over_all_shards_and_each_stays_on_one(
    client: AsyncChatClient, redis: aioredis.Redis, consume: Consume, db: asyncpg.Connection
) -> None:
    conversations = []
    for i in range(50):
        reply = await client.chat_reply(f"hello {i}")
        conversations.append(reply.conversation)
    for i, conversation in enumerate(conversations):
        await client.chat_reply(f"again {i}", conversation=conversation)

    shards_of: dict[str, set[int]] = {}
    for shard, entries in (await _all_entries(redis)).items():
        for _, fields in entries:
            turn = decode_turn(fields)
            shards_of.setdefault(str(turn.conversation_id), set()).add(shard)
    assert len(shards_of) == 50
    assert all(len(s) == 1 for s in shards_of.values())
    used = {next(iter(s)) for s in shards_of.values()}
    assert used == {0, 1, 2, 3}

    await consume()
    assert await db.fetchval("SELECT count(*) FROM chat.messages") == 200


async def test_entries_published_before_any_consumer_existed_are_persisted(
    client: AsyncChatClient, redis: aioredis.Redis, consume: Consume, db: asyncpg.Connection
) -> None:
    """The original incident: turns were published while no group existed."""
    await client.chat_reply("early")
    groups = [
        await redis.xinfo_groups(turns_stream(k)) for k in range(4) if await redis.exists(turns_stream(k))
    ]
    assert all(g == [] for g in groups)  # nobody created the group yet
    await consume()
    assert await db.fetchval("SELECT count(*) FROM chat.messages") == 2


async def test_undecodable_entry_goes_to_the_dead_letter_stream_not_silently_acked(
    client: AsyncChatClient, redis: aioredis.Redis, consume: Consume, db: asyncpg.Connection
) -> None:
    await client.chat_reply("good")
    await redis.xadd(turns_stream(0), {"v": "1", "turn": "{not json"})
    await redis.xadd(turns_stream(1), {"v": "1", "turn": ""})

    stats = await consume()

    assert stats.dead_lettered == 2
    dead = cast(StreamEntries, await redis.xrange(DEAD_LETTER_STREAM))
    assert sorted(fields[b"dlq_source"] for _, fields in dead) == [b"chat:turns:{0}", b"chat:turns:{1}"]
    assert all(fields[b"dlq_error"] for _, fields in dead)
    for shard in range(4):
        assert (await redis.xpending(turns_stream(shard), PERSISTENCE_GROUP))["pending"] == 0
    assert await db.fetchval("SELECT count(*) FROM chat.messages") == 2


async def test_a_deeply_nested_payload_is_dead_lettered_and_the_consumer_carries_on(
    client: AsyncChatClient, redis: aioredis.Redis, consume: Consume, db: asyncpg.Connection
) -> None:
    """Valid JSON too deep for the parser: poison, not a crash that would come back at every restart."""
    fields = dict(_V1_ENTRY)
    fields[b"turn"] = fields[b"turn"].replace(b'"r-1"', b"[" * 5000 + b"]" * 5000)
    await redis.xadd(turns_stream(2), fields)  # type: ignore[arg-type]
    await client.chat_reply("good")

    stats = await consume()

    assert stats.dead_lettered == 1
    dead = cast(StreamEntries, await redis.xrange(DEAD_LETTER_STREAM))
    assert [f[b"turn"] for _, f in dead] == [fields[b"turn"]]
    assert b"RecursionError" in dead[0][1][b"dlq_error"]
    assert await db.fetchval("SELECT count(*) FROM chat.messages") == 2


async def test_consumer_trims_only_what_it_has_persisted(
    client: AsyncChatClient, redis: aioredis.Redis, consume: Consume
) -> None:
    for i in range(5):
        await client.chat_reply(f"m{i}")
    await consume()
    lengths = [await redis.xlen(turns_stream(k)) for k in range(4)]
    assert sum(lengths) <= 4  # at most the last delivered entry per shard survives the trim
    await client.chat_reply("after trim")
    assert sum([await redis.xlen(turns_stream(k)) for k in range(4)]) == sum(lengths) + 1


# A stream entry exactly as the first release wrote it (format 1), and the message ids that
# release gave its messages: a turn published before an upgrade and consumed after it.
_V1_ENTRY = {
    b"v": b"1",
    b"turn": (
        b'{"id":"5f0c4a2e-8b7d-4c1e-9a3f-2d6b8e1f0a47","conversation_id":"9d4e3b2a-1c0f-4e8d-b7a6-5f4e3d2c1b0a",'
        b'"owner":"anonymous","seq":1,"request_id":"r-1","user_text":"h\xc3\xa9llo",'
        b'"assistant_text":"Hello from the fake model.","status":"COMPLETED","stop_reason":"end_turn",'
        b'"input_tokens":3,"output_tokens":6,"model":"claude-test",'
        b'"created_at":"2026-12-01T05:00:00.123456+00:00","completed_at":"2026-12-01T05:00:01+00:00"}'
    ),
}
_V1_MESSAGE_IDS = {
    1: uuid.UUID("43ae5bab-713f-5cf4-806e-b3a04d6725c6"),
    2: uuid.UUID("da370371-3ba6-53e7-81c7-91d4f5f73b3d"),
}


async def test_an_entry_of_the_first_release_is_persisted_with_the_ids_that_release_gave(
    redis: aioredis.Redis, consume: Consume, db: asyncpg.Connection
) -> None:
    conversation = uuid.UUID("9d4e3b2a-1c0f-4e8d-b7a6-5f4e3d2c1b0a")
    turn = uuid.UUID("5f0c4a2e-8b7d-4c1e-9a3f-2d6b8e1f0a47")
    await db.execute(
        "INSERT INTO chat.conversations (id, owner, turn_count) VALUES ($1, 'anonymous', 1)", conversation
    )
    await db.execute(
        "INSERT INTO chat.turns (id, conversation_id, owner, seq, user_text, assistant_text, status, model)"
        " VALUES ($1, $2, 'anonymous', 1, 'héllo', 'Hello from the fake model.', 'COMPLETED', 'claude-test')",
        turn,
        conversation,
    )
    await redis.xadd(turns_stream(0), _V1_ENTRY)  # type: ignore[arg-type]
    # Delivered twice, as around a deploy: the second delivery writes nothing.
    await redis.xadd(turns_stream(1), _V1_ENTRY)  # type: ignore[arg-type]

    stats = await consume()

    assert (stats.entries, stats.messages_inserted, stats.dead_lettered) == (2, 2, 0)
    rows = await db.fetch("SELECT id, role, text, turn_seq, turn_status, created_at FROM chat.messages")
    assert {r["role"]: r["id"] for r in rows} == _V1_MESSAGE_IDS
    assert {r["role"]: r["text"] for r in rows} == {1: "héllo", 2: "Hello from the fake model."}
    assert {(r["turn_seq"], r["turn_status"]) for r in rows} == {(1, "COMPLETED")}
    assert {r["created_at"].isoformat() for r in rows} == {"2026-12-01T05:00:00.123456+00:00"}
    assert await db.fetchval("SELECT persisted_at IS NOT NULL FROM chat.turns") is True
    assert await db.fetchval("SELECT message_count FROM chat.conversations") == 2
