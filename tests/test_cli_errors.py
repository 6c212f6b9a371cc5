"""CLI errors name what the user typed, and say each thing once."""

from __future__ import annotations

import uuid

from server.app import ChatServer
from server.config import Settings
from tests.conftest import StartServer
from tests.fake_anthropic import FakeAnthropic
from tests.processes import settings_env
from tests.terminal import run_cli


async def test_chat_with_a_malformed_conversation_names_the_option_and_calls_nothing(
    settings: Settings, fake: FakeAnthropic
) -> None:
    # No server at this target: a value refused before any call needs none.
    result = await run_cli(
        "chat", "--target", "127.0.0.1:1", "--conversation", "nope", env=settings_env(settings), stdin="hi\n"
    )

    assert result.returncode == 2  # a usage error
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error == (
        "Error: Invalid value for '--conversation': 'nope' is not conversations/ID or ID, where ID is a UUID"
    )
    assert "name" not in result.stderr.replace("NAME", "")  # never the server's field name
    assert fake.requests == []


async def test_chat_takes_a_conversation_by_its_name_or_its_bare_id(
    server: ChatServer, settings: Settings
) -> None:
    env = settings_env(settings)
    conversation_id = uuid.uuid4()
    for given in (
        str(conversation_id),
        f"conversations/{conversation_id}",
        f" {str(conversation_id).upper()} ",
    ):
        result = await run_cli("chat", "--target", server.address, "--conversation", given, env=env, stdin="")
        assert result.returncode == 1
        assert result.stderr.startswith("Error: NOT_FOUND CONVERSATION_NOT_FOUND: "), (given, result.stderr)


async def test_show_with_a_malformed_conversation_names_the_argument_and_calls_nothing(
    settings: Settings,
) -> None:
    # No server at this target: a value refused before any call needs none.
    result = await run_cli(
        "conversations", "show", "nope", "--target", "127.0.0.1:1", env=settings_env(settings)
    )

    assert result.returncode == 2  # a usage error
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error == (
        "Error: Invalid value for 'NAME': 'nope' is not conversations/ID or ID, where ID is a UUID"
    )
    assert "name:" not in result.stderr  # never the server's field, `name: must be conversations/{uuid}`


async def test_a_server_side_field_error_is_one_line_that_says_it_once(
    start_server: StartServer, settings: Settings, fake: FakeAnthropic
) -> None:
    # A message over the server's limit: only the server knows the limit, so only it refuses.
    server = await start_server(max_text_chars=10)
    result = await run_cli(
        "chat", "--target", server.address, env=settings_env(settings), stdin="longer than ten characters\n"
    )

    assert result.returncode == 1
    [error] = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert error == "error: INVALID_ARGUMENT: text: must be at most 10 characters"
    assert result.stderr.count("must be at most") == 1
    assert fake.requests == []
