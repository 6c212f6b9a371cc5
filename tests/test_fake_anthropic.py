"""The fake Anthropic server and the demo model speak the protocol the way the real SDK expects."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import anthropic
import httpx2
import pytest
from anthropic.types import MessageParam, TextBlock

from server.anthropic_sse import content_block_start_event, message_start_event, sse_frame
from server.demo_model import DEMO_MODEL, DemoModelServer, demo_reply
from tests.fake_anthropic import Error, FakeAnthropic, Gate, Raw, StallBeforeHeaders, Stream

MESSAGES: list[MessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeAnthropic) -> FakeAnthropic:
    fake_server.reset()
    return fake_server


def sdk(
    url: str, *, api_key: str = "test", max_retries: int = 0, timeout: float = 5.0
) -> anthropic.AsyncAnthropic:
    """The real SDK client, pointed at a local server; `api_key` is explicit so no env var leaks in."""
    return anthropic.AsyncAnthropic(base_url=url, api_key=api_key, max_retries=max_retries, timeout=timeout)


@pytest.fixture
async def client(fake: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with sdk(fake.url) as c:
        yield c


async def collect_text(client: anthropic.AsyncAnthropic, received: list[str] | None = None) -> list[str]:
    received = [] if received is None else received
    async with client.messages.stream(model="claude-x", max_tokens=100, messages=MESSAGES) as stream:
        async for text in stream.text_stream:
            received.append(text)
    return received


async def test_stream_helper_yields_deltas_and_final_message(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    fake.script(Stream(["Hel", "lo", " there"], delay_s=0.01, input_tokens=12))

    async with client.messages.stream(
        model="claude-x", max_tokens=100, messages=MESSAGES, system="be brief"
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()

    assert texts == ["Hel", "lo", " there"]
    assert isinstance(final.content[0], TextBlock)
    assert final.content[0].text == "Hello there"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 3)
    assert stream.request_id is not None
    assert stream.request_id.startswith("req_")
    [request] = fake.requests
    assert (request.method, request.path, request.retry_count) == ("POST", "/v1/messages", 0)
    assert request.headers["authorization"] == "Bearer test"
    assert request.body is not None
    assert request.body["stream"] is True
    assert (request.body["model"], request.body["system"]) == ("claude-x", "be brief")


async def test_create_stream_yields_raw_events_without_pings(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    fake.script(Stream(["a", "b"], pings_every=1, stop_reason="max_tokens"))

    stream = await client.messages.create(model="claude-x", max_tokens=2, messages=MESSAGES, stream=True)
    async with stream:
        events = [event async for event in stream]

    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[5].type == "message_delta"
    assert events[5].delta.stop_reason == "max_tokens"
    assert "x-stainless-helper-method" not in fake.requests[0].headers


async def test_overloaded_twice_then_success_is_retried(fake: FakeAnthropic) -> None:
    overloaded = Error(529, "overloaded_error", "Overloaded", {"retry-after-ms": "1"})
    fake.script(overloaded, overloaded, Stream(["ok"]))

    async with sdk(fake.url, max_retries=2) as client:
        assert await collect_text(client) == ["ok"]

    requests = fake.requests
    assert [r.retry_count for r in requests] == [0, 1, 2]
    assert len({r.raw_body for r in requests}) == 1


async def test_error_status_becomes_sdk_exception(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    fake.script(Error(529, "overloaded_error", "Overloaded", {"request-id": "req_fixed"}))

    with pytest.raises(anthropic.OverloadedError) as caught:
        await collect_text(client)

    assert (caught.value.status_code, caught.value.type) == (529, "overloaded_error")
    assert caught.value.request_id == "req_fixed"


async def test_wrong_api_key_is_rejected(fake: FakeAnthropic) -> None:
    async with sdk(fake.url, api_key="wrong") as client:
        with pytest.raises(anthropic.AuthenticationError):
            await collect_text(client)
    assert fake.scripts_left == 0


async def test_mid_stream_error_event_raises_status_200(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    fake.script(Stream(["a", "b", "c"], then="error", error_after=2))
    received: list[str] = []

    with pytest.raises(anthropic.APIStatusError) as caught:
        await collect_text(client, received)

    assert received == ["a", "b"]
    assert (caught.value.status_code, caught.value.type) == (200, "overloaded_error")
    assert not isinstance(caught.value, anthropic.OverloadedError)
    assert len(fake.requests) == 1


async def test_drop_raises_remote_protocol_error(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    fake.script(Stream(["a"], then="drop"))

    with pytest.raises(httpx2.RemoteProtocolError):
        await collect_text(client)


async def test_eof_ends_stream_without_stop_reason(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    fake.script(Stream(["a"], then="eof"))

    async with client.messages.stream(model="claude-x", max_tokens=100, messages=MESSAGES) as stream:
        final = await stream.get_final_message()

    assert final.stop_reason is None


async def test_cancelled_consumer_is_seen_as_disconnect(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    fake.script(Stream(["a", "b"], then="stall"))
    received: list[str] = []
    task = asyncio.create_task(collect_text(client, received))
    async with asyncio.timeout(2.0):
        while len(received) < 2:
            await asyncio.sleep(0.005)

    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    disconnected_at = await fake.wait_for_disconnect(1.0)
    assert cancelled_at <= disconnected_at < cancelled_at + 1.0
    assert fake.disconnects == 1


async def test_stall_before_headers_times_out_and_disconnects(fake: FakeAnthropic) -> None:
    fake.script(StallBeforeHeaders())

    async with sdk(fake.url, timeout=0.3) as client:
        with pytest.raises(anthropic.APITimeoutError):
            await collect_text(client)

    await fake.wait_for_disconnect(1.0)


async def test_gate_holds_first_delta_until_opened(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    gate = Gate()
    fake.script(Stream(["x", "y"], hold=gate))
    received: list[str] = []
    task = asyncio.create_task(collect_text(client, received))

    await gate.wait_reached(2.0)
    await asyncio.sleep(0.1)
    assert received == []

    gate.open()
    assert await asyncio.wait_for(task, 2.0) == ["x", "y"]


async def test_client_leaving_a_held_stream_is_seen_as_disconnect(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    gate = Gate()
    fake.script(Stream(hold=gate))
    task = asyncio.create_task(collect_text(client))
    await gate.wait_reached(2.0)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await fake.wait_for_disconnect(1.0)
    assert not gate.is_open


async def test_path_prefix_query_and_x_api_key_are_accepted(fake: FakeAnthropic) -> None:
    body = {"model": "claude-x", "max_tokens": 10, "messages": [], "stream": True}
    async with httpx2.AsyncClient(base_url=fake.url) as http:
        response = await http.post("/proxy/v1/messages?beta=true", headers={"x-api-key": "test"}, json=body)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.text.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')
    [request] = fake.requests
    assert (request.path, request.query, request.body) == ("/proxy/v1/messages", "beta=true", body)


def test_sync_client_is_served_while_the_test_blocks(fake: FakeAnthropic) -> None:
    # The synchronous client blocks the test's thread, and so its event loop, as a sync gRPC call would.
    with (
        anthropic.Anthropic(base_url=fake.url, api_key="test", max_retries=0, timeout=5.0) as client,
        client.messages.stream(model="claude-x", max_tokens=100, messages=MESSAGES) as stream,
    ):
        assert stream.get_final_text() == "Hello from the fake model."


async def test_keep_alive_reuses_one_connection(
    fake: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    for _ in range(3):
        await collect_text(client)

    requests = await fake.wait_for_requests(3, 1.0)
    assert len({r.connection_id for r in requests}) == 1


async def test_raw_body_is_sent_as_is(fake: FakeAnthropic, client: anthropic.AsyncAnthropic) -> None:
    frames = [
        sse_frame("message_start", message_start_event(model="claude-x", input_tokens=1)),
        sse_frame("content_block_start", content_block_start_event()),
        b"event: content_block_delta\ndata: not json\n\n",
    ]
    fake.script(Raw(b"".join(frames)))

    with pytest.raises(ValueError, match="Expecting value"):  # json.JSONDecodeError
        await collect_text(client)


@pytest.fixture
async def demo() -> AsyncIterator[DemoModelServer]:
    server = DemoModelServer(token_delay_s=0.001)
    await server.start()
    yield server
    await server.close()


async def test_demo_model_streams_a_reply_through_the_sdk(demo: DemoModelServer) -> None:
    messages: list[MessageParam] = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "hello   there"}]},
    ]

    async with (
        sdk(demo.url, api_key="any") as client,
        client.messages.stream(model="claude-x", max_tokens=100, messages=messages) as stream,
    ):
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()

    expected = "[demo model — not Claude] You said: hello there. This conversation has 2 earlier messages."
    assert "".join(texts) == expected == demo_reply({"messages": messages})
    assert len(texts) > 1
    assert (final.stop_reason, final.usage.output_tokens) == ("end_turn", len(texts))
    # Asked for Claude, the demo does not claim to be it.
    assert final.model == DEMO_MODEL


async def test_demo_model_rejects_what_it_does_not_serve(demo: DemoModelServer) -> None:
    async with sdk(demo.url, api_key="any") as client:
        with pytest.raises(anthropic.BadRequestError, match="only streams"):
            await client.messages.create(model="demo", max_tokens=100, messages=MESSAGES)
    async with httpx2.AsyncClient(base_url=demo.url) as http:
        response = await http.post("/v1/models?x=1", json={})

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    assert response.headers["request-id"].startswith("req_")


async def test_demo_model_stops_quietly_when_the_client_leaves(
    demo: DemoModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    long_text = "word " * 150
    messages: list[MessageParam] = [{"role": "user", "content": long_text}]

    async with sdk(demo.url, api_key="any") as client:
        async with client.messages.stream(model="demo", max_tokens=100, messages=messages) as stream:
            async for _ in stream.text_stream:
                break
        assert await collect_text(client) != []

    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
