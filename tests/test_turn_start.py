"""Unit of work 1: each outcome, as a value from the turn store and as a caller sees it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError, RetryPolicy, TurnStatus

from server.app import ChatServer
from server.config import Settings
from server.db import turn_store
from server.db.engine import Database
from server.db.turn_store import Busy, ConversationNotFound, Existing, Started, TurnRequest
from server.domain import TurnEnding, Usage
from server.domain import TurnStatus as DomainStatus
from tests.conftest import StartServer
from tests.fake_anthropic import FakeAnthropic, Gate, Stream

_LEASE = timedelta(seconds=30)


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    database = Database.from_settings(settings.database)
    try:
        yield database
    finally:
        await database.dispose()


def _request(**overrides: object) -> TurnRequest:
    fields: dict[str, object] = {
        "owner": "alice",
        "conversation_id": None,
        "request_id": None,
        "user_text": "hello",
        "model": "claude-test",
        "lease": _LEASE,
    }
    fields.update(overrides)
    return TurnRequest(**fields)  # type: ignore[arg-type]  # the fields above are TurnRequest's


async def _end(database: Database, turn_id: uuid.UUID) -> None:
    ending = TurnEnding(
        status=DomainStatus.COMPLETED,
        text="hi",
        stop_reason="end_turn",
        usage=Usage(),
        model="claude-test",
        error_reason=None,
        last_seq=3,
    )
    await turn_store.store_outcome(database, turn_id=turn_id, ending=ending)


async def test_a_new_conversation_and_a_next_turn_are_started_and_numbered(
    database: Database, db: asyncpg.Connection
) -> None:
    first = await turn_store.start_turn(database, _request())
    assert isinstance(first, Started)
    assert first.turn.seq == 1
    assert first.turn.status is DomainStatus.STREAMING
    await _end(database, first.turn.id)
    second = await turn_store.start_turn(database, _request(conversation_id=first.turn.conversation_id))
    assert isinstance(second, Started)
    assert second.turn.seq == 2
    count = await db.fetchval(
        "SELECT turn_count FROM chat.conversations WHERE id = $1", first.turn.conversation_id
    )
    assert count == 2


async def test_a_repeated_request_id_returns_the_existing_turn_and_writes_nothing(
    database: Database, db: asyncpg.Connection
) -> None:
    first = await turn_store.start_turn(database, _request(request_id="k1"))
    assert isinstance(first, Started)
    again = await turn_store.start_turn(database, _request(request_id="k1", user_text="something else"))
    assert again == Existing(turn=first.turn)
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 1


async def test_another_streaming_turn_makes_the_conversation_busy(
    database: Database, db: asyncpg.Connection
) -> None:
    first = await turn_store.start_turn(database, _request())
    assert isinstance(first, Started)
    conversation_id = first.turn.conversation_id
    busy = await turn_store.start_turn(database, _request(conversation_id=conversation_id))
    assert busy == Busy(conversation_id=conversation_id)
    assert await db.fetchval("SELECT turn_count FROM chat.conversations WHERE id = $1", conversation_id) == 1


async def test_a_missing_or_foreign_conversation_is_not_found_and_untouched(
    database: Database, db: asyncpg.Connection
) -> None:
    missing = await turn_store.start_turn(database, _request(conversation_id=uuid.uuid4()))
    assert missing == ConversationNotFound()
    mine = await turn_store.start_turn(database, _request(lease=timedelta(milliseconds=1)))
    assert isinstance(mine, Started)
    await asyncio.sleep(0.01)
    # Someone else's conversation, even with an expired turn in it: not found, and the
    # expired turn is left for its owner's next turn or the sweeper (no side effect).
    foreign = await turn_store.start_turn(
        database, _request(owner="mallory", conversation_id=mine.turn.conversation_id)
    )
    assert foreign == ConversationNotFound()
    assert await db.fetchval("SELECT status FROM chat.turns WHERE id = $1", mine.turn.id) == "STREAMING"


async def test_a_dead_producers_turn_makes_the_conversation_busy_with_an_expired_lease(
    database: Database, db: asyncpg.Connection
) -> None:
    dead = await turn_store.start_turn(database, _request(lease=timedelta(milliseconds=1)))
    assert isinstance(dead, Started)
    await asyncio.sleep(0.01)
    busy = await turn_store.start_turn(database, _request(conversation_id=dead.turn.conversation_id))
    assert busy == Busy(conversation_id=dead.turn.conversation_id, expired=True)
    # Reported, not acted on: ending the turn needs its live log (server/leases.py).
    assert await db.fetchval("SELECT status FROM chat.turns WHERE id = $1", dead.turn.id) == "STREAMING"


async def test_a_retry_whose_producer_died_reports_the_expired_lease(database: Database) -> None:
    dead = await turn_store.start_turn(database, _request(request_id="k2", lease=timedelta(milliseconds=1)))
    assert isinstance(dead, Started)
    await asyncio.sleep(0.01)
    retry = await turn_store.start_turn(database, _request(request_id="k2"))
    assert retry == Existing(turn=dead.turn, expired=True)


async def test_a_chat_on_a_dead_producers_conversation_interrupts_its_turn_and_goes_on(
    client: AsyncChatClient, db: asyncpg.Connection
) -> None:
    conversation_id, turn_id = await _dead_turn(db, request_id=None)
    reply = await client.chat_reply("and now?", conversation=f"conversations/{conversation_id}")
    assert reply.status == TurnStatus.TURN_STATUS_COMPLETED
    row = await db.fetchrow("SELECT status, error_reason FROM chat.turns WHERE id = $1", turn_id)
    assert row is not None
    assert (row["status"], row["error_reason"]) == ("INTERRUPTED", "LEASE_EXPIRED")
    assert (
        await db.fetchval("SELECT max(seq) FROM chat.turns WHERE conversation_id = $1", conversation_id) == 2
    )


async def _dead_turn(db: asyncpg.Connection, *, request_id: str | None) -> tuple[uuid.UUID, uuid.UUID]:
    """A turn row left STREAMING by a server that died, its lease gone."""
    conversation_id, turn_id = uuid.uuid4(), uuid.uuid4()
    await db.execute(
        "INSERT INTO chat.conversations (id, owner, turn_count) VALUES ($1, 'default', 1)", conversation_id
    )
    await db.execute(
        "INSERT INTO chat.turns (id, conversation_id, owner, seq, request_id, user_text, status, model,"
        " lease_expires_at) VALUES ($1, $2, 'default', 1, $3, 'hello', 'STREAMING', 'm',"
        " now() - interval '1 second')",
        turn_id,
        conversation_id,
        request_id,
    )
    return conversation_id, turn_id


async def test_chat_retried_after_its_producer_died_replays_the_interrupted_turn(
    client: AsyncChatClient, server: ChatServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """The old turn ends INTERRUPTED at once, not at the next sweep, and the retry replays it."""
    conversation_id, turn_id = await _dead_turn(db, request_id="dead-key")
    # Without restarts: the SDK would start an INTERRUPTED turn again (tests/test_sdk_fleet.py).
    async with AsyncChatClient(server.address, retry_policy=RetryPolicy(max_restarts=0)) as replaying:
        events = [e async for e in replaying.chat("hello", request_id="dead-key")]
    assert events[0].started.replay
    assert events[-1].completed.status == TurnStatus.TURN_STATUS_INTERRUPTED
    assert await db.fetchval("SELECT status FROM chat.turns WHERE id = $1", turn_id) == "INTERRUPTED"
    assert fake.requests == []
    # The conversation is usable at once.
    reply = await client.chat_reply("and now?", conversation=f"conversations/{conversation_id}")
    assert reply.status == TurnStatus.TURN_STATUS_COMPLETED


async def test_one_pool_per_process_bounds_its_backends_during_held_streams(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """Every statement of a server, per-turn or not, goes through one pool of db_pool_size."""
    server = await start_server(db_pool_size=1)
    gate = Gate()
    turns = 6
    for _ in range(turns):
        fake.script(Stream(["held"], hold=gate))
    most = 0
    async with AsyncChatClient(server.address) as client, contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(contextlib.aclosing(client.chat(f"t{i}"))) for i in range(turns)
        ]
        firsts = [asyncio.ensure_future(anext(s)) for s in streams]
        lists = [asyncio.ensure_future(client.list_conversations_page()) for _ in range(4)]
        while not all(f.done() for f in [*firsts, *lists]):
            backends = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chatstream'"
                " AND datname = current_database()"
            )
            most = max(most, backends)
            await asyncio.sleep(0.001)
        await gate.wait_reached(timeout=5)
        most = max(
            most,
            await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chatstream'"
                " AND datname = current_database()"
            ),
        )
        gate.open()
        for stream in streams:
            assert [e.WhichOneof("kind") async for e in stream][-1] == "completed"
    assert 1 <= most <= 1


async def test_unknown_conversation_through_chat_is_not_found(client: AsyncChatClient) -> None:
    with pytest.raises(ChatClientError) as caught:
        await client.chat_reply("hi", conversation=f"conversations/{uuid.uuid4()}")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
