"""Graceful shutdown of real `chatstream serve` and `chatstream consume` processes on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError, TurnStatus
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import Settings
from server.constants import PERSISTENCE_GROUP, turns_stream
from tests.conftest import eventually
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.processes import ChatstreamProcess, serve_process, settings_env


async def test_sigterm_drains_the_server_and_records_streams_cut_by_the_grace_period(
    settings: Settings, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    with serve_process(settings, CHATSTREAM_SHUTDOWN_GRACE_S="2", CHATSTREAM_SHUTDOWN_DRAIN_S="0.3") as (
        process,
        address,
    ):
        fake.script(Stream(["stuck"], then="stall"), Stream(["quick", " one"], delay_s=0.4))
        async with (
            AsyncChatClient(address) as client,
            grpc.aio.insecure_channel(address) as channel,
        ):
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="chatstream.v1.ChatService")
            )
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            # resume=False: this is about the server's shutdown; a resuming SDK would go on
            # trying the stopped server for its resume window before it gave up.
            stuck = client.chat("this one never ends", resume=False)
            assert (await anext(stuck)).HasField("started")
            assert (await anext(stuck)).text_delta.text == "stuck"
            quick = asyncio.create_task(client.chat_reply("this one ends in time"))
            await fake.wait_for_requests(2, timeout=5)

            signalled_at = time.monotonic()
            process.process.send_signal(signal.SIGTERM)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING

            # In-flight calls that finish within the grace period complete normally.
            reply = await quick
            assert reply.status == TurnStatus.TURN_STATUS_COMPLETED
            # Past the grace period the stuck stream is cut, and its turn recorded.
            with pytest.raises(ChatClientError) as caught:
                async for _ in stuck:
                    pass
            assert caught.value.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            assert time.monotonic() - signalled_at < 10
        assert process.process.wait(timeout=15) == 0
    rows = await db.fetch("SELECT user_text, status, assistant_text FROM chat.turns ORDER BY user_text")
    assert [tuple(r) for r in rows] == [
        ("this one ends in time", "COMPLETED", "quick one"),
        ("this one never ends", "CANCELLED", "stuck"),
    ]


async def test_sigterm_drains_turns_that_continue_without_their_client(
    settings: Settings, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """ON_DISCONNECT_CONTINUE turns have no call for the gRPC server's grace to wait for: the
    shutdown lets them finish within the grace period like any other, then cancels the rest."""
    with serve_process(settings, CHATSTREAM_SHUTDOWN_GRACE_S="3", CHATSTREAM_SHUTDOWN_DRAIN_S="0.3") as (
        process,
        address,
    ):
        fake.script(Stream(["stuck"], then="stall"), Stream(["slow ", "but ", "in ", "time"], delay_s=0.3))
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ChatServiceStub(channel)
            for text, events in (("this one never ends", 2), ("this one ends in time", 1)):
                call = stub.Chat(pb.ChatRequest(text=text, on_disconnect=pb.ON_DISCONNECT_CONTINUE))
                for _ in range(events):
                    await call.read()
                call.cancel()  # the client leaves; the turn goes on
        await fake.wait_for_requests(2, timeout=5)
        assert await db.fetchval("SELECT count(*) FROM chat.turns WHERE status = 'STREAMING'") == 2
        signalled_at = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.process.wait, 15) == 0
        assert time.monotonic() - signalled_at < 10
    rows = await db.fetch("SELECT user_text, status, assistant_text FROM chat.turns ORDER BY user_text")
    assert [tuple(r) for r in rows] == [
        ("this one ends in time", "COMPLETED", "slow but in time"),
        ("this one never ends", "CANCELLED", "stuck"),
    ]


async def test_sigterm_stops_the_consumer_after_it_acked_what_it_read(
    settings: Settings, client: AsyncChatClient, db: asyncpg.Connection, redis: aioredis.Redis
) -> None:
    for i in range(20):
        await client.chat_reply(f"message {i}")
    process = ChatstreamProcess(["consume"], settings_env(settings, CHATSTREAM_CONSUMER_BLOCK_MS="200"))
    try:

        async def persisted() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM chat.messages") == 40)

        await eventually(persisted, timeout_s=30, what="the consumer to persist every turn")
        started = time.monotonic()
        assert process.terminate(timeout_s=15) == 0, process.log()
        assert time.monotonic() - started < 5
    finally:
        process.close()
    for k in range(settings.redis.shards):
        assert (await redis.xpending(turns_stream(k), PERSISTENCE_GROUP))["pending"] == 0
