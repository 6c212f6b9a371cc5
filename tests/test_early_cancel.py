"""A client gone at any moment of a turn: the turn is terminal at once, never left to its lease.

The lease in these tests is the default 30 s, so a turn that the server failed to record
would still be STREAMING long after the bounds below; every check here would fail.
"""

from __future__ import annotations

import asyncio
import collections
import random
import subprocess
import sys
import textwrap
import time
import uuid

import asyncpg
import grpc
import pytest
from chatstream import AsyncChatClient
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc

from server.app import ChatServer
from server.config import Settings
from tests.conftest import eventually
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.processes import serve_process
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


async def test_200_cancels_from_zero_against_a_serve_process_end_within_a_second_of_each_cancel(
    settings: Settings, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """Issue 15's acceptance: 200 cancels from 0 ms, each turn terminal within 1 s of its cancel,
    none INTERRUPTED or FAILED, and no ERROR in the server's log.

    Against a real `chatstream serve`: the in-process server above shares the clients' event
    loop, so only a handful of its 200 calls get as far as a turn. The cancels fall from 0 to
    150 ms after the call (a reply takes about 50 ms): before the handler runs, while unit of
    work 1 commits, while TurnStarted or a delta is written, and after the reply ended.
    """
    calls = 200
    for _ in range(calls):
        fake.script(Stream(_REPLY, delay_s=0.002))
    rng = random.Random(20261202)
    cancelled_at: dict[str, float] = {}
    # Admission by load off: a fresh process would shed most of a 200-call burst, and this test
    # is about the calls it lets in.
    with serve_process(settings, CHATSTREAM_ADMISSION_MAX_LAG_MS="0", CHATSTREAM_ADMISSION_MAX_CPU="0") as (
        process,
        address,
    ):
        # One whole turn first: the burst meets a warm process (pools connected, code loaded).
        fake.script(Stream(_REPLY))
        async with AsyncChatClient(address) as client:
            assert (await client.chat_reply("warm up")).text == "".join(_REPLY)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ChatServiceStub(channel)

            async def cancel_after(n: int, delay_s: float) -> None:
                request_id = f"cancel-{n}"
                await asyncio.sleep(n * 0.002)  # a call every 2 ms, each cancelled on its own clock
                call = stub.Chat(pb.ChatRequest(text="cancel me", request_id=request_id))
                await asyncio.sleep(delay_s)
                call.cancel()
                cancelled_at[request_id] = time.time()

            await asyncio.gather(*(cancel_after(n, rng.uniform(0, 0.15)) for n in range(calls)))
            await _all_terminal(db)
        log = process.log()
    rows = await db.fetch(
        "SELECT request_id, status, extract(epoch FROM completed_at)::float8 AS ended FROM chat.turns"
        " WHERE request_id LIKE 'cancel-%'"
    )
    # From the client's cancel to the stored outcome (one host, one clock); a turn that
    # completed before its cancel counts as 0.
    late_s = sorted(max(0.0, row["ended"] - cancelled_at[row["request_id"]]) for row in rows)
    statuses = collections.Counter(row["status"] for row in rows)
    # The numbers of record for docs/reliability.md (pytest -s shows them).
    print(
        f"\n{calls} cancels from 0 ms: {len(rows)} turns started, {dict(sorted(statuses.items()))}; "
        f"terminal {late_s[len(late_s) // 2] * 1000:.0f} ms after the cancel at the median, "
        f"{late_s[-1] * 1000:.0f} ms at most"
    )
    # The run started 73 turns (this one about 115); far fewer would prove little.
    assert len(rows) >= 40, len(rows)
    assert late_s[-1] < 1.0, late_s[-5:]
    assert "Traceback" not in log, log
    errors = [
        line for line in log.splitlines() if '"level": "ERROR"' in line or '"level": "CRITICAL"' in line
    ]
    assert errors == [], errors


async def test_a_raw_http2_client_that_resets_its_calls_leaves_no_turn_streaming(
    server: ChatServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """Some calls are reset in the same write as their request, the rest 0-100 ms after it (a
    rapid-reset burst: the issue's left 290 of 511 turns INTERRUPTED after their lease)."""
    at_once, later = 20, 80  # at most 100 streams open: the server's SETTINGS_MAX_CONCURRENT_STREAMS
    for _ in range(at_once + later):
        fake.script(Stream(_REPLY, delay_s=0.002))
    message = pb.ChatRequest(text="reset me").SerializeToString()
    rng = random.Random(20261203)
    async with await RawHttp2.connect(server.address) as raw:
        for _ in range(at_once):
            await raw.send_and_reset("/chatstream.v1.ChatService/Chat", message)

        async def reset_after(delay_s: float) -> None:
            stream_id = await raw.send("/chatstream.v1.ChatService/Chat", message)
            await asyncio.sleep(delay_s)
            await raw.reset(stream_id)

        await asyncio.gather(*(reset_after(rng.uniform(0, 0.1)) for _ in range(later)))
        await _all_terminal(db)
    # Resets in the same write as the request never reach a handler; the later ones must
    # have started turns, or this test would prove nothing.
    assert await db.fetchval("SELECT count(*) FROM chat.turns") >= 10


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
    await _run_then_kill(child)
    await _all_terminal(db, expected=1)
    assert await db.fetchval("SELECT status FROM chat.turns") == "CANCELLED"


async def test_a_client_process_killed_with_calls_at_every_stage_leaves_every_turn_ended_within_a_second(
    server: ChatServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """One kill -9 cuts 20 calls at once, each at another stage: just sent, its unit of work 1
    committing, TurnStarted or a delta being written, the reply done."""
    calls = 20
    for _ in range(calls):
        fake.script(Stream(_REPLY, delay_s=0.005))
    child = textwrap.dedent(
        f"""
        import asyncio
        import grpc
        from chatstream.v1 import chat_service_pb2 as pb, chat_service_pb2_grpc as pb_grpc

        async def main():
            channel = grpc.aio.insecure_channel({server.address!r})
            stub = pb_grpc.ChatServiceStub(channel)
            calls = []
            for n in range({calls}):
                calls.append(stub.Chat(pb.ChatRequest(text="killed", request_id=f"killed-{{n}}")))
                await asyncio.sleep(0.005)
            await calls[-1].wait_for_connection()
            print("sent", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    killed_at = await _run_then_kill(child)
    await _all_terminal(db)
    rows = await db.fetch("SELECT status, extract(epoch FROM completed_at)::float8 AS ended FROM chat.turns")
    assert len(rows) >= calls // 2, len(rows)
    late_s = max(row["ended"] - killed_at for row in rows)
    assert late_s < 1.0, late_s


async def _run_then_kill(child: str) -> float:
    """Runs the Python program ``child`` until it prints ``sent``, then kills it with SIGKILL.

    Returns when it was killed (``time.time()``).
    """
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = await asyncio.to_thread(process.stdout.readline)
        assert line.strip() == "sent"
        process.kill()
        return time.time()
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


async def test_a_reset_while_a_write_waits_for_the_client_ends_the_turn_cancelled_not_failed(
    server: ChatServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """The issue's FAILED/INTERNAL case: the client leaves while a write to it is in flight.

    A window of 100 bytes takes TurnStarted and a delta or two; the next write waits for a
    WINDOW_UPDATE that never comes (the write timeout is 30 s), and then the stream is reset
    while the model is still producing.
    """
    reply = [f"w{i} " for i in range(40)]
    fake.script(Stream(reply, delay_s=0.05))  # about 2 s
    async with await RawHttp2.connect(server.address) as raw:
        await raw.stop_reading(after_bytes=100)
        stream_id = await raw.send(
            "/chatstream.v1.ChatService/Chat", pb.ChatRequest(text="reset mid-write").SerializeToString()
        )

        async def started() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM chat.turns") == 1)

        await eventually(started, what="the turn to start")
        await asyncio.sleep(0.5)  # ten deltas or so: far past the window
        assert await db.fetchval("SELECT status FROM chat.turns") == "STREAMING"
        await raw.reset(stream_id)
        reset_at = time.time()
        await _all_terminal(db, expected=1)
    row = await db.fetchrow(
        "SELECT status, error_reason, assistant_text, extract(epoch FROM completed_at)::float8 AS ended"
        " FROM chat.turns"
    )
    assert row is not None
    assert (row["status"], row["error_reason"]) == ("CANCELLED", "CANCELLED")
    assert "".join(reply).startswith(row["assistant_text"])
    assert row["assistant_text"]
    assert row["ended"] - reset_at < 1.0


async def test_a_cancel_while_unit_of_work_1_waits_leaves_no_turn_streaming(
    server: ChatServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """The call is gone before its turn's statement commits: the turn it commits ends at once."""
    async with AsyncChatClient(server.address) as client:
        conversation = (await client.create_conversation()).name
    fake.script(Stream(_REPLY), Stream(_REPLY))
    conversation_id = conversation.split("/")[-1]
    async with grpc.aio.insecure_channel(server.address) as channel:
        # Unit of work 1 locks the conversation's row; hold that lock so the statement waits.
        async with db.transaction():
            await db.execute(
                "SELECT 1 FROM chat.conversations WHERE id = $1 FOR UPDATE", uuid.UUID(conversation_id)
            )
            call = pb_grpc.ChatServiceStub(channel).Chat(
                pb.ChatRequest(text="cancel while starting", conversation=conversation)
            )

            async def waiting() -> bool:
                waits = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
                )
                return bool(waits)

            await eventually(waiting, what="unit of work 1 to wait for the conversation's lock")
            call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED
        released_at = time.time()
        await _all_terminal(db)
    rows = await db.fetch("SELECT status, extract(epoch FROM completed_at)::float8 AS ended FROM chat.turns")
    # Either the statement never committed a turn, or the turn it committed was ended at once.
    for row in rows:
        assert row["status"] == "CANCELLED"
        assert row["ended"] - released_at < 1.0
    async with AsyncChatClient(server.address) as client:
        reply = await client.chat_reply("next", conversation=conversation)
    assert reply.text == "".join(_REPLY)


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
