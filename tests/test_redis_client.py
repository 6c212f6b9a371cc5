"""The Redis client of every process (server/redis_client.py): what counts as an outage, and
its behaviour on the event loop the processes run.

tests/test_failover.py met both: a consumer process ended by the CLUSTERDOWN a cluster answers
while a replica is promoted, and by uvloop's RuntimeError on a write after the peer reset the
connection (asyncio's transports ignore such a write). Here the reset is made on purpose, by a
loopback server that speaks just enough RESP and then resets its connections.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import pytest
import redis.exceptions

from server import runtime
from server.config import RedisClusterMode, RedisSettings
from server.errors import StorageUnavailableError, classify
from server.redis_client import create_redis, is_redis_outage


@pytest.mark.parametrize(
    "exc",
    [
        redis.exceptions.ClusterDownError("The cluster is down"),
        redis.exceptions.MasterDownError(
            "Link with MASTER is down and replica-serve-stale-data is set to 'no'."
        ),
        redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
        redis.exceptions.SlotNotCoveredError("Slot 866 is not covered by the cluster."),
        redis.exceptions.ConnectionError("Connection refused"),
    ],
    ids=lambda exc: exc.__class__.__name__,
)
def test_a_cluster_failing_over_is_an_outage_not_an_internal_error(exc: Exception) -> None:
    """What the cluster client raises once its retries are spent, mid-failover: wait and retry."""
    assert is_redis_outage(exc)
    assert isinstance(classify(exc), StorageUnavailableError)


def test_a_wrong_command_is_not_an_outage() -> None:
    assert not is_redis_outage(redis.exceptions.ResponseError("WRONGTYPE Operation against a key"))


class _ResettingServer:
    """Answers PING with +PONG and other commands with +OK; ``reset()`` resets (RST) its connections."""

    def __init__(self) -> None:
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        while line := await reader.readline():
            if line.startswith(b"*"):  # one command: an array of bulk strings, its name first
                await reader.readline()
                name = (await reader.readline()).strip().upper()
                writer.write(b"+PONG\r\n" if name == b"PING" else b"+OK\r\n")

    def reset(self) -> None:
        for writer in self._writers:
            # SO_LINGER 0: closing sends RST, as the kernel does for a process killed with
            # unread data, rather than a polite FIN.
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()
        self._writers.clear()


async def _commands_around_a_reset() -> None:
    server = _ResettingServer()
    port = await server.start()
    settings = RedisSettings(redis_url=f"redis://127.0.0.1:{port}/0", redis_cluster=RedisClusterMode.FALSE)
    client = await create_redis(settings)
    try:
        assert await client.ping()
        (connection,) = client.connection_pool._available_connections
        server.reset()
        # The client learns of the reset when its loop reads the socket; the command below
        # must come after that, which only the connection itself can tell.
        for _ in range(200):
            writer = connection._writer
            if writer is None or writer.transport.is_closing():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the client never saw the reset")
        # What every outage path of ours handles (server/redis_client.py), not a RuntimeError.
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        assert await client.ping()
        assert server.connections == 2
    finally:
        await client.aclose()
        await server.close()


def test_a_write_to_a_connection_the_peer_reset_is_a_connection_error_on_uvloop() -> None:
    failures: list[BaseException] = []

    def run() -> None:
        # A thread of its own: the test session's loop belongs to pytest-asyncio.
        try:
            runtime.run(_commands_around_a_reset())
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the scenario hung"
    if failures:
        raise failures[0]
