"""Log output for the entrypoints: one JSON object per line, credentials redacted, user content out.

A small stdlib formatter rather than python-json-logger: the record shape is fixed and
short, and the redaction has to see the final text of every message and traceback
anyway, which a formatter subclass of our own does in one place.

What keeps user content out of the logs is, first, that no log call in ``server``
passes message text (tests/test_logs.py checks a whole chat); second, that the
third-party loggers that would (the Anthropic SDK logs request bodies at DEBUG) are held
at INFO unless ``CHATSTREAM_LOG_USER_CONTENT`` is true. Credentials are additionally
scrubbed by shape from every line, whatever logged them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Final, TextIO

from server.config import SettingsError

ENV_LOG_FORMAT: Final = "CHATSTREAM_LOG_FORMAT"
ENV_LOG_LEVEL: Final = "CHATSTREAM_LOG_LEVEL"
ENV_LOG_USER_CONTENT: Final = "CHATSTREAM_LOG_USER_CONTENT"

REDACTED: Final = "[REDACTED]"

# Shapes of credentials, scrubbed from every line whatever logged them.
_SECRET_PATTERNS: Final = (
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+"), r"\1" + REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),  # JWT
    (re.compile(r"\bcsk_[A-Za-z0-9_-]+"), REDACTED),  # our API keys
    (re.compile(r"\bsk-ant-[A-Za-z0-9_-]+"), REDACTED),  # Anthropic API keys
    (re.compile(r"(://[^:/@\s]*:)[^@\s]+@"), r"\1" + REDACTED + "@"),  # URL passwords
)

# Loggers of libraries that put request bodies (the user's messages) in DEBUG records.
_CONTENT_LOGGERS: Final = ("anthropic", "httpx", "httpcore")


# Identifiers of what the current task works on (conversation, turn), added to every
# record it logs. A context variable, so each call's task carries its own.
_fields: ContextVar[Mapping[str, str]] = ContextVar("chatstream_log_fields", default=MappingProxyType({}))


def bind_log_fields(**fields: str) -> Token[Mapping[str, str]]:
    """Adds ``fields`` (e.g. ``conversation_id``, ``turn_id``) to every record the current task logs."""
    return _fields.set({**_fields.get(), **fields})


def unbind_log_fields(token: Token[Mapping[str, str]]) -> None:
    """Restores the fields from before ``bind_log_fields``."""
    _fields.reset(token)


def log_fields() -> Mapping[str, str]:
    """The fields bound in the current task."""
    return _fields.get()


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with credential-shaped substrings and the given ``secrets`` replaced."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and exception if any.

    ``ensure_ascii`` keeps every line pure ASCII, so no U+2028 or other line separator
    in a message can split a record for a line-oriented shipper.
    """

    def __init__(self, *, secrets: Iterable[str] = ()) -> None:
        """Args:
        secrets: Exact strings to scrub besides the credential shapes (e.g. the JWT secret).
        """
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage(), self._secrets),
            **log_fields(),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info), self._secrets)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info), self._secrets)
        return json.dumps(entry, ensure_ascii=True, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for development, redacted like the JSON ones."""

    def __init__(self, *, secrets: Iterable[str] = ()) -> None:
        """Args:
        secrets: Exact strings to scrub besides the credential shapes.
        """
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        """The record as text, credentials scrubbed."""
        fields = "".join(f" {k}={v}" for k, v in log_fields().items())
        return redact(super().format(record) + fields, self._secrets)


_NOISY_LOGGERS: Final = (
    # Every upstream request, at INFO.
    "httpx2",
    # Each of alembic's autogenerate plugins, at every migration run (7 lines), at INFO.
    "alembic.runtime.plugins",
    # The embedded PostgreSQL of `chatstream dev`: each initdb and pg_ctl command with its whole
    # output, at INFO. A command that fails is logged at ERROR with that output, so it still shows.
    "pgserver",
)
"""Third-party loggers held at WARNING: what they say at INFO is noise at our default level."""


def configure_logging(
    *,
    fmt: str = "json",
    level: str = "INFO",
    log_user_content: bool = False,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Replaces the root logger's handlers with one that writes ``fmt`` lines to ``stream``.

    Args:
        fmt: ``json`` (one object per line) or ``text``.
        level: Root log level name.
        log_user_content: Let third-party DEBUG records that carry request bodies through.
        secrets: Exact strings to scrub from every line.
        stream: Where lines go; stderr by default.

    Returns:
        The installed handler.
    """
    if fmt not in ("json", "text"):
        raise SettingsError(f"{ENV_LOG_FORMAT} must be json or text, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter(secrets=secrets) if fmt == "json" else TextFormatter(secrets=secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if not log_user_content:
        floor = max(logging.INFO, root.level)
        for name in _CONTENT_LOGGERS:
            logging.getLogger(name).setLevel(floor)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


def configure_logging_from_env(
    environ: Mapping[str, str] | None = None, *, default_format: str = "json"
) -> logging.Handler:
    """``configure_logging`` from CHATSTREAM_LOG_FORMAT, CHATSTREAM_LOG_LEVEL and
    CHATSTREAM_LOG_USER_CONTENT; the entrypoints call it before reading Settings."""
    env = os.environ if environ is None else environ
    return configure_logging(
        fmt=(env.get(ENV_LOG_FORMAT) or default_format).lower(),
        level=env.get(ENV_LOG_LEVEL) or "INFO",
        log_user_content=(env.get(ENV_LOG_USER_CONTENT) or "false").lower() in {"1", "true", "yes", "on"},
        secrets=[env.get("CHATSTREAM_JWT_HS256_SECRET", ""), env.get("ANTHROPIC_API_KEY", "")],
    )
