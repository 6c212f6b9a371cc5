"""The live path's costs: time to resume after a cut connection, and what watchers cost Redis.

``.venv/bin/python -m bench.live [--resumes 100] [--watchers 100]``

Two real ``chatstream serve`` processes share embedded PostgreSQL and Redis and the test
suite's fake upstream (tests/fake_anthropic.py); a loopback proxy (tests/proxy.py) cuts
client connections. Prints one JSON object:

- ``resume``: for each of ``--resumes`` turns, a client reads a few events through the proxy,
  the proxy cuts every connection and points new ones at the other server, and the client
  resumes with ``WatchTurn``. The time from the cut to the first resumed event, p50 / p99 /
  max, and how many replies ended whole.
- ``watchers``: Redis commands (INFO commandstats) spent while one 50-token turn streams to
  1 and then to ``--watchers`` WatchConversation watchers on the other server process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import redis.asyncio as aioredis
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc

from server.config import Settings
from server.db.migrate import upgrade_async
from server.embedded import embedded_services
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.processes import ChatstreamProcess, free_port, settings_env, wait_for_port
from tests.proxy import CuttingProxy

_WORDS = [f"w{i:02d} " for i in range(50)]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _resume_once(proxy: CuttingProxy, fake: FakeAnthropic) -> tuple[float, bool]:
    fake.script(Stream(_WORDS, delay_s=0.01))
    text, turn, seq = "", "", 0
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        stub = pb_grpc.ChatServiceStub(channel)
        call = stub.Chat(pb.ChatRequest(text="resume me", on_disconnect=pb.ON_DISCONNECT_CONTINUE))
        async for response in call:
            event = response.event
            seq = event.seq
            if event.HasField("started"):
                turn = event.started.turn
            if event.HasField("text_delta"):
                text += event.text_delta.text
            if len(text) >= 12:
                break
        proxy.active = 1 - proxy.active
        cut_at = time.perf_counter()
        proxy.cut()
        call.cancel()
    first: float | None = None
    for _ in range(5):  # as a client would: a resume that fails UNAVAILABLE is tried again
        try:
            async with grpc.aio.insecure_channel(proxy.address) as channel:
                stub = pb_grpc.ChatServiceStub(channel)
                watch = stub.WatchTurn(pb.WatchTurnRequest(turn=turn, after_seq=seq, after_offset=len(text)))
                async for response in watch:
                    if first is None:
                        first = time.perf_counter()
                    seq = response.event.seq
                    if response.event.HasField("text_delta"):
                        text += response.event.text_delta.text
            break
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
    assert first is not None
    return first - cut_at, text == "".join(_WORDS)


async def _redis_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values() if isinstance(v, dict))


async def _watched_turn(
    addresses: list[str], fake: FakeAnthropic, redis: aioredis.Redis, watchers: int
) -> int:
    """Redis commands spent while one turn streams to ``watchers`` WatchConversation calls."""
    fake.script(Stream(["start"]), Stream(_WORDS, delay_s=0.005))
    async with grpc.aio.insecure_channel(addresses[0]) as a, grpc.aio.insecure_channel(addresses[1]) as b:
        producer, other = pb_grpc.ChatServiceStub(a), pb_grpc.ChatServiceStub(b)
        conversation = ""
        async for response in producer.Chat(pb.ChatRequest(text="first")):
            if response.event.HasField("started"):
                conversation = response.event.started.conversation
        calls = [
            other.WatchConversation(pb.WatchConversationRequest(conversation=conversation))
            for _ in range(watchers)
        ]

        async def until_completed(
            call: grpc.aio.UnaryStreamCall[pb.WatchConversationRequest, pb.ChatResponse],
        ) -> None:
            async for response in call:
                if response.event.HasField("completed"):
                    return

        following = [asyncio.ensure_future(until_completed(call)) for call in calls]
        await asyncio.sleep(1.0)  # every watcher is in; the process's reader waits for a turn
        before = await _redis_calls(redis)
        async for _ in producer.Chat(pb.ChatRequest(conversation=conversation, text="watched")):
            pass
        await asyncio.wait_for(asyncio.gather(*following), timeout=30)
        spent = await _redis_calls(redis) - before
        for call in calls:
            call.cancel()
    return spent


async def run(resumes: int, watchers: int) -> dict[str, object]:
    with (
        tempfile.TemporaryDirectory(prefix="cs-live-", dir="/tmp") as data_dir,
        embedded_services(Path(data_dir)) as services,
        FakeAnthropic() as fake,
    ):
        await upgrade_async(services.database_url)
        settings = Settings.from_fields(
            database_url=services.database_url,
            redis_url=services.redis_url,
            anthropic_api_key="test",
            anthropic_base_url=fake.url,
            model="claude-test",
            llm_max_retries=0,
        )
        processes: list[ChatstreamProcess] = []
        addresses: list[str] = []
        try:
            for _ in range(2):
                address = f"127.0.0.1:{free_port()}"
                process = ChatstreamProcess(["serve"], settings_env(settings, CHATSTREAM_LISTEN=address))
                processes.append(process)
                wait_for_port(address, process=process)
                addresses.append(address)
            latencies: list[float] = []
            whole = 0
            async with CuttingProxy(addresses) as proxy:
                for _ in range(resumes):
                    latency, complete = await _resume_once(proxy, fake)
                    latencies.append(latency * 1000)
                    whole += complete
            redis = aioredis.from_url(services.redis_url)
            try:
                one = await _watched_turn(addresses, fake, redis, 1)
                many = await _watched_turn(addresses, fake, redis, watchers)
            finally:
                await redis.aclose()
        finally:
            for process in processes:
                with contextlib.suppress(Exception):
                    process.terminate(timeout_s=20)
                process.close()
    return {
        "resume": {
            "resumes": resumes,
            "whole_replies": whole,
            "cut_to_first_resumed_event_ms": {
                "p50": round(statistics.median(latencies), 2),
                "p99": round(_percentile(latencies, 0.99), 2),
                "max": round(max(latencies), 2),
            },
        },
        "watchers": {
            "redis_commands_one_turn_1_watcher": one,
            f"redis_commands_one_turn_{watchers}_watchers": many,
            "tokens_per_turn": len(_WORDS),
        },
    }


def main() -> int:
    """Runs the measurement and prints its JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resumes", type=int, default=100)
    parser.add_argument("--watchers", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.resumes, args.watchers)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
