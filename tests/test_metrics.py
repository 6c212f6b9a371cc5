"""The Prometheus endpoint: scraped over HTTP after real chats, values checked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings
from server.constants import DEAD_LETTER_STREAM
from server.consumer.process import ConsumerProcess
from server.consumer.worker import PersistenceWorker
from server.db.engine import Database
from server.metrics import Metrics
from server.redis_client import create_redis
from tests.conftest import StartServer, eventually
from tests.fake_anthropic import Error, FakeAnthropic, Gate, Stream
from tests.processes import free_port, serve_process

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    return _parse(await asyncio.to_thread(get))


async def test_metrics_endpoint_reports_turns_tokens_latencies_and_streams(
    start_server: StartServer, fake: FakeAnthropic
) -> None:
    server = await start_server(metrics_listen="127.0.0.1:0")
    assert server.metrics_port
    fake.script(Stream(["a", "b", "c"], output_tokens=3), Error(529, "overloaded_error", "busy"))
    async with AsyncChatClient(server.address) as client:
        await client.chat_reply("one")
        with contextlib.suppress(ChatClientError):
            await client.chat_reply("two")

    samples = await _scrape(server.metrics_port)
    assert samples[("chatstream_turns_total", (("status", "COMPLETED"),))] == 1
    assert samples[("chatstream_turns_total", (("status", "FAILED"),))] == 1
    assert samples[("chatstream_text_deltas_total", ())] == 3
    assert samples[("chatstream_output_tokens_total", ())] == 3
    assert samples[("chatstream_active_streams", ())] == 0
    for stage in ("upstream", "written"):
        assert samples[("chatstream_time_to_first_token_seconds_count", (("stage", stage),))] == 1
    assert samples[("chatstream_time_to_turn_started_seconds_count", ())] == 2
    assert samples[("chatstream_unit_of_work_seconds_count", (("unit", "start"),))] == 2
    assert samples[("chatstream_unit_of_work_seconds_count", (("unit", "finish"),))] == 2
    first = samples[("chatstream_time_to_first_token_seconds_sum", (("stage", "written"),))]
    assert 0 < first < 5


async def test_a_serving_process_freezes_its_start_up_heap_out_of_garbage_collection(
    settings: Settings, fake: FakeAnthropic
) -> None:
    # Full collections walked the whole start-up heap: 100-200 ms pauses under load, seen by
    # every stream as a gap (docs/benchmarks.md). A real ``serve``, as an operator runs it.
    metrics_port = free_port()
    with serve_process(settings, CHATSTREAM_METRICS_LISTEN=f"127.0.0.1:{metrics_port}") as (process, address):
        async with AsyncChatClient(address) as client:
            await client.chat_reply("after start-up")
        samples = await _scrape(metrics_port)
        assert process.terminate(timeout_s=30) == 0
    # Modules, descriptors and SDK classes: far more than a few thousand objects.
    assert samples[("chatstream_gc_frozen_objects", ())] > 50_000


async def test_consumer_metrics_count_persisted_messages(client: AsyncChatClient, settings: Settings) -> None:
    await client.chat_reply("persist me")
    metrics = Metrics()
    database = Database.from_settings(settings.database)
    redis_client = await create_redis(settings.redis)
    try:
        worker = PersistenceWorker.from_settings(
            settings.consumer,
            shards=settings.redis.shards,
            redis=redis_client,
            database=database,
            metrics=metrics,
        )
        await worker.run(burst=True)
    finally:
        await redis_client.aclose()
        await database.dispose()
    samples = _parse(generate_latest(metrics.registry).decode())
    assert samples[("chatstream_messages_persisted_total", ())] == 2
    assert samples[("chatstream_unit_of_work_seconds_count", (("unit", "persist"),))] == 1


async def test_transaction_log_shows_each_unit_of_work_committed_before_the_reply_streams(
    start_server: StartServer, fake: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(log_transactions=True)
    gate = Gate()
    fake.script(Stream(["held"], hold=gate))
    caplog.set_level(logging.INFO, logger="server.db.transactions")
    async with AsyncChatClient(server.address) as client:
        events = client.chat("log my transactions")
        await anext(events)
        await gate.wait_reached(timeout=5)
        # While the model holds the reply: every transaction opened so far is closed.
        so_far = [r.getMessage().split(" ")[0] for r in caplog.records if r.name == "server.db.transactions"]
        assert so_far.count("BEGIN") == so_far.count("COMMIT") >= 1
        gate.open()
        async for _ in events:
            pass
    verbs = [r.getMessage().split(" ")[0] for r in caplog.records if r.name == "server.db.transactions"]
    assert verbs.count("BEGIN") == verbs.count("COMMIT") >= 2
    assert "ROLLBACK" not in verbs
    assert all("after" in r.getMessage() for r in caplog.records if r.getMessage().startswith("COMMIT"))


def test_the_grafana_dashboard_only_uses_metrics_we_export() -> None:
    dashboard = json.loads(
        (Path(__file__).parent.parent / "deploy/grafana/chatstream-dashboard.json").read_text()
    )
    exported = {metric.name for metric in Metrics().registry.collect()}
    used = {
        name.removesuffix("_bucket").removesuffix("_total")
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bchatstream_[a-z_]+", target["expr"])
    }
    assert used
    assert used <= exported, used - exported
    assert exported - {"chatstream_time_to_first_token_seconds"} <= used | {
        "chatstream_time_to_first_token_seconds"
    }


async def test_consumer_process_keeps_lag_pending_and_dead_letter_gauges_current(
    client: AsyncChatClient, settings: Settings, redis: aioredis.Redis
) -> None:
    await client.chat_reply("lagging")
    await redis.xadd(DEAD_LETTER_STREAM, {"v": "1", "dlq_error": "planted"})
    metrics = Metrics()
    consumer = ConsumerProcess(settings, metrics=metrics)
    await consumer.start()
    try:

        async def observed() -> bool:
            samples = _parse(generate_latest(metrics.registry).decode())
            return (
                samples.get(("chatstream_messages_persisted_total", ())) == 2
                and samples.get(("chatstream_dead_letters", ())) == 1
                and all(
                    samples.get(("chatstream_consumer_pending_entries", (("shard", str(k)),))) == 0
                    for k in range(4)
                )
            )

        await eventually(observed, timeout_s=15, what="the consumer's gauges")
    finally:
        await consumer.stop()
    samples = _parse(generate_latest(metrics.registry).decode())
    assert {k[1] for k in samples if k[0] == "chatstream_consumer_lag_entries"} == {
        (("shard", str(k)),) for k in range(4)
    }
