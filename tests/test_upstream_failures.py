"""Upstream failures, cancels and deadlines: one terminal status each, partial text kept, never UNKNOWN."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import timedelta

import asyncpg
import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError, TurnEvent

from server.anthropic_sse import (
    message_delta_event,
    message_start_event,
    message_stop_event,
    sse_frame,
    text_delta_event,
)
from server.app import ChatServer
from tests.conftest import Consume, StartServer, eventually
from tests.fake_anthropic import Error, FakeAnthropic, Raw, Script, StallBeforeHeaders, Stream
from tests.proxy import CuttingProxy


async def _turn_row(db: asyncpg.Connection) -> asyncpg.Record:
    row = await db.fetchrow("SELECT status, assistant_text, error_reason FROM chat.turns")
    assert row is not None
    return row


async def _chat_until_error(client: AsyncChatClient, text: str) -> tuple[list[TurnEvent], ChatClientError]:
    events: list[TurnEvent] = []
    try:
        async for event in client.chat(text):
            events.append(event)
    except ChatClientError as err:
        return events, err
    raise AssertionError(f"the call succeeded: {events}")


@pytest.mark.parametrize(
    ("script", "code", "reason", "partial"),
    [
        (
            Error(529, "overloaded_error", "Overloaded"),
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            "",
        ),
        (
            Error(429, "rate_limit_error", "Slow down"),
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            "",
        ),
        (Error(500, "api_error", "Boom"), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", ""),
        (Error(503, "api_error", "Down"), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", ""),
        (Error(400, "invalid_request_error", "bad"), grpc.StatusCode.INTERNAL, "INTERNAL", ""),
        (Error(401, "authentication_error", "who"), grpc.StatusCode.INTERNAL, "INTERNAL", ""),
        (Error(403, "permission_error", "no"), grpc.StatusCode.INTERNAL, "INTERNAL", ""),
        (
            Stream(["par", "tial", "x"], then="error", error_after=2),
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            "partial",
        ),
        (
            Stream(["par", "tial"], then="error", error_type="invalid_request_error"),
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
            "partial",
        ),
        (
            Stream(["dro", "pped"], then="drop"),
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            "dropped",
        ),
        (Stream(["no", " stop"], then="eof"), grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", "no stop"),
        (
            Stream(["sta", "lled"], then="stall"),
            grpc.StatusCode.UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            "stalled",
        ),
        (
            Raw(b'event: message_start\ndata: {"type": "message_start", broken\n\n'),
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
            "",
        ),
    ],
)
async def test_upstream_failure_ends_the_turn_failed_with_partial_text_and_a_clear_status(
    start_server: StartServer,
    fake: FakeAnthropic,
    db: asyncpg.Connection,
    consume: Consume,
    script: Script,
    code: grpc.StatusCode,
    reason: str,
    partial: str,
) -> None:
    server = await start_server(llm_timeout_s=0.5)
    fake.script(script)
    async with AsyncChatClient(server.address) as client:
        events, err = await _chat_until_error(client, "hi")

    assert err.code == code
    assert err.reason == reason
    assert events[0].WhichOneof("kind") == "started"
    assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == partial
    if code == grpc.StatusCode.UNAVAILABLE:
        assert err.retry_delay is not None
    else:
        assert err.message == "internal error"  # nothing about the upstream leaks
    row = await _turn_row(db)
    assert (row["status"], row["assistant_text"], row["error_reason"]) == ("FAILED", partial, reason)
    # The failed turn is relayed and persisted like any other, flagged with its status.
    await consume()
    statuses = await db.fetch("SELECT role, turn_status, text FROM chat.messages ORDER BY role")
    assert [tuple(r) for r in statuses] == [(1, "FAILED", "hi"), (2, "FAILED", partial)]


async def test_a_caller_that_leaves_before_its_turn_is_named_still_ends_it_cancelled(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """The SDK asks the server to keep a turn going without its connection (so that it can
    resume); a caller that leaves before TurnStarted arrived must still stop that turn."""
    server = await start_server()
    fake.script(StallBeforeHeaders())
    async with CuttingProxy([server.address]) as proxy, AsyncChatClient(proxy.address) as client:
        await client.create_conversation()  # the connection is up before the replies are held
        proxy.hold_replies()
        task = asyncio.create_task(client.chat_reply("never answered"))
        await fake.wait_for_requests(1, timeout=5)
        task.cancel()
        proxy.release_replies()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        async def recorded() -> bool:
            row = await db.fetchrow("SELECT status, assistant_text FROM chat.turns")
            return row is not None and tuple(row) == ("CANCELLED", "")

        await eventually(recorded, what="the turn to be CANCELLED")
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 1


async def test_any_line_ending_and_any_read_boundary_give_the_same_reply(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """SSE lines may end in CRLF, LF or CR (§2.1), and reads may cut anywhere: inside a
    line, between a CR and its LF, inside a UTF-8 character."""
    frames = [
        sse_frame("message_start", message_start_event(model="claude-x", input_tokens=3)),
        # As the API sends it: UTF-8, not \\u escapes.
        b"event: content_block_delta\ndata: %s\n\n"
        % json.dumps(text_delta_event("héllo"), ensure_ascii=False).encode(),
        sse_frame("content_block_delta", text_delta_event(" wörld")),
        sse_frame("message_delta", message_delta_event(stop_reason="end_turn", output_tokens=2)),
        sse_frame("message_stop", message_stop_event()),
    ]
    for ending in (b"\r\n", b"\r"):
        body = b"".join(frames).replace(b"\n", ending)
        # Every cut after the first frame's CR, and one in the middle of "é" (0xC3 0xA9).
        cuts = [i + 1 for i in range(len(body)) if body[i : i + 1] == b"\r"]
        cuts.append(body.index("é".encode()) + 1)
        fake.script(Raw(body, split_at=sorted(set(cuts))))
        reply = await client.chat_reply("hi")
        assert reply.text == "héllo wörld"
    rows = await db.fetch("SELECT status, assistant_text FROM chat.turns")
    assert [tuple(r) for r in rows] == [("COMPLETED", "héllo wörld")] * 2


async def test_overloaded_upstream_is_retried_by_the_sdk_before_the_first_token(
    start_server: StartServer, fake: FakeAnthropic
) -> None:
    server = await start_server(llm_max_retries=2)
    overloaded = Error(529, "overloaded_error", "Overloaded", {"retry-after-ms": "1"})
    fake.script(overloaded, overloaded, Stream(["fine"]))
    async with AsyncChatClient(server.address) as client:
        reply = await client.chat_reply("hi")
    assert reply.text == "fine"
    assert [r.retry_count for r in fake.requests] == [0, 1, 2]


async def test_client_cancel_closes_the_upstream_stream_within_a_second_and_keeps_the_partial_turn(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection, consume: Consume
) -> None:
    """I8: the upstream HTTP stream is closed promptly after the caller leaves."""
    fake.script(Stream(["so", " far"], then="stall", delay_s=0.02))
    async with contextlib.aclosing(client.chat("cancel me")) as events:
        received = [await anext(events) for _ in range(3)]
        assert received[-1].text_delta.text == " far"
        cancelled_at = time.monotonic()
    disconnected_at = await fake.wait_for_disconnect(timeout=1.0)
    assert disconnected_at - cancelled_at < 1.0

    async def recorded() -> bool:
        row = await db.fetchrow("SELECT status, assistant_text FROM chat.turns")
        return row is not None and tuple(row) == ("CANCELLED", "so far")

    await eventually(recorded, what="the CANCELLED turn with its partial text")
    await consume()
    texts = await db.fetch("SELECT text, turn_status FROM chat.messages ORDER BY role")
    assert [tuple(r) for r in texts] == [("cancel me", "CANCELLED"), ("so far", "CANCELLED")]


async def test_deadline_cancels_the_turn_and_the_upstream(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    fake.script(Stream(["before", " deadline"], then="stall", delay_s=0.02))
    events: list[TurnEvent] = []

    async def chat() -> None:
        async for event in client.chat("hurry", timeout=timedelta(seconds=0.7)):
            events.append(event)

    with pytest.raises(ChatClientError) as caught:
        await chat()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [e.WhichOneof("kind") for e in events] == ["started", "text_delta", "text_delta"]
    await fake.wait_for_disconnect(timeout=1.0)

    async def recorded() -> bool:
        row = await db.fetchrow("SELECT status, assistant_text FROM chat.turns")
        return row is not None and tuple(row) == ("CANCELLED", "before deadline")

    await eventually(recorded, what="the turn cut by the deadline to be CANCELLED")


async def test_server_stays_healthy_and_serving_after_every_kind_of_failure(
    server: ChatServer, client: AsyncChatClient, fake: FakeAnthropic
) -> None:
    """I9: failures end calls, never the server."""
    fake.script(Error(500, "api_error", "x"), Stream(["a"], then="drop"), Raw(b"garbage"), Stream(["ok"]))
    for _ in range(3):
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply("hi")
        assert caught.value.code != grpc.StatusCode.UNKNOWN
    assert (await client.chat_reply("hi")).text == "ok"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(server.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_turn_recording_survives_the_caller_going_away_during_the_model_wait(
    client: AsyncChatClient, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """Cancelled before any token: the turn still ends in exactly one terminal status."""
    fake.script(StallBeforeHeaders())
    task = asyncio.create_task(client.chat_reply("never answered"))
    await fake.wait_for_requests(1, timeout=5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    async def recorded() -> bool:
        row = await db.fetchrow("SELECT status, assistant_text FROM chat.turns")
        return row is not None and tuple(row) == ("CANCELLED", "")

    await eventually(recorded, what="the turn to be CANCELLED")
    await fake.wait_for_disconnect(timeout=1.0)
