"""A client that never reads cannot hold its turn, its conversation or a stream slot."""

from __future__ import annotations

import asyncpg
import grpc
from chatstream import AsyncChatClient, ChatClientError, ChatReply, TurnStatus
from chatstream.v1 import chat_service_pb2 as pb

from server.app import ChatServer
from tests.conftest import StartServer, eventually
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.raw_http2 import RawHttp2

_REPLY = [f"w{i} " for i in range(40)]
_KEEP_GOING = "SELECT status, assistant_text, error_reason FROM chat.turns WHERE user_text = 'keep going'"


async def _send_and_never_read(raw: RawHttp2, request: pb.ChatRequest) -> None:
    await raw.stop_reading()
    await raw.send("/chatstream.v1.ChatService/Chat", request.SerializeToString())


async def _chat_once_the_slot_is_free(server: ChatServer, text: str) -> ChatReply:
    """Chats as soon as the server's one stream slot is free (TOO_MANY_STREAMS until then)."""
    replies: list[ChatReply] = []

    async def admitted() -> bool:
        async with AsyncChatClient(server.address) as client:
            try:
                replies.append(await client.chat_reply(text))
            except ChatClientError as err:
                if (err.code, err.reason) != (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS"):
                    raise
                return False
        return True

    # Well under the 30 s lease that would end the stuck turn otherwise (INTERRUPTED).
    await eventually(admitted, timeout_s=8, what="the stream slot to be free")
    return replies[0]


async def test_a_stream_whose_client_accepts_no_write_is_cancelled_and_frees_its_slot(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    # One stream slot in all: the stuck call holds it until the write timeout frees it.
    server = await start_server(write_timeout_s=1.0, max_streams=1)
    # The model is still producing when the write timeout passes (a model that finished
    # first would leave the turn COMPLETED, stored whole, and only free the slot).
    fake.script(Stream(_REPLY, delay_s=0.1))
    async with await RawHttp2.connect(server.address) as raw:
        await _send_and_never_read(raw, pb.ChatRequest(text="never read"))

        async def cancelled() -> bool:
            row = await db.fetchrow("SELECT status, error_reason FROM chat.turns")
            return row is not None and (row["status"], row["error_reason"]) == ("CANCELLED", "CANCELLED")

        await eventually(cancelled, timeout_s=8, what="the unread turn to end CANCELLED")
        # With what the model had produced by then, although the client got none of it.
        stored = await db.fetchval("SELECT assistant_text FROM chat.turns")
        full = "".join(_REPLY)
        assert full.startswith(stored), stored
        assert 0 < len(stored) < len(full), stored
        # Its slot is free again while the stuck connection is still open.
        reply = await _chat_once_the_slot_is_free(server, "my turn")
    assert reply.status == TurnStatus.TURN_STATUS_COMPLETED


async def test_a_continue_turn_whose_client_accepts_no_write_frees_its_slot_and_keeps_generating(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """ON_DISCONNECT_CONTINUE: the turn does not depend on that client, so it goes on to the end."""
    server = await start_server(write_timeout_s=1.0, max_streams=1)
    fake.script(Stream(_REPLY, delay_s=0.1))  # about 4 s
    async with await RawHttp2.connect(server.address) as raw:
        await _send_and_never_read(
            raw, pb.ChatRequest(text="keep going", on_disconnect=pb.ON_DISCONNECT_CONTINUE)
        )
        reply = await _chat_once_the_slot_is_free(server, "my turn")
        assert reply.status == TurnStatus.TURN_STATUS_COMPLETED
        # The slot came back at the write timeout, not at the end of the unread turn.
        assert await db.fetchval(_KEEP_GOING) == "STREAMING"

        async def completed() -> bool:
            row = await db.fetchrow(_KEEP_GOING)
            return row is not None and row["status"] == "COMPLETED"

        await eventually(completed, timeout_s=15, what="the unread CONTINUE turn to complete")
    row = await db.fetchrow(_KEEP_GOING)
    assert row is not None
    assert (row["assistant_text"], row["error_reason"]) == ("".join(_REPLY), None)
