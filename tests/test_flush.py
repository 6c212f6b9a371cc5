"""The flush interval (server/coalescer.py): an idle stream gets each delta as its own message; a
busy process joins a stream's deltas into fewer messages, yet never holds a reply back whole.

The load is real, as in tests/test_admission.py. The server runs on this test's event loop
(conftest.py), and the busy test holds that loop in short slices of a blocking sleep, which makes
it late (the lag the server's LoadMonitor reads) without using CPU. Nothing here is timed: the
tests count the messages and check their numbers, with the upstream pacing its deltas far apart
enough that, without the flush interval, nothing would join them.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Sequence
from datetime import timedelta

import pytest
from chatstream import AsyncChatClient, RetryPolicy, TurnEvent
from prometheus_client.parser import text_string_to_metric_families

from server.coalescer import FlushPolicy, flush_interval
from server.load import LoadMonitor
from server.metrics import Metrics
from tests.conftest import StartServer, eventually
from tests.fake_anthropic import FakeAnthropic, Gate, Stream

REPLY = [f" w{i:02d}" for i in range(30)]
"""Distinct deltas of one length each: a message's text says which deltas it joined."""
PATIENT = RetryPolicy(max_attempts=30)
"""A refusal for load (a machine busy with other work) is retried after its RetryInfo delay."""


# -- the interval function ------------------------------------------------------------------------


def test_the_interval_is_zero_with_half_the_thresholds_left_and_grows_to_its_bound_at_them() -> None:
    assert flush_interval(1.0, max_s=0.025) == 0
    assert flush_interval(0.5, max_s=0.025) == 0
    assert flush_interval(0.25, max_s=0.025) == pytest.approx(0.0125)
    assert flush_interval(0.0, max_s=0.025) == pytest.approx(0.025)
    # Past the thresholds (shedding): the bound, never more.
    assert flush_interval(-2.0, max_s=0.025) == pytest.approx(0.025)


def test_the_policy_follows_the_monitors_readings_and_is_off_without_thresholds() -> None:
    def monitor(max_lag_s: float) -> LoadMonitor:
        return LoadMonitor(
            max_lag_s=max_lag_s, max_cpu=0.0, window_s=1.0, retry_after_s=1.0, metrics=Metrics()
        )

    on, off = monitor(0.020), monitor(0.0)
    policies = [FlushPolicy(on, max_s=0.025), FlushPolicy(off, max_s=0.025), FlushPolicy(on, max_s=0.0)]
    for m in (on, off):
        m.sample(100.0, lag_s=0.001, cpu_s=0.0)
    assert [p.interval() for p in policies] == [0, 0, 0]
    # A late loop: lag p90 past the threshold.
    for m in (on, off):
        m.sample(100.1, lag_s=0.050, cpu_s=0.0)
    assert [p.interval() for p in policies] == [pytest.approx(0.025), 0, 0]


# -- through the front door ---------------------------------------------------------------------


async def test_an_idle_stream_gets_each_delta_as_its_own_message(
    start_server: StartServer, fake: FakeAnthropic
) -> None:
    server = await start_server(
        # The load is measured, and an idle loop (late by a millisecond or so) is far from half
        # of this threshold.
        admission_max_lag_ms=50.0,
        # Long: were any of it applied while idle, these deltas (30 ms apart) would be joined.
        flush_max_ms=500.0,
        metrics_listen="127.0.0.1:0",
    )
    fake.script(Stream(REPLY[:12], delay_s=0.03))
    async with AsyncChatClient(server.address, retry_policy=PATIENT) as client:
        events = [event async for event in client.chat("are you idle?")]

    assert _joined(events, REPLY[:12]) == [1] * 12
    assert await _flush_interval_s(server.metrics_port) == 0


async def test_a_busy_server_joins_a_streams_deltas_into_fewer_messages_but_not_into_one(
    start_server: StartServer, fake: FakeAnthropic
) -> None:
    flush_max_s = 0.4
    server = await start_server(
        # An idle loop is late by about a millisecond, this test's held one by about 5 to 10.
        admission_max_lag_ms=2.5,
        admission_window_s=0.5,
        flush_max_ms=flush_max_s * 1000,
        metrics_listen="127.0.0.1:0",
    )
    gate = Gate()
    # 40 ms apart, 30 of them: a loop held 10 ms at a time still writes each alone, unless the
    # flush interval (up to 400 ms here) lets several go in one pipeline.
    fake.script(Stream(REPLY, delay_s=0.04, hold=gate))
    async with AsyncChatClient(
        server.address, retry_policy=PATIENT, chat_timeout=timedelta(seconds=30)
    ) as client:
        events = client.chat("are you busy?")
        # Admitted while the loop is idle (a new Chat is refused once it is not).
        started = await anext(events)
        assert started.WhichOneof("kind") == "started"

        stop = asyncio.Event()
        holder = asyncio.create_task(_hold_loop(stop))
        try:

            async def busy() -> bool:
                return await _flush_interval_s(server.metrics_port) >= flush_max_s / 2

            await eventually(busy, timeout_s=10, what="the flush interval to follow the load up")
            gate.open()
            rest = [event async for event in events]
        finally:
            stop.set()
            await holder

        joined = _joined([started, *rest], REPLY)
        # Fewer, fuller messages: without the interval each delta would be its own.
        assert len(joined) <= len(REPLY) // 2, joined
        # ... yet bounded: the reply is not held back until its end.
        assert len(joined) >= 2, joined

        # A joined delta's seq (its last part's) is a resume point: a watch from there gets
        # exactly the rest of the reply.
        first = next(e for e in rest if e.WhichOneof("kind") == "text_delta")
        seen = first.text_delta.offset + len(first.text_delta.text)
        watched = [
            event
            async for event in client.watch_turn(started.started.turn, after_seq=first.seq, after_offset=seen)
        ]
        text = "".join(e.text_delta.text for e in watched if e.WhichOneof("kind") == "text_delta")
        assert text == "".join(REPLY)[seen:]


async def _hold_loop(stop: asyncio.Event) -> None:
    """Holds the event loop 10 ms at a time without using CPU (a blocking call): late, not busy."""
    while not stop.is_set():
        time.sleep(0.01)
        await asyncio.sleep(0.01)


def _joined(events: Sequence[TurnEvent], deltas: Sequence[str]) -> list[int]:
    """How many of ``deltas`` each TextDelta joined, after checking the numbering of every event.

    The stream is ``started`` (seq 1), TextDeltas, ``completed``; delta i of the upstream has
    seq i + 2. Each TextDelta is a run of consecutive deltas: their text, the offset of the
    first, the seq of the last. Together they are the whole reply, in order.
    """
    kinds = [event.WhichOneof("kind") for event in events]
    assert kinds == ["started", *["text_delta"] * (len(kinds) - 2), "completed"], kinds
    seqs = [event.seq for event in events]
    assert seqs[0] == 1
    assert seqs == sorted(set(seqs)), seqs
    joined: list[int] = []
    done = 0
    for event in events[1:-1]:
        delta = event.text_delta
        assert delta.offset == len("".join(deltas[:done])), (delta, done)
        parts = next(
            n for n in range(1, len(deltas) - done + 1) if "".join(deltas[done : done + n]) == delta.text
        )
        done += parts
        assert event.seq == done + 1, (event.seq, done)
        joined.append(parts)
    assert done == len(deltas)
    return joined


async def _flush_interval_s(port: int) -> float:
    def scrape() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        families = {family.name: family for family in text_string_to_metric_families(text)}
        return families["chatstream_flush_interval_seconds"].samples[0].value

    return await asyncio.to_thread(scrape)
