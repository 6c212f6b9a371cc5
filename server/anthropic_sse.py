"""Serving the Anthropic Messages streaming protocol: a loopback HTTP/1.1 server, SSE framing, event payloads.

The toolkit of the two stand-ins for the Anthropic API: the offline demo model of `chatstream dev`
(`server.demo_model`) and the test suite's scriptable fake (`tests/fake_anthropic.py`). The wire
format follows ANTHROPIC_STREAMING.md sections 2, 3 and 7.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, cast

logger = logging.getLogger(__name__)

JsonObject = dict[str, object]
"""A decoded JSON object, such as a request body or an event payload."""

MAX_BODY_BYTES: Final = 32 * 1024 * 1024
"""Larger request bodies close the connection; the real API rejects them long before this."""

LAST_CHUNK: Final = b"0\r\n\r\n"
"""Ends a chunked body; a response cut off without it is a dropped stream to the client."""

_WATCH_POLL_S: Final = 0.01


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest:
    """One parsed HTTP/1.1 request."""

    method: str
    """Upper-cased, e.g. `POST`."""
    path: str
    """The target without its query string, e.g. `/proxy/v1/messages`."""
    query: str
    """The raw query string without `?`; empty when there is none."""
    headers: Mapping[str, str]
    """Lower-cased names; the last one wins when a name repeats."""
    body: bytes
    json: JsonObject | None
    """The body decoded as a JSON object, or `None` when it is not one."""


@dataclass(frozen=True, slots=True)
class Connection:
    """One accepted client connection, which may carry several requests (keep-alive)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    id: int
    """Numbers connections of one server from 1, so tests can tell reuse from reconnects."""

    @property
    def gone(self) -> bool:
        """Whether the client closed or reset the connection."""
        # No read is kept pending to notice this: a pending read could swallow the first byte of
        # the client's next keep-alive request. The transport reads on its own and records EOF or
        # a reset in the reader, so polling these is enough.
        reader = self.reader
        return reader.at_eof() or reader.exception() is not None or self.writer.transport.is_closing()

    async def wait_gone(self, timeout_s: float, *, until: Awaitable[object] | None = None) -> bool:
        """Waits up to `timeout_s` for the client to leave, or for `until` to complete first.

        Returns:
            True if the client left, False on timeout or when `until` completed.
        """
        task = asyncio.ensure_future(until) if until is not None else None
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            while not self.gone:
                remaining = deadline - asyncio.get_running_loop().time()
                if task is not None and task.done():
                    task.result()  # surfaces a failure of `until` instead of hiding it
                    return False
                if remaining <= 0:
                    return False
                if task is None:
                    await asyncio.sleep(min(_WATCH_POLL_S, remaining))
                else:
                    await asyncio.wait({task}, timeout=min(_WATCH_POLL_S, remaining))
            return True
        finally:
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task})


Handler = Callable[[HttpRequest, Connection], Awaitable[bool]]
"""Answers one request; returns whether the connection may carry another one."""


async def read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    """Reads one request with a `content-length` or chunked body.

    Returns:
        The request, or None when the client closed the connection or sent something that is not
        HTTP/1.1; either way the caller should close the connection.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in filter(None, header_lines):
            name, colon, value = line.partition(":")
            if not colon:
                return None
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked_body(reader)
        else:
            length = int(headers.get("content-length", "0"))
            if not 0 <= length <= MAX_BODY_BYTES:
                return None
            body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError):
        return None
    path, _, query = target.partition("?")
    return HttpRequest(
        method=method.upper(),
        path=path,
        query=query,
        headers=headers,
        body=body,
        json=parse_json_object(body),
    )


async def _read_chunked_body(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        if len(body) + size > MAX_BODY_BYTES:
            raise ValueError("request body too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, unused
        pass
    return bytes(body)


def parse_json_object(body: bytes) -> JsonObject | None:
    """Decodes `body` as a JSON object; returns None for anything else."""
    try:
        value: object = json.loads(body)
    except ValueError:
        return None
    return cast(JsonObject, value) if isinstance(value, dict) else None


def new_request_id() -> str:
    """Returns an id shaped like the API's `request-id` header (`req_...`)."""
    return f"req_{uuid.uuid4().hex}"


def sse_frame(event: str, data: Mapping[str, object]) -> bytes:
    """Encodes one server-sent event; the SDK drops frames without an `event:` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def chunk(data: bytes) -> bytes:
    """Encodes `data` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def message_start_event(*, model: str, input_tokens: int, output_tokens: int = 1) -> JsonObject:
    """The first event: the message with no content yet. The SDK needs its `usage`."""
    return {
        "type": "message_start",
        "message": {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        },
    }


def content_block_start_event(index: int = 0) -> JsonObject:
    """Opens an empty text block; block indexes start at 0 and must be contiguous."""
    return {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}


def text_delta_event(text: str, *, index: int = 0) -> JsonObject:
    """Appends `text` to the text block at `index`."""
    return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}


def content_block_stop_event(index: int = 0) -> JsonObject:
    """Closes the block at `index`."""
    return {"type": "content_block_stop", "index": index}


def message_delta_event(*, stop_reason: str | None, output_tokens: int) -> JsonObject:
    """Sets the stop reason and the cumulative output token count; the SDK needs both keys."""
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return {"type": "message_delta", "delta": delta, "usage": {"output_tokens": output_tokens}}


def message_stop_event() -> JsonObject:
    """The last event of a complete stream."""
    return {"type": "message_stop"}


def ping_event() -> JsonObject:
    """A keep-alive event, which the SDK drops."""
    return {"type": "ping"}


def error_event(error_type: str, message: str) -> JsonObject:
    """An `error` event or body; mid-stream, the SDK raises `APIStatusError` with status 200."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _status_line(status: int) -> str:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:  # e.g. 529, the API's own "Overloaded"
        phrase = "Overloaded" if status == 529 else "Unknown"
    return f"HTTP/1.1 {status} {phrase}"


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    lines = [_status_line(status), *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def write_response(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    content_type: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Writes a whole response with `content-length`, plus a `request-id` unless `headers` has one."""
    all_headers = {"request-id": new_request_id(), "content-type": content_type}
    all_headers |= {**(headers or {}), "content-length": str(len(body))}
    writer.write(_head(status, all_headers) + body)
    await writer.drain()


async def write_error_response(
    writer: asyncio.StreamWriter,
    status: int,
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Writes an API error body (`{"type": "error", "error": {...}, "request_id": ...}`)."""
    request_id = (headers or {}).get("request-id") or new_request_id()
    body = error_event(error_type, message) | {"request_id": request_id}
    await write_response(
        writer,
        status,
        json.dumps(body).encode(),
        content_type="application/json",
        headers={**(headers or {}), "request-id": request_id},
    )


async def start_sse_response(writer: asyncio.StreamWriter, request_id: str) -> None:
    """Writes the head of a 200 event stream; each event then goes in its own chunk."""
    headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
    headers |= {"transfer-encoding": "chunked", "request-id": request_id}
    writer.write(_head(200, headers))
    await writer.drain()


async def write_event(writer: asyncio.StreamWriter, event: Mapping[str, object]) -> None:
    """Writes one event in its own chunk, named after its `type`, and flushes it."""
    writer.write(chunk(sse_frame(str(event["type"]), event)))
    await writer.drain()


async def end_sse_response(writer: asyncio.StreamWriter) -> None:
    """Ends the chunked body cleanly, leaving the connection reusable."""
    writer.write(LAST_CHUNK)
    await writer.drain()


async def serve_connection(connection: Connection, handle: Handler) -> None:
    """Serves requests on one keep-alive connection until either side closes it."""
    writer = connection.writer
    try:
        while (request := await read_request(connection.reader)) is not None:
            keep_alive = await handle(request, connection)
            if not keep_alive or request.headers.get("connection", "").lower() == "close":
                break
    except ConnectionError:  # the client left mid-response: routine, not worth a traceback
        logger.debug("connection %d closed by the client", connection.id)
    except asyncio.CancelledError:
        writer.transport.abort()  # a graceful close would wait for a client that may not read
        raise
    except Exception:
        logger.exception("connection %d failed", connection.id)
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # it re-raises the error that broke the connection
            await writer.wait_closed()


class LoopbackServer:
    """An asyncio HTTP/1.1 server that passes each request to a `Handler`."""

    def __init__(self, handle: Handler, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handle = handle
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._url: str | None = None
        self._connection_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def url(self) -> str:
        """The base URL, e.g. `http://127.0.0.1:41234`, without `/v1`."""
        if self._url is None:
            raise RuntimeError("the server has not been started")
        return self._url

    async def start(self) -> str:
        """Starts listening and returns the base URL."""
        self._server = await asyncio.start_server(self._on_connect, self._host, self._port)
        host, port = self._server.sockets[0].getsockname()[:2]
        self._url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        return self._url

    async def close(self) -> None:
        """Stops listening and cancels every open connection. Idempotent."""
        if self._server is None:
            return
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await serve_connection(Connection(reader, writer, next(self._connection_ids)), self._handle)
        except asyncio.CancelledError:
            # Only close() cancels this task, and it must then end quietly: before 3.12.2 asyncio's
            # done-callback calls task.exception() on it, which raises and logs noise
            # (https://github.com/python/cpython/issues/113538).
            pass
        finally:
            self._tasks.discard(task)
