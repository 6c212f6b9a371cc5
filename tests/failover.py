"""The failover scenario behind tests/test_failover.py: a fleet on a Redis Cluster loses a primary.

Turns flow from several clients (the real SDK) through 2 `chatstream serve` processes into a
Redis Cluster of the scenario's own (3 primaries, 3 replicas; tests/redis_cluster.py), and 2
`chatstream consume` processes persist them. While they flow:

1. the primary serving one of the turn shards is killed with kill -9 right after it
   acknowledged writes its replica never saw, and the replica is promoted without them. To lose
   writes for certain rather than by luck, the consumers and the replica are frozen (SIGSTOP)
   and the replication link cut first: the servers took those turns as published, no consumer
   was given them, and only the relay can bring them to PostgreSQL;
2. one server process is killed with kill -9 and started again on its address;
3. one consumer process is killed with kill -9 and started again.

The SDK resumes a stream its server dropped (WatchTurn, on the same address); a call that fails
anyway is tried again with the same request_id on the other server, as a real client would.
Then I1, I2 and I7 are checked (tests/invariants.py), and the turns whose entries the failover
lost undelivered are checked to have been re-published by the relay.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg
import grpc
from chatstream import AsyncChatClient, ChatClientError, RetryPolicy, TurnCompleted, TurnEvent, TurnStatus
from redis.crc import key_slot

from server.config import Settings
from server.constants import PERSISTENCE_GROUP, turns_stream
from server.publisher import shard_for
from server.turn_codec import decode_turn
from tests.conftest import raw_redis
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.invariants import (
    ClientTurn,
    assert_completed_turns_stored,
    assert_interrupted_turns_kept,
    assert_no_duplicates,
    relayed_turns,
    wait_settled,
)
from tests.processes import ChatstreamProcess, free_port, settings_env, wait_for_port
from tests.redis_cluster import RedisCluster

SHARDS = 4
CLIENTS_PER_SHARD = 2
LEASE_S = 2
WARM_UP_TURNS = 40
"""Turns completed before the first kill."""
LOST_WRITES = 2
"""Writes the doomed primary acknowledges after its replica was cut off (waited for up to
``_LOSS_WINDOW_S``)."""
SETTLE_TIMEOUT_S = 45.0

_LOSS_WINDOW_S = 0.8  # below the cluster's node timeout: the frozen replica stays a healthy node
_CLIENT_ATTEMPTS = 40
_CONSUMER_BLOCK_MS = 200
# What a client tries again: a server or a dependency gone for now (AIP-194).
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class Load:
    """What the clients saw."""

    completed: dict[str, ClientTurn] = field(default_factory=dict)
    """Turns (by name) whose TurnCompleted arrived (first time or replayed), as the client saw them."""
    restarted: dict[str, ClientTurn] = field(default_factory=dict)
    """Turns a killed server left INTERRUPTED, which the SDK started again as new turns, with
    the part of their reply the client had got of them."""
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: int = 0
    given_up: int = 0


@dataclass(frozen=True, slots=True)
class Report:
    """The figures of one run, for the log and the closing note of the issue."""

    turns: int
    clients: int
    statuses: dict[str, int]
    restarted: int
    """INTERRUPTED turns the SDK started again (their TurnCompleted never reached the caller)."""
    client_retries: int
    promoted_after_s: float
    lost_writes: int
    """Entries the killed primary had acknowledged that its promoted replica never had."""
    stranded_writes: int
    """Those of them no consumer had been given: the relay re-published each."""
    converged_after_s: float
    """From the last kill until every turn had its rows, none was STREAMING and nothing was
    pending (no new turn starts after the last kill)."""
    messages: int
    relayed: int
    """Turns the relay re-published: lost writes, publishes that failed during the failover,
    turns of the killed server (interrupted by the lease sweeper)."""
    seconds: float

    def __str__(self) -> str:
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(self.statuses.items()))
        return (
            f"{self.turns} turns from {self.clients} clients ({statuses} as the clients saw them, "
            f"{self.restarted} INTERRUPTED and started again by the SDK); "
            "kills: 1 Redis primary (kill -9, replica promoted in "
            f"{self.promoted_after_s:.1f} s), 1 server and 1 consumer (kill -9, restarted); "
            f"{self.lost_writes} acknowledged writes lost by the failover ({self.stranded_writes} never "
            "delivered to a consumer, all re-published by the relay); "
            f"converged {self.converged_after_s:.1f} s after the last kill; "
            f"{self.messages} message rows (= 2 x turns), 0 duplicates, 0 pending, 0 STREAMING, "
            f"0 dead letters; {self.relayed} turns re-published by the relay; "
            f"{self.client_retries} calls tried again with their request_id; {self.seconds:.0f} s in all"
        )


async def run_scenario(*, database_url: str, fake: FakeAnthropic) -> Report:
    """Runs the whole scenario on a cluster of its own; raises AssertionError on any broken invariant."""
    began = time.monotonic()
    cluster = RedisCluster()
    try:
        await asyncio.to_thread(cluster.start)
        return await _scenario(cluster, database_url=database_url, fake=fake, began=began)
    finally:
        await asyncio.to_thread(cluster.close)


async def _scenario(cluster: RedisCluster, *, database_url: str, fake: FakeAnthropic, began: float) -> Report:
    # Every process names the node of the URL, which is never the one killed: a process that
    # starts while the node its URL names is down cannot read the slot map (docs/deployment.md).
    url_port = cluster.ports[0]
    doomed_shard = next(
        k for k in range(SHARDS) if cluster.port_serving(key_slot(turns_stream(k).encode())) != url_port
    )
    doomed = cluster.port_serving(key_slot(turns_stream(doomed_shard).encode()))
    settings = Settings.from_fields(
        database_url=database_url,
        redis_url=f"redis://127.0.0.1:{url_port}/0",
        anthropic_api_key="test",
        anthropic_base_url=fake.url,
        model="claude-test",
        llm_max_retries=0,
        llm_timeout_s=10.0,
    )
    # Distinct replies, so that a row holding another turn's text cannot pass for its own.
    fake.script(
        *(Stream([f"reply {n}:", " one", " two", " three", " four"], delay_s=0.04) for n in range(5000))
    )
    redis_client = raw_redis(settings.redis.redis_url, "cluster")
    db = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        async with _fleet(settings) as fleet, _clients(fleet.addresses) as clients:
            conversations = await _conversations(clients[0])
            load = Load()
            stop = asyncio.Event()
            driver = asyncio.create_task(_drive(clients, conversations, load, stop))
            try:
                await _until(lambda: len(load.completed) >= WARM_UP_TURNS, driver, what="the warm-up turns")
                lost = await asyncio.to_thread(
                    _fail_over_losing_writes, cluster, doomed, fleet, shards=SHARDS
                )
                await asyncio.to_thread(cluster.wait_failover, doomed)
                promoted_after_s = time.monotonic() - lost.killed_at

                fleet.restart_server(0)
                last_kill = fleet.restart_consumer(0)
            finally:
                # No new turn from here: what converges is what the kills left in flight.
                stop.set()
            await driver
            await wait_settled(db, redis_client, SHARDS, timeout_s=SETTLE_TIMEOUT_S)
            converged_after_s = time.monotonic() - last_kill

            # The restarted server serves as the other does: one more turn per client, half on it.
            await asyncio.to_thread(wait_for_port, fleet.addresses[0], process=fleet.servers[0])
            after = [
                _turn(clients, i, load, name, f"client {i} after the kills")
                for i, name in enumerate(conversations)
            ]
            assert all(await asyncio.gather(*after))
            state = await wait_settled(db, redis_client, SHARDS, timeout_s=SETTLE_TIMEOUT_S)
            assert load.given_up == 0, f"{load.given_up} clients gave up"
            assert state.turns == len(load.completed) + len(load.restarted), "a turn no client saw end"
            assert state.dead == 0, "nothing is poison here: nothing may reach the dead-letter stream"
            await assert_completed_turns_stored(db, load.completed)
            await assert_interrupted_turns_kept(db, load.restarted)
            await assert_no_duplicates(db)
            await _assert_relayed(db, lost, load)
            return Report(
                turns=state.turns,
                clients=len(conversations),
                statuses=dict(load.statuses),
                restarted=len(load.restarted),
                client_retries=load.retries,
                promoted_after_s=promoted_after_s,
                lost_writes=len(lost.delivered) + len(lost.stranded),
                stranded_writes=len(lost.stranded),
                converged_after_s=converged_after_s,
                messages=state.messages,
                relayed=await relayed_turns(db),
                seconds=time.monotonic() - began,
            )
    finally:
        await db.close()
        await redis_client.aclose()


@dataclass(frozen=True, slots=True)
class LostWrites:
    """Turns whose stream entries the killed primary acknowledged and its promoted replica lacks."""

    delivered: list[uuid.UUID]
    """Already handed to a consumer (XREADGROUP answered into a frozen process's socket): that
    consumer persists them when it wakes, with or without Redis."""
    stranded: list[uuid.UUID]
    """Never handed to any consumer: nothing but the relay can bring them to PostgreSQL."""
    killed_at: float
    """When the primary was killed (monotonic clock)."""


def _fail_over_losing_writes(
    cluster: RedisCluster, primary: int, fleet: _Fleet, *, shards: int
) -> LostWrites:
    """kill -9 of ``primary`` once it has acknowledged writes nobody else has.

    Blocking (run it in a thread): the servers write to the primary meanwhile. They are frozen
    just before the kill, so that every write the primary has then is one whose whole
    pipeline it answered: the server took the turn as published.
    """
    keys = [
        turns_stream(k)
        for k in range(shards)
        if cluster.port_serving(key_slot(turns_stream(k).encode())) == primary
    ]
    replica = cluster.replica_of(primary)
    with _frozen(fleet.consumers):
        # A frozen consumer's XREADGROUP still blocked on the primary would be answered into
        # its socket; past the block time none is, and new entries stay undelivered.
        time.sleep(_CONSUMER_BLOCK_MS / 1000 + 0.1)
        cluster.freeze(replica)
        try:
            cluster.cut_replication(primary)
            cut = {key: cluster.last_id(primary, key) for key in keys}
            deadline = time.monotonic() + _LOSS_WINDOW_S
            while time.monotonic() < deadline:
                if sum(len(cluster.stream_after(primary, key, cut[key])) for key in keys) >= LOST_WRITES:
                    break
                time.sleep(0.02)
            with _frozen(fleet.servers):
                time.sleep(0.05)  # what the servers sent before they froze reaches the primary
                acknowledged = {key: cluster.stream_after(primary, key, cut[key]) for key in keys}
                delivered_up_to = {
                    key: _entry_id(cluster.last_delivered_id(primary, key, PERSISTENCE_GROUP)) for key in keys
                }
                cluster.kill(primary)
                killed_at = time.monotonic()
        finally:
            cluster.thaw(replica)
    kept = {key: _entry_id(cluster.last_id(replica, key)) for key in keys}
    lost = LostWrites(delivered=[], stranded=[], killed_at=killed_at)
    for key, entries in acknowledged.items():
        for entry_id, fields in entries:
            number = _entry_id(entry_id.decode())
            assert number > kept[key], f"the replica has {entry_id!r} of {key}"
            turn_id = decode_turn(fields).id
            (lost.delivered if number <= delivered_up_to[key] else lost.stranded).append(turn_id)
    return lost


def _entry_id(text: str) -> tuple[int, int]:
    milliseconds, sequence = text.split("-")
    return int(milliseconds), int(sequence)


@contextlib.contextmanager
def _frozen(processes: Sequence[ChatstreamProcess]) -> Iterator[None]:
    for process in processes:
        process.freeze()
    try:
        yield
    finally:
        for process in processes:
            process.thaw()


async def _assert_relayed(db: asyncpg.Connection, lost: LostWrites, load: Load) -> None:
    """The turns whose entries the failover lost reached their clients, and the relay re-published
    each one no consumer had been given."""
    assert lost.stranded, "no acknowledged write was lost undelivered: the scenario proved nothing"
    everything = [*lost.delivered, *lost.stranded]
    seen = {uuid.UUID(name.rsplit("/", 1)[1]) for name in load.completed}
    assert set(everything) <= seen, "a lost write's turn had sent TurnCompleted, after its XADD"
    relayed = await db.fetch(
        "SELECT id FROM chat.turns WHERE id = ANY($1::uuid[]) AND relay_count > 0", lost.stranded
    )
    assert {row["id"] for row in relayed} == set(lost.stranded)


class _Fleet:
    """2 `serve` and 2 `consume` processes, each one replaceable by a new one."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        self.servers: list[ChatstreamProcess] = []
        self.consumers: list[ChatstreamProcess] = []
        self.killed: list[ChatstreamProcess] = []

    def start_server(self, index: int) -> ChatstreamProcess:
        env = settings_env(
            self._settings,
            CHATSTREAM_LISTEN=self.addresses[index],
            CHATSTREAM_REDIS_CLUSTER="true",
            CHATSTREAM_TURN_LEASE_S=str(LEASE_S),
            CHATSTREAM_DB_POOL_SIZE="4",
        )
        return ChatstreamProcess(["serve"], env)

    def start_consumer(self) -> ChatstreamProcess:
        env = settings_env(
            self._settings,
            CHATSTREAM_REDIS_CLUSTER="true",
            CHATSTREAM_DB_POOL_SIZE="4",
            CHATSTREAM_CONSUMER_BLOCK_MS=str(_CONSUMER_BLOCK_MS),
            CHATSTREAM_CONSUMER_CLAIM_IDLE_MS="1000",
            CHATSTREAM_RELAY_INTERVAL_S="0.5",
            CHATSTREAM_RELAY_GRACE_S="1",
        )
        return ChatstreamProcess(["consume"], env)

    def restart_server(self, index: int) -> float:
        """kill -9 of a server, and a new one on its address; returns when it was killed."""
        killed_at = self._kill(self.servers[index])
        self.servers[index] = self.start_server(index)
        return killed_at

    def restart_consumer(self, index: int) -> float:
        """kill -9 of a consumer (its pending entries stay behind), and a new one."""
        killed_at = self._kill(self.consumers[index])
        self.consumers[index] = self.start_consumer()
        return killed_at

    def _kill(self, process: ChatstreamProcess) -> float:
        process.kill()
        self.killed.append(process)
        return time.monotonic()

    def processes(self) -> list[ChatstreamProcess]:
        return [*self.servers, *self.consumers, *self.killed]


@contextlib.asynccontextmanager
async def _fleet(settings: Settings) -> AsyncIterator[_Fleet]:
    fleet = _Fleet(settings)
    try:
        fleet.servers = [fleet.start_server(i) for i in range(2)]
        fleet.consumers = [fleet.start_consumer() for _ in range(2)]
        for server, address in zip(fleet.servers, fleet.addresses, strict=True):
            await asyncio.to_thread(wait_for_port, address, process=server)
        yield fleet
    except BaseException:
        for process in fleet.processes():
            print(f"--- output of {process.pid}:\n{process.log()}")
        raise
    finally:
        for process in fleet.processes():
            process.close()


@contextlib.asynccontextmanager
async def _clients(addresses: Sequence[str]) -> AsyncIterator[list[AsyncChatClient]]:
    """One SDK client per server; a restarted server is reconnected to within a second."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                AsyncChatClient(
                    address,
                    chat_timeout=timedelta(seconds=30),
                    # Past this the caller's own retry moves to the other server.
                    retry_policy=RetryPolicy(resume_window=timedelta(seconds=10)),
                    options=[
                        ("grpc.initial_reconnect_backoff_ms", 200),
                        ("grpc.max_reconnect_backoff_ms", 1000),
                    ],
                )
            )
            for address in addresses
        ]


async def _conversations(client: AsyncChatClient) -> list[str]:
    """CLIENTS_PER_SHARD conversations on every shard, so that every primary's streams are busy."""
    names: list[str] = []
    for shard in range(SHARDS):
        ids: list[uuid.UUID] = []
        while len(ids) < CLIENTS_PER_SHARD:
            candidate = uuid.uuid4()
            if shard_for(candidate, SHARDS) == shard:
                ids.append(candidate)
        for conversation_id in ids:
            names.append((await client.create_conversation(conversation_id=str(conversation_id))).name)
    return names


async def _drive(
    clients: Sequence[AsyncChatClient], conversations: Sequence[str], load: Load, stop: asyncio.Event
) -> None:
    async def one_client(index: int, conversation: str) -> None:
        n = 0
        while not stop.is_set():
            if not await _turn(clients, index, load, conversation, f"client {index} turn {n}"):
                return
            n += 1

    await asyncio.gather(*(one_client(i, name) for i, name in enumerate(conversations)))


async def _turn(
    clients: Sequence[AsyncChatClient], first: int, load: Load, conversation: str, text: str
) -> bool:
    """One turn to its TurnCompleted, as a client of several servers would; False if it gave up.

    The call goes to ``clients[first]``; one that fails is tried again with the same
    request_id, on the next server. The SDK resumes a broken stream by itself, and starts a turn
    its dying server left INTERRUPTED again: the events of every turn of the call are kept.
    """
    request_id = "failover-" + text.replace(" ", "-")
    for attempt in range(_CLIENT_ATTEMPTS):
        client = clients[(first + attempt) % len(clients)]
        seen = _Seen()
        try:
            async with contextlib.aclosing(
                client.chat(text, conversation=conversation, request_id=request_id)
            ) as events:
                async for event in events:
                    seen.add(event)
        except ChatClientError as err:
            if err.code not in _RETRIED:
                raise AssertionError(f"{request_id}: a fault surfaced as {err}") from err
            load.retries += 1
            await asyncio.sleep(min(0.1 * (attempt + 1), 0.5))
            continue
        *restarted, (turn, reply) = seen.turns
        assert seen.completed is not None, f"{request_id}: the stream of {turn} ended without TurnCompleted"
        for interrupted, partial in restarted:
            load.restarted[interrupted] = ClientTurn(user_text=text, reply_text="".join(partial))
        load.completed[turn] = ClientTurn(user_text=text, reply_text="".join(reply))
        load.statuses[TurnStatus(seen.completed.status).name] += 1
        return True
    load.given_up += 1
    return False


class _Seen:
    """The events of one call, turn by turn: a restart opens with a second TurnStarted."""

    def __init__(self) -> None:
        self.turns: list[tuple[str, list[str]]] = []
        """Each turn's name and the text deltas the call got of it."""
        self.completed: TurnCompleted | None = None

    def add(self, event: TurnEvent) -> None:
        match event.WhichOneof("kind"):
            case "started":
                self.turns.append((event.started.turn, []))
            case "text_delta":
                assert self.turns, "a text delta before TurnStarted"
                self.turns[-1][1].append(event.text_delta.text)
            case "completed":
                self.completed = event.completed


async def _until(condition: Callable[[], bool], driver: asyncio.Task[None], *, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        if driver.done():
            await driver
            raise AssertionError(f"the clients stopped before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
