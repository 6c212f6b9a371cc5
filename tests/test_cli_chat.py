"""`chatstream chat`: a person at a terminal (a real pty), and a script piping lines into it."""

from __future__ import annotations

import asyncio
import re
import uuid

import asyncpg
from chatstream import AsyncChatClient

from server.app import ChatServer
from server.config import Settings
from tests.conftest import StartServer, eventually
from tests.fake_anthropic import Error, FakeAnthropic, Stream
from tests.processes import ChatstreamProcess, free_port, settings_env, wait_for_port
from tests.terminal import Terminal, run_cli

PROMPT = r"> "
NAME = r"conversation (conversations/[0-9a-f-]{36})"
REPLY = "Hello from the fake model."


def _id(name: str) -> uuid.UUID:
    return uuid.UUID(name.rsplit("/", 1)[1])


async def test_chat_streams_replies_keeps_context_and_exits_on_ctrl_d(
    server: ChatServer, settings: Settings, fake: FakeAnthropic
) -> None:
    with Terminal("chat", "--target", server.address, env=settings_env(settings)) as term:
        name = (await term.expect(NAME))[1]
        await term.expect(PROMPT)

        term.send("What is a queue?\r")
        await term.expect(REPLY)
        await term.expect(PROMPT)
        term.send("And a log?\r")
        await term.expect(REPLY)
        await term.expect(PROMPT)
        term.send("\x04")

        assert await term.wait() == 0
    second = fake.requests[-1].body
    assert second is not None
    assert second["messages"] == [
        {"role": "user", "content": "What is a queue?"},
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "And a log?"},
    ]
    assert f"--conversation {name}" in term.output  # how to resume it


async def test_ctrl_c_cancels_the_reply_in_flight_and_returns_to_the_prompt(
    start_server: StartServer, settings: Settings, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    # The reply stalls after two deltas: it can only end by being cancelled, not by the
    # upstream read timeout, however slowly a loaded machine delivers the Ctrl-C.
    server = await start_server(llm_timeout_s=60)
    fake.script(Stream(["Partial", " answer"], then="stall"))
    with Terminal("chat", "--target", server.address, env=settings_env(settings)) as term:
        name = (await term.expect(NAME))[1]
        await term.expect(PROMPT)
        term.send("Tell me everything.\r")
        # Seen while the turn is still open upstream: deltas are printed as they arrive.
        await term.expect("Partial answer")

        term.send("\x03")
        await term.expect(r"\[reply cancelled\]")
        await term.expect(PROMPT)

        async def cancelled() -> bool:
            statuses = await db.fetch("SELECT status FROM chat.turns WHERE conversation_id = $1", _id(name))
            return [row["status"] for row in statuses] == ["CANCELLED"]

        await eventually(cancelled, what="the interrupted turn stored as CANCELLED")
        # The conversation goes on.
        term.send("Shorter, please.\r")
        await term.expect(REPLY)
        await term.expect(PROMPT)
        term.send("/quit\r")

        assert await term.wait() == 0


async def test_chat_without_a_terminal_sends_one_message_per_line(
    server: ChatServer, settings: Settings, fake: FakeAnthropic
) -> None:
    fake.script(Stream(["One"]), Stream(["Two"]))

    result = await run_cli(
        "chat", "--target", server.address, env=settings_env(settings), stdin="first\n\nsecond\n"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == "One\nTwo\n"
    assert "conversation conversations/" in result.stderr
    last = fake.requests[-1].body
    assert last is not None
    assert last["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "One"},
        {"role": "user", "content": "second"},
    ]


async def test_chat_failures_print_one_line_with_code_and_reason(
    server: ChatServer, settings: Settings, fake: FakeAnthropic
) -> None:
    env = settings_env(settings)
    fake.script(Error(529, "overloaded_error", "Overloaded"))

    failed = await run_cli("chat", "--target", server.address, env=env, stdin="hi\nnever sent\n")

    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: UNAVAILABLE ")
    assert len(fake.requests) == 1  # stopped at the first failed turn

    unknown = await run_cli(
        "chat", "--target", server.address, "--conversation", str(uuid.uuid4()), env=env, stdin="hi\n"
    )

    assert unknown.returncode == 1
    assert unknown.stderr.startswith("Error: NOT_FOUND CONVERSATION_NOT_FOUND: ")
    assert len(unknown.stderr.strip().splitlines()) == 1


async def test_watch_follows_a_conversations_new_turns_live(
    server: ChatServer, settings: Settings, fake: FakeAnthropic
) -> None:
    fake.script(Stream(["first"]), Stream(["second ", "turn"]))
    async with AsyncChatClient(server.address) as client:
        first = await client.chat_reply("one")
        with Terminal(
            "watch", first.conversation, "--target", server.address, env=settings_env(settings)
        ) as term:
            await term.expect("watching")
            await asyncio.sleep(0.5)  # the watch's reader is waiting for the next turn
            second = await client.chat_reply("two", conversation=first.conversation)
            await term.expect(r"--- " + re.escape(second.turn))
            await term.expect("second turn")
            await term.expect("--- end")
            term.send("\x03")
            await term.wait()


async def test_chat_survives_a_server_restart_mid_reply(settings: Settings, fake: FakeAnthropic) -> None:
    """kill -9 of the server mid-reply, a new one on the same port: the terminal goes on.

    The SDK resumes the turn with WatchTurn on the new process; the turn's producer died, so
    once its lease expires the turn ends INTERRUPTED with the partial reply its live log kept.
    The SDK then starts the turn again: the terminal says so and prints the new reply on a
    line of its own, and the next message works.
    """
    address = f"127.0.0.1:{free_port()}"
    env = settings_env(settings, CHATSTREAM_LISTEN=address, CHATSTREAM_TURN_LEASE_S="2")
    first = ChatstreamProcess(["serve"], env)
    second: ChatstreamProcess | None = None
    try:
        wait_for_port(address, process=first)
        fake.script(Stream(["Partial", " answer"], then="stall"))
        with Terminal("chat", "--target", address, env=settings_env(settings)) as term:
            await term.expect(PROMPT)
            term.send("Tell me everything\r")
            await term.expect("Partial answer")
            first.kill()
            second = ChatstreamProcess(["serve"], env)
            wait_for_port(address, process=second)
            await term.expect(r"\[the server died mid-reply; starting it again\]", timeout_s=30)
            await term.expect(REPLY)
            await term.expect(PROMPT)
            term.send("Still there?\r")
            await term.expect(REPLY)
            await term.expect(PROMPT)
            term.send("\x04")
            assert await term.wait() == 0
    finally:
        first.close()
        if second is not None:
            second.close()
