"""Logs: one JSON object per line; no user content unless asked for; never a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError

from server.config import AuthMode
from server.logs import REDACTED, JsonFormatter, configure_logging, configure_logging_from_env
from tests.conftest import Consume, StartServer
from tests.credentials import HS256_SECRET, api_key, bearer, jwt_token
from tests.fake_anthropic import Error, FakeAnthropic, Stream

USER_TEXT = "USER-TEXT-d41d8cd98f00 my card is 4111 1111 1111 1111"
MODEL_TEXT = "MODEL-REPLY-9e107d9d372b"
FAILED_TEXT = "USER-TEXT-OF-A-FAILED-TURN-e4d909c290d0"


def _lines(buffer: io.StringIO) -> list[dict[str, object]]:
    lines = buffer.getvalue().splitlines()
    assert lines, "nothing was logged"
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Installs the production logging setup at DEBUG into a buffer; restores the old setup after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    names = ("anthropic", "httpx", "httpcore", "httpx2")
    saved_levels = {name: logging.getLogger(name).level for name in names}
    buffer = io.StringIO()
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def test_json_lines_are_single_line_objects_with_credentials_redacted() -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter(secrets=["exact-secret-value"]))
    logger = logging.getLogger("tests.logs.formatter")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.warning("multi\nline\u2028message with %s", "Authorization: Bearer abc.def-ghi")
        logger.info("dsn postgresql+asyncpg://chat:hunter2@db:5432/chat and redis://:pw@redis:6379/0")
        logger.info("keys csk_AbC123-_x sk-ant-api03-XyZ %s", jwt_token("svc"))
        try:
            raise RuntimeError("failed with exact-secret-value inside")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    records = _lines(buffer)
    assert len(records) == 4
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    assert records[0]["message"] == f"multi\nline\u2028message with Authorization: Bearer {REDACTED}"
    text = buffer.getvalue()
    assert text.isascii()
    for secret in (
        "abc.def-ghi",
        "hunter2",
        ":pw@",
        "csk_AbC123",
        "sk-ant-api03",
        "eyJ",
        "exact-secret-value",
    ):
        assert secret not in text, secret
    assert "RuntimeError" in str(records[3]["exception"])


async def test_a_session_of_chats_and_refusals_logs_no_user_content_and_no_secret(
    captured_logs: io.StringIO, start_server: StartServer, fake: FakeAnthropic, consume: Consume
) -> None:
    configure_logging(fmt="json", level="DEBUG", secrets=[HS256_SECRET], stream=captured_logs)
    key, entry = api_key("svc-logs")
    token = jwt_token("svc-jwt")
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(entry,), jwt_hs256_secret=HS256_SECRET)
    fake.script(
        Stream([MODEL_TEXT]),
        Error(500, "api_error", f"upstream echoed {FAILED_TEXT}"),
        Error(400, "invalid_request_error", f"upstream echoed {FAILED_TEXT}"),
        Stream(["partial ", MODEL_TEXT], then="error", error_message=f"echo {FAILED_TEXT}"),
    )
    timeout = timedelta(seconds=10)
    async with AsyncChatClient(server.address, metadata=bearer(key), timeout=timeout) as client:
        reply = await client.chat_reply(USER_TEXT)
        for _ in range(3):
            with pytest.raises(ChatClientError):
                await client.chat_reply(FAILED_TEXT, conversation=reply.conversation)
        await consume()
        assert [m.text async for m in client.list_messages(reply.conversation)][:2] == [USER_TEXT, MODEL_TEXT]
    async with AsyncChatClient(server.address, metadata=bearer(token), timeout=timeout) as client:
        await client.create_conversation()
    bogus = "csk_bogus-key-that-is-not-configured-0123456789"
    async with AsyncChatClient(
        server.address, metadata=bearer(bogus, user="alice"), timeout=timeout
    ) as client:
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply(USER_TEXT)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED

    records = _lines(captured_logs)
    text = captured_logs.getvalue()
    for forbidden in (USER_TEXT, "4111 1111", MODEL_TEXT, FAILED_TEXT, key, token, bogus, HS256_SECRET):
        assert forbidden not in text, f"{forbidden!r} was logged"
    messages = [str(r["message"]) for r in records]
    assert any("serving chatstream.v1.ChatService" in m for m in messages)
    assert any("call refused" in m and "CREDENTIALS_INVALID" in m for m in messages)


async def test_user_content_is_logged_only_when_the_debug_setting_says_so(
    captured_logs: io.StringIO, start_server: StartServer
) -> None:
    configure_logging_from_env(
        {
            "CHATSTREAM_LOG_LEVEL": "DEBUG",
            "CHATSTREAM_LOG_USER_CONTENT": "true",
            "CHATSTREAM_LOG_FORMAT": "json",
        }
    )
    root = logging.getLogger()
    root.handlers[0].setStream(captured_logs)  # type: ignore[attr-defined]  # a StreamHandler
    server = await start_server(log_user_content=True)
    async with AsyncChatClient(server.address) as client:
        await client.chat_reply(USER_TEXT)
    assert USER_TEXT in captured_logs.getvalue()
    _lines(captured_logs)


def test_log_format_must_be_json_or_text() -> None:
    from server.config import SettingsError

    with pytest.raises(SettingsError, match="CHATSTREAM_LOG_FORMAT"):
        configure_logging(fmt="xml")


async def test_records_logged_during_a_turn_carry_its_conversation_and_turn_ids(
    captured_logs: io.StringIO, client: AsyncChatClient, fake: FakeAnthropic
) -> None:
    configure_logging(fmt="json", level="INFO", stream=captured_logs)
    fake.script(Error(400, "invalid_request_error", "bad request"))
    events = []

    async def chat() -> None:
        async for event in client.chat("fails upstream"):
            events.append(event)

    with pytest.raises(ChatClientError):
        await chat()
    started = events[0].started
    conversation_id = started.conversation.rsplit("/", 1)[1]
    turn_id = started.turn.rsplit("/", 1)[1]
    records = [r for r in _lines(captured_logs) if "upstream rejected" in str(r["message"])]
    assert records
    assert all((r["conversation_id"], r["turn_id"]) == (conversation_id, turn_id) for r in records)
    # Outside a turn nothing is bound.
    assert all("turn_id" not in r for r in _lines(captured_logs) if "serving" in str(r["message"]))
