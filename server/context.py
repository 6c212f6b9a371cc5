"""A conversation's earlier turns for the prompt: cache-aside in Redis over PostgreSQL."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis
import redis.exceptions

from server.constants import context_key
from server.context_budget import fit_context
from server.db import turn_store
from server.db.engine import Database
from server.domain import Exchange

logger = logging.getLogger(__name__)


class ContextStore:
    """Loads and remembers the exchanges that precede a turn.

    The cached value records the last turn it covers (``through``). It is used only
    when it covers exactly the turns before the one being built, so a stale or
    partially written cache can never hide a turn: PostgreSQL (the turn rows written
    by unit of work 2) is the fallback and the truth. Redis failures only cost a read.

    Both what is loaded and what is cached are bounded by size as well as by count
    (``server.context_budget``), so neither the prompt nor the cache entry grows with
    the conversation.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        database: Database,
        *,
        max_turns: int,
        ttl_s: int,
        max_chars: int | None = None,
        max_text_chars: int = 0,
    ) -> None:
        """Args:
        redis: The cache.
        database: Where the turns are read from on a cache miss.
        max_turns: Most earlier turns in a prompt.
        ttl_s: Lifetime of a cache entry.
        max_chars: Most characters of earlier turns any prompt may carry (the prompt
            budget less the system prompt); the cache entry holds no more. None: unbounded.
        max_text_chars: Characters kept free for the new message when ``load`` is not told
            its length: the longest message accepted.
        """
        self._redis = redis
        self._database = database
        self._max_turns = max_turns
        self._ttl_s = ttl_s
        self._max_chars = max_chars
        self._max_text_chars = max_text_chars

    async def load(
        self, conversation_id: uuid.UUID, *, owner: str, before_seq: int, text_chars: int | None = None
    ) -> list[Exchange]:
        """The exchanges before turn ``before_seq`` that fit the prompt, oldest first.

        At most ``max_turns``, and, newest first, only as many as fit ``max_chars`` less
        the new message's ``text_chars`` (the longest accepted message when not given).
        """
        if self._max_turns == 0 or before_seq <= 1:
            return []
        cached = await self._read_cache(conversation_id)
        if cached is not None:
            cached_owner, through, exchanges = cached
            # The owner check keeps a stale entry of a deleted conversation from ever
            # reaching another owner who re-creates the same id.
            if cached_owner == owner and through == before_seq - 1:
                return self._fit(exchanges[-self._max_turns :], text_chars)
        exchanges = await turn_store.list_exchanges(
            self._database, conversation_id=conversation_id, before_seq=before_seq, limit=self._max_turns
        )
        await self.remember(conversation_id, owner=owner, through=before_seq - 1, exchanges=exchanges)
        return self._fit(exchanges, text_chars)

    def _fit(self, exchanges: Sequence[Exchange], text_chars: int | None) -> list[Exchange]:
        if self._max_chars is None:
            return list(exchanges)
        reserved = self._max_text_chars if text_chars is None else text_chars
        return fit_context(exchanges, max(0, self._max_chars - reserved))

    async def remember(
        self, conversation_id: uuid.UUID, *, owner: str, through: int, exchanges: Sequence[Exchange]
    ) -> None:
        """Caches the exchanges up to and including turn ``through``; best effort."""
        key, value = self.entry(conversation_id, owner=owner, through=through, exchanges=exchanges)
        try:
            await self._redis.set(key, value, ex=self._ttl_s)
        except redis.exceptions.RedisError as exc:
            logger.warning("context cache write failed: %s", exc.__class__.__name__)

    @property
    def ttl_s(self) -> int:
        """How long a cached entry lives, in seconds."""
        return self._ttl_s

    def entry(
        self, conversation_id: uuid.UUID, *, owner: str, through: int, exchanges: Sequence[Exchange]
    ) -> tuple[str, str]:
        """The cache key and value ``remember`` writes, for callers that batch the write."""
        kept = list(exchanges)[-self._max_turns :] if self._max_turns else []
        if self._max_chars is not None:
            # The most any next prompt can use: the cache entry never outgrows the budget.
            kept = fit_context(kept, self._max_chars)
        value = json.dumps(
            {"owner": owner, "through": through, "x": [[e.seq, e.user_text, e.assistant_text] for e in kept]},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return context_key(str(conversation_id)), value

    async def forget(self, conversation_id: uuid.UUID) -> None:
        """Drops a conversation's cached context; best effort (the owner check covers misses)."""
        try:
            await self._redis.delete(context_key(str(conversation_id)))
        except redis.exceptions.RedisError as exc:
            logger.warning("context cache delete failed: %s", exc.__class__.__name__)

    async def _read_cache(self, conversation_id: uuid.UUID) -> tuple[str, int, list[Exchange]] | None:
        try:
            raw = await self._redis.get(context_key(str(conversation_id)))
        except redis.exceptions.RedisError as exc:
            logger.warning("context cache read failed: %s", exc.__class__.__name__)
            return None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            exchanges = [
                Exchange(seq=int(s), user_text=str(u), assistant_text=str(a)) for s, u, a in data["x"]
            ]
            return str(data["owner"]), int(data["through"]), exchanges
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed context cache entry")
            return None
