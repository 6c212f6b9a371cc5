"""Outside-in checks shared by the security tests: side effects, health, error hygiene."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import timedelta

import asyncpg
import grpc
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError
from chatstream.v1.chat_service_pb2 import ErrorReason
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.errors import REASON_PREFIX
from server.grpc_errors import STATUS_CODES
from tests.conftest import stream_lengths
from tests.fake_anthropic import FakeAnthropic

# What must never reach a caller: SQL, driver names, Python tracebacks, file paths.
_LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|sqlalchemy|asyncpg|psycopg|redis\.|"
    r"\b(SELECT|INSERT|UPDATE|DELETE FROM|WHERE|chat\.turns|chat\.conversations|chat\.messages)\b"
)


async def assert_no_side_effects(db: asyncpg.Connection, redis: aioredis.Redis, fake: FakeAnthropic) -> None:
    """I5: no LLM call, no rows, no stream entries."""
    assert fake.requests == []
    assert await db.fetchval("SELECT count(*) FROM chat.conversations") == 0
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 0
    assert await stream_lengths(redis) == [0, 0, 0, 0]


async def health_status(
    address: str, *, credentials: grpc.ChannelCredentials | None = None, service: str = ""
) -> int:
    """The Health/Check status of ``service``, called without any call credential."""
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        status: int = response.status
        return status


async def assert_still_serving(
    address: str,
    *,
    metadata: Iterable[tuple[str, str]] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """I9: health is SERVING and a normal chat still completes."""
    assert await health_status(address, credentials=credentials) == health_pb2.HealthCheckResponse.SERVING
    async with AsyncChatClient(
        address, credentials=credentials, metadata=list(metadata), timeout=timedelta(seconds=10)
    ) as client:
        reply = await client.chat_reply("are you still there?")
    assert reply.text


def assert_clean_error(err: ChatClientError, *, forbidden: Iterable[str] = ()) -> None:
    """I10: a status, our ErrorInfo, and nothing internal or belonging to someone else."""
    assert err.reason, f"no ErrorInfo in {err!r}"
    assert err.domain == "chatstream.v1.ChatService"
    # The proto's ErrorReason lists every reason, each with one code (tests/test_error_reasons.py).
    assert REASON_PREFIX + err.reason in set(ErrorReason.keys()), f"{err.reason} is not in ErrorReason"
    assert STATUS_CODES[ErrorReason.Value(REASON_PREFIX + err.reason)] == err.code, err
    visible = " ".join([err.message, *err.metadata.keys(), *err.metadata.values()])
    visible += " ".join(f"{f} {d}" for f, d in err.field_violations)
    assert _LEAKS.search(visible) is None, visible
    for secret in forbidden:
        assert secret not in visible, f"{secret!r} leaked in {visible!r}"


def rpc_error(exc: BaseException) -> ChatClientError:
    """A raw stub's failure as the SDK would report it."""
    assert isinstance(exc, grpc.RpcError), exc
    return ChatClientError.from_rpc_error(exc)
