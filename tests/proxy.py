"""A loopback TCP proxy that can cut every connection through it, as a load balancer or a network would."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to one of several targets; ``cut()`` drops every live connection.

    New connections go to ``targets[active]``, so a test can cut the client off one server
    and let its reconnect land on another, as a load balancer would after a pod died.
    """

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets
        self.active = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()
        self._replies = asyncio.Event()
        self._replies.set()

    @property
    def address(self) -> str:
        """``host:port`` clients should dial."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def hold_replies(self) -> None:
        """Keeps what the servers send from the clients until ``release_replies``, as a stalled
        network would; what the clients send still goes through."""
        self._replies.clear()

    def release_replies(self) -> None:
        """Forwards what was held, and everything after it."""
        self._replies.set()

    def cut(self) -> None:
        """Resets every connection through the proxy at once (no FIN: the peers see a reset)."""
        for writer in list(self._live):
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()
        self._live.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        host, port = self.targets[self.active].rsplit(":", 1)
        try:
            server_reader, server_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.transport.abort()
            return
        self._live.update((client_writer, server_writer))

        async def pump(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Event
        ) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while chunk := await reader.read(65536):
                    await gate.wait()
                    writer.write(chunk)
                    await writer.drain()
            writer.transport.abort()

        always = asyncio.Event()
        always.set()
        await asyncio.gather(
            pump(client_reader, server_writer, always), pump(server_reader, client_writer, self._replies)
        )
        self._live.discard(client_writer)
        self._live.discard(server_writer)
