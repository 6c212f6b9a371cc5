"""The TypeScript client (clients/typescript) against a real server, through its `node --test` suite.

The server is the production composition root with authentication on, real PostgreSQL and
Redis, the fake Anthropic API upstream and a persistence consumer running beside it (the suite
reads messages back through ListMessages). Each test here scripts the upstream for one group
of the suite's tests and runs only that group (`--test-name-pattern '^<group>: '`), so every
node test sees the upstream it expects whatever order node runs them in.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import pytest

from server.app import ChatServer
from server.config import AuthMode, Settings
from server.consumer.worker import PersistenceWorker
from server.db.engine import Database
from server.redis_client import create_redis
from tests.conftest import StartServer
from tests.credentials import api_key
from tests.fake_anthropic import DEFAULT_DELTAS, Error, FakeAnthropic, Stream
from tests.node_tools import ROOT, TSC, ensure_node_modules, require_node

CLIENT_DIR: Final = ROOT / "clients" / "typescript"
SUITE_SOURCE: Final = CLIENT_DIR / "test" / "client.test.ts"
SUITE: Final = CLIENT_DIR / "dist" / "test" / "client.test.js"
GROUPS: Final = ("turns", "cancel", "errors", "retry", "lists")
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


@pytest.fixture
async def target(start_server: StartServer, settings: Settings) -> AsyncIterator[Target]:
    """The server with authentication on, and a persistence consumer running until the test ends."""
    token, entry = api_key("ts-client")
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(entry,))
    database = Database.from_settings(settings)
    redis_client = await create_redis(settings)
    worker = PersistenceWorker.from_settings(settings, redis=redis_client, database=database)
    consumer = asyncio.create_task(worker.run())
    try:
        yield Target(server=server, token=token)
    finally:
        worker.stop()
        await consumer
        await redis_client.aclose()
        await database.dispose()


async def run_group(suite: NodeSuite, target: Target, group: str) -> str:
    """Runs the suite's tests named `<group>: ...`; fails unless at least one ran and all passed."""
    env = {
        "PATH": "/usr/bin:/bin",
        "CHATSTREAM_TEST_TARGET": f"http://{target.server.address}",
        "CHATSTREAM_TEST_TOKEN": target.token,
        "CHATSTREAM_TEST_REPLY": "".join(DEFAULT_DELTAS),
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
    )
    await run_group(suite, target, "cancel")
    assert fake.scripts_left == 0
    # Each cancelled call closed its upstream request (I8).
    await fake.wait_for_disconnect(timeout=5)
    await fake.wait_for_disconnect(timeout=5)


async def test_typescript_client_errors_carry_their_details(suite: NodeSuite, target: Target) -> None:
    await run_group(suite, target, "errors")


async def test_typescript_client_reads_retry_info(
    suite: NodeSuite, target: Target, fake: FakeAnthropic
) -> None:
    fake.script(Error(529, "overloaded_error", "Overloaded"))
    await run_group(suite, target, "retry")


async def test_typescript_client_lists_across_pages(suite: NodeSuite, target: Target) -> None:
    await run_group(suite, target, "lists")
