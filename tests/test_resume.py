"""Streams that survive the network: resume, watch, cancel and kill across two server processes.

Two real `chatstream serve` processes share one PostgreSQL, one Redis and the fake upstream;
a loopback proxy cuts client connections as a load balancer or a network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClient, TurnEvent, TurnStatus
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from server.config import Settings
from server.consumer.relay import Relay
from server.db.engine import Database
from server.publisher import TurnPublisher
from server.redis_client import create_redis
from tests.conftest import Consume, eventually
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.processes import ChatstreamProcess, free_port, settings_env, wait_for_port
from tests.proxy import CuttingProxy

# Also on a real Redis Cluster (tests/conftest.py, CHATSTREAM_TEST_REDIS).
pytestmark = pytest.mark.redis_cluster

_WORDS = [f"w{i:02d} " for i in range(40)]
_REPLY = "".join(_WORDS)
_LEASE_S = 2


@dataclass
class Replicas:
    """Two serving processes; ``addresses[0]`` produces, ``addresses[1]`` resumes."""

    addresses: list[str]
    processes: list[ChatstreamProcess]


def _start(settings: Settings, **extra: str) -> tuple[str, ChatstreamProcess]:
    address = f"127.0.0.1:{free_port()}"
    env = settings_env(
        settings, CHATSTREAM_LISTEN=address, **{"CHATSTREAM_TURN_LEASE_S": str(_LEASE_S), **extra}
    )
    process = ChatstreamProcess(["serve"], env)
    wait_for_port(address, process=process)
    return address, process


@contextlib.contextmanager
def _replicas(settings: Settings, **extra: str) -> Iterator[Replicas]:
    started = [_start(settings, **extra), _start(settings, **extra)]
    try:
        yield Replicas(addresses=[a for a, _ in started], processes=[p for _, p in started])
    finally:
        for _, process in started:
            process.close()


@pytest.fixture
def replicas(settings: Settings) -> Iterator[Replicas]:
    with _replicas(settings) as running:
        yield running


@contextlib.asynccontextmanager
async def _stub(address: str) -> AsyncIterator[pb_grpc.ChatServiceAsyncStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.ChatServiceStub(channel)


@dataclass
class Received:
    """What a client has of a turn so far, and whether any event came twice."""

    turn: str = ""
    text: str = ""
    seqs: list[int] | None = None
    completed: pb.TurnCompleted | None = None
    start_offset: int | None = None
    """Where this client's text starts in the reply: 0, or later for a watcher that joined late."""

    def add(self, event: pb.TurnEvent) -> None:
        self.seqs = [*(self.seqs or []), event.seq]
        match event.WhichOneof("kind"):
            case "started":
                self.turn = event.started.turn
            case "text_delta":
                if self.start_offset is None:
                    self.start_offset = event.text_delta.offset
                expected = self.start_offset + len(self.text)
                assert event.text_delta.offset == expected, (event.text_delta.offset, expected)
                self.text += event.text_delta.text
            case "completed":
                self.completed = event.completed

    @property
    def last_seq(self) -> int:
        return (self.seqs or [0])[-1]

    def assert_no_repeats(self) -> None:
        seqs = self.seqs or []
        assert all(a < b for a, b in itertools.pairwise(seqs)), seqs


async def _read(call: AsyncIterable[pb.ChatResponse], into: Received, *, events: int) -> None:
    async for response in call:
        into.add(response.event)
        if len(into.seqs or []) >= events:
            return


async def _watch(address: str, received: Received) -> None:
    async with _stub(address) as stub:
        call = stub.WatchTurn(
            pb.WatchTurnRequest(
                turn=received.turn, after_seq=received.last_seq, after_offset=len(received.text)
            )
        )
        async for response in call:
            received.add(response.event)


def _turn_id(turn: str) -> uuid.UUID:
    return uuid.UUID(turn.rsplit("/", 1)[1])


async def test_a_cut_connection_resumes_on_the_other_replica_with_exactly_the_reply(
    replicas: Replicas, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    fake.script(Stream(_WORDS, delay_s=0.03))
    received = Received()
    async with CuttingProxy(replicas.addresses) as proxy:
        async with _stub(proxy.address) as stub:
            call = stub.Chat(pb.ChatRequest(text="tell me", on_disconnect=pb.ON_DISCONNECT_CONTINUE))
            await _read(call, received, events=6)
            proxy.active = 1  # the reconnect lands on the other server, as after a failover
            proxy.cut()
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await _read(call, received, events=1000)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        await _watch(proxy.address, received)
    assert received.text == _REPLY
    received.assert_no_repeats()
    assert received.completed is not None
    assert received.completed.status == pb.TURN_STATUS_COMPLETED
    assert await db.fetchval("SELECT assistant_text FROM chat.turns") == _REPLY


async def test_a_late_watcher_gets_everything_after_its_resume_point(
    replicas: Replicas, fake: FakeAnthropic
) -> None:
    fake.script(Stream(_WORDS, delay_s=0.03))
    producer = Received()
    async with _stub(replicas.addresses[0]) as stub:
        call = stub.Chat(pb.ChatRequest(text="halfway"))
        await _read(call, producer, events=10)
        # A second device on the other replica joins halfway, from the 5th event.
        watcher = Received()
        async with _stub(replicas.addresses[1]) as other:
            await _read(
                other.WatchTurn(pb.WatchTurnRequest(turn=producer.turn, after_seq=5)), watcher, events=1000
            )
        await _read(call, producer, events=1000)
    assert producer.text == _REPLY
    assert watcher.seqs is not None
    assert watcher.seqs[0] == 6
    watcher.assert_no_repeats()
    # Exactly the reply after the 5th event: the text from that event's end on.
    assert watcher.start_offset is not None
    assert _REPLY[watcher.start_offset :] == watcher.text
    assert watcher.completed is not None


async def test_a_watcher_resuming_inside_a_log_entry_gets_the_text_from_its_offset_on(
    replicas: Replicas, fake: FakeAnthropic
) -> None:
    """The live log and the caller's stream join deltas each in their own batches: a caller's
    resume point can fall inside a log entry, whose text before it the caller has already."""
    fake.script(Stream(_WORDS, delay_s=0.03))
    producer = Received()
    async with _stub(replicas.addresses[0]) as stub:
        call = stub.Chat(pb.ChatRequest(text="halfway"))
        await _read(call, producer, events=4)
        watcher = Received()
        async with _stub(replicas.addresses[1]) as other:
            # Two characters into the first delta ("w00 "), as if an event had carried only those.
            request = pb.WatchTurnRequest(turn=producer.turn, after_seq=1, after_offset=2)
            await _read(other.WatchTurn(request), watcher, events=1000)
        await _read(call, producer, events=1000)
    assert watcher.start_offset == 2
    assert watcher.text == _REPLY[2:]
    watcher.assert_no_repeats()
    assert watcher.completed is not None


async def test_resume_after_the_live_log_expired_is_served_from_postgresql(
    settings: Settings, fake: FakeAnthropic
) -> None:
    with _replicas(settings, CHATSTREAM_LIVE_TTL_S="0.5") as short:
        fake.script(Stream(_WORDS, delay_s=0.005))
        received = Received()
        async with _stub(short.addresses[0]) as stub:
            call = stub.Chat(pb.ChatRequest(text="expire me", on_disconnect=pb.ON_DISCONNECT_CONTINUE))
            await _read(call, received, events=4)
            call.cancel()
        await asyncio.sleep(1.5)  # the turn ends and its live log expires (TTL 0.5 s)
        await _watch(short.addresses[1], received)
    assert received.text == _REPLY
    received.assert_no_repeats()
    assert received.completed is not None
    assert received.completed.status == pb.TURN_STATUS_COMPLETED


async def test_cancel_turn_on_the_other_replica_closes_the_upstream_and_keeps_the_partial_text(
    replicas: Replicas, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    fake.script(Stream(_WORDS, delay_s=0.2))
    received = Received()
    async with _stub(replicas.addresses[0]) as stub, _stub(replicas.addresses[1]) as other:
        call = stub.Chat(pb.ChatRequest(text="stop me"))
        await _read(call, received, events=3)
        cancelled = await other.CancelTurn(pb.CancelTurnRequest(turn=received.turn))
        assert cancelled.status == pb.TURN_STATUS_CANCELLED
        await fake.wait_for_disconnect(timeout=1)
        await _read(call, received, events=1000)
        again = await other.CancelTurn(pb.CancelTurnRequest(turn=received.turn))
        assert again.status == pb.TURN_STATUS_CANCELLED
    assert received.completed is not None
    assert received.completed.status == pb.TURN_STATUS_CANCELLED
    stored = await db.fetchval("SELECT assistant_text FROM chat.turns")
    assert stored == received.text
    assert _REPLY.startswith(stored)


async def test_a_killed_producer_ends_its_watcher_interrupted_with_the_partial_reply_kept(
    replicas: Replicas, fake: FakeAnthropic, db: asyncpg.Connection, consume: Consume
) -> None:
    fake.script(Stream(_WORDS[:5], then="stall", delay_s=0.01))
    received = Received()
    async with _stub(replicas.addresses[0]) as stub:
        call = stub.Chat(pb.ChatRequest(text="doomed"))
        await _read(call, received, events=6)
        watcher = Received()
        async with _stub(replicas.addresses[1]) as other:
            watching = asyncio.ensure_future(
                _read(other.WatchTurn(pb.WatchTurnRequest(turn=received.turn)), watcher, events=1000)
            )
            await eventually(lambda: _has_text(watcher, received.text), what="the watcher to catch up")
            replicas.processes[0].kill()
            loop = asyncio.get_running_loop()
            killed_at = loop.time()
            await asyncio.wait_for(watching, timeout=_LEASE_S * 4)
            assert loop.time() - killed_at < _LEASE_S * 4
    assert watcher.completed is not None
    assert watcher.completed.status == pb.TURN_STATUS_INTERRUPTED
    assert watcher.text == "".join(_WORDS[:5])
    await consume()
    texts = await db.fetch("SELECT role, text, turn_status FROM chat.messages ORDER BY role")
    assert [tuple(r) for r in texts] == [
        (1, "doomed", "INTERRUPTED"),
        (2, "".join(_WORDS[:5]), "INTERRUPTED"),
    ]


async def _has_text(received: Received, text: str) -> bool:
    return received.text == text


async def test_a_caller_never_holds_text_that_its_killed_producer_could_not_end_with(
    replicas: Replicas, fake: FakeAnthropic, db: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    """The live log is written ahead of the caller: while it cannot be written, the caller waits.

    A turn whose server dies ends INTERRUPTED with the text its live log kept. Were the caller
    ahead of the log, it would hold text the stored turn lacks, and its resume would end with
    no terminal event (the stored turn ends before the caller's last event).
    """
    fake.script(Stream(_WORDS[:5], then="stall", delay_s=0.01))
    received = Received()
    await _pause_writes(redis, timeout_s=20)  # the live log cannot be written
    try:
        async with _stub(replicas.addresses[0]) as stub:
            reading = asyncio.ensure_future(
                _read(stub.Chat(pb.ChatRequest(text="doomed")), received, events=1000)
            )
            await fake.wait_for_requests(1, timeout=5)
            # The five deltas take 50 ms to come; no live log holds them, so none reaches us.
            await asyncio.sleep(1)
            assert received.seqs == [1]
            replicas.processes[0].kill()
            with pytest.raises(grpc.aio.AioRpcError):
                await reading
    finally:
        await _unpause_writes(redis)
    assert received.text == ""
    await _watch(replicas.addresses[1], received)
    assert received.completed is not None
    assert received.completed.status == pb.TURN_STATUS_INTERRUPTED
    received.assert_no_repeats()
    assert await db.fetchval("SELECT assistant_text FROM chat.turns") == received.text == ""


async def test_a_retry_attached_to_a_turn_whose_log_lost_its_start_still_opens_with_turn_started(
    settings: Settings, fake: FakeAnthropic, db: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    """The producer dies before its log has even TurnStarted; the retry attached to the turn gets
    it all the same, then the end the lease sweeper appends to the log."""
    fake.script(Stream(_WORDS[:5], then="stall", delay_s=0.01))
    first, retry = Received(), Received()
    request = pb.ChatRequest(text="doomed", request_id="attach-me")
    # A long lease: the test, not the clock, says when the dead producer's lease has expired.
    with _replicas(settings, CHATSTREAM_TURN_LEASE_S="60") as replicas:
        await _pause_writes(redis, timeout_s=20)  # the live log cannot be written
        try:
            async with _stub(replicas.addresses[0]) as stub:
                reading = asyncio.ensure_future(_read(stub.Chat(request), first, events=1000))
                await fake.wait_for_requests(1, timeout=5)
                replicas.processes[0].kill()
                with pytest.raises(grpc.aio.AioRpcError):
                    await reading
        finally:
            await _unpause_writes(redis)
        async with _stub(replicas.addresses[1]) as other:
            attached = asyncio.ensure_future(_read(other.Chat(request), retry, events=1000))
            await asyncio.sleep(0.3)  # the retry is attached, following the (empty) live log
            assert not attached.done()
            await db.execute("UPDATE chat.turns SET lease_expires_at = now() - interval '1 second'")
            assert await _sweep(settings) == 1
            await asyncio.wait_for(attached, timeout=10)
    assert retry.seqs is not None
    assert retry.seqs[0] == 1, retry.seqs
    assert retry.turn == first.turn
    assert retry.completed is not None
    assert retry.completed.status == pb.TURN_STATUS_INTERRUPTED


async def _sweep(settings: Settings) -> int:
    """One pass of the relay's lease sweeper, as a consumer process runs it; the turns it ended."""
    database = Database.from_settings(settings.database)
    redis_client = await create_redis(settings.redis)
    try:
        sweeper = Relay(
            database=database,
            redis=redis_client,
            live_ttl_s=settings.turns.live_ttl_s,
            publisher=TurnPublisher(redis_client, shards=settings.redis.shards),
            interval=timedelta(seconds=1),
            grace=timedelta(seconds=60),
        )
        await sweeper.run_once()
        return sweeper.stats.interrupted
    finally:
        await redis_client.aclose()
        await database.dispose()


async def _pause_writes(redis: aioredis.Redis, *, timeout_s: float) -> None:
    if isinstance(redis, RedisClusterClient):
        await redis.client_pause(int(timeout_s * 1000), all=False, target_nodes=RedisClusterClient.ALL_NODES)
    else:
        await redis.client_pause(int(timeout_s * 1000), all=False)


async def _unpause_writes(redis: aioredis.Redis) -> None:
    if isinstance(redis, RedisClusterClient):
        await redis.client_unpause(target_nodes=RedisClusterClient.ALL_NODES)
    else:
        await redis.client_unpause()


async def test_continue_with_the_client_gone_completes_and_persists_the_turn(
    replicas: Replicas, fake: FakeAnthropic, db: asyncpg.Connection, consume: Consume
) -> None:
    fake.script(Stream(_WORDS, delay_s=0.01))
    received = Received()
    async with _stub(replicas.addresses[0]) as stub:
        call = stub.Chat(pb.ChatRequest(text="finish without me", on_disconnect=pb.ON_DISCONNECT_CONTINUE))
        await _read(call, received, events=2)
        call.cancel()

    async def completed() -> bool:
        return bool(await db.fetchval("SELECT status = 'COMPLETED' FROM chat.turns"))

    await eventually(completed, timeout_s=10, what="the turn to complete without its client")
    assert await db.fetchval("SELECT assistant_text FROM chat.turns") == _REPLY
    await consume()
    assert await db.fetchval("SELECT text FROM chat.messages WHERE role = 2") == _REPLY


async def test_watch_conversation_streams_each_new_turn_to_every_watcher(
    replicas: Replicas, fake: FakeAnthropic
) -> None:
    fake.script(Stream(["first"]), Stream(["second"]))
    async with _stub(replicas.addresses[0]) as stub, _stub(replicas.addresses[1]) as other:
        first = Received()
        await _read(stub.Chat(pb.ChatRequest(text="one")), first, events=1000)
        conversation = first.turn.rsplit("/turns/", 1)[0]
        watchers = [
            other.WatchConversation(pb.WatchConversationRequest(conversation=conversation)) for _ in range(3)
        ]
        seen: list[list[str]] = [[] for _ in watchers]

        async def follow(i: int) -> None:
            async for response in watchers[i]:
                event = response.event
                if event.HasField("text_delta"):
                    seen[i].append(event.text_delta.text)
                if event.HasField("completed"):
                    return

        following = [asyncio.ensure_future(follow(i)) for i in range(len(watchers))]
        await asyncio.sleep(0.5)  # the watchers' reader is waiting for the next turn
        second = Received()
        await _read(stub.Chat(pb.ChatRequest(conversation=conversation, text="two")), second, events=1000)
        await asyncio.wait_for(asyncio.gather(*following), timeout=10)
        for call in watchers:
            call.cancel()
    assert seen == [["second"]] * 3


async def test_the_sdk_resumes_by_itself_after_a_cut_connection(
    replicas: Replicas, fake: FakeAnthropic
) -> None:
    fake.script(Stream(_WORDS, delay_s=0.03))
    events: list[TurnEvent] = []
    async with CuttingProxy(replicas.addresses) as proxy, AsyncChatClient(proxy.address) as client:
        async with contextlib.aclosing(client.chat("tell me")) as stream:
            async for event in stream:
                events.append(event)
                if len(events) == 6:
                    proxy.active = 1
                    proxy.cut()
        assert proxy.connections >= 2
    received = Received()
    for event in events:
        received.add(event.proto)
    received.assert_no_repeats()
    assert received.text == _REPLY
    assert received.completed is not None
    assert received.completed.status == pb.TURN_STATUS_COMPLETED


async def test_the_blocking_sdk_watches_and_cancels_turns_too(
    replicas: Replicas, fake: FakeAnthropic
) -> None:
    fake.script(Stream(_WORDS, delay_s=0.01), Stream(_WORDS, delay_s=0.3))

    def blocking() -> tuple[str, str, TurnStatus, TurnStatus]:
        with ChatClient(replicas.addresses[0]) as producer, ChatClient(replicas.addresses[1]) as other:
            reply = producer.chat_reply("first")
            watched = "".join(
                e.text_delta.text for e in other.watch_turn(reply.turn) if e.HasField("text_delta")
            )
            ended = other.cancel_turn(reply.turn)  # idempotent on an ended turn
            stream = producer.chat("second", conversation=reply.conversation)
            started = next(stream)
            cancelled = other.cancel_turn(started.started.turn)
            stream.close()
            return reply.text, watched, ended, cancelled

    text, watched, ended, cancelled = await asyncio.to_thread(blocking)
    assert text == watched == _REPLY
    assert ended is TurnStatus.COMPLETED
    assert cancelled is TurnStatus.CANCELLED
