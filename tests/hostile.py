"""Hostile peers for tests/test_hostile_clients.py: stream floods that ignore the server's limits,
connection hoarders, and a `chatstream serve` process to aim them at.

A well-behaved HTTP/2 client (grpc's, or `h2` left to itself) never opens more streams than
the server's SETTINGS_MAX_CONCURRENT_STREAMS allows; an attacker does. ``stream_flood``
sends every stream it was asked to, on a connection whose stream bookkeeping pretends
none is open, and tallies how the server answered each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from tests.raw_http2 import grpc_frame


class _GreedyConnection(h2.connection.H2Connection):
    """An h2 connection that never counts its open streams, so it exceeds any stream limit."""

    @property
    def open_outbound_streams(self) -> int:
        return 0


@dataclass
class FloodTally:
    """How the server answered the streams of a flood, so far."""

    sent: int = 0
    answered: set[tuple[int, int]] = field(default_factory=set)
    """(connection, stream) pairs that received a response message: a call the server holds."""
    resets: Counter[int] = field(default_factory=Counter)
    """RST_STREAM error codes (7 = REFUSED_STREAM)."""
    statuses: Counter[int] = field(default_factory=Counter)
    """grpc-status of streams that ended with a status (8 = RESOURCE_EXHAUSTED)."""
    messages: Counter[str] = field(default_factory=Counter)
    """grpc-message of those streams."""
    advertised_max_streams: int | None = None
    """SETTINGS_MAX_CONCURRENT_STREAMS as the server announced it."""
    goaways: int = 0
    closed: int = 0
    """Connections the server closed (EOF)."""

    @property
    def held(self) -> int:
        """Streams the server answered and has not ended."""
        return len(self.answered)

    @property
    def settled(self) -> bool:
        """Every stream sent is either held or ended."""
        return self.held + self.resets.total() + self.statuses.total() >= self.sent


class _FloodConnection:
    def __init__(self, index: int, address: str, tally: FloodTally) -> None:
        self._index = index
        self._address = address
        self._tally = tally
        self._ended: set[int] = set()
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._conn = _GreedyConnection(config=config)
        self._reader: asyncio.StreamReader | None = None
        self._broken = False
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        host, port = self._address.rsplit(":", 1)
        self._reader, self._writer = await asyncio.open_connection(host, int(port))
        self._conn.initiate_connection()
        await self._flush()

    async def send(self, method: str, message: bytes, count: int) -> None:
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.encode()),
            (b":authority", self._address.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        for n in range(count):
            try:
                stream_id = self._conn.get_next_available_stream_id()
                self._conn.send_headers(stream_id, headers)
                self._conn.send_data(stream_id, grpc_frame(message), end_stream=True)
            except h2.exceptions.ProtocolError:
                return  # the server ended the connection
            self._tally.sent += 1
            if n % 50 == 49:
                # Let the server's answers in as we go, as a real flood would: its window
                # updates keep the connection's flow-control window open.
                await self._flush()
                await self._read_available(0.0)
        await self._flush()

    async def read_forever(self) -> None:
        while await self._read_available(None):
            pass

    async def read_for(self, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            if not await self._read_available(remaining):
                return

    async def _read_available(self, timeout_s: float | None) -> bool:
        assert self._reader is not None
        try:
            chunk = await asyncio.wait_for(self._reader.read(65536), timeout_s)
        except TimeoutError:
            return True
        except ConnectionError:
            chunk = b""
        if not chunk:
            self._tally.closed += 1
            return False
        if self._broken:
            return True
        try:
            events = self._conn.receive_data(chunk)
        except h2.exceptions.ProtocolError:
            # h2 refuses frames after a GOAWAY (grpc's graceful GOAWAY is followed by a
            # PING); the connection is ending, so keep reading only to see it close.
            self._broken = True
            self._tally.goaways += 1
            return True
        for event in events:
            self._record(event)
        await self._flush()
        return True

    def _record(self, event: h2.events.Event) -> None:
        key = (self._index, getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length and event.stream_id is not None:
                self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if key[1] not in self._ended:
                self._tally.answered.add(key)
        elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
            for name, value in event.headers or []:
                if bytes(name) == b"grpc-status":
                    self._end(key)
                    self._tally.statuses[int(value)] += 1
                if bytes(name) == b"grpc-message":
                    self._tally.messages[bytes(value).decode()[:80]] += 1
        elif isinstance(event, h2.events.StreamReset):
            self._end(key)
            self._tally.resets[int(event.error_code or 0)] += 1
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._tally.goaways += 1
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._tally.advertised_max_streams = self._conn.remote_settings.max_concurrent_streams

    def _end(self, key: tuple[int, int]) -> None:
        self._ended.add(key[1])
        self._tally.answered.discard(key)

    async def _flush(self) -> None:
        assert self._writer is not None
        data = self._conn.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()


@contextlib.asynccontextmanager
async def stream_flood(
    address: str,
    method: str,
    message: bytes,
    *,
    connections: int,
    streams_per_connection: int,
    answer_pings: bool = True,
) -> AsyncIterator[FloodTally]:
    """Opens ``connections`` connections and sends ``streams_per_connection`` calls on each,
    ignoring every limit the server advertises; holds them open until the block exits.

    With ``answer_pings`` False the peer goes silent once it has sent its calls: it reads
    nothing more, so it answers no PING (a crashed or partitioned client).
    """
    tally = FloodTally()
    flood = [_FloodConnection(i, address, tally) for i in range(connections)]
    readers: list[asyncio.Task[None]] = []
    try:
        for connection in flood:
            await connection.open()
        await asyncio.gather(*(c.send(method, message, streams_per_connection) for c in flood))
        if answer_pings:
            readers = [asyncio.create_task(c.read_forever()) for c in flood]
        else:
            # Settle the handshake (our SETTINGS ACK) and take the first answers, then go silent.
            await asyncio.gather(*(c.read_for(0.3) for c in flood))
        yield tally
    finally:
        for reader in readers:
            reader.cancel()
        for connection in flood:
            await connection.close()


@contextlib.contextmanager
def idle_connections(address: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections that send the HTTP/2 preface and then nothing."""
    host, port = address.rsplit(":", 1)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


async def wait_for_goaway(address: str, *, timeout_s: float) -> tuple[tuple[int, bytes] | None, bool]:
    """Opens a connection that completes its handshake, makes no call and only listens.

    Returns the GOAWAY the server sent (error code, debug data; None if none came) and
    whether the server closed the connection, within ``timeout_s``.
    """
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    goaway: tuple[int, bytes] | None = None
    closed = False
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                writer.write(conn.data_to_send())
                await writer.drain()
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        goaway = (int(event.error_code or 0), event.additional_data or b"")
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return goaway, closed


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` holds."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))
