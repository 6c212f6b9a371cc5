"""A raw HTTP/2 client (the `h2` package) for what a gRPC client refuses to send.

gRPC's own clients validate metadata and pace their pings; a hostile peer does neither.
This speaks HTTP/2 directly so tests can send header values with CR/LF, binary junk,
hand-made gRPC frames, and ping floods, and see exactly how the server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings


@dataclass
class RawResponse:
    """What came back on one stream, or for the whole connection."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    reset_code: int | None = None
    """RST_STREAM error code, if the server reset the stream."""
    goaway_code: int | None = None
    """GOAWAY error code, if the server ended the connection."""
    goaway_data: bytes = b""
    closed: bool = False
    """The socket reached EOF."""

    @property
    def grpc_status(self) -> int | None:
        """The grpc-status trailer (or trailers-only header), if any."""
        for key, value in (*self.trailers, *self.headers):
            if key == b"grpc-status":
                return int(value)
        return None


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message, uncompressed."""
    return struct.pack(">BI", 0, len(message)) + message


class RawHttp2:
    """One plaintext HTTP/2 connection with validation switched off."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str) -> None:
        self._reader = reader
        self._writer = writer
        self._authority = authority
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self._conn = h2.connection.H2Connection(config=config)

    @classmethod
    async def connect(cls, address: str, *, acknowledge_settings: bool = True) -> Self:
        """Opens the connection and sends the client preface.

        With ``acknowledge_settings`` False the client never ACKs the server's SETTINGS,
        so the limits announced there are not yet in force for it.
        """
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        client = cls(reader, writer, address)
        client._conn.initiate_connection()
        await client._flush()
        if acknowledge_settings:
            await client._settle()
        return client

    async def _settle(self, timeout_s: float = 5) -> None:
        """Reads the server's SETTINGS and acknowledges them (h2 does on receipt).

        Until then they are not in force (RFC 9113 §6.5.3): a server may apply its header
        list limit only to a peer that acknowledged it, as a real client would have.
        """
        async with asyncio.timeout(timeout_s):
            while True:
                chunk = await self._reader.read(65536)
                if not chunk:
                    return
                events = self._conn.receive_data(chunk)
                await self._flush()
                if any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events):
                    return

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)
            await self._writer.drain()

    async def unary(
        self,
        method: str,
        message: bytes,
        metadata: Sequence[tuple[bytes, bytes]] = (),
        *,
        timeout_s: float = 5,
    ) -> RawResponse:
        """Sends one gRPC call (headers exactly as given, then one message) and reads its outcome."""
        stream_id = self._call(method, message, metadata)
        await self._flush()
        return await self._read(stream_id, timeout_s)

    def _call(self, method: str, message: bytes, metadata: Sequence[tuple[bytes, bytes]]) -> int:
        """Queues one gRPC call: headers exactly as given, then one message; its stream id."""
        stream_id: int = self._conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", method.encode()),
            (b":authority", self._authority.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *metadata,
        ]
        self._conn.send_headers(stream_id, headers)
        self._conn.send_data(stream_id, grpc_frame(message), end_stream=True)
        return stream_id

    async def stop_reading(self, *, after_bytes: int = 0) -> None:
        """Announces a receive window of ``after_bytes`` for new streams, never raised: the
        server can send each of them that much DATA, then nothing more."""
        self._conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: after_bytes})
        await self._flush()

    async def send(self, method: str, message: bytes, metadata: Sequence[tuple[bytes, bytes]] = ()) -> int:
        """Sends one gRPC call and returns its stream id without reading anything."""
        stream_id = self._call(method, message, metadata)
        await self._flush()
        return stream_id

    async def send_and_reset(
        self, method: str, message: bytes, metadata: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Sends one gRPC call and resets its stream (RST_STREAM CANCEL) in the same write."""
        stream_id = self._call(method, message, metadata)
        self._conn.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        await self._flush()

    async def reset(self, stream_id: int) -> None:
        """Resets one stream (RST_STREAM CANCEL): a client that gives up on its call."""
        self._conn.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        await self._flush()

    async def ping_flood(self, count: int, *, timeout_s: float = 5) -> RawResponse:
        """Sends up to ``count`` pings 20 ms apart, reading in between, until the server ends
        the connection. Reading as we go matters: once the server closes, anything we still
        send makes its kernel reset the connection, which would discard its GOAWAY unread."""
        response = RawResponse()
        for i in range(count):
            self._conn.ping(struct.pack(">Q", i))
            try:
                await self._flush()
            except ConnectionError:
                return response
            response = await self._read(None, 0.02)
            if response.goaway_code is not None or response.closed:
                return response
        return await self._read(None, timeout_s)

    async def _read(self, stream_id: int | None, timeout_s: float) -> RawResponse:
        response = RawResponse()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return response
            try:
                chunk = await asyncio.wait_for(self._reader.read(65536), remaining)
            except (TimeoutError, ConnectionError):
                return response
            if not chunk:
                response.closed = True
                return response
            for event in self._conn.receive_data(chunk):
                if self._record(event, stream_id, response):
                    await self._flush()
                    return response
            await self._flush()

    @staticmethod
    def _record(event: h2.events.Event, stream_id: int | None, response: RawResponse) -> bool:
        """Notes ``event``; True when the outcome is complete."""
        if isinstance(event, h2.events.ConnectionTerminated):
            response.goaway_code = int(event.error_code) if event.error_code is not None else None
            response.goaway_data = event.additional_data or b""
            return True
        if getattr(event, "stream_id", None) != stream_id or stream_id is None:
            return False
        if isinstance(event, h2.events.ResponseReceived):
            response.headers = [(bytes(k), bytes(v)) for k, v in event.headers or []]
            return event.stream_ended is not None
        if isinstance(event, h2.events.DataReceived):
            response.data += event.data or b""
        elif isinstance(event, h2.events.TrailersReceived):
            response.trailers = [(bytes(k), bytes(v)) for k, v in event.headers or []]
            return True
        elif isinstance(event, h2.events.StreamReset):
            response.reset_code = int(event.error_code) if event.error_code is not None else None
            return True
        elif isinstance(event, h2.events.StreamEnded):
            return True
        return False
