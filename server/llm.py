"""Adapter over ``anthropic.AsyncAnthropic``: streams reply text and sorts upstream failures.

See ANTHROPIC_STREAMING.md §9 for why errors are sorted the way they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Final, cast

import anthropic
import httpx2
from anthropic.types import MessageParam

from server.config import LlmSettings, SettingsError
from server.domain import Exchange, Usage
from server.errors import ChatError, InternalError, UpstreamUnavailableError

logger = logging.getLogger(__name__)

# Mid-stream `event: error` types that mean "try again later" (§2.3, §9).
_TRANSIENT_STREAM_ERRORS = frozenset({"overloaded_error", "api_error", "rate_limit_error", "timeout_error"})

NO_MODEL_MESSAGE: Final = (
    "no way to reach a model: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN), "
    "or ANTHROPIC_BASE_URL to a gateway that adds the credential itself"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyStarted:
    """The model accepted the request: which model answers, and the prompt's size."""

    model: str
    usage: Usage


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyEnded:
    """The reply is complete: why it stopped, and the final token counts."""

    stop_reason: str
    usage: Usage


ReplyPart = ReplyStarted | str | ReplyEnded
"""What ``stream_reply`` yields: ``ReplyStarted`` first, text deltas, ``ReplyEnded`` last."""


def build_messages(history: Sequence[Exchange], text: str) -> list[MessageParam]:
    """The prompt: earlier exchanges, then the new user message.

    An earlier turn that produced no assistant text at all is left out: the API needs
    alternating, non-empty messages, and inventing a reply would put words in the
    model's mouth.
    """
    messages: list[MessageParam] = []
    for exchange in history:
        if not exchange.assistant_text:
            continue
        messages.append({"role": "user", "content": exchange.user_text})
        messages.append({"role": "assistant", "content": exchange.assistant_text})
    messages.append({"role": "user", "content": text})
    return messages


def check_model_reachable(settings: LlmSettings) -> None:
    """Raises SettingsError(NO_MODEL_MESSAGE) where ``LlmClient(settings)`` would; opens nothing.

    For a process that checks settings before it starts servers of its own (``serve --workers``).
    """
    with anthropic.Anthropic(
        api_key=settings.anthropic_api_key, base_url=settings.anthropic_base_url
    ) as client:
        if not _has_credential(client) and settings.anthropic_base_url is None:
            raise SettingsError(NO_MODEL_MESSAGE)


def _has_credential(client: anthropic.Anthropic | anthropic.AsyncAnthropic) -> bool:
    """Whether the SDK resolved a credential: from its arguments, its env vars or its credential files."""
    return bool(client.api_key or client.auth_token) or client.credentials is not None


class LlmClient:
    """Streams replies from the Messages API with the configured model and limits."""

    def __init__(
        self, settings: LlmSettings, *, base_url: str | None = None, api_key: str | None = None
    ) -> None:
        """Configures the SDK client; no request is sent.

        Raises:
            SettingsError: there is no way to reach a model: the SDK found no credential
                (``ANTHROPIC_API_KEY``, ``ANTHROPIC_AUTH_TOKEN`` or its credential files)
                and no ``ANTHROPIC_BASE_URL`` is set. Without this check the server would
                start and fail every turn.
        """
        self._model = settings.model
        self._max_tokens = settings.max_tokens
        self._system = settings.system_prompt
        base_url = base_url or settings.anthropic_base_url
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key or settings.anthropic_api_key,
            base_url=base_url,
            max_retries=settings.llm_max_retries,
            # The read timeout is the longest silence allowed mid-stream; the SDK's
            # default (10 minutes) would pin a turn that long on a stalled upstream.
            timeout=httpx2.Timeout(settings.llm_timeout_s, connect=5.0),
            # The SDK's own aiohttp transport: the SDK keeps its auth, retries and error
            # classes, and the per-delta and per-request CPU drop (docs/benchmarks.md).
            http_client=anthropic.DefaultAioHttpClient(),
        )
        if not _has_credential(self._client):
            if base_url is None:
                raise SettingsError(NO_MODEL_MESSAGE)
            # A gateway at the base URL that adds the credential itself. The SDK refuses to
            # send a request without one (TypeError) unless the header is explicitly
            # omitted; its header layers take `omit` at run time, though typed as str.
            self._client = self._client.with_options(
                default_headers=cast("Mapping[str, str]", {"Authorization": anthropic.omit})
            )

    @property
    def model(self) -> str:
        """The model id requested upstream."""
        return self._model

    async def close(self) -> None:
        """Closes the HTTP connection pool."""
        await self._client.close()

    async def stream_reply(
        self, *, history: Sequence[Exchange], text: str
    ) -> AsyncGenerator[ReplyPart, None]:
        """Yields ``ReplyStarted``, the reply's text deltas as they arrive, then ``ReplyEnded``.

        The SDK sends the request (auth, retries before the first byte, error classes),
        but the event stream is parsed here, line by line, from its raw response: typed
        event models cost about 30 µs per delta and the ``messages.stream()`` helper
        about 72 µs, against about 12 µs for this (the benchmarks' largest hot spot).
        Only the four events that matter are decoded. Use it under
        ``contextlib.aclosing`` so that cancelling the consumer closes the upstream HTTP
        stream at once.

        Raises:
            UpstreamUnavailableError: overloaded, rate limited, timed out, disconnected,
                or the stream ended before ``message_stop``; the caller may retry.
            InternalError: the API rejected our request or sent a malformed stream.
        """
        stop_reason: str | None = None
        input_tokens = output_tokens = 0
        stopped = False
        try:
            async with self._client.messages.with_streaming_response.create(
                model=self._model,
                max_tokens=self._max_tokens,
                messages=build_messages(history, text),
                system=self._system or anthropic.omit,
                stream=True,
            ) as response:
                event = b""
                data: list[bytes] = []
                lines = SseLines()
                # `aiter_bytes` closes every generator under it when it is closed, and
                # `aclosing` closes it here, in this task. httpx's `aiter_lines` does not
                # close its inner generators: a reply abandoned mid-stream left them to the
                # garbage collector, whose late `aclose` of `aiter_raw` failed outside any
                # task. Splitting bytes into lines here is also cheaper than its str layers.
                async with contextlib.aclosing(response.http_response.aiter_bytes()) as chunks:
                    async for chunk in chunks:
                        for line in lines.feed(chunk):
                            if line:
                                # SSE fields (ANTHROPIC_STREAMING.md §2.1); comments, id and
                                # retry are ignored.
                                if line.startswith(b"data:"):
                                    data.append(line[6:] if line.startswith(b"data: ") else line[5:])
                                elif line.startswith(b"event:"):
                                    event = line[6:].strip()
                                continue
                            name, payload = event, b"\n".join(data)
                            event, data = b"", []
                            if name == b"content_block_delta":
                                delta = json.loads(payload)["delta"]
                                if delta.get("type") == "text_delta" and delta.get("text"):
                                    yield delta["text"]
                            elif name == b"message_start":
                                message = json.loads(payload)["message"]
                                input_tokens = _total_input(message["usage"])
                                output_tokens = message["usage"]["output_tokens"]
                                yield ReplyStarted(
                                    model=message.get("model") or self._model,
                                    usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
                                )
                            elif name == b"message_delta":
                                body = json.loads(payload)
                                stop_reason = body["delta"].get("stop_reason")
                                output_tokens = body["usage"]["output_tokens"]
                                if body["usage"].get("input_tokens") is not None:
                                    input_tokens = _total_input(body["usage"])
                            elif name == b"message_stop":
                                stopped = True
                            elif name == b"error":
                                raise _stream_error(payload)
                            # ping, content_block_start/stop, unknown events and frames
                            # without an event name are dropped, as the SDK drops them.
        except ChatError:
            raise
        except Exception as exc:
            raise _sort(exc) from exc
        if not stopped or stop_reason is None:
            # A clean end of body without message_stop raises nothing in the SDK (§2.4).
            raise UpstreamUnavailableError(
                "the model's reply was interrupted", metadata={"cause": "truncated"}
            )
        yield ReplyEnded(
            stop_reason=stop_reason, usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        )


class SseLines:
    """Splits an event stream's bytes into lines, without their ends, as they arrive.

    Lines end in CRLF, LF or CR (§2.1). A read that ends in CR has ended its line; an LF
    at the start of the next read is that CRLF's second half, not a blank line (which
    would end an event early).
    """

    __slots__ = ("_after_cr", "_rest")

    def __init__(self) -> None:
        self._rest = b""
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines that ``chunk`` completes; an unfinished last line waits for more."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        buffer = self._rest + chunk if self._rest else chunk
        self._after_cr = buffer.endswith(b"\r")
        lines = buffer.splitlines(keepends=True)
        self._rest = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        return [line.rstrip(b"\r\n") for line in lines]


def _total_input(usage: Mapping[str, int | None]) -> int:
    return (
        (usage.get("input_tokens") or 0)
        + (usage.get("cache_creation_input_tokens") or 0)
        + (usage.get("cache_read_input_tokens") or 0)
    )


def _stream_error(payload: bytes) -> ChatError:
    """A mid-stream ``event: error``: sorted by its type, never by the HTTP 200 (§4)."""
    try:
        error_type = json.loads(payload)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        error_type = None
    if error_type in _TRANSIENT_STREAM_ERRORS:
        return UpstreamUnavailableError(
            "the model is temporarily unavailable", metadata={"cause": error_type}
        )
    logger.error("upstream stream error: type=%s", error_type)
    return InternalError("internal error")


def _sort(exc: Exception) -> ChatError:
    """Transient upstream trouble becomes UNAVAILABLE; anything else is our problem (INTERNAL)."""
    # Mid-stream `event: error`s never get here: the stream parser sorts them (_stream_error).
    if isinstance(exc, anthropic.APIStatusError):
        if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
            return UpstreamUnavailableError(
                "the model is temporarily unavailable",
                retry_after=_retry_after(exc.response),
                metadata={"cause": str(exc.status_code)},
            )
        logger.error("upstream rejected the request: status=%s type=%s", exc.status_code, exc.type)
        return InternalError("internal error")
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        return UpstreamUnavailableError(
            "the model is temporarily unavailable", metadata={"cause": "connection"}
        )
    if isinstance(exc, KeyError | TypeError | ValueError):
        if _raised_in_sdk(exc.__traceback__):
            # The SDK itself failed; a TypeError is how it refuses to send a request
            # without a credential. Either way it says nothing about the upstream's stream.
            logger.error(
                "the Anthropic SDK raised %s (a TypeError means it has no credential to send)",
                exc.__class__.__name__,
            )
            return InternalError("internal error")
        # Our parser met an event without the fields the protocol promises, or bad JSON.
        logger.error("upstream sent a malformed stream: %s", exc.__class__.__name__)
        return InternalError("internal error")
    logger.error("unexpected upstream failure: %s", exc.__class__.__name__)
    return InternalError("internal error")


def _raised_in_sdk(traceback: TracebackType | None) -> bool:
    """Whether a frame of the ``anthropic`` package raised (or passed on) the exception."""
    while traceback is not None:
        module = traceback.tb_frame.f_globals.get("__name__", "")
        if module == "anthropic" or module.startswith("anthropic."):
            return True
        traceback = traceback.tb_next
    return False


def _retry_after(response: httpx2.Response) -> timedelta:
    """The upstream's own retry hint, bounded to something a caller can use."""
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = response.headers.get(header)
        if raw:
            try:
                seconds = float(raw) * scale
            except ValueError:
                continue
            if seconds > 0:
                return timedelta(seconds=min(seconds, 60.0))
    return timedelta(seconds=1)
