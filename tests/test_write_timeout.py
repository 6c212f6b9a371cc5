"""A client that never reads cannot hold its turn, its conversation or a stream slot."""

from __future__ import annotations

import asyncpg
from chatstream import AsyncChatClient, TurnStatus
from chatstream.v1 import chat_service_pb2 as pb

from tests.conftest import StartServer, eventually
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.raw_http2 import RawHttp2


async def test_a_stream_whose_client_accepts_no_write_is_cancelled_and_frees_its_slot(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    # One stream slot in all: the stuck call holds it until the write timeout frees it.
    server = await start_server(write_timeout_s=1.0, max_streams=1)
    # The model is still producing when the write timeout passes (a model that finished
    # first would leave the turn COMPLETED, stored whole, and only free the slot).
    fake.script(Stream([f"w{i} " for i in range(100)], delay_s=0.1))
    async with await RawHttp2.connect(server.address) as raw:
        await raw.stop_reading()
        await raw.send(
            "/chatstream.v1.ChatService/Chat", pb.ChatRequest(text="never read").SerializeToString()
        )

        async def cancelled() -> bool:
            row = await db.fetchrow("SELECT status, error_reason FROM chat.turns")
            return row is not None and (row["status"], row["error_reason"]) == ("CANCELLED", "CANCELLED")

        # Well under the 30 s lease that would end it otherwise (INTERRUPTED).
        await eventually(cancelled, timeout_s=8, what="the unread turn to end CANCELLED")
        # Its slot is free again while the stuck connection is still open.
        async with AsyncChatClient(server.address) as client:
            reply = await client.chat_reply("my turn")
        assert reply.status == TurnStatus.TURN_STATUS_COMPLETED
