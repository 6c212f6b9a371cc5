"""Offline demo model: answers Anthropic Messages streaming requests on loopback, without a network.

`chatstream dev` starts `DemoModelServer` when no `ANTHROPIC_API_KEY` is set, so that the real
`anthropic` SDK path runs end to end. Its replies say that they are not Claude's, and so does the
model name it reports (`DEMO_MODEL`), which ends up in every turn's ``completed.model``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Final

from server.anthropic_sse import (
    Connection,
    HttpRequest,
    LoopbackServer,
    content_block_start_event,
    content_block_stop_event,
    end_sse_response,
    message_delta_event,
    message_start_event,
    message_stop_event,
    new_request_id,
    start_sse_response,
    text_delta_event,
    write_error_response,
    write_event,
)

logger = logging.getLogger(__name__)

DEMO_MODEL: Final = "chatstream-demo"
"""The model name the demo reports, whatever model the request asked for: it is not that model."""

_REPLY_QUOTE_CHARS: Final = 200


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(b["text"]) for b in content if isinstance(b, dict) and "text" in b)
    return ""


def _messages_of(body: Mapping[str, object]) -> list[dict[str, object]]:
    messages = body.get("messages")
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def demo_reply(body: Mapping[str, object]) -> str:
    """Builds the demo model's deterministic reply to a Messages request body."""
    messages = _messages_of(body)
    said = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    said = " ".join(said.split())  # one line, so the reply reads the same in any terminal
    if len(said) > _REPLY_QUOTE_CHARS:
        said = said[:_REPLY_QUOTE_CHARS] + "…"
    earlier = max(len(messages) - 1, 0)
    plural = "" if earlier == 1 else "s"
    history = f"This conversation has {earlier} earlier message{plural}."
    return f"[demo model — not Claude] You said: {said}. {history}"


def estimate_input_tokens(body: Mapping[str, object]) -> int:
    """Roughly four characters per token over the system prompt and every message."""
    chars = len(_text_of(body.get("system")))
    chars += sum(len(_text_of(m.get("content"))) for m in _messages_of(body))
    return max(chars // 4, 1)


def split_tokens(text: str) -> list[str]:
    """Splits `text` into word-sized pieces that join back to exactly `text`."""
    return re.findall(r"\s*\S+\s*", text)


class DemoModelServer:
    """The offline demo model, serving `POST .../v1/messages` with `"stream": true` on loopback."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, token_delay_s: float = 0.02) -> None:
        self._server = LoopbackServer(self._handle, host=host, port=port)
        self._token_delay_s = token_delay_s

    @property
    def url(self) -> str:
        """The base URL for `AsyncAnthropic(base_url=...)`, without `/v1`."""
        return self._server.url

    async def start(self) -> str:
        """Starts listening and returns the base URL."""
        url = await self._server.start()
        logger.info("demo model listening on %s", url)
        return url

    async def close(self) -> None:
        """Stops listening and closes open connections."""
        await self._server.close()

    async def _handle(self, request: HttpRequest, connection: Connection) -> bool:
        writer = connection.writer
        if request.method != "POST" or not request.path.endswith("/v1/messages"):
            message = f"{request.method} {request.path} is not served by the demo model"
            await write_error_response(writer, 404, "not_found_error", message)
            return True
        body = request.json
        if body is None or not isinstance(body.get("messages"), list):
            message = "the body must be a JSON object with a messages list"
            await write_error_response(writer, 400, "invalid_request_error", message)
            return True
        if body.get("stream") is not True:
            await write_error_response(writer, 400, "invalid_request_error", "the demo model only streams")
            return True
        tokens = split_tokens(demo_reply(body))
        await start_sse_response(writer, new_request_id())
        start = message_start_event(model=DEMO_MODEL, input_tokens=estimate_input_tokens(body))
        await write_event(writer, start)
        await write_event(writer, content_block_start_event())
        for i, token in enumerate(tokens):
            if i and await connection.wait_gone(self._token_delay_s):
                logger.debug("client left the demo stream after %d of %d tokens", i, len(tokens))
                return False
            await write_event(writer, text_delta_event(token))
        await write_event(writer, content_block_stop_event())
        await write_event(writer, message_delta_event(stop_reason="end_turn", output_tokens=len(tokens)))
        await write_event(writer, message_stop_event())
        await end_sse_response(writer)
        return True
