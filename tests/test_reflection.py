"""Reflection as tools use it: buf curl over `grpc.reflection.v1`, grpcurl over v1alpha, error details.

The server runs with authentication on: reflection needs no credential, the calls send a key.

What buf curl prints for error details depends on buf itself, not on the server: it decodes
a detail only when the type is compiled into the buf binary, and buf 1.75.0 compiles in
google/rpc/status.proto but not error_details.proto (connect-go's `connectWireDetail` unpacks
details with the global registry; buf's reflection resolver is never asked). So buf curl
prints an ErrorInfo as its type name plus base64 bytes, and the test decodes those bytes.
grpcurl does resolve detail types through reflection, which the grpcurl test proves: its
binary has no google.rpc.ErrorInfo of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2

from server.app import ChatServer
from server.config import AuthMode
from tests.conftest import StartServer
from tests.credentials import api_key
from tests.fake_anthropic import DEFAULT_DELTAS, Error, FakeAnthropic
from tests.node_tools import BUF, ensure_node_modules

GRPCURL: Final = Path(sys.executable).parent / "grpcurl"
MISSING: Final = "conversations/00000000-0000-0000-0000-000000000000"
_TOOL_TIMEOUT_S: Final = 60


@dataclass(frozen=True, slots=True)
class Result:
    """How a command line tool ended."""

    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class Target:
    """A running server and the header that authenticates to it."""

    server: ChatServer
    auth: str

    @property
    def url(self) -> str:
        return f"http://{self.server.address}"


@pytest.fixture
async def target(start_server: StartServer) -> Target:
    token, entry = api_key("reflection-tools")
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(entry,))
    return Target(server=server, auth=f"authorization: Bearer {token}")


@pytest.fixture(scope="module")
def buf() -> Path:
    ensure_node_modules()
    return BUF


async def run(*args: str | Path) -> Result:
    """Runs a tool without blocking the event loop that serves the server under test."""
    process = await asyncio.create_subprocess_exec(
        *map(str, args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), _TOOL_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def buf_curl(buf: Path, target: Target, *args: str) -> Result:
    """`buf curl` over gRPC with reflection v1 only: no fallback to v1alpha can hide a gap."""
    return await run(
        buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1", *args
    )


def json_values(text: str) -> list[dict[str, object]]:
    """The JSON objects that a tool printed one after another."""
    decoder = json.JSONDecoder()
    values, index = [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        value, index = decoder.raw_decode(text, index)
        values.append(value)
    return values


async def test_buf_curl_lists_the_services_through_reflection_v1_without_a_key(
    buf: Path, target: Target
) -> None:
    result = await buf_curl(buf, target, "--list-services", target.url)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {
        "chatstream.v1.ChatService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_buf_curl_streams_a_chat_turn(buf: Path, target: Target) -> None:
    chat = f"{target.url}/chatstream.v1.ChatService/Chat"
    result = await buf_curl(buf, target, "-H", target.auth, "-d", '{"text":"hello"}', chat)
    assert result.returncode == 0, result.stderr
    events = [value["event"] for value in json_values(result.stdout)]
    assert isinstance(events[0], dict)
    assert "started" in events[0]
    deltas = [e["textDelta"]["text"] for e in events if isinstance(e, dict) and "textDelta" in e]
    assert "".join(deltas) == "".join(DEFAULT_DELTAS)
    assert isinstance(events[-1], dict)
    assert events[-1]["completed"]["status"] == "TURN_STATUS_COMPLETED"


async def test_buf_curl_prints_not_found_with_its_error_info(buf: Path, target: Target) -> None:
    body = json.dumps({"name": MISSING})
    result = await buf_curl(
        buf, target, "-H", target.auth, "-d", body, f"{target.url}/chatstream.v1.ChatService/GetConversation"
    )
    assert result.returncode == 5 * 8, result.stderr  # buf curl exits with the code times 8
    [status] = json_values(result.stderr)
    assert status["code"] == "not_found"
    assert status["message"] == "conversation not found"
    details = status["details"]
    assert isinstance(details, list)
    [detail] = details
    assert detail["type"] == "google.rpc.ErrorInfo"
    value = detail["value"]
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))
    assert (info.reason, info.domain) == ("CONVERSATION_NOT_FOUND", "chatstream.v1.ChatService")
    if "debug" in detail:  # a buf that knows the type prints it decoded too
        assert detail["debug"]["reason"] == "CONVERSATION_NOT_FOUND"


@pytest.mark.parametrize("service", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
async def test_reflection_serves_the_error_detail_types(target: Target, service: str) -> None:
    # v1's messages are v1alpha's, field for field: the v1alpha classes speak both.
    symbols = ["google.rpc.Status", "google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.RetryInfo"]
    async with grpc.aio.insecure_channel(target.server.address) as channel:
        call = channel.stream_stream(
            f"/{service}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols]
        responses = [r async for r in call(iter(requests))]
    for symbol, response in zip(symbols, responses, strict=True):
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in response.file_descriptor_response.file_descriptor_proto
        ]
        package, name = symbol.rsplit(".", 1)
        defining = [f for f in files if f.package == package and name in [m.name for m in f.message_type]]
        assert defining, f"{symbol} not resolved: {response}"
        # With its imports, so that a client can build the descriptor (Any, Duration).
        assert set(defining[0].dependency) <= {f.name for f in files}


async def test_grpcurl_decodes_error_details_through_reflection(target: Target, fake: FakeAnthropic) -> None:
    async def status_of(method: str, body: dict[str, object]) -> dict[str, object]:
        result = await run(
            GRPCURL, "-plaintext", "-format-error", "-H", target.auth, "-d", json.dumps(body),
            target.server.address, f"chatstream.v1.ChatService/{method}",
        )  # fmt: skip
        assert result.returncode != 0
        # A Chat that fails after `started` prints that event first, then the status.
        return json_values(result.stdout + result.stderr)[-1]

    not_found = await status_of("GetConversation", {"name": MISSING})
    assert not_found["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "CONVERSATION_NOT_FOUND",
            "domain": "chatstream.v1.ChatService",
        }
    ]
    bad_request = await status_of("ListConversations", {"page_size": -1})
    assert isinstance(bad_request["details"], list)
    assert {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "field_violations": [{"field": "page_size", "description": "must not be negative"}],
    } in bad_request["details"]
    fake.script(Error(529, "overloaded_error", "Overloaded"))
    unavailable = await status_of("Chat", {"text": "hello"})
    assert isinstance(unavailable["details"], list)
    [retry] = [d for d in unavailable["details"] if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo"]
    assert retry["retry_delay"].endswith("s")  # a Duration in JSON, e.g. "1s"
