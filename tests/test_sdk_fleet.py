"""One SDK client over a fleet: three real `chatstream serve` processes behind one client.

The client is given the three addresses, so gRPC balances its calls round_robin over them.
Which process served or produces a call is read from the outside, from each process's own
metrics port. The processes share the test PostgreSQL and Redis and the fake upstream; their
turn lease is short, so that a killed producer's turn ends INTERRUPTED within a second or two.
The processes are started once for the module; a test that kills one leaves the next test a
fresh one in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest
from chatstream import AsyncChatClient, ChatClient, RetryPolicy, TurnEvent, TurnStatus
from chatstream._common import channel_target
from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings
from tests.conftest import Consume, Services
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.processes import ChatstreamProcess, free_port, settings_env, wait_for_port

_SERVERS = 3
_LEASE_S = 1
_WORDS = [f"w{i:02d} " for i in range(40)]
_REPLY = "".join(_WORDS)
_DEFAULT_REPLY = "Hello from the fake model."


@dataclass
class Server:
    """One `chatstream serve` process, its gRPC address and its metrics port."""

    address: str
    metrics_port: int
    process: ChatstreamProcess

    @property
    def alive(self) -> bool:
        return self.process.process.poll() is None


class Fleet:
    """The module's serving processes; a killed one is replaced before the next test."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.servers: list[Server] = []

    def fill(self) -> None:
        """Starts a process for every missing or dead one, all at once, and waits for them."""
        for server in self.servers:
            if not server.alive:
                server.process.close()
        self.servers = [server for server in self.servers if server.alive]
        starting = [self._spawn() for _ in range(_SERVERS - len(self.servers))]
        for server in starting:
            wait_for_port(server.address, process=server.process)
            wait_for_port(f"127.0.0.1:{server.metrics_port}", process=server.process)
        self.servers.extend(starting)

    def _spawn(self) -> Server:
        address = f"127.0.0.1:{free_port()}"
        metrics_port = free_port()
        env = settings_env(
            self._settings,
            CHATSTREAM_LISTEN=address,
            CHATSTREAM_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
            CHATSTREAM_TURN_LEASE_S=str(_LEASE_S),
        )
        return Server(address, metrics_port, ChatstreamProcess(["serve"], env))

    @property
    def addresses(self) -> list[str]:
        return [server.address for server in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.process.close()


@pytest.fixture(scope="module")
def _fleet(services: Services, fake_upstream: FakeAnthropic) -> Iterator[Fleet]:
    # The `settings` fixture is per test; these processes outlive one, so they get the same
    # settings built from the session's services (a single Redis: the SDK is the subject here).
    settings = Settings.from_fields(
        database_url=services.database_url,
        redis_url=services.redis_url,
        anthropic_api_key="test",
        anthropic_base_url=fake_upstream.url,
        model="claude-test",
        llm_max_retries=0,
        llm_timeout_s=5.0,
    )
    fleet = Fleet(settings)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def fleet(_fleet: Fleet) -> Fleet:
    _fleet.fill()
    return _fleet


async def _metric(server: Server, name: str, **labels: str) -> float:
    def get() -> str:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def _completed(server: Server) -> float:
    return await _metric(server, "chatstream_turns_total", status="COMPLETED")


async def test_calls_of_one_client_take_turns_over_every_server(fleet: Fleet, fake: FakeAnthropic) -> None:
    before = [await _completed(server) for server in fleet.servers]
    async with AsyncChatClient(fleet.addresses) as client:
        replies = [await client.chat_reply(f"message {i}") for i in range(3 * _SERVERS)]
    assert [reply.text for reply in replies] == [_DEFAULT_REPLY] * (3 * _SERVERS)
    served = [await _completed(server) - b for server, b in zip(fleet.servers, before, strict=True)]
    # round_robin over three ready connections gives each server every third call; the first
    # call may go out while only some connections are ready, hence not exactly 3 each.
    assert sum(served) == 3 * _SERVERS
    assert min(served) >= 2, served


async def test_a_grpc_target_string_with_several_addresses_is_balanced_too(
    fleet: Fleet, fake: FakeAnthropic
) -> None:
    before = [await _completed(server) for server in fleet.servers]
    with ChatClient(f"ipv4:{','.join(fleet.addresses)}") as client:
        for i in range(3 * _SERVERS):
            await asyncio.to_thread(client.chat_reply, f"message {i}")
    served = [await _completed(server) - b for server, b in zip(fleet.servers, before, strict=True)]
    assert sum(served) == 3 * _SERVERS
    assert min(served) >= 2, served


@pytest.mark.parametrize(
    ("addresses", "target"),
    [
        (["chat.internal:443"], "chat.internal:443"),
        (["10.0.0.1:1", "10.0.0.2:2"], "ipv4:10.0.0.1:1,10.0.0.2:2"),
        (["[fd00::1]:1", "[fd00::2]:2"], "ipv6:[fd00::1]:1,[fd00::2]:2"),
    ],
)
def test_a_list_of_addresses_becomes_one_grpc_target(addresses: list[str], target: str) -> None:
    assert channel_target(addresses) == target
    assert channel_target(target) == target  # a string is gRPC's own target, left as it is


@pytest.mark.parametrize(
    "addresses",
    [[], ["a.internal:1", "b.internal:1"], ["10.0.0.1:1", "[fd00::1]:1"], ["10.0.0.1", "10.0.0.2"]],
)
def test_several_addresses_must_be_ip_addresses_of_one_family_with_ports(addresses: list[str]) -> None:
    with pytest.raises(ValueError, match="address"):
        ChatClient(addresses)


async def test_a_cancelled_turn_is_not_started_again(fleet: Fleet, fake: FakeAnthropic) -> None:
    fake.script(Stream(_WORDS, delay_s=0.05))
    events: list[TurnEvent] = []
    async with AsyncChatClient(fleet.addresses) as client, AsyncChatClient(fleet.addresses) as other:
        async for event in client.chat("stop me"):
            events.append(event)
            if len(events) == 3:
                assert await other.cancel_turn(events[0].started.turn) is TurnStatus.CANCELLED
    assert sum(e.HasField("started") for e in events) == 1
    assert events[-1].completed.status is TurnStatus.CANCELLED
    assert len(fake.requests) == 1


async def _producer(fleet: Fleet) -> Server:
    """The one process producing a turn right now."""
    producing = [server for server in fleet.servers if await _metric(server, "chatstream_active_streams")]
    assert len(producing) == 1, producing
    return producing[0]


def _segments(events: list[TurnEvent]) -> list[list[TurnEvent]]:
    """The events split before each `started`: one list per turn the call went through."""
    segments: list[list[TurnEvent]] = []
    for event in events:
        if event.HasField("started"):
            segments.append([])
        segments[-1].append(event)
    return segments


def _text(segment: list[TurnEvent]) -> str:
    """The segment's text, checking that each delta starts where the previous one ended."""
    text = ""
    for event in segment:
        if event.HasField("text_delta"):
            assert event.text_delta.offset == len(text), (event.text_delta.offset, len(text))
            text += event.text_delta.text
    return text


async def test_a_server_killed_mid_turn_leaves_the_client_with_the_whole_reply(
    fleet: Fleet, fake: FakeAnthropic, db: asyncpg.Connection, consume: Consume
) -> None:
    # Paced so that the kill lands mid-turn: 40 deltas 50 ms apart; the restart is quicker.
    fake.script(Stream(_WORDS, delay_s=0.05), Stream(_WORDS, delay_s=0.01))
    events: list[TurnEvent] = []
    killed: Server | None = None
    began = time.monotonic()
    async with (
        AsyncChatClient(fleet.addresses, chat_timeout=timedelta(seconds=30)) as client,
        contextlib.aclosing(client.chat("tell me", request_id="fleet-1")) as stream,
    ):
        async for event in stream:
            events.append(event)
            if len(events) == 4:
                killed = await _producer(fleet)
                killed.process.kill()
    took_s = time.monotonic() - began
    assert killed is not None
    assert not killed.alive

    # What the caller saw: the interrupted turn's start and partial text, then a second
    # `started` for the new turn, whose events are the whole reply; one `completed`, last.
    interrupted, restarted = _segments(events)
    assert interrupted[0].started.turn != restarted[0].started.turn
    assert interrupted[0].started.conversation == restarted[0].started.conversation
    assert not any(e.HasField("completed") for e in interrupted)
    partial = _text(interrupted)
    assert len(partial) < len(_REPLY)
    assert _REPLY.startswith(partial)
    assert _text(restarted) == _REPLY
    assert restarted[-1].completed.status is TurnStatus.COMPLETED
    for segment in (interrupted, restarted):
        seqs = [e.seq for e in segment]
        assert seqs[0] == 1
        assert all(a < b for a, b in itertools.pairwise(seqs)), seqs
    assert len(fake.requests) == 2
    # A dead producer is known only once its lease expires; then the restart streams.
    assert took_s < 10 * _LEASE_S + 5, took_s

    rows = await db.fetch("SELECT request_id, status, assistant_text FROM chat.turns ORDER BY seq")
    assert [tuple(r) for r in rows] == [
        ("fleet-1", "INTERRUPTED", partial),
        ("fleet-1:restart:1", "COMPLETED", _REPLY),
    ]
    await consume()
    messages = await db.fetch("SELECT role, text, turn_status FROM chat.messages ORDER BY turn_seq, role")
    assert [tuple(m) for m in messages] == [
        (1, "tell me", "INTERRUPTED"),
        (2, partial, "INTERRUPTED"),
        (1, "tell me", "COMPLETED"),
        (2, _REPLY, "COMPLETED"),
    ]

    # The same call again (a caller retrying with its request_id): the interrupted turn is
    # replayed, then the restart it made, not a third turn. The blocking client folds it into
    # the last turn's reply.
    def again(policy: RetryPolicy) -> tuple[str, TurnStatus, int, bool]:
        with ChatClient(fleet.addresses, retry_policy=policy) as blocking:
            reply = blocking.chat_reply("tell me", request_id="fleet-1")
            return reply.text, reply.status, reply.restarts, reply.replay

    assert await asyncio.to_thread(again, RetryPolicy()) == (_REPLY, TurnStatus.COMPLETED, 1, True)
    # Without restarts, the interrupted turn is the reply, as before restarts existed.
    assert await asyncio.to_thread(again, RetryPolicy(max_restarts=0)) == (
        partial,
        TurnStatus.INTERRUPTED,
        0,
        True,
    )
    assert len(fake.requests) == 2
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 2
