"""A server with no way to reach a model refuses to start; SDK failures are never blamed on the stream."""

from __future__ import annotations

import logging
import subprocess
import sys

import anthropic
import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError

from server.config import Settings
from server.llm import NO_MODEL_MESSAGE, _sort
from tests.conftest import StartServer
from tests.credentials import api_key
from tests.fake_anthropic import FakeAnthropic
from tests.processes import free_port, settings_env

# The SDK reads these itself when it is given no credential.
_SDK_CREDENTIAL_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL")


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_without_a_model_credential_exits_with_one_clear_line(settings: Settings, workers: int) -> None:
    _, key = api_key("billing")
    # As an operator runs it: authentication on, and the default log level (INFO), at which
    # anything else the server logs on its way out would show next to the refusal.
    env = settings_env(
        settings,
        CHATSTREAM_LISTEN=f"127.0.0.1:{free_port()}",
        CHATSTREAM_AUTH_MODE="required",
        CHATSTREAM_API_KEYS=f"{key.subject}:{key.sha256}",
    )
    for name in (*_SDK_CREDENTIAL_ENV, "CHATSTREAM_LOG_LEVEL"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--workers", str(workers)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"Error: {NO_MODEL_MESSAGE}"], done.stderr
    assert done.stdout == ""


async def test_a_base_url_without_a_credential_reaches_it_and_never_blames_the_stream(
    start_server: StartServer,
    fake: FakeAnthropic,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway at ANTHROPIC_BASE_URL may add the credential itself: the request goes out without one."""
    for name in _SDK_CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    server = await start_server(anthropic_api_key=None)  # the base URL is the fake's
    caplog.set_level(logging.ERROR, logger="server.llm")
    async with AsyncChatClient(server.address) as client:
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply("hello")
    # The fake wants a key, as a gateway that does not add one would: 401, our misconfiguration.
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    [request] = fake.requests
    assert "authorization" not in request.headers
    assert "x-api-key" not in request.headers
    logged = [record.getMessage() for record in caplog.records if record.name == "server.llm"]
    assert logged == ["upstream rejected the request: status=401 type=authentication_error"]


async def test_a_type_error_of_the_sdk_is_not_logged_as_a_malformed_stream(
    fake: FakeAnthropic, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's real "no credential" TypeError, sorted as the adapter sorts it.

    No configuration the server starts with reaches this any more (it refuses to start, or
    omits the header for a gateway), so the sorting is checked on its own.
    """
    for name in _SDK_CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    async with anthropic.AsyncAnthropic(base_url=fake.url, max_retries=0) as sdk:
        with pytest.raises(TypeError) as raised:
            await sdk.messages.create(
                model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
    caplog.set_level(logging.ERROR, logger="server.llm")
    assert _sort(raised.value).reason == "INTERNAL"
    [message] = [record.getMessage() for record in caplog.records if record.name == "server.llm"]
    assert "malformed" not in message
    assert message.startswith("the Anthropic SDK raised TypeError")
    assert fake.requests == []
