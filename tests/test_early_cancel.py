"""A client gone at any moment of a turn: the turn is terminal at once, never left to its lease.

The lease in these tests is the default 30 s, so a turn that the server failed to record
would still be STREAMING long after the bounds below; every check here would fail.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap

import asyncpg
import grpc
import pytest
from chatstream import AsyncChatClient
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc

from server.app import ChatServer
from tests.conftest import eventually
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.raw_http2 import RawHttp2

_REPLY = [f"w{i} " for i in range(20)]
# Terminal "at once": far below the 30 s lease, with room for a loaded CI machine.
_TERMINAL_WITHIN_S = 3.0
# Polls (20 ms apart) with an unchanged turn count before the table counts as settled.
_QUIET_POLLS = 25


async def _all_terminal(db: asyncpg.Connection, expected: int | None = None) -> None:
    """Waits until no turn is STREAMING and no new one has appeared for a while.

    A call cancelled while its unit of work 1 is still queued on a loaded machine commits its
    turn after the client is gone; that turn must then end CANCELLED at once too.
    """
    seen: list[int] = []

    async def settled() -> bool:
        counts = await db.fetchrow(
            "SELECT count(*) AS n, count(*) FILTER (WHERE status = 'STREAMING') AS streaming FROM chat.turns"
        )
        assert counts is not None
        seen.append(counts["n"])
        quiet = len(seen) > _QUIET_POLLS and len(set(seen[-_QUIET_POLLS:])) == 1
        done = counts["streaming"] == 0 and quiet
        return done and (expected is None or counts["n"] == expected)

    await eventually(settled, timeout_s=_TERMINAL_WITHIN_S + 2, what="every turn to be terminal")
    statuses = {r["status"] for r in await db.fetch("SELECT DISTINCT status FROM chat.turns")}
    assert statuses <= {"CANCELLED", "COMPLETED"}, statuses
    full = "".join(_REPLY)
    for row in await db.fetch("SELECT assistant_text FROM chat.turns"):
        assert full.startswith(row["assistant_text"])


async def test_cancels_at_random_moments_from_zero_end_every_turn_cancelled_at_once(
    server: ChatServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    calls = 200  # issue 15: 200 cancels from 0 ms
    for _ in range(calls):
        fake.script(Stream(_REPLY, delay_s=0.002))
    rng = random.Random(20261201)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.ChatServiceStub(channel)

        async def cancel_after(delay_s: float) -> None:
            call = stub.Chat(pb.ChatRequest(text="cancel me"))
            await asyncio.sleep(delay_s)
            call.cancel()

        await asyncio.gather(*(cancel_after(rng.uniform(0, 0.04)) for _ in range(calls)))
        await _all_terminal(db)
        # Every conversation a cancelled turn started is usable at once.
        conversations = await db.fetch("SELECT DISTINCT conversation_id FROM chat.turns LIMIT 5")
    async with AsyncChatClient(server.address) as client:
        for row in conversations:
            reply = await client.chat_reply("next", conversation=f"conversations/{row['conversation_id']}")
            assert reply.text == "".join(_REPLY)


async def test_a_raw_http2_client_that_resets_right_after_the_request_leaves_no_turn_streaming(
    server: ChatServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    resets = 30
    for _ in range(resets):
        fake.script(Stream(_REPLY, delay_s=0.002))
    message = pb.ChatRequest(text="reset me").SerializeToString()
    async with await RawHttp2.connect(server.address) as raw:
        for _ in range(resets):
            await raw.send_and_reset("/chatstream.v1.ChatService/Chat", message)
        await _all_terminal(db)


async def test_a_client_process_killed_right_after_sending_leaves_its_turn_cancelled(
    server: ChatServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    fake.script(Stream(_REPLY, delay_s=0.05))
    child = textwrap.dedent(
        f"""
        import asyncio, sys
        import grpc
        from chatstream.v1 import chat_service_pb2 as pb, chat_service_pb2_grpc as pb_grpc

        async def main():
            channel = grpc.aio.insecure_channel({server.address!r})
            call = pb_grpc.ChatServiceStub(channel).Chat(pb.ChatRequest(text="killed"))
            await call.wait_for_connection()
            print("sent", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)
        assert line.strip() == "sent"
        process.kill()
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    await _all_terminal(db, expected=1)
    assert await db.fetchval("SELECT status FROM chat.turns") == "CANCELLED"


@pytest.mark.parametrize("when", ["before_turn_started", "mid_reply"])
async def test_a_disconnect_never_logs_an_error(
    server: ChatServer,
    fake: FakeAnthropic,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    when: str,
) -> None:
    fake.script(Stream(_REPLY, delay_s=0.01))
    async with AsyncChatClient(server.address) as client:
        events = client.chat("bye")
        if when == "mid_reply":
            await anext(events)
            await anext(events)
        task = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.001 if when == "before_turn_started" else 0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await events.aclose()
    await _all_terminal(db)
    assert [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []
