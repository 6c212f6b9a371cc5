"""Limits: stream concurrency, message and metadata sizes, keepalive abuse, slow handshakes, pages."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import asyncpg
import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError

from server.app import ChatServer
from server.config import AuthMode
from tests.conftest import StartServer, eventually
from tests.credentials import api_key, bearer
from tests.fake_anthropic import FakeAnthropic, Gate, Stream
from tests.probes import assert_clean_error, assert_still_serving
from tests.raw_http2 import RawHttp2

ENHANCE_YOUR_CALM = 0xB


async def _two_owner_server(start_server: StartServer, **limits: object) -> tuple[ChatServer, str, str]:
    key_a, entry_a = api_key("tenant-a")
    key_b, entry_b = api_key("tenant-b")
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(entry_a, entry_b), **limits)
    return server, key_a, key_b


async def test_streams_per_owner_are_limited_without_side_effects_and_released_after(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    server, key_a, key_b = await _two_owner_server(start_server, max_streams_per_owner=1, max_streams=10)
    gate = Gate()
    fake.script(Stream(["held"], hold=gate))
    async with (
        AsyncChatClient(server.address, metadata=bearer(key_a)) as a,
        AsyncChatClient(server.address, metadata=bearer(key_b)) as b,
    ):
        async with contextlib.aclosing(a.chat("first")) as held:
            await anext(held)
            await gate.wait_reached(timeout=5)
            with pytest.raises(ChatClientError) as caught:
                await a.chat_reply("second")
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.reason == "TOO_MANY_STREAMS"
            assert caught.value.metadata == {"scope": "owner", "limit": "1"}
            assert caught.value.retry_delay is not None
            assert_clean_error(caught.value)
            # The refused call ran nothing: one upstream request, one turn.
            assert len(fake.requests) == 1
            assert await db.fetchval("SELECT count(*) FROM chat.turns") == 1
            # Another owner is not affected by A's limit.
            assert (await b.chat_reply("meanwhile")).text
            gate.open()
            assert [e.WhichOneof("kind") async for e in held][-1] == "completed"
        # The slot came back when the stream ended.
        assert (await a.chat_reply("third")).text


async def test_a_cancelled_stream_gives_its_slot_back(start_server: StartServer, fake: FakeAnthropic) -> None:
    server, key_a, _ = await _two_owner_server(start_server, max_streams_per_owner=1)
    fake.script(Stream(["a"], then="stall"))
    async with AsyncChatClient(server.address, metadata=bearer(key_a)) as a:
        async with contextlib.aclosing(a.chat("will be cancelled")) as events:
            kinds = [(await anext(events)).WhichOneof("kind") for _ in range(2)]
            assert kinds == ["started", "text_delta"]  # the upstream stream is open now
        await fake.wait_for_disconnect(timeout=5)

        async def admitted() -> bool:
            try:
                await a.chat_reply("again")
            except ChatClientError as err:
                if err.reason != "TOO_MANY_STREAMS":
                    raise
                return False
            return True

        await eventually(admitted, what="the cancelled stream's slot to be released")


async def test_streams_per_server_are_limited(start_server: StartServer, fake: FakeAnthropic) -> None:
    server, key_a, key_b = await _two_owner_server(start_server, max_streams=1)
    gate = Gate()
    fake.script(Stream(["held"], hold=gate))
    async with (
        AsyncChatClient(server.address, metadata=bearer(key_a)) as a,
        AsyncChatClient(server.address, metadata=bearer(key_b)) as b,
        contextlib.aclosing(a.chat("first")) as held,
    ):
        await anext(held)
        with pytest.raises(ChatClientError) as caught:
            await b.chat_reply("second")
        assert (caught.value.code, caught.value.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_STREAMS",
        )
        assert caught.value.metadata["scope"] == "server"
        # Unary calls are not streams and stay available.
        await b.create_conversation()
        gate.open()
        _ = [e async for e in held]


async def test_oversized_requests_and_texts_are_refused_before_any_side_effect(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    server = await start_server(max_request_bytes=4096, max_text_chars=100)
    async with AsyncChatClient(server.address, timeout=timedelta(seconds=5)) as client:
        with pytest.raises(ChatClientError) as too_big:
            await client.chat_reply("x" * 5000)
        with pytest.raises(ChatClientError) as too_long:
            await client.chat_reply("y" * 101)
    assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert too_long.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert too_long.value.field_violations == (("text", "must be at most 100 characters"),)
    assert fake.requests == []
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 0
    await assert_still_serving(server.address)


async def test_oversized_metadata_is_refused(start_server: StartServer, fake: FakeAnthropic) -> None:
    server = await start_server(max_metadata_bytes=2048)
    async with AsyncChatClient(
        server.address, metadata=[("x-padding", "p" * 4096)], timeout=timedelta(seconds=5)
    ) as client:
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply("hello")
    assert caught.value.code in {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL}
    assert fake.requests == []
    await assert_still_serving(server.address)


async def test_page_size_bounds_come_from_settings(start_server: StartServer) -> None:
    server = await start_server(default_page_size=2, max_page_size=3)
    async with AsyncChatClient(server.address) as client:
        for _ in range(5):
            await client.create_conversation()
        assert len((await client.list_conversations_page()).conversations) == 2
        assert len((await client.list_conversations_page(page_size=1000)).conversations) == 3
        with pytest.raises(ChatClientError) as caught:
            await client.list_conversations_page(page_size=-1)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in caught.value.field_violations] == ["page_size"]


async def test_a_ping_flood_gets_goaway(start_server: StartServer) -> None:
    server = await start_server(keepalive_min_ping_interval_s=10.0, keepalive_max_ping_strikes=2)
    async with await RawHttp2.connect(server.address) as raw:
        outcome = await raw.ping_flood(20)
    assert outcome.goaway_code == ENHANCE_YOUR_CALM, outcome
    assert b"too_many_pings" in outcome.goaway_data
    await assert_still_serving(server.address)


async def test_a_connection_that_never_finishes_its_handshake_is_closed(start_server: StartServer) -> None:
    server = await start_server(handshake_timeout_s=0.5)
    host, port = server.address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        # Silence: no HTTP/2 preface. The server must hang up on its own, soon.
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    assert loop.time() - started < 5
    assert data.endswith(b"Did not receive HTTP/2 settings before handshake timeout")
    await assert_still_serving(server.address)


async def test_unary_calls_are_not_counted_as_streams(start_server: StartServer) -> None:
    server = await start_server(max_streams=1, max_streams_per_owner=1)
    async with AsyncChatClient(server.address) as client:
        results = await asyncio.gather(*(client.create_conversation() for _ in range(5)))
    assert len({c.name for c in results}) == 5


async def test_without_authentication_only_the_server_limit_applies(
    start_server: StartServer, fake: FakeAnthropic
) -> None:
    """One owner for everything: a per-owner cap would just be a lower server cap."""
    server = await start_server(max_streams_per_owner=1, max_streams=2)
    gate = Gate()
    fake.script(Stream(["held"], hold=gate))
    async with AsyncChatClient(server.address) as client, contextlib.aclosing(client.chat("first")) as held:
        await anext(held)
        await gate.wait_reached(timeout=5)
        assert (await client.chat_reply("second")).text
        gate.open()
        assert [e.WhichOneof("kind") async for e in held][-1] == "completed"
