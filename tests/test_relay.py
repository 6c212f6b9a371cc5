"""The outbox relay, leases, claiming abandoned entries, dead letters and eviction-policy checks."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError, RetryPolicy, TurnStatus

from server.app import ChatServer
from server.config import Settings
from server.constants import DEAD_LETTER_STREAM, PERSISTENCE_GROUP, turns_stream
from server.consumer.process import ConsumerProcess
from server.consumer.relay import Relay
from server.consumer.worker import PersistenceWorker
from server.db.engine import Database
from server.live import live_key
from server.publisher import TurnPublisher, shard_for
from server.redis_client import RedisEvictionPolicyError, create_redis
from server.turn_codec import encode_turn
from tests.conftest import Consume, StartServer, eventually, stream_entries, stream_lengths
from tests.fake_anthropic import FakeAnthropic, Gate, Stream
from tests.processes import free_port, serve_process, settings_env

# Also on a real Redis Cluster (tests/conftest.py, CHATSTREAM_TEST_REDIS).
pytestmark = pytest.mark.redis_cluster


@contextlib.asynccontextmanager
async def _relay(settings: Settings, *, grace_s: float = 0.0) -> AsyncIterator[Relay]:
    database = Database.from_settings(settings.database)
    redis_client = await create_redis(settings.redis)
    try:
        yield Relay(
            database=database,
            redis=redis_client,
            live_ttl_s=settings.turns.live_ttl_s,
            publisher=TurnPublisher(redis_client, shards=settings.redis.shards),
            interval=timedelta(seconds=1),
            grace=timedelta(seconds=grace_s),
        )
    finally:
        await redis_client.aclose()
        await database.dispose()


async def _message_count(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM chat.messages")
    return count


async def test_redis_down_at_publish_time_does_not_fail_the_chat_and_the_relay_delivers_later(
    start_server: StartServer, settings: Settings, db: asyncpg.Connection, consume: Consume
) -> None:
    # A Redis nobody listens on: context cache and publish both fail.
    server = await start_server(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with AsyncChatClient(server.address) as client:
        first = await client.chat_reply("while redis is down")
        second = await client.chat_reply("and again", conversation=first.conversation)
    assert first.status == second.status == TurnStatus.TURN_STATUS_COMPLETED

    await consume()
    assert await _message_count(db) == 0  # nothing reached the streams
    async with _relay(settings, grace_s=0.3) as relay:
        published = 0

        async def relayed_both() -> bool:
            nonlocal published
            published += await relay.run_once()
            return published == 2

        await eventually(relayed_both, what="the relay to re-publish both turns once their grace passed")
        assert await relay.run_once() == 0  # re-published turns wait a backoff period
    await consume()
    assert await _message_count(db) == 4
    assert await db.fetchval("SELECT count(*) FROM chat.turns WHERE persisted_at IS NULL") == 0


async def test_streams_lost_in_a_redis_restart_are_recreated_and_refilled_by_the_relay(
    client: AsyncChatClient,
    settings: Settings,
    redis: aioredis.Redis,
    db: asyncpg.Connection,
    consume: Consume,
) -> None:
    await client.chat_reply("before")
    await consume()  # creates the group
    await client.chat_reply("lost")
    await redis.flushall()  # what a restart without persistence leaves behind

    stats = await consume()  # must recreate the group, not crash on NOGROUP
    assert stats.failures == 0
    assert await _message_count(db) == 2
    async with _relay(settings) as relay:
        assert await relay.run_once() == 1
    await consume()
    assert await _message_count(db) == 4


async def test_relay_grace_leaves_fresh_turns_to_the_normal_path(
    client: AsyncChatClient, settings: Settings
) -> None:
    await client.chat_reply("fresh")
    async with _relay(settings, grace_s=60) as relay:
        assert await relay.run_once() == 0


async def test_turn_of_a_killed_server_becomes_interrupted_and_the_conversation_moves_on(
    settings: Settings,
    fake: FakeAnthropic,
    db: asyncpg.Connection,
    consume: Consume,
    client: AsyncChatClient,
    redis: aioredis.Redis,
) -> None:
    """kill -9 the server mid-stream: its lease expires, the turn ends INTERRUPTED, the user
    message stays, and so does the partial reply its live log kept."""
    with serve_process(settings, CHATSTREAM_TURN_LEASE_S="1") as (process, address):
        fake.script(Stream(["half"], then="stall"))
        async with AsyncChatClient(address) as doomed:
            events = doomed.chat("are you there?")
            started = await anext(events)
            assert (await anext(events)).text_delta.text == "half"
            turn_id = uuid.UUID(started.started.turn.rsplit("/", 1)[1])

            async def logged() -> bool:
                return int(await redis.xlen(live_key(turn_id))) >= 2

            await eventually(logged, what="the delta to reach the live log")
            process.kill()
            with pytest.raises(ChatClientError) as caught:
                await anext(events)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            await events.aclose()
    conversation = started.started.conversation
    assert await db.fetchval("SELECT status FROM chat.turns") == "STREAMING"

    # Once the lease has expired, the next Chat takes the conversation over at once.
    async def expired() -> bool:
        return bool(await db.fetchval("SELECT lease_expires_at < now() FROM chat.turns"))

    await eventually(expired, timeout_s=5, what="the lease to expire")
    reply = await client.chat_reply("hello again", conversation=conversation)
    assert reply.status == TurnStatus.TURN_STATUS_COMPLETED

    rows = await db.fetch("SELECT seq, status, error_reason FROM chat.turns ORDER BY seq")
    assert [tuple(r) for r in rows] == [(1, "INTERRUPTED", "LEASE_EXPIRED"), (2, "COMPLETED", None)]
    await consume()
    messages = await db.fetch(
        "SELECT turn_seq, role, text, turn_status FROM chat.messages ORDER BY turn_seq, role"
    )
    assert [tuple(m) for m in messages][:2] == [
        (1, 1, "are you there?", "INTERRUPTED"),
        (1, 2, "half", "INTERRUPTED"),
    ]


async def test_relay_sweeps_expired_leases_even_if_nobody_chats_again(
    settings: Settings,
    start_server: StartServer,
    fake: FakeAnthropic,
    db: asyncpg.Connection,
    consume: Consume,
) -> None:
    server = await start_server(turn_lease_s=1)
    gate = Gate()
    fake.script(Stream(["x"], hold=gate))
    # No restart of the INTERRUPTED turn (the SDK's default would start it again as a new
    # turn): this test is about the sweeper's verdict on the first one.
    async with AsyncChatClient(server.address, retry_policy=RetryPolicy(max_restarts=0)) as chat_client:
        events = chat_client.chat("orphan")
        await anext(events)
        await gate.wait_reached(timeout=5)
        # Simulate a dead server: the lease is not renewed because the row says it ended long ago.
        await db.execute("UPDATE chat.turns SET lease_expires_at = now() - interval '1 second'")
        async with _relay(settings) as relay:
            await relay.run_once()
            assert relay.stats.interrupted == 1
        gate.open()
        rest = [event async for event in events]
    # The live server's late outcome never overwrites the sweeper's verdict, and its caller
    # learns that verdict as the last event of its stream.
    assert await db.fetchval("SELECT status FROM chat.turns") == "INTERRUPTED"
    assert rest[-1].completed.status == TurnStatus.TURN_STATUS_INTERRUPTED
    await consume()
    assert await _message_count(db) == 2


async def test_live_turns_keep_their_lease_renewed(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    server = await start_server(turn_lease_s=1)
    fake.script(Stream(["slow", " but", " alive"], delay_s=0.6))
    async with AsyncChatClient(server.address) as chat_client:
        reply = await chat_client.chat_reply("take your time")
    assert reply.status == TurnStatus.TURN_STATUS_COMPLETED  # 1.8 s of streaming on a 1 s lease
    assert await db.fetchval("SELECT status FROM chat.turns") == "COMPLETED"


async def test_entries_of_a_dead_consumer_are_claimed_and_persisted(
    client: AsyncChatClient, settings: Settings, redis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    for i in range(6):
        await client.chat_reply(f"m{i}")
    database = Database.from_settings(settings.database)
    redis_client = await create_redis(settings.redis)
    try:
        worker = PersistenceWorker.from_settings(
            settings.consumer, shards=settings.redis.shards, redis=redis_client, database=database
        )
        await worker.ensure_groups()
        # A consumer reads everything and dies before acknowledging.
        for k in range(settings.redis.shards):
            await redis.xreadgroup(PERSISTENCE_GROUP, "dead-consumer", {turns_stream(k): ">"}, count=100)
        await asyncio.sleep(0.05)
        rescuer = PersistenceWorker.from_settings(
            replace(settings.consumer, consumer_claim_idle_ms=10),
            shards=settings.redis.shards,
            redis=redis_client,
            database=database,
            consumer_name="rescuer",
        )
        await rescuer.run(burst=True)
    finally:
        await redis_client.aclose()
        await database.dispose()
    assert rescuer.stats.claimed == 6
    assert await _message_count(db) == 12
    for k in range(settings.redis.shards):
        assert (await redis.xpending(turns_stream(k), PERSISTENCE_GROUP))["pending"] == 0


async def test_an_entry_that_keeps_failing_is_dead_lettered_after_k_deliveries(
    client: AsyncChatClient, settings: Settings, redis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    """I7: the pending list drains, and only true poison reaches the dead-letter stream."""
    good = await client.chat_reply("good")
    bad = await client.chat_reply("bad")
    await redis.flushdb()
    turn_rows = {r["id"]: r for r in await db.fetch("SELECT * FROM chat.turns")}
    from server.db import turn_store

    # Re-publish both turns, the second with text PostgreSQL rejects (NUL): decodable,
    # but its insert fails every time, whatever the retry.
    database = Database.from_settings(settings.database)
    try:
        async with database.begin() as session:
            turns = {
                t.id: t
                for t in [
                    await turn_store.find_turn_by_request_id(
                        session, owner=r["owner"], request_id=r["request_id"]
                    )
                    for r in turn_rows.values()
                ]
                if t is not None
            }
    finally:
        await database.dispose()
    good_turn = next(t for t in turns.values() if t.user_text == "good")
    bad_turn = replace(
        next(t for t in turns.values() if t.user_text == "bad"), assistant_text="nul \x00 inside"
    )
    for turn in (good_turn, bad_turn):
        stream = turns_stream(shard_for(turn.conversation_id, settings.redis.shards))
        await redis.xadd(stream, encode_turn(turn))  # type: ignore[arg-type]

    database = Database.from_settings(settings.database)
    redis_client = await create_redis(settings.redis)
    try:
        worker = PersistenceWorker.from_settings(
            replace(settings.consumer, consumer_max_deliveries=3),
            shards=settings.redis.shards,
            redis=redis_client,
            database=database,
        )
        await worker.run(burst=True)
    finally:
        await redis_client.aclose()
        await database.dispose()

    assert worker.stats.dead_lettered == 1
    dead = await stream_entries(redis, DEAD_LETTER_STREAM)
    assert len(dead) == 1
    assert b"CharacterNotInRepertoire" in dead[0][1][b"dlq_error"] or b"0x00" in dead[0][1][b"dlq_error"]
    for k in range(settings.redis.shards):
        assert (await redis.xpending(turns_stream(k), PERSISTENCE_GROUP))["pending"] == 0
    persisted = await db.fetch("SELECT text FROM chat.messages ORDER BY text")
    assert [r["text"] for r in persisted] == ["Hello from the fake model.", "good"]
    assert good.conversation != bad.conversation


async def test_dlq_commands_list_and_replay_dead_letters(
    client: AsyncChatClient,
    settings: Settings,
    redis: aioredis.Redis,
    db: asyncpg.Connection,
    consume: Consume,
) -> None:
    reply = await client.chat_reply("replay me")
    await consume()
    await db.execute("DELETE FROM chat.messages")
    # Put the (valid) entry in the DLQ as if a bug had rejected it, plus one undecodable.
    assert await stream_entries(redis, DEAD_LETTER_STREAM) == []
    turn_id = uuid.UUID(reply.turn.rsplit("/", 1)[1])
    row = await db.fetchrow("SELECT * FROM chat.turns WHERE id = $1", turn_id)
    assert row is not None
    from server.domain import Turn, Usage
    from server.domain import TurnStatus as DomainStatus

    turn = Turn(
        id=row["id"], conversation_id=row["conversation_id"], owner=row["owner"], seq=row["seq"],
        request_id=row["request_id"], user_text=row["user_text"], assistant_text=row["assistant_text"],
        status=DomainStatus(row["status"]), stop_reason=row["stop_reason"],
        usage=Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"]), model=row["model"],
        created_at=row["created_at"], completed_at=row["completed_at"],
    )  # fmt: skip
    replayable: dict[bytes, bytes] = {
        **encode_turn(turn),
        b"dlq_source": b"chat:turns:{0}",
        b"dlq_entry_id": b"1-0",
        b"dlq_error": b"bug 42",
    }
    undecodable = {b"v": b"1", b"turn": b"{", b"dlq_source": b"chat:turns:{1}", b"dlq_entry_id": b"2-0"}
    await redis.xadd(DEAD_LETTER_STREAM, replayable)  # type: ignore[arg-type]
    undecodable[b"dlq_error"] = b"bad json"
    await redis.xadd(DEAD_LETTER_STREAM, undecodable)  # type: ignore[arg-type]

    env = settings_env(settings)
    listed = subprocess.run(
        [sys.executable, "-m", "server", "dlq", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    for expected in ("bug 42", "bad json", str(turn_id)):
        assert expected in listed.stdout
    assert "2 dead letter(s)" in listed.stdout

    replayed = subprocess.run(
        [sys.executable, "-m", "server", "dlq", "replay"], env=env, capture_output=True, text=True, timeout=60
    )
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1, skipped 1 undecodable" in replayed.stdout
    assert len(await stream_entries(redis, DEAD_LETTER_STREAM)) == 1
    await consume()
    assert await _message_count(db) == 2


async def test_server_and_consumer_refuse_a_redis_that_can_evict_streams(
    settings: Settings, redis: aioredis.Redis
) -> None:
    await redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        server = ChatServer(settings)
        with pytest.raises(RedisEvictionPolicyError, match="noeviction"):
            await server.start()
        await server.stop(grace_s=0)
        with pytest.raises(RedisEvictionPolicyError):
            await ConsumerProcess(settings).drain()
    finally:
        await redis.config_set("maxmemory-policy", "noeviction")


async def test_fifty_parallel_creates_of_one_new_conversation_make_one_conversation(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    gate = Gate()
    fake.script(Stream(["only once"], hold=gate))

    async def attempt() -> str:
        try:
            reply = await client.chat_reply("same message", request_id="same-request")
        except ChatClientError as err:
            return err.code.name + "/" + err.reason
        return reply.text

    tasks = [asyncio.create_task(attempt()) for _ in range(50)]
    await gate.wait_reached(timeout=10)
    # One call won the turn; the others attach to it (as WatchTurn from the start), or
    # replay it if they get there after it ended; none is refused, all get the reply.
    await asyncio.sleep(0.2)
    assert not any(task.done() for task in tasks)
    gate.open()
    outcomes = await asyncio.gather(*tasks)

    assert outcomes == ["only once"] * 50
    assert await db.fetchval("SELECT count(*) FROM chat.conversations") == 1
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 1
    assert len(fake.requests) == 1
    # And once it is done, a retry replays it.
    again = await client.chat_reply("same message", request_id="same-request")
    assert (again.replay, again.text) == (True, "only once")


async def test_same_request_id_while_streaming_attaches_and_a_different_message_is_refused(
    client: AsyncChatClient, fake: FakeAnthropic
) -> None:
    gate = Gate()
    fake.script(Stream(["slow ", "reply"], hold=gate))
    async with contextlib.aclosing(client.chat("hi", request_id="dup-1")) as events:
        first = await anext(events)
        await gate.wait_reached(timeout=5)
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply("something else", request_id="dup-1")
        assert (caught.value.code, caught.value.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "IDEMPOTENCY_KEY_REUSED",
        )
        attached = asyncio.ensure_future(client.chat_reply("hi", request_id="dup-1"))
        await asyncio.sleep(0.2)
        assert not attached.done()
        gate.open()
        rest = [e async for e in events]
    reply = await attached
    assert reply.text == "slow reply" == "".join(e.text_delta.text for e in rest if e.HasField("text_delta"))
    assert reply.conversation == first.started.conversation
    assert len(fake.requests) == 1


async def test_no_stream_entry_or_row_is_written_for_rejected_calls(
    client: AsyncChatClient, redis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    with pytest.raises(ChatClientError):
        await client.chat_reply("")
    assert await stream_lengths(redis) == [0, 0, 0, 0]
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 0
