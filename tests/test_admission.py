"""Admission by measured load: a process past what it can carry refuses new Chat calls, before any
side effect, and every stream it already runs completes.

The load is real. The monitor's own test blocks or busies the event loop it shares with the
monitors; the end-to-end test saturates the server (which runs on the test's event loop, see
conftest.py) with streams whose replies the fake upstream sends as fast as it can, with a lag
threshold that such a loop is always past and an idle one never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import timedelta

import asyncpg
import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError, RetryPolicy, TurnEvent
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from server.app import SERVICE_NAME
from server.limits import MIN_LOAD_LIMIT
from server.load import LoadMonitor, Overload
from server.metrics import Metrics
from tests.conftest import StartServer, eventually
from tests.fake_anthropic import FakeAnthropic, Gate, Stream
from tests.probes import assert_clean_error, health_status

NO_RETRIES = RetryPolicy(max_attempts=1)
"""The SDK retries UNAVAILABLE before the first event by itself; these tests look at one refusal."""
PATIENT = RetryPolicy(max_attempts=30)


# -- the monitor: each signal trips on its own kind of load, and lets go after it ----------------


def _sleep_30ms() -> None:
    """Holds the loop without using CPU: lag, no CPU."""
    time.sleep(0.03)


def _spin_5ms() -> None:
    """Keeps the loop's thread busy in short slices: CPU near one core, and little lag."""
    end = time.monotonic() + 0.005
    while time.monotonic() < end:
        pass


async def _hold_loop(seconds: float, block: Callable[[], None]) -> None:
    """Runs ``block`` on the loop again and again for ``seconds``, letting the loop turn in between."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        block()
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def _sampling(*monitors: LoadMonitor) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(monitor.run()) for monitor in monitors]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _monitor(*, max_lag_s: float = 0.0, max_cpu: float = 0.0) -> LoadMonitor:
    return LoadMonitor(
        max_lag_s=max_lag_s, max_cpu=max_cpu, window_s=0.3, retry_after_s=0.5, metrics=Metrics()
    )


async def test_lag_and_cpu_each_trip_their_own_threshold_and_release_it() -> None:
    by_lag = _monitor(max_lag_s=0.015)
    # Low: a thread that spins gets only its share of a machine that other processes keep busy.
    by_cpu = _monitor(max_cpu=0.15)
    off = _monitor()
    async with _sampling(by_lag, by_cpu, off):
        await asyncio.sleep(0.4)
        assert [m.overload for m in (by_lag, by_cpu, off)] == [None, None, None]

        # A loop held without CPU (a blocking call): late, not busy.
        await _hold_loop(0.5, _sleep_30ms)
        assert by_lag.overload is Overload.LOOP_LAG, by_lag.reading
        assert by_cpu.overload is None, by_cpu.reading
        assert off.overload is None
        assert off.reading.lag_s > 0.015, off.reading

        await eventually(lambda: _released(by_lag), timeout_s=3, what="the lag signal to let go")

        # A loop whose thread is busy in short slices. (It may be late too, on a busy machine.)
        await _hold_loop(0.6, _spin_5ms)
        assert by_cpu.overload is Overload.CPU, by_cpu.reading
        assert off.overload is None
        assert off.reading.cpu > 0.15, off.reading

        await eventually(lambda: _released(by_cpu), timeout_s=3, what="the CPU signal to let go")
    # The refusal's RetryInfo: the configured least, up to twice it, at random.
    delays = {by_lag.retry_after() for _ in range(20)}
    assert all(timedelta(seconds=0.5) <= d <= timedelta(seconds=1) for d in delays)
    assert len(delays) > 1


async def _released(monitor: LoadMonitor) -> bool:
    return monitor.overload is None


# -- the server: refusal before any side effect, and the admitted streams unharmed ---------------

LOAD_STREAMS = 24
LOAD_DELTAS = 2000


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _shedding(port: int) -> float:
    return (await asyncio.to_thread(_scrape, port))[("chatstream_shedding", ())]


async def test_an_overloaded_server_refuses_a_new_chat_before_side_effects_and_finishes_every_stream(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    server = await start_server(
        # An idle loop is late by a few milliseconds at most, a saturated one by tens; an idle
        # loop's thread uses a few percent of a core, one relaying this load most of one.
        # Either signal may be the one that trips first, depending on what else the machine runs.
        admission_max_lag_ms=25.0,
        admission_max_cpu=0.3,
        admission_window_s=0.5,
        # The load streams wait at the fake's gate until the last is admitted, which takes
        # refusals and retries: the tests' 5 s read timeout would end the first ones.
        llm_timeout_s=60.0,
        admission_retry_after_s=0.5,
        metrics_listen="127.0.0.1:0",
    )
    deltas = [f" t{i}" for i in range(LOAD_DELTAS)]
    expected = "".join(deltas)
    async with (
        AsyncChatClient(server.address, timeout=timedelta(seconds=10), retry_policy=NO_RETRIES) as client,
        # A client that retries until it is admitted, after each RetryInfo delay: starting all
        # the load streams at once is load too.
        AsyncChatClient(server.address, retry_policy=PATIENT) as loader,
    ):

        async def admitted() -> bool:
            try:
                await client.chat_reply("while there is no load of ours")
            except ChatClientError as err:
                if err.reason != "SERVER_OVERLOADED":
                    raise
                return False
            return True

        # Before the load (and once the server's own start-up, on this loop, is behind it): a
        # Chat goes through. "Eventually": a machine busy with other work makes this loop late
        # too, which the server rightly counts as load.
        await eventually(admitted, timeout_s=15, what="a Chat to be admitted before the load")

        # The load: streams whose whole replies the fake sends at once, so that the server's
        # loop (this test's) has more to parse and relay than it can keep up with. They are all
        # admitted first, held before their first delta, then let go together.
        gate = Gate()
        fake.script(*(Stream(deltas, hold=gate) for _ in range(LOAD_STREAMS)))
        loop = asyncio.get_running_loop()
        started: list[asyncio.Future[str]] = [loop.create_future() for _ in range(LOAD_STREAMS)]

        async def stream(index: int) -> tuple[str, str]:
            text: list[str] = []
            last = ""
            try:
                async for event in loader.chat(f"load {index}"):
                    kind = event.WhichOneof("kind")
                    if kind == "started":
                        started[index].set_result(event.started.turn)
                    elif kind == "text_delta":
                        text.append(event.text_delta.text)
                    last = kind or ""
            except ChatClientError as err:
                if not started[index].done():
                    started[index].set_exception(err)
                raise
            return "".join(text), last

        load = [asyncio.create_task(stream(i)) for i in range(LOAD_STREAMS)]
        turns = await asyncio.gather(*started)
        # Every load stream reached the model (after its TurnStarted): the baseline of requests.
        await fake.wait_for_requests(1 + LOAD_STREAMS, timeout=10)
        gate.open()

        async def shedding() -> bool:
            return await _shedding(server.metrics_port) == 1

        await eventually(shedding, timeout_s=10, what="the server to shed")

        # While it sheds: a new Chat is refused, and leaves nothing behind.
        conversations = await db.fetchval("SELECT count(*) FROM chat.conversations")
        turn_rows = await db.fetchval("SELECT count(*) FROM chat.turns")
        upstream_requests = len(fake.requests)
        with pytest.raises(ChatClientError) as refused:
            await client.chat_reply("one too many")
        assert (refused.value.code, refused.value.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "SERVER_OVERLOADED",
        )
        assert refused.value.metadata == {"scope": "server"}
        assert refused.value.retry_delay is not None
        assert timedelta(seconds=0.5) <= refused.value.retry_delay <= timedelta(seconds=1)
        assert_clean_error(refused.value)
        assert await db.fetchval("SELECT count(*) FROM chat.conversations") == conversations
        assert await db.fetchval("SELECT count(*) FROM chat.turns") == turn_rows
        assert len(fake.requests) == upstream_requests

        # ... but a watch of a turn already running is not new work: it is served, to the end.
        watched = [event async for event in client.watch_turn(turns[0])]
        assert "".join(e.text_delta.text for e in watched if e.WhichOneof("kind") == "text_delta") == expected
        # Shedding is not ill health: the pod stays in rotation for everything it can serve.
        for service in ("", SERVICE_NAME):
            assert (
                await health_status(server.address, service=service) == health_pb2.HealthCheckResponse.SERVING
            )

        # Every admitted stream completes, with every token.
        for text, last in await asyncio.gather(*load):
            assert text == expected
            assert last == "completed"

        # Once the load is gone, new calls are admitted again.
        await eventually(admitted, timeout_s=15, what="a Chat to be admitted after the load")

    samples = await asyncio.to_thread(_scrape, server.metrics_port)
    assert samples[("chatstream_streams_refused_total", (("cause", "overload"),))] >= 1
    assert samples[("chatstream_shedding", ())] == 0
    assert samples[("chatstream_turns_total", (("status", "COMPLETED"),))] >= LOAD_STREAMS + 2


async def test_a_burst_of_new_calls_is_admitted_only_as_fast_as_the_load_limit_grows(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    """The readings lag what a new stream costs, so a burst is admitted in steps, not at once."""
    server = await start_server(
        # The lag never trips here (no load: every stream is held): only the learnt count acts.
        admission_max_lag_ms=10_000.0,
        admission_max_cpu=0.0,
        admission_window_s=0.2,
        admission_retry_after_s=0.1,
        metrics_listen="127.0.0.1:0",
    )
    burst = 3 * MIN_LOAD_LIMIT
    refusals: list[ChatClientError] = []
    gate = Gate()
    fake.script(*(Stream(["held"], hold=gate) for _ in range(burst)))
    async with (
        AsyncChatClient(server.address, retry_policy=NO_RETRIES) as client,
        contextlib.AsyncExitStack() as held,
    ):

        async def start(index: int) -> AsyncGenerator[TurnEvent, None] | ChatClientError:
            events = client.chat(f"burst {index}")
            try:
                assert (await anext(events)).WhichOneof("kind") == "started"
            except ChatClientError as err:
                refusals.append(err)
                return err
            return await held.enter_async_context(contextlib.aclosing(events))

        outcomes = await asyncio.gather(*(start(i) for i in range(burst)))
        admitted = [o for o in outcomes if not isinstance(o, ChatClientError)]
        # The first burst gets about the starting limit (one more window's growth at most, on a
        # slow machine), and the refused calls left nothing behind.
        assert MIN_LOAD_LIMIT <= len(admitted) < burst
        assert await db.fetchval("SELECT count(*) FROM chat.turns") == len(admitted)

        # Retried after their RetryInfo, the others get in as the limit grows.
        waiting = [i for i, o in enumerate(outcomes) if isinstance(o, ChatClientError)]

        async def all_admitted() -> bool:
            for index in list(waiting):
                outcome = await start(index)
                if not isinstance(outcome, ChatClientError):
                    admitted.append(outcome)
                    waiting.remove(index)
            return not waiting

        await eventually(all_admitted, timeout_s=10, what="the load limit to grow to the whole burst")
        assert {(err.code, err.reason) for err in refusals} == {
            (grpc.StatusCode.UNAVAILABLE, "SERVER_OVERLOADED")
        }
        assert all(err.retry_delay is not None for err in refusals)
        limit = (await asyncio.to_thread(_scrape, server.metrics_port))[("chatstream_admission_limit", ())]
        assert limit >= burst

        gate.open()
        for events in admitted:
            assert [e.WhichOneof("kind") async for e in events][-1] == "completed"
