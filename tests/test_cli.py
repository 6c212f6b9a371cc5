"""The operator and client commands: `lag` against real Redis, `conversations` against a real server,
and the progress bar of `dlq replay` in a real terminal."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient

from server.app import ChatServer
from server.config import AuthMode, Settings
from server.constants import DEAD_LETTER_STREAM, PERSISTENCE_GROUP, turns_stream
from server.publisher import shard_for
from tests.conftest import Consume, StartServer, stream_entries
from tests.credentials import CertificateAuthority, api_key
from tests.fake_anthropic import FakeAnthropic, Stream
from tests.processes import settings_env
from tests.terminal import Terminal, run_cli

# Also on a real Redis Cluster (tests/conftest.py, CHATSTREAM_TEST_REDIS).
pytestmark = pytest.mark.redis_cluster

SHARDS = range(4)


def _shard(conversation: str, settings: Settings) -> int:
    return shard_for(uuid.UUID(conversation.rsplit("/", 1)[1]), settings.redis.shards)


async def _dead_letter(redis: aioredis.Redis, shard: int, entry: tuple[bytes, dict[bytes, bytes]]) -> None:
    """Dead-letters a copy of ``entry`` the way the consumer does: its fields plus where it came from."""
    entry_id, fields = entry
    meta = {b"dlq_source": turns_stream(shard).encode(), b"dlq_entry_id": entry_id, b"dlq_error": b"a bug"}
    # redis-py types stream fields as str-keyed; bytes keys are equally valid on the wire.
    dead: dict[bytes, bytes] = {**fields, **meta}
    await redis.xadd(DEAD_LETTER_STREAM, dead)  # type: ignore[arg-type]


def _redis_only_env(settings: Settings) -> dict[str, str]:
    env = settings_env(settings)
    del env["CHATSTREAM_DATABASE_URL"]  # lag must not need it
    return env


async def _lag(settings: Settings) -> dict[str, object]:
    result = await run_cli("lag", "--json", env=_redis_only_env(settings))
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def _total(report: dict[str, object]) -> dict[str, int]:
    total = report["total"]
    assert isinstance(total, dict)
    return total


def _shards(report: dict[str, object]) -> list[dict[str, object]]:
    shards = report["shards"]
    assert isinstance(shards, list)
    return shards


async def test_lag_counts_undelivered_then_nothing_once_consumed(
    client: AsyncChatClient, settings: Settings, consume: Consume
) -> None:
    await client.chat_reply("one")
    await client.chat_reply("two")

    before = await _lag(settings)

    assert _total(before)["undelivered"] == 2
    assert _total(before)["pending"] == 0
    assert [shard["stream"] for shard in _shards(before)] == [turns_stream(k) for k in SHARDS]
    waiting = [shard for shard in _shards(before) if shard["undelivered"]]
    assert all(isinstance(s["oldest_undelivered_age_s"], float) for s in waiting)

    await consume()
    after = await _lag(settings)

    assert (_total(after)["undelivered"], _total(after)["pending"]) == (0, 0)
    assert all(shard["group_exists"] for shard in _shards(after))
    assert all(shard["oldest_pending_age_s"] is None for shard in _shards(after))
    assert after["dead_letters"] == 0


async def test_lag_past_the_group_position_pending_entries_and_dead_letters(
    client: AsyncChatClient, settings: Settings, consume: Consume, redis: aioredis.Redis
) -> None:
    await client.chat_reply("persisted")
    await consume()  # creates the group on every shard
    reply = await client.chat_reply("published after the consumer stopped")
    shard = _shard(reply.conversation, settings)

    # Once the group exists, undelivered means "after last-delivered-id" (XRANGE on Redis 6.2).
    waiting = await _lag(settings)

    assert _total(waiting)["undelivered"] == 1
    assert _shards(waiting)[shard]["undelivered"] == 1

    # A consumer that reads and dies before acknowledging leaves the entry pending.
    await redis.xreadgroup(PERSISTENCE_GROUP, "crashed", {turns_stream(shard): ">"}, count=10)
    await _dead_letter(redis, shard, (await stream_entries(redis, turns_stream(shard)))[-1])
    stuck = await _lag(settings)

    row = _shards(stuck)[shard]
    assert (row["undelivered"], row["pending"]) == (0, 1)
    assert isinstance(row["oldest_pending_age_s"], float)
    assert isinstance(row["oldest_pending_idle_s"], float)
    assert stuck["dead_letters"] == 1

    table = await run_cli("lag", env=_redis_only_env(settings))

    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:5] == ["shard", "stream", "length", "undelivered", "pending"]
    assert "dead letters: 1" in table.stdout


async def test_lag_watch_prints_json_lines_until_ctrl_c(settings: Settings) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "lag", "--json", "--watch", "0.1",
        env=_redis_only_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    # Generous waits: a loaded CI machine takes seconds just to start the interpreter.
    lines = [await asyncio.wait_for(process.stdout.readline(), 60) for _ in range(2)]
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 0, stderr
    assert [json.loads(line)["group"] for line in lines] == [PERSISTENCE_GROUP] * 2


async def test_lag_without_a_redis_url_says_which_variable_is_missing(
    settings: Settings, tmp_path: Path
) -> None:
    env = _redis_only_env(settings)
    del env["CHATSTREAM_REDIS_URL"]
    # No dev server either, whatever runs in the folder the tests run from.
    env["CHATSTREAM_DEV_DIR"] = str(tmp_path)

    result = await run_cli("lag", env=env)

    assert result.returncode == 1
    assert "CHATSTREAM_REDIS_URL is not set" in result.stderr


async def test_conversations_list_and_show_read_through_the_server(
    client: AsyncChatClient, server: ChatServer, settings: Settings, fake: FakeAnthropic, consume: Consume
) -> None:
    fake.script(Stream(["Queues hold work."]), Stream(["Logs keep it."]), Stream(["Hi."]))
    first = await client.chat_reply("What is a queue?")
    await client.chat_reply("And a log?", conversation=first.conversation)
    other = await client.chat_reply("Hello")
    await consume()
    env = settings_env(settings)
    target = ("--target", server.address)

    listed = await run_cli("conversations", "list", *target, "--json", env=env)

    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [row["name"] for row in rows] == [other.conversation, first.conversation]  # newest first
    assert (rows[1]["turn_count"], rows[1]["message_count"]) == (2, 4)

    shown = await run_cli("conversations", "show", first.conversation, *target, "--json", env=env)

    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["conversation"]["name"] == first.conversation
    assert [(m["role"], m["text"], m["turn_status"]) for m in document["messages"]] == [
        ("user", "What is a queue?", "completed"),
        ("assistant", "Queues hold work.", "completed"),
        ("user", "And a log?", "completed"),
        ("assistant", "Logs keep it.", "completed"),
    ]

    # People get text, and may give the bare id.
    text = await run_cli("conversations", "show", first.conversation.split("/")[1], *target, env=env)
    table = await run_cli("conversations", "list", *target, env=env)

    assert text.returncode == 0, text.stderr
    said = ("What is a queue?", "Queues hold work.", "And a log?", "Logs keep it.")
    order = [text.stdout.index(line) for line in said]
    assert order == sorted(order)
    assert first.conversation in table.stdout
    assert other.conversation in table.stdout


async def test_conversations_show_unknown_is_one_error_line(server: ChatServer, settings: Settings) -> None:
    result = await run_cli(
        "conversations", "show", str(uuid.uuid4()), "--target", server.address, env=settings_env(settings)
    )

    assert result.returncode == 1
    assert result.stderr.startswith("Error: NOT_FOUND CONVERSATION_NOT_FOUND: ")
    assert len(result.stderr.strip().splitlines()) == 1


async def test_conversations_over_tls_with_a_token(
    start_server: StartServer, settings: Settings, tmp_path: Path
) -> None:
    ca = CertificateAuthority("cli test CA")
    cert, key = ca.issue_server().write(tmp_path, "server")
    token, entry = api_key("cli")
    server = await start_server(
        auth_mode=AuthMode.REQUIRED, api_keys=(entry,), tls_cert_file=str(cert), tls_key_file=str(key)
    )
    ca_file = str(ca.write(tmp_path, "ca"))
    args = ("conversations", "list", "--json", "--target", server.address, "--tls-ca", ca_file)

    with_token = await run_cli(*args, env=settings_env(settings, CHATSTREAM_TOKEN=token))
    without = await run_cli(*args, env=settings_env(settings))

    assert with_token.returncode == 0, with_token.stderr
    assert json.loads(with_token.stdout) == []
    assert without.returncode == 1
    assert without.stderr.startswith("Error: UNAUTHENTICATED ")


@pytest.mark.parametrize("letters", [25])
async def test_dlq_replay_draws_a_progress_bar_in_a_terminal(
    client: AsyncChatClient, settings: Settings, redis: aioredis.Redis, letters: int
) -> None:
    reply = await client.chat_reply("dead on arrival")
    shard = _shard(reply.conversation, settings)
    entry = (await stream_entries(redis, turns_stream(shard)))[0]
    for _ in range(letters):
        await _dead_letter(redis, shard, entry)

    with Terminal("dlq", "replay", env=_redis_only_env(settings)) as term:
        await term.expect("replaying dead letters")
        await term.expect(f"{letters}/{letters}")
        await term.expect(f"replayed {letters}, skipped 0 undecodable")
        assert await term.wait() == 0

    assert await redis.xlen(DEAD_LETTER_STREAM) == 0
    assert await redis.xlen(turns_stream(shard)) == 1 + letters
