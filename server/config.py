"""Settings: read once from CHATSTREAM_* environment variables, then passed down explicitly."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from server import constants


class SettingsError(ValueError):
    """An environment variable is missing or malformed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the server, consumer and relay need to run."""

    database_url: str = field(repr=False)
    """SQLAlchemy URL, ``postgresql+asyncpg://user:pass@host/db`` (CHATSTREAM_DATABASE_URL)."""
    redis_url: str = field(repr=False)
    """``redis://host:port/db`` or ``unix:///path.sock`` (CHATSTREAM_REDIS_URL)."""
    listen: str = "127.0.0.1:50051"
    """gRPC listen address (CHATSTREAM_LISTEN); port 0 picks a free port."""

    anthropic_api_key: str | None = field(default=None, repr=False)
    """The SDK's own ANTHROPIC_API_KEY; None means dev mode serves the demo model."""
    anthropic_base_url: str | None = None
    """The SDK's own ANTHROPIC_BASE_URL; None means the SDK default."""
    model: str = "claude-sonnet-4-5"
    """Model id sent upstream (CHATSTREAM_MODEL)."""
    max_tokens: int = 1024
    """Upper bound on one reply's tokens (CHATSTREAM_MAX_TOKENS)."""
    system_prompt: str = ""
    """System prompt for every turn; empty sends none (CHATSTREAM_SYSTEM_PROMPT)."""
    llm_timeout_s: float = 60.0
    """Longest silence allowed from upstream, before or during a reply (CHATSTREAM_LLM_TIMEOUT_S)."""
    llm_max_retries: int = 2
    """SDK retries of 429/5xx/connection errors before the first token (CHATSTREAM_LLM_MAX_RETRIES)."""

    shards: int = 4
    """Number of ``chat:turns:{k}`` streams (CHATSTREAM_SHARDS); changing it re-maps conversations."""
    context_max_turns: int = 50
    """Earlier turns sent to the model as context (CHATSTREAM_CONTEXT_MAX_TURNS)."""
    context_cache_ttl_s: int = 3600
    """How long a conversation's context stays cached in Redis (CHATSTREAM_CONTEXT_CACHE_TTL_S)."""
    max_text_chars: int = 32_768
    """Longest user message accepted (CHATSTREAM_MAX_TEXT_CHARS)."""

    turn_lease_s: int = 600
    """Seconds an unrenewed STREAMING turn lives before it counts as interrupted (CHATSTREAM_TURN_LEASE_S)."""

    db_pool_size: int = 10
    """PostgreSQL connections per process (CHATSTREAM_DB_POOL_SIZE)."""
    shutdown_grace_s: float = 10.0
    """How long in-flight streams may finish after SIGTERM (CHATSTREAM_SHUTDOWN_GRACE_S)."""

    consumer_name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """This consumer's name in the group (CHATSTREAM_CONSUMER_NAME); unique per process."""
    consumer_batch: int = 200
    """Entries read per XREADGROUP call (CHATSTREAM_CONSUMER_BATCH)."""
    consumer_block_ms: int = 1000
    """How long one XREADGROUP waits for new entries (CHATSTREAM_CONSUMER_BLOCK_MS)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Builds Settings from the environment; raises SettingsError naming the bad variable."""
        env = os.environ if environ is None else environ
        database_url = env.get(constants.ENV_DATABASE_URL, "")
        redis_url = env.get(constants.ENV_REDIS_URL, "")
        if not database_url:
            raise SettingsError(f"{constants.ENV_DATABASE_URL} is not set (postgresql+asyncpg://...)")
        if not redis_url:
            raise SettingsError(f"{constants.ENV_REDIS_URL} is not set (redis://host:6379/0)")
        defaults = cls(database_url="", redis_url="")
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            listen=env.get(constants.ENV_LISTEN, defaults.listen),
            anthropic_api_key=env.get("ANTHROPIC_API_KEY") or None,
            anthropic_base_url=env.get("ANTHROPIC_BASE_URL") or None,
            model=env.get("CHATSTREAM_MODEL", defaults.model),
            max_tokens=_int(env, "CHATSTREAM_MAX_TOKENS", defaults.max_tokens, minimum=1),
            system_prompt=env.get("CHATSTREAM_SYSTEM_PROMPT", defaults.system_prompt),
            llm_timeout_s=_float(env, "CHATSTREAM_LLM_TIMEOUT_S", defaults.llm_timeout_s),
            llm_max_retries=_int(env, "CHATSTREAM_LLM_MAX_RETRIES", defaults.llm_max_retries, minimum=0),
            shards=_int(env, "CHATSTREAM_SHARDS", defaults.shards, minimum=1),
            context_max_turns=_int(
                env, "CHATSTREAM_CONTEXT_MAX_TURNS", defaults.context_max_turns, minimum=0
            ),
            context_cache_ttl_s=_int(
                env, "CHATSTREAM_CONTEXT_CACHE_TTL_S", defaults.context_cache_ttl_s, minimum=1
            ),
            max_text_chars=_int(env, "CHATSTREAM_MAX_TEXT_CHARS", defaults.max_text_chars, minimum=1),
            turn_lease_s=_int(env, "CHATSTREAM_TURN_LEASE_S", defaults.turn_lease_s, minimum=1),
            db_pool_size=_int(env, "CHATSTREAM_DB_POOL_SIZE", defaults.db_pool_size, minimum=1),
            shutdown_grace_s=_float(env, "CHATSTREAM_SHUTDOWN_GRACE_S", defaults.shutdown_grace_s),
            consumer_name=env.get("CHATSTREAM_CONSUMER_NAME", defaults.consumer_name),
            consumer_batch=_int(env, "CHATSTREAM_CONSUMER_BATCH", defaults.consumer_batch, minimum=1),
            consumer_block_ms=_int(
                env, "CHATSTREAM_CONSUMER_BLOCK_MS", defaults.consumer_block_ms, minimum=1
            ),
        )


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    return value
