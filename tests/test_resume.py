"""Streams that survive the network: resume, watch, cancel and kill across two server processes.

Two real `chatstream serve` processes share one PostgreSQL, one Redis and the fake upstream;
a loopback proxy cuts client connections as a load balancer or a network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClient, ChatClientError, TurnEvent, TurnStatus
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from server import live
from server.config import Settings
from server.consumer.relay import Relay
from server.db.engine import Database
from server.domain import TextDelta
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


async def test_a_watcher_resuming_before_a_log_entry_of_joined_deltas_follows_it_live(
    replicas: Replicas, fake: FakeAnthropic, redis: aioredis.Redis, db: asyncpg.Connection
) -> None:
    """The live log's writer joins the deltas that pile up while a pipeline is in flight into
    one entry, numbered as the last of them: the log's numbers skip, and a watcher whose next
    entry is such a one has lost nothing. It follows the turn live, not only once it ended."""
    words = [f"v{i:02d} " for i in range(60)]
    fake.script(Stream(words, delay_s=0.05))
    producer = Received()
    async with _stub(replicas.addresses[0]) as stub:
        call = stub.Chat(pb.ChatRequest(text="in bursts"))
        await _read(call, producer, events=4)
        # Writes wait for a while, as behind a slow Redis: the deltas meanwhile become one entry.
        await _pause_writes(redis, timeout_s=0.6)
        await asyncio.sleep(0.9)
        entries = await live.read_after(redis, _turn_id(producer.turn), 0)
        gaps = [a for a, b in itertools.pairwise(entries) if b.seq > a.seq + 1 and a.seq > 1]
        assert gaps, [entry.seq for entry in entries]
        assert isinstance(gaps[0].event, TextDelta)
        after_seq, after_offset = gaps[0].seq, gaps[0].event.offset + len(gaps[0].event.text)
        watcher = Received(text="".join(words)[:after_offset], start_offset=0)
        watcher.seqs = [after_seq]
        async with _stub(replicas.addresses[1]) as other:
            watch = other.WatchTurn(
                pb.WatchTurnRequest(turn=producer.turn, after_seq=after_seq, after_offset=after_offset)
            )
            await _read(watch, watcher, events=len(watcher.seqs) + 1)
            # The turn has more than a second of its reply to go: this came live.
            assert await db.fetchval("SELECT status FROM chat.turns") == "STREAMING"
            await _read(watch, watcher, events=1000)
        await _read(call, producer, events=1000)
    assert watcher.text == producer.text == "".join(words)
    watcher.assert_no_repeats()
    assert watcher.completed is not None
    # Followed live: one event per later entry, not the rest in one piece from PostgreSQL.
    assert len(watcher.seqs) > 4, watcher.seqs


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


async def test_a_resume_point_the_bounded_live_log_no_longer_holds_is_served_from_postgresql(
    settings: Settings, fake: FakeAnthropic, redis: aioredis.Redis
) -> None:
    """The live log keeps a turn's last CHATSTREAM_LIVE_MAXLEN events (at least): a watcher whose
    resume point was trimmed away gets exactly the rest, from PostgreSQL once the turn ended."""
    words = [f"t{i:03d} " for i in range(400)]
    fake.script(Stream(words, delay_s=0.005))
    with _replicas(settings, CHATSTREAM_LIVE_MAXLEN="10") as bounded:
        producer = Received()
        async with _stub(bounded.addresses[0]) as stub:
            call = stub.Chat(pb.ChatRequest(text="a long one"))
            await _read(call, producer, events=6)
            turn_id = _turn_id(producer.turn)

            async def trimmed() -> bool:
                first = await live.first_seq(redis, turn_id)
                return first is not None and first > producer.last_seq + 1

            await eventually(trimmed, timeout_s=10, what="the live log to be trimmed past the resume point")
            watcher = Received(turn=producer.turn, text=producer.text, start_offset=0)
            watcher.seqs = [producer.last_seq]
            await _watch(bounded.addresses[1], watcher)
            await _read(call, producer, events=10_000)
    assert watcher.text == producer.text == "".join(words)
    watcher.assert_no_repeats()
    assert watcher.completed is not None
    assert watcher.completed.status == pb.TURN_STATUS_COMPLETED


async def test_cancel_turn_on_the_other_replica_closes_the_upstream_and_keeps_the_partial_text(
    replicas: Replicas, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    fake.script(Stream(_WORDS, delay_s=0.2))
    received = Received()
    async with _stub(replicas.addresses[0]) as stub, _stub(replicas.addresses[1]) as other:
        call = stub.Chat(pb.ChatRequest(text="stop me"))
        await _read(call, received, events=3)
        asked_at = time.monotonic()
        cancelled = await other.CancelTurn(pb.CancelTurnRequest(turn=received.turn))
        assert cancelled.status == pb.TURN_STATUS_CANCELLED
        # The fake notes when the producer's upstream request went away: within 1 s of the ask.
        closed_at = await fake.wait_for_disconnect(timeout=1)
        assert closed_at - asked_at < 1.0, closed_at - asked_at
        await _read(call, received, events=1000)
        again = await other.CancelTurn(pb.CancelTurnRequest(turn=received.turn))
        assert again.status == pb.TURN_STATUS_CANCELLED
    assert received.completed is not None
    assert received.completed.status == pb.TURN_STATUS_CANCELLED
    stored = await db.fetchval("SELECT assistant_text FROM chat.turns")
    assert stored == received.text
    assert _REPLY.startswith(stored)


async def test_cancel_turn_of_a_killed_producer_answers_interrupted_once_its_lease_expired(
    settings: Settings, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """Nothing can stop a dead producer: CancelTurn waits out its lease (longer than a live
    producer's answer could take) and returns the turn ended INTERRUPTED, not an error."""
    lease_s = 11
    partial = "".join(_WORDS[:5])
    fake.script(Stream(_WORDS[:5], then="stall", delay_s=0.01))
    received = Received()
    with _replicas(settings, CHATSTREAM_TURN_LEASE_S=str(lease_s)) as replicas:
        async with _stub(replicas.addresses[0]) as stub:
            await _read_text(stub.Chat(pb.ChatRequest(text="doomed")), received, partial)
            replicas.processes[0].kill()
        async with _stub(replicas.addresses[1]) as other:
            asked_at = time.monotonic()
            cancelled = await other.CancelTurn(pb.CancelTurnRequest(turn=received.turn))
            waited = time.monotonic() - asked_at
    assert cancelled.status == pb.TURN_STATUS_INTERRUPTED
    # The proto promises the lease plus 2 s; the rest is slack for a loaded machine.
    assert waited < lease_s + 4, waited
    row = await db.fetchrow("SELECT status, assistant_text FROM chat.turns")
    assert row is not None
    assert tuple(row) == ("INTERRUPTED", partial)


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
            # The lease, renewed until the kill, runs out within _LEASE_S of it; the watcher
            # looks at the turn's row after each second of silence (server/watch.py).
            ended_after = loop.time() - killed_at
            assert ended_after < _LEASE_S + 1.5, ended_after
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


async def _read_text(call: AsyncIterable[pb.ChatResponse], into: Received, text: str) -> None:
    """Reads until ``into`` holds ``text`` (however the deltas were joined on the way)."""
    async for response in call:
        into.add(response.event)
        if into.text == text:
            return


async def test_the_lease_sweeper_stores_the_partial_reply_of_a_killed_producer(
    replicas: Replicas, settings: Settings, fake: FakeAnthropic, db: asyncpg.Connection, consume: Consume
) -> None:
    """Nobody watches or retries the turn: the relay's lease sweeper alone ends it, with the text
    its live log held, which reaches chat.messages."""
    partial = "".join(_WORDS[:5])
    fake.script(Stream(_WORDS[:5], then="stall", delay_s=0.01))
    received = Received()
    async with _stub(replicas.addresses[0]) as stub:
        await _read_text(stub.Chat(pb.ChatRequest(text="doomed")), received, partial)
        replicas.processes[0].kill()

    async def expired() -> bool:
        return bool(await db.fetchval("SELECT lease_expires_at < now() FROM chat.turns"))

    await eventually(expired, timeout_s=_LEASE_S * 3, what="the dead producer's lease to expire")
    assert await db.fetchval("SELECT status FROM chat.turns") == "STREAMING"
    assert await _sweep(settings) == 1
    row = await db.fetchrow("SELECT status, error_reason, assistant_text FROM chat.turns")
    assert row is not None
    assert tuple(row) == ("INTERRUPTED", "LEASE_EXPIRED", partial)
    await consume()
    messages = await db.fetch("SELECT role, text, turn_status FROM chat.messages ORDER BY role")
    assert [tuple(r) for r in messages] == [(1, "doomed", "INTERRUPTED"), (2, partial, "INTERRUPTED")]


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


async def test_a_producer_swept_while_it_still_streams_ends_its_caller_and_resumes_in_order(
    settings: Settings, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """The producer's process freezes past its lease and a sweeper ends the turn INTERRUPTED with
    the live log's text; then the process runs on and streams the rest to its caller. The
    caller's terminal event still comes after everything it was sent, and a resume from its
    last delta (it could have been cut before the terminal event) also ends with one."""
    fake.script(Stream(_WORDS, delay_s=0.05))
    received = Received()
    # A long lease: the test, not the clock, says when the frozen producer's lease has expired.
    with _replicas(settings, CHATSTREAM_TURN_LEASE_S="60") as replicas:
        async with _stub(replicas.addresses[0]) as stub:
            call = stub.Chat(pb.ChatRequest(text="frozen"))
            await _read(call, received, events=8)
            replicas.processes[0].freeze()
            try:
                await db.execute("UPDATE chat.turns SET lease_expires_at = now() - interval '1 second'")
                assert await _sweep(settings) == 1
            finally:
                replicas.processes[0].thaw()
            await _read(call, received, events=1000)
        swept = await db.fetchrow("SELECT status, last_seq, assistant_text FROM chat.turns")
        assert swept is not None
        assert swept["status"] == "INTERRUPTED"
        received.assert_no_repeats()
        assert received.completed is not None
        assert received.completed.status == pb.TURN_STATUS_INTERRUPTED
        # The caller got more than the sweeper could store, numbered past the stored end.
        assert received.text == _REPLY
        assert _REPLY.startswith(swept["assistant_text"])
        assert received.last_seq > swept["last_seq"]

        # A caller cut just before that terminal event resumes from its last delta.
        resumed = Received(
            turn=received.turn,
            text=received.text,
            seqs=(received.seqs or [])[:-1],
            start_offset=0,
        )
        await asyncio.wait_for(_watch(replicas.addresses[1], resumed), timeout=10)
    resumed.assert_no_repeats()
    assert resumed.completed is not None
    assert resumed.completed.status == pb.TURN_STATUS_INTERRUPTED
    assert resumed.text == _REPLY


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


async def test_a_retry_on_the_other_replica_attaches_and_a_conflicting_one_is_refused(
    replicas: Replicas, fake: FakeAnthropic
) -> None:
    fake.script(Stream(_WORDS, delay_s=0.03))
    request = pb.ChatRequest(text="once only", request_id="retry-me")
    first, retry = Received(), Received()
    async with _stub(replicas.addresses[0]) as stub, _stub(replicas.addresses[1]) as other:
        call = stub.Chat(request)
        await _read(call, first, events=4)
        # The same key with another message, on the other replica, while the turn streams.
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await _read(
                other.Chat(pb.ChatRequest(text="something else", request_id="retry-me")), Received(), events=1
            )
        refused = ChatClientError.from_rpc_error(conflict.value)
        assert (refused.code, refused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REUSED")
        # The same request there attaches to the turn, from its start, while it streams.
        await _read(other.Chat(request), retry, events=1000)
        await _read(call, first, events=1000)
    assert retry.turn == first.turn
    assert retry.seqs is not None
    assert retry.seqs[0] == 1
    retry.assert_no_repeats()
    assert retry.text == first.text == _REPLY
    assert retry.completed is not None
    assert retry.completed.status == pb.TURN_STATUS_COMPLETED
    assert len(fake.requests) == 1


async def test_a_turn_that_continues_without_its_client_ends_at_the_maximum_turn_duration(
    settings: Settings, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    partial = "".join(_WORDS[:3])
    fake.script(Stream(_WORDS[:3], then="stall", delay_s=0.01))
    address, process = _start(settings, CHATSTREAM_MAX_TURN_S="1")
    try:
        received = Received()
        async with _stub(address) as stub:
            call = stub.Chat(pb.ChatRequest(text="never ends", on_disconnect=pb.ON_DISCONNECT_CONTINUE))
            await _read_text(call, received, partial)
            call.cancel()
        await asyncio.sleep(0.2)
        # The client is gone and the turn goes on...
        assert await db.fetchval("SELECT status FROM chat.turns") == "STREAMING"
        assert fake.disconnects == 0
        # ...until its maximum duration (1 s from its start), which closes the upstream too.
        await fake.wait_for_disconnect(timeout=3)

        async def ended() -> bool:
            return bool(await db.fetchval("SELECT status <> 'STREAMING' FROM chat.turns"))

        await eventually(ended, what="the turn to end")
    finally:
        process.close()
    row = await db.fetchrow("SELECT status, error_reason, assistant_text FROM chat.turns")
    assert row is not None
    assert tuple(row) == ("CANCELLED", "DEADLINE_EXCEEDED", partial)


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


async def test_a_conversation_watcher_that_joins_mid_turn_gets_whole_turns_only(
    replicas: Replicas, fake: FakeAnthropic
) -> None:
    """WatchConversation sends turns that start after the call, each from its `started`: a watcher
    that joins while its process already follows a turn for another watcher does not get that
    turn's tail, whose deltas it could not place."""
    fake.script(Stream(["first"]), Stream(_WORDS, delay_s=0.03), Stream(["third"]))
    async with _stub(replicas.addresses[0]) as stub, _stub(replicas.addresses[1]) as other:
        first = Received()
        await _read(stub.Chat(pb.ChatRequest(text="one")), first, events=1000)
        conversation = first.turn.rsplit("/turns/", 1)[0]
        request = pb.WatchConversationRequest(conversation=conversation)
        early = other.WatchConversation(request)
        seen: dict[str, list[pb.TurnEvent]] = {"early": [], "late": []}

        async def follow(name: str, call: AsyncIterable[pb.ChatResponse], turns: int) -> None:
            async for response in call:
                seen[name].append(response.event)
                if response.event.HasField("completed"):
                    turns -= 1
                    if turns == 0:
                        return

        following = [asyncio.ensure_future(follow("early", early, 2))]
        await asyncio.sleep(0.5)  # the process's reader waits for the next turn
        second = Received()
        call = stub.Chat(pb.ChatRequest(conversation=conversation, text="two"))
        await _read(call, second, events=6)
        # The second watcher joins while the process's reader follows the second turn.
        late = other.WatchConversation(request)
        following.append(asyncio.ensure_future(follow("late", late, 1)))
        await asyncio.sleep(0.3)
        await _read(call, second, events=1000)
        third = Received()
        await _read(stub.Chat(pb.ChatRequest(conversation=conversation, text="three")), third, events=1000)
        await asyncio.wait_for(asyncio.gather(*following), timeout=10)
        early.cancel()
        late.cancel()
    kinds = [event.WhichOneof("kind") for event in seen["late"]]
    assert kinds == ["started", "text_delta", "completed"], kinds
    assert seen["late"][0].started.turn == third.turn
    assert [event.started.turn for event in seen["early"] if event.HasField("started")] == [
        second.turn,
        third.turn,
    ]


async def test_a_malformed_turn_start_does_not_stop_a_conversations_watchers(
    replicas: Replicas, fake: FakeAnthropic, redis: aioredis.Redis
) -> None:
    """The one reader a process keeps per watched conversation serves every watcher: an entry it
    cannot read (written by a bug, or by hand) is skipped, and the next turn still arrives."""
    fake.script(Stream(["first"]), Stream(["second"]))
    async with _stub(replicas.addresses[0]) as stub, _stub(replicas.addresses[1]) as other:
        first = Received()
        await _read(stub.Chat(pb.ChatRequest(text="one")), first, events=1000)
        conversation = first.turn.rsplit("/turns/", 1)[0]
        watching = Received()
        call = other.WatchConversation(pb.WatchConversationRequest(conversation=conversation))
        following = asyncio.ensure_future(_read_text(call, watching, "second"))
        await asyncio.sleep(0.5)  # the process's reader waits for the next turn
        await redis.xadd(
            live.conversation_key(uuid.UUID(conversation.rsplit("/", 1)[1])), {"t": "not a turn"}
        )
        await asyncio.sleep(0.3)
        second = Received()
        await _read(stub.Chat(pb.ChatRequest(conversation=conversation, text="two")), second, events=1000)
        await asyncio.wait_for(following, timeout=10)
        call.cancel()
    assert watching.turn == second.turn
    assert watching.text == "second"


async def _stream_reads(redis: aioredis.Redis) -> int:
    """XREAD and XRANGE commands Redis has served so far (on every node of a cluster)."""
    if isinstance(redis, RedisClusterClient):
        per_node = await redis.info("commandstats", target_nodes=RedisClusterClient.ALL_NODES)
        stats = [node for node in per_node.values() if isinstance(node, dict)]
    else:
        stats = [await redis.info("commandstats")]
    names = ("cmdstat_xread", "cmdstat_xrange")
    return sum(int(node[name]["calls"]) for node in stats for name in names if name in node)


async def test_many_watchers_of_a_conversation_cost_redis_the_reads_of_one(
    replicas: Replicas, fake: FakeAnthropic, redis: aioredis.Redis
) -> None:
    """A server process reads a watched conversation once for all its watchers: 50 watchers on
    the other replica cost Redis the stream reads of one."""
    fake.script(Stream(["first"]), Stream(_WORDS, delay_s=0.01), Stream(_WORDS, delay_s=0.01))
    async with _stub(replicas.addresses[0]) as stub, _stub(replicas.addresses[1]) as other:
        first = Received()
        await _read(stub.Chat(pb.ChatRequest(text="one")), first, events=1000)
        conversation = first.turn.rsplit("/turns/", 1)[0]

        async def reads_of_a_turn_watched_by(watchers: int) -> int:
            calls = [
                other.WatchConversation(pb.WatchConversationRequest(conversation=conversation))
                for _ in range(watchers)
            ]

            async def until_completed(call: AsyncIterable[pb.ChatResponse]) -> None:
                async for response in call:
                    if response.event.HasField("completed"):
                        return

            following = [asyncio.ensure_future(until_completed(call)) for call in calls]
            await asyncio.sleep(0.5)  # every watcher is in; the reader waits for the next turn
            before = await _stream_reads(redis)
            turn = stub.Chat(pb.ChatRequest(conversation=conversation, text="next"))
            await _read(turn, Received(), events=1000)
            await asyncio.wait_for(asyncio.gather(*following), timeout=10)
            spent = await _stream_reads(redis) - before
            for call in calls:
                call.cancel()
            return spent

        one = await reads_of_a_turn_watched_by(1)
        many = await reads_of_a_turn_watched_by(50)
    assert one > 0
    # One reader per watcher would be 50 times as many.
    assert many <= 2 * one + 5, (one, many)


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
