"""The fault scenario behind tests/test_faults.py and bench/soak.py.

It owns its PostgreSQL and Redis (it restarts them), runs the server in-process and
the consumers as real `chatstream consume` processes that it SIGKILLs at random
moments, and pushes turns through the SDK the whole time. Then it checks PostgreSQL:
every turn whose TurnCompleted reached a client has exactly its two messages, every
ended turn is persisted, nothing is duplicated, the pending lists are empty and the
dead-letter stream holds exactly the entries the scenario poisoned on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg
import grpc
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError

from server.app import ChatServer
from server.config import Settings
from server.constants import DEAD_LETTER_STREAM, turns_stream
from server.db.migrate import upgrade_async
from tests.conftest import stream_entries
from tests.invariants import (
    ClientTurn,
    assert_completed_turns_stored,
    assert_no_duplicates,
    relayed_turns,
    wait_settled,
)
from tests.processes import ChatstreamProcess, PostgresProcess, RedisProcess, settings_env

CLIENTS = 16
POISON = 3


@dataclass
class Load:
    """What the clients saw."""

    completed: dict[str, ClientTurn] = field(default_factory=dict)
    """Turns (by name) whose TurnCompleted arrived (first time or replayed), as the client saw them."""
    attempts: int = 0
    retries: int = 0
    given_up: int = 0
    sent: int = 0


@dataclass(frozen=True)
class Report:
    """What happened, for the log and the soak document."""

    turns: int
    seed: int
    seconds: float
    consumer_kills: int
    client_retries: int
    relayed: int
    """Turns the relay had to publish again (Redis lost them, or the consumer lagged)."""
    messages: int
    dead_letters: int

    def __str__(self) -> str:
        return (
            f"{self.turns} turns in {self.seconds:.1f} s ({self.turns / self.seconds:.0f} turns/s), "
            f"seed {self.seed}: {self.consumer_kills} consumer SIGKILLs, 1 Redis restart (no persistence), "
            "1 PostgreSQL restart, "
            f"{self.client_retries} client retries, {self.relayed} turns re-published by the relay, "
            f"{self.messages} message rows (= 2 x turns), "
            f"{self.dead_letters} dead letters (all poisoned on purpose), 0 pending, 0 duplicates"
        )


@contextlib.asynccontextmanager
async def own_services() -> AsyncIterator[tuple[PostgresProcess, RedisProcess]]:
    """A PostgreSQL and a Redis that the scenario may restart."""
    pg = PostgresProcess()
    redis_server = RedisProcess()
    redis_server.start()
    try:
        await upgrade_async(pg.url)
        yield pg, redis_server
    finally:
        redis_server.close()
        pg.close()


@contextlib.asynccontextmanager
async def _consumers(
    settings: Settings, rng: random.Random, *, kill: asyncio.Event
) -> AsyncIterator[list[int]]:
    """Keeps one consumer process running, SIGKILLing it at random moments until ``kill`` clears."""
    env = settings_env(
        settings,
        CHATSTREAM_CONSUMER_BLOCK_MS="200",
        CHATSTREAM_CONSUMER_CLAIM_IDLE_MS="1000",
        CHATSTREAM_RELAY_INTERVAL_S="0.5",
        CHATSTREAM_RELAY_GRACE_S="1",
        CHATSTREAM_CONSUMER_BATCH="100",
    )
    kills: list[int] = []
    current = ChatstreamProcess(["consume"], env)

    async def chaos() -> None:
        nonlocal current
        while True:
            # Each restart costs a process start (~1 CPU-second of imports), so kills are
            # spaced to leave the machine's two cores to the load.
            await asyncio.sleep(rng.uniform(1.0, 2.5))
            if kill.is_set():
                current.kill()
                kills.append(current.pid)
                current.close()
                current = ChatstreamProcess(["consume"], env)

    task = asyncio.create_task(chaos())
    try:
        yield kills
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        current.close()


async def _drive(client: AsyncChatClient, load: Load, turns: int, progress: asyncio.Queue[int]) -> None:
    async def one_client(index: int) -> None:
        conversation = ""
        for n in range(turns):
            request_id = f"fault-{index}-{n}"
            text = f"client {index} turn {n}"
            for attempt in range(40):
                load.attempts += 1
                try:
                    reply = await client.chat_reply(text, conversation=conversation, request_id=request_id)
                except ChatClientError as err:
                    if err.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                        raise AssertionError(f"a fault surfaced as {err}") from err
                    load.retries += 1
                    await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
                    continue
                conversation = reply.conversation
                load.completed[reply.turn] = ClientTurn(user_text=text, reply_text=reply.text)
                break
            else:
                load.given_up += 1
            load.sent += 1
            progress.put_nowait(load.sent)

    await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))


async def run_scenario(*, turns: int, seed: int, upstream_url: str) -> Report:
    """Runs the whole scenario on fresh services; raises AssertionError on any broken invariant."""
    async with own_services() as (pg, redis_server):
        return await _scenario(pg, redis_server, turns=turns, seed=seed, upstream_url=upstream_url)


async def _scenario(
    pg: PostgresProcess, redis_server: RedisProcess, *, turns: int, seed: int, upstream_url: str
) -> Report:
    rng = random.Random(seed)
    started = time.monotonic()
    settings = Settings.from_fields(
        database_url=pg.url,
        redis_url=redis_server.url,
        listen="127.0.0.1:0",
        anthropic_api_key="test",
        anthropic_base_url=upstream_url,
        model="claude-test",
        llm_max_retries=0,
        turn_lease_s=3,
        db_pool_size=8,
        shutdown_grace_s=1,
    )
    server = ChatServer(settings)
    await server.start()
    load = Load()
    progress: asyncio.Queue[int] = asyncio.Queue()
    chaos_on = asyncio.Event()
    chaos_on.set()
    per_client = turns // CLIENTS
    total = per_client * CLIENTS
    poisoned: set[tuple[bytes, bytes]] = set()
    redis_client = aioredis.from_url(redis_server.url)
    try:
        async with (
            AsyncChatClient(server.address, chat_timeout=timedelta(seconds=20)) as client,
            _consumers(settings, rng, kill=chaos_on) as kills,
        ):
            driver = asyncio.create_task(_drive(client, load, per_client, progress))
            restarted_redis = restarted_pg = False
            while not driver.done():
                try:
                    sent = await asyncio.wait_for(progress.get(), timeout=1)
                except TimeoutError:
                    continue
                if not restarted_redis and sent >= total * rng.uniform(0.25, 0.35):
                    redis_server.restart()
                    restarted_redis = True
                if not restarted_pg and sent >= total * rng.uniform(0.55, 0.65):
                    await asyncio.to_thread(pg.restart)
                    restarted_pg = True
                    # Poison after the Redis restart, so the restart cannot erase it.
                    for i in range(POISON):
                        stream = turns_stream(i % settings.redis.shards).encode()
                        entry_id = await redis_client.xadd(stream, {"v": "1", "turn": f"not json {i}"})
                        poisoned.add((stream, entry_id if isinstance(entry_id, bytes) else entry_id.encode()))
            await driver
            chaos_on.clear()
            assert restarted_redis
            assert restarted_pg
            assert load.given_up == 0

            # Let the last consumer (no longer killed), the relay and the lease sweeper finish.
            db = await asyncpg.connect(pg.url.replace("+asyncpg", ""))
            try:
                state = await wait_settled(
                    db, redis_client, settings.redis.shards, timeout_s=90, dead_letters=POISON, poll_s=0.5
                )
                assert len(load.completed) == total
                await assert_completed_turns_stored(db, load.completed)
                await assert_no_duplicates(db)
                relayed = await relayed_turns(db)
            finally:
                await db.close()

            # I7: only the poison reached the dead-letter stream (redelivery may copy it twice).
            dead = await stream_entries(redis_client, DEAD_LETTER_STREAM)
            assert {(f[b"dlq_source"], f[b"dlq_entry_id"]) for _, f in dead} == poisoned
            return Report(
                turns=total,
                seed=seed,
                seconds=time.monotonic() - started,
                consumer_kills=len(kills),
                client_retries=load.retries,
                relayed=relayed,
                messages=state.messages,
                dead_letters=len(dead),
            )
    finally:
        chaos_on.clear()
        await redis_client.aclose()
        await server.stop(grace_s=0)
