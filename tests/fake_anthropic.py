"""Scriptable fake of the Anthropic Messages API, served over real HTTP on loopback for the real SDK.

The fake runs its own event loop in its own thread, so it keeps answering while a test blocks its
own loop (for example with a synchronous gRPC call). Tests script the replies, then assert on what
the SDK sent and on when it hung up:

    fake = FakeAnthropic()
    fake.start()
    fake.script(Error(529, "overloaded_error", "Overloaded", {"retry-after-ms": "1"}), Stream(["Hi"]))
    client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=1)
    ...
    assert [r.retry_count for r in fake.requests] == [0, 1]
    fake.stop()

Each request pops one script (FIFO); with none queued it gets a normal five-delta `Stream()`.
The wire format follows ANTHROPIC_STREAMING.md section 7.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from types import TracebackType
from typing import Final, Literal, Self, TypeVar, assert_never

from server.anthropic_sse import (
    Connection,
    HttpRequest,
    JsonObject,
    LoopbackServer,
    chunk,
    content_block_start_event,
    content_block_stop_event,
    end_sse_response,
    error_event,
    message_delta_event,
    message_start_event,
    message_stop_event,
    new_request_id,
    ping_event,
    start_sse_response,
    text_delta_event,
    write_error_response,
    write_event,
    write_response,
)

logger = logging.getLogger(__name__)

MAX_STALL_S: Final = 30.0
"""Upper bound on every stall and hold, so that a broken test cannot hang CI."""

DEFAULT_DELTAS: Final = ("Hello", " from", " the", " fake", " model.")

_START_TIMEOUT_S: Final = 10.0
_ERROR_MESSAGES: Final = {
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
    "rate_limit_error": "Rate limited",
}

_T = TypeVar("_T")


class _Notifier:
    """A lock for shared state, with wake-ups for threads and for coroutines on any event loop."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self._futures: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        """Wakes every waiter so it re-checks its condition; call with `lock` held."""
        self.lock.notify_all()
        for future in self._futures:
            with contextlib.suppress(RuntimeError):  # the waiter's event loop has closed
                future.get_loop().call_soon_threadsafe(_resolve, future)
        self._futures.clear()

    async def wait(self, ready: Callable[[], _T | None], timeout_s: float | None) -> _T:
        """Waits, without blocking the running loop, until `ready()` returns something.

        Raises:
            TimeoutError: `ready()` still returned None after `timeout_s`.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            while True:
                with self.lock:
                    if (result := ready()) is not None:
                        return result
                    future = loop.create_future()
                    self._futures.append(future)
                await future

    def wait_sync(self, ready: Callable[[], _T | None], timeout_s: float) -> _T:
        """Blocks the calling thread until `ready()` returns something; see `wait`."""
        with self.lock:
            result = self.lock.wait_for(ready, timeout_s)
        if result is None:
            raise TimeoutError(f"not ready after {timeout_s} s")
        return result


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Gate:
    """A thread-safe one-shot gate that holds a `Stream` before its first delta.

    The test opens it with `open()`; `wait_reached()` tells the test that the fake has sent
    `message_start` and `content_block_start` and is now holding.
    """

    def __init__(self) -> None:
        self._notifier = _Notifier()
        self._reached = False
        self._opened = False

    @property
    def reached(self) -> bool:
        """Whether the fake has reached the gate."""
        return self._reached

    @property
    def is_open(self) -> bool:
        """Whether `open()` has been called."""
        return self._opened

    def open(self) -> None:
        """Lets the held stream continue. Idempotent; callable from any thread."""
        with self._notifier.lock:
            self._opened = True
            self._notifier.notify()

    async def wait_reached(self, timeout: float) -> None:
        """Waits until the fake holds at the gate; raises TimeoutError after `timeout` seconds."""
        await self._notifier.wait(lambda: True if self._reached else None, timeout)

    def wait_reached_sync(self, timeout: float) -> None:
        """Blocking form of `wait_reached`, for synchronous tests."""
        self._notifier.wait_sync(lambda: True if self._reached else None, timeout)

    async def _hold(self) -> None:
        """Marks the gate reached, then waits for `open()` (the fake's side)."""
        with self._notifier.lock:
            self._reached = True
            self._notifier.notify()
        await self._notifier.wait(lambda: True if self._opened else None, None)


@dataclass(frozen=True, slots=True)
class Stream:
    """A 200 event stream of one text block; a request without `"stream": true` gets 400 instead."""

    deltas: Sequence[str] = DEFAULT_DELTAS
    """One `text_delta` event each."""
    _: KW_ONLY
    delay_s: float = 0
    """Pause between two deltas."""
    stop_reason: str | None = "end_turn"
    input_tokens: int = 12
    output_tokens: int | None = None
    """The final count in `message_delta`; defaults to the number of deltas."""
    then: Literal["finish", "error", "stall", "drop", "eof"] = "finish"
    """After the deltas: `finish` ends normally; `error` sends an `error` event and ends the body;
    `stall` sends nothing more until the client leaves; `drop` closes the socket mid-body; `eof`
    ends the body cleanly without `message_delta` or `message_stop`."""
    error_type: str = "overloaded_error"
    """The `error.type` of the event that `then="error"` sends."""
    error_message: str | None = None
    """Its `error.message`; defaults to the API's wording for `error_type`."""
    error_after: int | None = None
    """How many deltas `then="error"` sends before the error event; defaults to all."""
    hold: Gate | None = None
    """Holds the stream before the first delta until the gate opens."""
    pings_every: int = 0
    """Sends a `ping` after every N deltas; 0 sends none."""


@dataclass(frozen=True, slots=True)
class Error:
    """A non-2xx answer with the API's JSON error body."""

    status: int
    type: str
    message: str = "Error from the fake Anthropic API"
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra response headers, e.g. `retry-after-ms`, `x-should-retry` or `request-id`."""


@dataclass(frozen=True, slots=True)
class StallBeforeHeaders:
    """Accepts the request and never answers, until the client leaves (bounded by MAX_STALL_S)."""


@dataclass(frozen=True, slots=True)
class Raw:
    """A 200 answer with exactly these body bytes, for malformed-stream tests."""

    body: bytes
    content_type: str = "text/event-stream"
    split_at: Sequence[int] = ()
    """Byte offsets where the body is cut into separate HTTP chunks, sent a few ms apart so
    that the client reads them apart; empty sends it whole, with `content-length`."""


Script = Stream | Error | StallBeforeHeaders | Raw


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    """Lower-cased names."""
    body: JsonObject | None
    """The parsed JSON body, or None when it was not a JSON object."""
    raw_body: bytes
    arrived_at: float
    """`time.monotonic()` when the request had been read."""
    connection_id: int
    """Equal for requests that shared one keep-alive connection."""
    retry_count: int
    """From `x-stainless-retry-count`: 0 for the first attempt (and when the header is absent)."""


class FakeAnthropic:
    """The scriptable fake Anthropic server; see the module docstring.

    Args:
        api_key: Accepted as `authorization: Bearer <key>` or `x-api-key: <key>`; anything else
            gets 401 `authentication_error`.
        host: The loopback address to listen on; the port is always a free one.
    """

    def __init__(self, *, api_key: str = "test", host: str = "127.0.0.1") -> None:
        self._api_key = api_key
        self._host = host
        self._notifier = _Notifier()
        self._scripts: collections.deque[Script] = collections.deque()
        self._requests: list[RecordedRequest] = []
        self._disconnects: list[float] = []
        self._disconnects_returned = 0
        # Bumped by reset(), so that a connection left over from an earlier test records nothing.
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._url: str | None = None
        self._startup_error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Starts serving on a free loopback port; returns once it is listening."""
        if self._thread is not None:
            raise RuntimeError("the fake is already started")
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="fake-anthropic", daemon=True)
        self._thread.start()
        if not started.wait(_START_TIMEOUT_S) or self._url is None:
            raise RuntimeError("the fake Anthropic server did not start") from self._startup_error

    def stop(self) -> None:
        """Cancels open connections and stops the server thread. Idempotent."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has already finished
            loop.call_soon_threadsafe(stopping.set)
        thread.join(_START_TIMEOUT_S)
        self._thread = self._loop = self._stopping = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL for `AsyncAnthropic(base_url=...)`, without `/v1`."""
        if self._url is None:
            raise RuntimeError("the fake has not been started")
        return self._url

    # -- scripting and recordings (any thread) -------------------------------------------------

    def script(self, *scripts: Script) -> None:
        """Queues one script per future request, in order."""
        with self._notifier.lock:
            self._scripts.extend(scripts)

    def reset(self) -> None:
        """Forgets queued scripts, recorded requests and disconnects."""
        with self._notifier.lock:
            self._scripts.clear()
            self._requests.clear()
            self._disconnects.clear()
            self._disconnects_returned = 0
            self._generation += 1
            self._notifier.notify()

    @property
    def scripts_left(self) -> int:
        """How many queued scripts no request has used yet."""
        with self._notifier.lock:
            return len(self._scripts)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received since the last `reset()`."""
        with self._notifier.lock:
            return list(self._requests)

    @property
    def disconnects(self) -> int:
        """How many times a client left while a response was streaming, stalled or held."""
        with self._notifier.lock:
            return len(self._disconnects)

    @property
    def disconnect_times(self) -> list[float]:
        """The `time.monotonic()` of each of those disconnects."""
        with self._notifier.lock:
            return list(self._disconnects)

    async def wait_for_requests(self, n: int, timeout: float) -> list[RecordedRequest]:
        """Waits until at least `n` requests have arrived and returns them all.

        Raises:
            TimeoutError: fewer than `n` arrived within `timeout` seconds.
        """

        def arrived() -> list[RecordedRequest] | None:
            return list(self._requests) if len(self._requests) >= n else None

        return await self._notifier.wait(arrived, timeout)

    async def wait_for_disconnect(self, timeout: float) -> float:
        """Waits for the next disconnect that no earlier call returned.

        Returns:
            Its `time.monotonic()`, which may lie before this call.

        Raises:
            TimeoutError: no such disconnect within `timeout` seconds.
        """

        def next_disconnect() -> float | None:
            if self._disconnects_returned >= len(self._disconnects):
                return None
            self._disconnects_returned += 1
            return self._disconnects[self._disconnects_returned - 1]

        return await self._notifier.wait(next_disconnect, timeout)

    # -- the server thread ---------------------------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        try:
            asyncio.run(self._serve(started))
        except Exception as exc:
            logger.exception("the fake Anthropic server failed")
            self._startup_error = exc
        finally:
            started.set()

    async def _serve(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = LoopbackServer(self._handle, host=self._host)
        self._url = await server.start()
        started.set()
        try:
            await self._stopping.wait()
        finally:
            await server.close()

    async def _handle(self, request: HttpRequest, connection: Connection) -> bool:
        generation = self._record(request, connection)
        writer = connection.writer
        if request.method != "POST" or not request.path.endswith("/v1/messages"):
            message = f"{request.method} {request.path} is not served by the fake"
            await write_error_response(writer, 404, "not_found_error", message)
            return True
        if not self._authorized(request.headers):
            await write_error_response(writer, 401, "authentication_error", "invalid x-api-key")
            return True
        with self._notifier.lock:
            script = self._scripts.popleft() if self._scripts else Stream()
        try:
            keep_alive = await self._play(script, request, connection)
        except ConnectionError:
            keep_alive = False
            self._record_disconnect(generation)
        else:
            if connection.gone:
                self._record_disconnect(generation)
        return keep_alive

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        # 2.x SDKs send the key as a bearer token, older ones as x-api-key (spec section 0).
        bearer = headers.get("authorization") == f"Bearer {self._api_key}"
        return bearer or headers.get("x-api-key") == self._api_key

    async def _play(self, script: Script, request: HttpRequest, connection: Connection) -> bool:
        writer = connection.writer
        match script:
            case Stream():
                if request.json is None or request.json.get("stream") is not True:
                    await write_error_response(writer, 400, "invalid_request_error", "the fake only streams")
                    return True
                return await self._stream(script, request.json, connection)
            case Error(status=status, type=error_type, message=message, headers=headers):
                await write_error_response(writer, status, error_type, message, headers)
                return True
            case StallBeforeHeaders():
                return await self._stall(connection)
            case Raw(body=body, content_type=content_type, split_at=()):
                await write_response(writer, 200, body, content_type=content_type)
                return True
            case Raw(body=body, split_at=split_at):
                await start_sse_response(writer, new_request_id())
                cuts = [0, *split_at, len(body)]
                for start, end in itertools.pairwise(cuts):
                    writer.write(chunk(body[start:end]))
                    await writer.drain()
                    await asyncio.sleep(0.005)
                await end_sse_response(writer)
                return True
            case _:
                assert_never(script)

    async def _stream(self, script: Stream, body: JsonObject, connection: Connection) -> bool:
        writer = connection.writer
        model = body.get("model")
        await start_sse_response(writer, new_request_id())
        start = message_start_event(
            model=model if isinstance(model, str) else "claude-fake", input_tokens=script.input_tokens
        )
        await write_event(writer, start)
        await write_event(writer, content_block_start_event())
        if script.hold is not None:
            gone = await connection.wait_gone(MAX_STALL_S, until=script.hold._hold())
            if gone or not script.hold.is_open:
                return self._end_stall(gone, "held at a gate")
        deltas = script.deltas
        if script.then == "error" and script.error_after is not None:
            deltas = deltas[: script.error_after]
        for i, text in enumerate(deltas):
            if i and script.delay_s and await connection.wait_gone(script.delay_s):
                return False
            await write_event(writer, text_delta_event(text))
            if script.pings_every and (i + 1) % script.pings_every == 0:
                await write_event(writer, ping_event())
        match script.then:
            case "finish":
                output_tokens = len(script.deltas) if script.output_tokens is None else script.output_tokens
                delta = message_delta_event(stop_reason=script.stop_reason, output_tokens=output_tokens)
                await write_event(writer, content_block_stop_event())
                await write_event(writer, delta)
                await write_event(writer, message_stop_event())
            case "error":
                message = script.error_message or _ERROR_MESSAGES.get(script.error_type, script.error_type)
                await write_event(writer, error_event(script.error_type, message))
            case "stall":
                return await self._stall(connection)
            case "drop":
                return False  # closes the socket without the last chunk
            case "eof":
                pass
            case _:
                assert_never(script.then)
        await end_sse_response(writer)
        return True

    async def _stall(self, connection: Connection) -> bool:
        return self._end_stall(await connection.wait_gone(MAX_STALL_S), "stalled")

    def _end_stall(self, gone: bool, what: str) -> bool:
        if not gone:
            logger.warning("the fake %s for %s s; closing the connection", what, MAX_STALL_S)
        return False  # the connection closes; `_handle` records a disconnect if the client left

    def _record(self, request: HttpRequest, connection: Connection) -> int:
        try:
            retry_count = int(request.headers.get("x-stainless-retry-count", "0"))
        except ValueError:
            retry_count = 0
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=dict(request.headers),
            body=request.json,
            raw_body=request.body,
            arrived_at=time.monotonic(),
            connection_id=connection.id,
            retry_count=retry_count,
        )
        with self._notifier.lock:
            self._requests.append(recorded)
            self._notifier.notify()
            return self._generation

    def _record_disconnect(self, generation: int) -> None:
        with self._notifier.lock:
            if generation == self._generation:
                self._disconnects.append(time.monotonic())
                self._notifier.notify()
