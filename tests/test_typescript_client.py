"""The TypeScript client (clients/typescript) against a real server, through its `node --test` suite.

The server is the production composition root with authentication on, real PostgreSQL and
Redis, the fake Anthropic API upstream and a persistence consumer running beside it (the suite
reads messages back through ListMessages). Each test here scripts the upstream for one group
of the suite's tests and runs only that group (`--test-name-pattern '^<group>: '`), so every
node test sees the upstream it expects whatever order node runs them in.

The "resume" group talks to two servers through tests/proxy.py's CuttingProxy. The node test
asks for the cut by creating a file and reads on once this side has removed it, so the cut
always lands mid-reply, after the events the test has seen and before the ones it has not.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from server.app import ChatServer
from server.config import ApiKeyEntry, AuthMode, Settings
from server.consumer.worker import PersistenceWorker
from server.db.engine import Database
from server.redis_client import create_redis
from tests.conftest import StartServer
from tests.credentials import api_key
from tests.fake_anthropic import DEFAULT_DELTAS, Error, FakeAnthropic, Stream
from tests.node_tools import ROOT, TSC, ensure_node_modules, require_node
from tests.proxy import CuttingProxy

CLIENT_DIR: Final = ROOT / "clients" / "typescript"
SUITE_SOURCE: Final = CLIENT_DIR / "test" / "client.test.ts"
SUITE: Final = CLIENT_DIR / "dist" / "test" / "client.test.js"
GROUPS: Final = ("turns", "cancel", "watch", "resume", "errors", "retry", "lists")
_LONG_REPLY: Final = [f"w{i:02d} " for i in range(40)]
_NODE_TIMEOUT_S: Final = 90


@dataclass(frozen=True, slots=True)
class NodeSuite:
    """The compiled suite and the node binary that runs it."""

    node: str


@pytest.fixture(scope="module")
def suite() -> NodeSuite:
    """Installs the pinned toolchain if needed and compiles the client and its tests with tsc."""
    node = require_node()
    ensure_node_modules()
    result = subprocess.run(
        [str(TSC), "-p", str(CLIENT_DIR)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"tsc failed:\n{result.stdout}{result.stderr}"
    return NodeSuite(node=node)


@dataclass(frozen=True, slots=True)
class Target:
    """A running server and a key it accepts."""

    server: ChatServer
    token: str
    key: ApiKeyEntry
    """The configuration entry of `token`, for a second server."""


@pytest.fixture
async def target(start_server: StartServer, settings: Settings) -> AsyncIterator[Target]:
    """The server with authentication on, and a persistence consumer running until the test ends."""
    token, entry = api_key("ts-client")
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(entry,))
    database = Database.from_settings(settings.database)
    redis_client = await create_redis(settings.redis)
    worker = PersistenceWorker.from_settings(
        settings.consumer, shards=settings.redis.shards, redis=redis_client, database=database
    )
    consumer = asyncio.create_task(worker.run())
    try:
        yield Target(server=server, token=token, key=entry)
    finally:
        worker.stop()
        await consumer
        await redis_client.aclose()
        await database.dispose()


async def run_group(
    suite: NodeSuite, target: Target, group: str, extra_env: Mapping[str, str] | None = None
) -> str:
    """Runs the suite's tests named `<group>: ...`; fails unless at least one ran and all passed."""
    env = {
        "PATH": "/usr/bin:/bin",
        "CHATSTREAM_TEST_TARGET": f"http://{target.server.address}",
        "CHATSTREAM_TEST_TOKEN": target.token,
        "CHATSTREAM_TEST_REPLY": "".join(DEFAULT_DELTAS),
        **(extra_env or {}),
    }
    # A subprocess on the event loop: the server under test is served by this same loop.
    process = await asyncio.create_subprocess_exec(
        suite.node,
        "--test",
        f"--test-name-pattern=^{group}: ",
        str(SUITE),
        cwd=CLIENT_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), _NODE_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    output = stdout.decode()
    assert process.returncode == 0, f"node --test failed for group {group!r}:\n{output}"
    passed = re.search(r"^# pass (\d+)$", output, re.MULTILINE)
    assert passed is not None, output
    assert int(passed[1]) > 0, f"no test of group {group!r} ran:\n{output}"
    return output


def test_every_suite_test_belongs_to_a_group() -> None:
    """A test outside GROUPS would never run here."""
    names = re.findall(r'^test\("([^"]+)"', SUITE_SOURCE.read_text(), re.MULTILINE)
    assert names, "no tests found in the suite"
    assert [n for n in names if n.split(":", 1)[0] not in GROUPS] == []
    assert {n.split(":", 1)[0] for n in names} == set(GROUPS)


async def test_typescript_client_streams_turns_and_continues_a_conversation(
    suite: NodeSuite, target: Target, fake: FakeAnthropic
) -> None:
    await run_group(suite, target, "turns")
    # The second turn's prompt carried the first turn: context, not just the same name.
    prompts = [r.body["messages"] for r in fake.requests if r.body is not None]
    reply = "".join(DEFAULT_DELTAS)
    assert [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "what is my name?"},
    ] in prompts


async def test_typescript_client_cancel_keeps_the_partial_reply(
    suite: NodeSuite, target: Target, fake: FakeAnthropic
) -> None:
    # One delta, then silence until the client leaves: the cancel always lands mid-stream.
    fake.script(
        Stream(["Once upon a time"], then="stall"),
        Stream(["There was a"], then="stall"),
        Stream(["It was a dark"], then="stall"),
        Stream(["In a hole"], then="stall"),
    )
    await run_group(suite, target, "cancel")
    assert fake.scripts_left == 0
    # Each cancelled turn closed its upstream request (I8).
    for _ in range(4):
        await fake.wait_for_disconnect(timeout=5)


async def test_typescript_client_watches_turns_and_conversations(suite: NodeSuite, target: Target) -> None:
    await run_group(suite, target, "watch")


async def test_typescript_client_resumes_a_cut_connection_on_another_server(
    suite: NodeSuite, target: Target, start_server: StartServer, fake: FakeAnthropic, tmp_path: Path
) -> None:
    other = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(target.key,))
    # Slow enough that each turn is still being produced when its cut lands.
    fake.script(Stream(_LONG_REPLY, delay_s=0.03), Stream(_LONG_REPLY, delay_s=0.03))
    cut_file = tmp_path / "cut"
    async with CuttingProxy([target.server.address, other.address]) as proxy:
        cutter = _Cutter(proxy, cut_file)
        cutting = asyncio.create_task(cutter.run())
        try:
            await run_group(
                suite,
                target,
                "resume",
                {
                    "CHATSTREAM_TEST_PROXY": f"http://{proxy.address}",
                    "CHATSTREAM_TEST_CUT_FILE": str(cut_file),
                    "CHATSTREAM_TEST_REPLY": "".join(_LONG_REPLY),
                },
            )
        finally:
            cutting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cutting
    assert cutter.cuts == 2, "each node test had its connection cut"
    # The resuming client: one connection before its cut, one to the other server after it.
    # The one with `resume: false`: one connection, never replaced.
    assert proxy.connections == 3
    assert len(fake.requests) == 2, "the model ran once per turn"
    # The turn of the client that did not resume was cancelled by its cut (I8).
    await fake.wait_for_disconnect(timeout=5)


@dataclass
class _Cutter:
    """Cuts the proxy's connections each time the node test creates `cut_file`."""

    proxy: CuttingProxy
    cut_file: Path
    cuts: int = 0

    async def run(self) -> None:
        """Waits for the file, cuts, then removes the file to let the node test read on; forever."""
        while True:
            while not self.cut_file.exists():
                await asyncio.sleep(0.005)
            self.proxy.active = 1  # a reconnect lands on the other server, as after a failover
            self.proxy.cut()
            self.cuts += 1
            self.cut_file.unlink()


async def test_typescript_client_errors_carry_their_details(suite: NodeSuite, target: Target) -> None:
    await run_group(suite, target, "errors")


async def test_typescript_client_reads_retry_info(
    suite: NodeSuite, target: Target, fake: FakeAnthropic
) -> None:
    fake.script(Error(529, "overloaded_error", "Overloaded"))
    await run_group(suite, target, "retry")


async def test_typescript_client_lists_across_pages(suite: NodeSuite, target: Target) -> None:
    await run_group(suite, target, "lists")
