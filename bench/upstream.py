"""Fast fake Anthropic Messages API for the benchmark: HTTP/1.1 + SSE, one process, uvloop.

``python -m bench.upstream --port P [--tokens 500] [--rate 0]``

Every ``POST .../v1/messages`` gets a complete, valid stream (ANTHROPIC_STREAMING.md §2, §7) of the
shape asked for in the last user message (``bench n=<tokens> r=<rate>``, see bench/common.py), or of
the CLI defaults. The first token carries the monotonic time at which it was written to the socket.

* rate 0 ("fast upstream"): the whole response is one ``write()``: the fake costs a few microseconds
  per reply and the system under test sees tokens as fast as it can parse them.
* rate > 0: token i is written at ``t0 + i / rate`` on an absolute schedule (``loop.call_at``), so the
  pacing does not drift when the machine is busy.

``GET /stats`` answers counters as JSON (requests, tokens sent, streams completed or cut short).
It is built on ``asyncio.Protocol`` rather than streams to keep its own CPU use small: it shares two
cores with everything it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Final, cast

import uvloop

from bench.common import FIRST_W, VOCAB, body_text, first_token, parse_spec, token

_MAX_HEAD: Final = 64 * 1024
_MAX_BODY: Final = 32 * 1024 * 1024


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _frame(obj: dict[str, object]) -> bytes:
    return _chunk(f"event: {obj['type']}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode())


def _delta(text: str) -> bytes:
    return _frame({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\nrequest-id: req_bench\r\n\r\n"
)
_BLOCK_START: Final = _frame(
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
)
_TAIL_STOP: Final = _frame({"type": "content_block_stop", "index": 0})
_MESSAGE_STOP: Final = _frame({"type": "message_stop"}) + b"0\r\n\r\n"
_PLACEHOLDER: Final = "#" * FIRST_W
_FIRST_DELTA_PREFIX, _FIRST_DELTA_SUFFIX = _delta(_PLACEHOLDER).split(_PLACEHOLDER.encode())
# The first token's chunk differs only by its digits; its length (and so the chunk header) is fixed.


def _message_start(model: str, input_tokens: int) -> bytes:
    usage = {"input_tokens": input_tokens, "output_tokens": 1, "cache_creation_input_tokens": 0}
    usage["cache_read_input_tokens"] = 0
    message: dict[str, object] = {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return _frame({"type": "message_start", "message": message})


def _message_delta(tokens: int) -> bytes:
    return _frame(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": tokens},
        }
    )


@dataclass(slots=True)
class Stats:
    """Counters served at ``GET /stats``."""

    requests: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cut: int = 0
    tokens_sent: int = 0
    bad_requests: int = 0
    connections: int = 0


class Upstream:
    """Shared state: defaults, caches of encoded bodies, counters."""

    def __init__(self, *, tokens: int, rate: float) -> None:
        self.tokens = tokens
        self.rate = rate
        self.stats = Stats()
        self._bodies: dict[int, bytes] = {}
        self._starts: dict[tuple[str, int], bytes] = {}
        self._tokens = [_delta(t) for t in VOCAB]

    def token_chunk(self, i: int) -> bytes:
        """The encoded chunk of token ``i >= 1``."""
        return self._tokens[(i - 1) % len(VOCAB)]

    def rest(self, tokens: int) -> bytes:
        """Tokens 1..tokens-1 and the end of the stream, encoded (cached per length)."""
        body = self._bodies.get(tokens)
        if body is None:
            chunks = [self.token_chunk(i) for i in range(1, tokens)]
            body = b"".join(chunks) + self.tail(tokens)
            if len(self._bodies) < 256:
                self._bodies[tokens] = body
        return body

    @staticmethod
    def tail(tokens: int) -> bytes:
        """content_block_stop, message_delta, message_stop and the last chunk."""
        return _TAIL_STOP + _message_delta(tokens) + _MESSAGE_STOP

    def start(self, model: str, input_tokens: int) -> bytes:
        """Response head, message_start and content_block_start."""
        key = (model, input_tokens)
        head = self._starts.get(key)
        if head is None:
            head = _HEAD + _message_start(model, input_tokens) + _BLOCK_START
            if len(self._starts) < 4096:
                self._starts[key] = head
        return head


class Pacer:
    """A timing wheel for paced replies: one loop callback per tick writes every token that is due.

    Cheaper than one timer per token (no TimerHandle, no heap), which matters when 1,000+ streams
    at 20 tokens/s share two cores with the system under test. A token is late by at most one tick.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = 0.002) -> None:
        self._loop = loop
        self._tick = tick_s
        self._buckets: dict[int, list[Paced]] = {}
        self._done = int(loop.time() / tick_s)
        self._handle: asyncio.TimerHandle | None = None
        self._key = 0

    def add(self, paced: Paced, due: float) -> None:
        """Files ``paced`` under the first tick at or after ``due`` that has not run yet."""
        key = max(math.ceil(due / self._tick), self._done + 1)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [paced]
        else:
            bucket.append(paced)
        if self._handle is None:
            self._schedule(key)
        elif key < self._key:
            self._handle.cancel()
            self._schedule(key)

    def _schedule(self, key: int) -> None:
        self._key = key
        self._handle = self._loop.call_at(key * self._tick, self._run)

    def _run(self) -> None:
        self._handle = None
        now = self._loop.time()
        # The loop's clock has millisecond resolution (libuv): a timer may fire a hair before
        # the tick it was set for. That tick is due all the same, or this would spin.
        upto = max(int(now / self._tick), self._key)
        self._done = max(self._done, upto)
        buckets = self._buckets
        for key in sorted(k for k in buckets if k <= upto):
            for paced in buckets.pop(key):
                due = paced.send_due(now)
                if due is not None:
                    self.add(paced, due)
        if buckets and self._handle is None:
            self._schedule(min(buckets))


class Paced:
    """One paced reply in progress: token ``i`` is due at ``t0 + i / rate``."""

    __slots__ = ("next", "proto", "rate", "t0", "tokens")

    def __init__(self, proto: UpstreamProtocol, t0: float, rate: float, tokens: int) -> None:
        self.proto = proto
        self.t0 = t0
        self.rate = rate
        self.tokens = tokens
        self.next = 1

    def due(self) -> float:
        return self.t0 + self.next / self.rate

    def send_due(self, now: float) -> float | None:
        """Writes every token due by ``now`` in one write; returns when the next one is due."""
        proto = self.proto
        if proto.closed:
            proto.up.stats.streams_cut += 1
            return None
        last = min(int((now - self.t0) * self.rate + 1e-9), self.tokens - 1)
        up = proto.up
        if last >= self.next:
            data = b"".join(up.token_chunk(i) for i in range(self.next, last + 1))
            up.stats.tokens_sent += last + 1 - self.next
            self.next = last + 1
        else:
            data = b""
        if self.next >= self.tokens:
            proto.finish(data, self.tokens)
            return None
        if data:
            proto.write(data)
        return self.due()


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive), no pipelining."""

    def __init__(self, upstream: Upstream, pacer: Pacer) -> None:
        self.up = upstream
        self._pacer = pacer
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self.up.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # a paced reply in progress notices on its next tick

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._next_request()

    def _next_request(self) -> None:
        while not self._busy and not self.closed:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    self._abort()
                return
            head = bytes(self._buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            method, target, *_ = lines[0].split(" ")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if not 0 <= length <= _MAX_BODY:
                self._abort()
                return
            if len(self._buf) < end + 4 + length:
                return
            body = bytes(self._buf[end + 4 : end + 4 + length])
            del self._buf[: end + 4 + length]
            self._handle(method, target.split("?", 1)[0], body)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _respond(self, status: str, body: bytes, content_type: str = "application/json") -> None:
        assert self._transport is not None
        head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        self._transport.write(head.encode() + f"request-id: req_{uuid.uuid4().hex}\r\n\r\n".encode() + body)

    def _handle(self, method: str, path: str, body: bytes) -> None:
        up = self.up
        up.stats.requests += 1
        if method == "GET" and path == "/stats":
            self._respond("200 OK", json.dumps(asdict(up.stats)).encode())
            return
        if method != "POST" or not path.endswith("/v1/messages"):
            up.stats.bad_requests += 1
            error = {"type": "error", "error": {"type": "not_found_error", "message": path}}
            self._respond("404 Not Found", json.dumps(error).encode())
            return
        try:
            request = json.loads(body)
            messages = request["messages"]
            last = messages[-1]["content"]
            if isinstance(last, list):
                last = " ".join(str(b.get("text", "")) for b in last if isinstance(b, dict))
            model = str(request.get("model", "bench"))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            up.stats.bad_requests += 1
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad body"}}
            self._respond("400 Bad Request", json.dumps(error).encode())
            return
        spec = parse_spec(str(last))
        tokens, rate = spec if spec is not None else (up.tokens, up.rate)
        tokens = max(tokens, 1)
        up.stats.streams_started += 1
        start = up.start(model, max(len(body) // 16, 1))
        assert self._transport is not None
        if rate <= 0:
            now_ns = time.monotonic_ns()
            first = _FIRST_DELTA_PREFIX + first_token(now_ns).encode() + _FIRST_DELTA_SUFFIX
            self._transport.write(start + first + up.rest(tokens))
            up.stats.tokens_sent += tokens
            up.stats.streams_completed += 1
            return
        self._busy = True
        now_ns = time.monotonic_ns()
        self._transport.write(
            start + _FIRST_DELTA_PREFIX + first_token(now_ns).encode() + _FIRST_DELTA_SUFFIX
        )
        up.stats.tokens_sent += 1
        paced = Paced(self, asyncio.get_running_loop().time(), rate, tokens)
        if tokens <= 1:
            self.finish(b"", tokens)
        else:
            self._pacer.add(paced, paced.due())

    def write(self, data: bytes) -> None:
        """Writes to the client unless it has gone."""
        if self._transport is not None and not self.closed:
            self._transport.write(data)

    def finish(self, data: bytes, tokens: int) -> None:
        """Writes ``data`` and the end of the stream, then serves the next request, if any."""
        self.write(data + Upstream.tail(tokens))
        self.up.stats.streams_completed += 1
        self._busy = False
        if self._buf:
            self._next_request()


async def serve(port: int, tokens: int, rate: float) -> None:
    """Serves until SIGTERM or SIGINT."""
    upstream = Upstream(tokens=tokens, rate=rate)
    loop = asyncio.get_running_loop()
    pacer = Pacer(loop)
    server = await loop.create_server(
        lambda: UpstreamProtocol(upstream, pacer), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream listening on http://127.0.0.1:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=500, help="reply length when the request names none")
    parser.add_argument("--rate", type=float, default=0.0, help="tokens/s per reply; 0 = as fast as possible")
    args = parser.parse_args()
    # body_text is imported so the module documents what the bytes are; check they agree once.
    assert body_text(3) == token(1) + token(2)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.tokens, args.rate))


if __name__ == "__main__":
    main()
