"""One load-generator process: N concurrent streams of turns against one system.

``python -m bench.load --target grpc|sse --address HOST:PORT --streams N ...``

Started by the harness several times side by side (so the load is not bound by one client's event
loop). Protocol with the harness: the process connects, prints ``READY``, reads the common start time
``t0`` (``time.monotonic()``, one clock for all processes) from stdin, runs, and prints one JSON
result as its last stdout line.

Timeline from t0: stream i starts at ``t0 + ramp * i / N``; the measurement window is
``[t0 + warmup, t0 + warmup + window]``; no new turn starts after the window; turns still running
``drain`` seconds later are cancelled (counted as ``cut``, not as errors). Each stream runs turns back
to back, continuing one conversation for ``--conv-turns`` turns, at most ``--turns-per-stream`` turns.

With ``--retry-refused`` (P6), a call the server refuses before its TurnStarted for its load or its
stream caps (``SERVER_OVERLOADED``, ``TOO_MANY_STREAMS``) is counted as refused, checked for
``ErrorInfo`` and ``RetryInfo``, and tried again after the RetryInfo delay, as a well-behaved client
would, until the window ends; it is not an error. A turn that failed after its TurnStarted is a
mid-stream failure.

Per turn it checks that the reply is exactly the expected text (every token, in order), and records:
time to TurnStarted (request sent -> started received), server-added time to first token (first
TextDelta received -> the fake's send time encoded in the first token), gaps between consecutive events
of a turn (1 ms histogram), tokens delivered (counted from the text, so coalesced deltas count fully).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import FIRST_W, TOKEN_W, check_reply, monotonic, parse_first_token, spec_text

GAP_BIN_S = 0.001


@dataclass(slots=True)
class Plan:
    """What one process does (all times in seconds)."""

    target: str
    address: str
    streams: int
    tokens: int
    rate: float
    warmup: float
    window: float
    ramp: float
    drain: float
    conv_turns: int
    turns_per_stream: int
    streams_per_channel: int
    call_timeout: float
    retry_refused: bool = False


@dataclass(slots=True)
class Stats:
    """What one process measured."""

    tokens: int = 0
    turns_ok: int = 0
    turns_ok_window: int = 0
    turns_started: int = 0
    bad_text: int = 0
    cut: int = 0
    events: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    gaps: dict[int, int] = field(default_factory=dict)
    max_gap: float = 0.0
    error_samples: list[str] = field(default_factory=list)
    started_censored: int = 0
    started_events: int = 0
    """TurnStarted events received: turns the server admitted and made durable."""
    refused: Counter[str] = field(default_factory=Counter)
    """Calls refused before TurnStarted, by ErrorInfo reason (``--retry-refused``)."""
    refused_without_retry_info: int = 0
    midstream_failures: int = 0
    """Turns that failed (error, status, or text) after their TurnStarted."""


@dataclass(frozen=True, slots=True)
class Refused:
    """A call the server refused before any side effect; try again after ``delay_s``."""

    delay_s: float


REFUSALS = frozenset({"SERVER_OVERLOADED", "TOO_MANY_STREAMS"})


class Runner:
    """Drives the streams of one process."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.stats = Stats()
        self.t0 = 0.0
        self.ws = 0.0
        self.we = 0.0
        self.text = spec_text(plan.tokens, plan.rate)
        self.marks: dict[str, float] = {}
        self.waiting: dict[int, float] = {}
        """Send time of each turn (by task) that has not had its TurnStarted yet."""

    def record_started(self, now: float, sent: float) -> None:
        """Time to TurnStarted, for every TurnStarted that arrives inside the window."""
        self.waiting.pop(id(asyncio.current_task()), None)
        if self.ws <= now < self.we:
            self.stats.started.append(now - sent)

    def censor_waiting(self, at: float) -> None:
        """Requests still without TurnStarted when the run is cut count with what they waited so far
        (a lower bound): leaving them out would hide exactly the slowest ones."""
        for sent in self.waiting.values():
            if sent < self.we:
                self.stats.started.append(at - sent)
                self.stats.started_censored += 1
        self.waiting.clear()

    def record_event(self, now: float, last: float) -> None:
        stats = self.stats
        stats.events += 1
        if self.ws <= now < self.we:
            gap = now - last
            b = int(gap / GAP_BIN_S)
            stats.gaps[b] = stats.gaps.get(b, 0) + 1
            if gap > stats.max_gap:
                stats.max_gap = gap

    def count_delta(self, text: str, first: bool, now: float) -> None:
        if first:
            sent_ns = parse_first_token(text)
            if sent_ns is not None and self.ws <= now < self.we:
                self.stats.ttft.append(now - sent_ns / 1e9)
            self.stats.tokens += 1 + max(len(text) - FIRST_W, 0) // TOKEN_W
        else:
            self.stats.tokens += len(text) // TOKEN_W

    def end_turn(self, text: str, ok: bool, now: float) -> bool:
        if not ok:
            return False
        if not check_reply(text, self.plan.tokens):
            self.stats.bad_text += 1
            return False
        self.stats.turns_ok += 1
        if self.ws <= now < self.we:
            self.stats.turns_ok_window += 1
        return True

    # -- gRPC (chatstream and the floor) ------------------------------------------------------

    def metadata(self, index: int) -> tuple[tuple[str, str], ...]:
        """Per-stream call metadata: the bench credential and a user of its own, if a key is given."""
        key = os.environ.get("BENCH_API_KEY")
        if not key:
            return ()
        return (("authorization", f"Bearer {key}"), ("x-chatstream-user", f"u{os.getpid()}-{index}"))

    async def grpc_turn(
        self, stub: Any, conversation: str, metadata: tuple[tuple[str, str], ...]
    ) -> str | Refused | None:
        """One turn; returns the conversation name to continue, None after a failure, or a refusal."""
        from chatstream.v1 import chat_service_pb2 as pb
        from grpc import aio

        plan = self.plan
        sent = monotonic()
        self.waiting[id(asyncio.current_task())] = sent
        self.stats.turns_started += 1
        request = pb.ChatRequest(conversation=conversation, text=self.text)
        call = stub.Chat(request, timeout=plan.call_timeout, metadata=metadata or None)
        parts: list[str] = []
        first = True
        last = sent
        ok = False
        started = False
        try:
            async for response in call:
                now = monotonic()
                event = response.event
                kind = event.WhichOneof("kind")
                if kind == "text_delta":
                    text = event.text_delta.text
                    self.count_delta(text, first, now)
                    first = False
                    parts.append(text)
                elif kind == "started":
                    conversation = event.started.conversation
                    started = True
                    self.stats.started_events += 1
                    self.record_started(now, sent)
                elif kind == "completed":
                    ok = event.completed.status == pb.TURN_STATUS_COMPLETED
                    if not ok:
                        self.stats.errors[f"status_{event.completed.status}"] += 1
                self.record_event(now, last)
                last = now
        except aio.AioRpcError as exc:
            if started:
                self.stats.midstream_failures += 1
            elif plan.retry_refused and (refused := self.refusal(exc)) is not None:
                return refused
            self.stats.errors[exc.code().name] += 1
            if len(self.stats.error_samples) < 5:
                self.stats.error_samples.append(
                    f"{exc.code().name}: {exc.details()!r} after {monotonic() - sent:.2f}s, "
                    f"{len(parts)} deltas, t={monotonic() - self.t0:.1f}s into the run"
                )
            return None
        if self.end_turn("".join(parts), ok, monotonic()):
            return conversation
        if started:
            self.stats.midstream_failures += 1
        return None

    def refusal(self, exc: Any) -> Refused | None:
        """A refusal for load or stream caps, from the rich status; None for any other error."""
        from google.rpc import error_details_pb2, status_pb2

        details = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
        if details is None:
            return None
        reason, delay_s = None, None
        for detail in status_pb2.Status.FromString(details).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                delay_s = retry.retry_delay.ToTimedelta().total_seconds()
        if reason not in REFUSALS:
            return None
        self.stats.refused[reason] += 1
        if delay_s is None:
            self.stats.refused_without_retry_info += 1
        return Refused(delay_s if delay_s is not None else 1.0)

    async def run_grpc(self) -> None:
        import grpc
        from chatstream.v1 import chat_service_pb2_grpc as pb_grpc

        plan = self.plan
        n_channels = max(1, -(-plan.streams // plan.streams_per_channel))
        # A local subchannel pool gives each channel its own TCP connection, like separate clients.
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 16 << 20)]
        channels = [grpc.aio.insecure_channel(plan.address, options=options) for _ in range(n_channels)]
        try:
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 30)
            stubs = [pb_grpc.ChatServiceStub(c) for c in channels]
            metadata = [self.metadata(i) for i in range(plan.streams)]
            await self.drive(lambda i, conv: self.grpc_turn(stubs[i % len(stubs)], conv, metadata[i]))
        finally:
            await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)

    # -- SSE (the peer) -------------------------------------------------------------------------

    async def sse_turn(self, session: Any, conversation: str) -> str | None:
        import aiohttp

        plan = self.plan
        sent = monotonic()
        self.waiting[id(asyncio.current_task())] = sent
        self.stats.turns_started += 1
        parts: list[str] = []
        first = True
        last = sent
        ok = False
        try:
            async with session.post(
                f"http://{plan.address}/chat", json={"text": self.text, "session": conversation}
            ) as response:
                if response.status != 200:
                    self.stats.errors[f"HTTP_{response.status}"] += 1
                    await response.read()
                    return None
                buf = b""
                async for chunk in response.content.iter_any():
                    now = monotonic()
                    buf += chunk
                    while (end := buf.find(b"\n\n")) >= 0:
                        frame, buf = buf[:end], buf[end + 2 :]
                        if not frame.startswith(b"data: "):
                            continue
                        event = json.loads(frame[6:])
                        kind = event["type"]
                        if kind == "delta":
                            text = event["text"]
                            self.count_delta(text, first, now)
                            first = False
                            parts.append(text)
                        elif kind == "started":
                            conversation = event["session"]
                            self.record_started(now, sent)
                        elif kind == "completed":
                            ok = True
                        elif kind == "error":
                            self.stats.errors[f"sse_{event.get('error')}"] += 1
                            return None
                        self.record_event(now, last)
                        last = now
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.stats.errors[exc.__class__.__name__] += 1
            return None
        if not ok:
            self.stats.errors["sse_incomplete"] += 1
        return conversation if self.end_turn("".join(parts), ok, monotonic()) else None

    async def run_sse(self) -> None:
        import aiohttp

        plan = self.plan
        timeout = aiohttp.ClientTimeout(total=plan.call_timeout, sock_read=60)
        connector = aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.get(f"http://{plan.address}/health") as response:
                await response.read()
            await self.drive(lambda i, conv: self.sse_turn(session, conv))

    # -- common ---------------------------------------------------------------------------------

    async def drive(self, turn: Any) -> None:
        plan = self.plan
        print("READY", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        self.t0 = float(line)
        self.ws = self.t0 + plan.warmup
        self.we = self.ws + plan.window
        tasks = [asyncio.create_task(self.stream(i, turn)) for i in range(plan.streams)]
        marker = asyncio.create_task(self.mark_window())
        hard_end = self.we + plan.drain
        done, pending = await asyncio.wait(tasks, timeout=max(hard_end - monotonic(), 0.1))
        marker.cancel()
        self.censor_waiting(min(monotonic(), self.we))
        if "t_ws" not in self.marks:
            self.mark("ws")
        if "t_we" not in self.marks:
            self.mark("we")  # every stream ended before the window did
        for task in pending:
            task.cancel()
        self.stats.cut += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                self.stats.errors[f"crash_{task.exception().__class__.__name__}"] += 1

    def mark(self, name: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.marks[f"t_{name}"] = monotonic()
        self.marks[f"tokens_{name}"] = self.stats.tokens
        self.marks[f"cpu_{name}"] = usage.ru_utime + usage.ru_stime

    async def mark_window(self) -> None:
        """Counts tokens at the window's edges: what arrived in between is the throughput."""
        await asyncio.sleep(max(self.ws - monotonic(), 0))
        self.mark("ws")
        await asyncio.sleep(max(self.we - monotonic(), 0))
        self.mark("we")

    async def stream(self, index: int, turn: Any) -> None:
        plan = self.plan
        start = self.t0 + plan.ramp * index / max(plan.streams, 1)
        await asyncio.sleep(max(start - monotonic(), 0))
        conversation = ""
        in_conversation = 0
        done = 0
        limit = plan.turns_per_stream or 1_000_000
        while done < limit and monotonic() < self.we:
            result = await turn(index, conversation)
            self.waiting.pop(id(asyncio.current_task()), None)  # failed before TurnStarted
            if isinstance(result, Refused):
                # Nothing happened on the server: the same turn again, after the delay it asked for.
                await asyncio.sleep(result.delay_s)
                continue
            done += 1
            in_conversation += 1
            if result is None:
                await asyncio.sleep(0.01)  # a failing system must not turn this into a busy loop
                conversation, in_conversation = "", 0
            elif in_conversation >= plan.conv_turns:
                conversation, in_conversation = "", 0
            else:
                conversation = result

    def result(self) -> dict[str, object]:
        s = self.stats
        return {
            "tokens": s.tokens,
            "turns_ok": s.turns_ok,
            "turns_ok_window": s.turns_ok_window,
            "turns_started": s.turns_started,
            "bad_text": s.bad_text,
            "cut": s.cut,
            "events": s.events,
            "errors": dict(s.errors),
            "ttft": s.ttft,
            "started": s.started,
            "gaps": s.gaps,
            "max_gap": s.max_gap,
            "error_samples": s.error_samples,
            "started_censored": s.started_censored,
            "started_events": s.started_events,
            "refused": dict(s.refused),
            "refused_without_retry_info": s.refused_without_retry_info,
            "midstream_failures": s.midstream_failures,
            "window_start": self.ws,
            "window_end": self.we,
            **self.marks,
        }


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=["grpc", "sse"], required=True)
    parser.add_argument("--address", required=True, help="host:port")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--ramp", type=float, default=0.5)
    parser.add_argument("--drain", type=float, default=10.0)
    parser.add_argument("--conv-turns", type=int, default=1)
    parser.add_argument("--turns-per-stream", type=int, default=0, help="0: as many as fit")
    parser.add_argument("--streams-per-channel", type=int, default=50)
    parser.add_argument("--call-timeout", type=float, default=300.0)
    parser.add_argument(
        "--retry-refused",
        action="store_true",
        help="retry calls refused for load or stream caps after their RetryInfo delay (P6)",
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (the SSE client only)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    args = parser.parse_args()
    plan = Plan(
        target=args.target,
        address=args.address,
        streams=args.streams,
        tokens=args.tokens,
        rate=args.rate,
        warmup=args.warmup,
        window=args.window,
        ramp=args.ramp,
        drain=args.drain,
        conv_turns=max(args.conv_turns, 1),
        turns_per_stream=args.turns_per_stream,
        streams_per_channel=max(args.streams_per_channel, 1),
        call_timeout=args.call_timeout,
        retry_refused=args.retry_refused,
    )
    runner = Runner(plan)
    coro = runner.run_grpc() if plan.target == "grpc" else runner.run_sse()
    if args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
            loop_runner.run(coro)
    else:
        asyncio.run(coro)
    args.out.write_text(json.dumps(runner.result(), separators=(",", ":")))


if __name__ == "__main__":
    main()
