"""The per-turn and per-batch statements, each one round trip on a raw asyncpg pool.

Units of work 1 and 2 run for every turn, so their cost is the service's per-turn
floor. Through the ORM, unit of work 1 was a pool pre-ping, BEGIN, three or four
statements and COMMIT; here it is one statement whose CTEs do all of it, sent in
autocommit mode: a single statement is its own transaction, atomic and committed
when it returns, and no transaction is ever held across anything but that one
round trip. asyncpg prepares each statement once per connection and caches it. The
statements are plain literals (schema ``chat`` spelled out), never built from input.

The fast path covers the common cases only. Whenever its statement cannot decide
(a request_id seen before, another turn streaming, a conversation not found), it
writes nothing and returns None, and the caller runs the general unit of work on
the ORM session, which tells those cases apart. Both paths are exercised by the
test suite.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Final

import asyncpg
from sqlalchemy.engine import make_url

from server.config import Settings
from server.db.repository import message_id
from server.domain import Exchange, Role, Turn, TurnStatus, Usage

transaction_logger = logging.getLogger("server.db.transactions")


# An existing conversation: lock it, insert the turn numbered after the last one, and
# bump the counter only if the turn went in. ON CONFLICT DO NOTHING turns both "this
# request_id was used" and "another turn is streaming" into an empty result.
_START_IN_CONVERSATION: Final = """
WITH c AS MATERIALIZED (
    SELECT id, turn_count FROM chat.conversations
    WHERE id = $1 AND owner = $2
    FOR UPDATE
), t AS (
    INSERT INTO chat.turns
        (id, conversation_id, owner, seq, request_id, user_text, status, model, lease_expires_at)
    SELECT $3, c.id, $2, c.turn_count + 1, $4, $5, 'STREAMING', $6, now() + $7::interval
    FROM c
    ON CONFLICT DO NOTHING
    RETURNING seq, created_at
), u AS (
    UPDATE chat.conversations AS conv SET turn_count = t.seq, updated_at = now()
    FROM t WHERE conv.id = $1
)
SELECT t.seq, t.created_at FROM t
"""

# A new conversation: the turn is inserted first and the conversation only if the
# turn went in. Foreign keys are checked at the end of the statement, so if the
# conversation insert is skipped (its (owner, request_id) is taken) the turn's
# reference fails and the whole statement rolls back: never a conversation without
# its first turn, nor a turn without its conversation.
_START_NEW_CONVERSATION: Final = """
WITH t AS (
    INSERT INTO chat.turns
        (id, conversation_id, owner, seq, request_id, user_text, status, model, lease_expires_at)
    VALUES ($3, $1, $2, 1, $4, $5, 'STREAMING', $6, now() + $7::interval)
    ON CONFLICT DO NOTHING
    RETURNING seq, created_at
), c AS (
    INSERT INTO chat.conversations (id, owner, create_request_id, turn_count)
    SELECT $1, $2, $4, 1 FROM t
    ON CONFLICT DO NOTHING
)
SELECT t.seq, t.created_at FROM t
"""

# Unit of work 2: store the outcome of a turn that is still STREAMING; if it is not
# (the lease sweeper marked it INTERRUPTED), return the stored row untouched.
_STORE_OUTCOME: Final = """
WITH u AS (
    UPDATE chat.turns SET
        assistant_text = $2, status = $3, stop_reason = $4, input_tokens = $5,
        output_tokens = $6, error_reason = $7, completed_at = now(), lease_expires_at = NULL
    WHERE id = $1 AND status = 'STREAMING'
    RETURNING id, conversation_id, owner, seq, request_id, user_text, assistant_text, status,
        stop_reason, input_tokens, output_tokens, model, created_at, completed_at
)
SELECT * FROM u
UNION ALL
SELECT id, conversation_id, owner, seq, request_id, user_text, assistant_text, status,
    stop_reason, input_tokens, output_tokens, model, created_at, completed_at
FROM chat.turns WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM u)
"""

# The consumer's batch: the messages of ended turns, the conversations' counters grown
# by what was really inserted, and the turns marked persisted, in one statement.
# - ON CONFLICT skips messages a redelivery already wrote (idempotent, I2), and the
#   EXISTS skips turns whose conversation was deleted meanwhile.
# - The counters' rows are locked in id order (the FOR UPDATE subquery sorts before it
#   locks), so two consumers whose batches share conversations cannot deadlock.
_PERSIST_BATCH: Final = """
WITH m AS (
    INSERT INTO chat.messages
        (id, conversation_id, turn_id, turn_seq, role, text, turn_status, created_at)
    SELECT m.id, m.conversation_id, m.turn_id, m.turn_seq, m.role, m.text, m.turn_status, m.created_at
    FROM unnest(
        $1::uuid[], $2::uuid[], $3::uuid[], $4::int[], $5::smallint[], $6::text[], $7::text[],
        $8::timestamptz[]
    ) AS m(id, conversation_id, turn_id, turn_seq, role, text, turn_status, created_at)
    WHERE EXISTS (SELECT 1 FROM chat.turns t WHERE t.id = m.turn_id)
    ON CONFLICT (turn_id, role) DO NOTHING
    RETURNING conversation_id
), n AS (
    SELECT conversation_id AS id, count(*)::int AS n FROM m GROUP BY conversation_id
), counted AS (
    UPDATE chat.conversations AS c SET message_count = c.message_count + l.n
    FROM (
        SELECT c2.id, n.n FROM chat.conversations AS c2 JOIN n ON n.id = c2.id
        ORDER BY c2.id
        FOR UPDATE OF c2
    ) AS l
    WHERE c.id = l.id
), persisted AS (
    UPDATE chat.turns SET persisted_at = now()
    WHERE id = ANY($9::uuid[]) AND persisted_at IS NULL
)
SELECT coalesce(sum(n), 0)::int FROM n
"""

_LIST_EXCHANGES: Final = """
SELECT seq, user_text, assistant_text FROM chat.turns
WHERE conversation_id = $1 AND seq < $2 AND status <> 'STREAMING'
ORDER BY seq DESC
LIMIT $3
"""


def connect_kwargs(database_url: str) -> dict[str, Any]:
    """asyncpg.connect() arguments for the SQLAlchemy URL the rest of the service uses."""
    url = make_url(database_url)
    kwargs: dict[str, Any] = {
        "user": url.username,
        "password": url.password,
        "host": url.host,
        "port": url.port,
        "database": url.database,
    }
    for key, value in url.query.items():
        # ?host=/socket/dir (Unix sockets) and ?ssl=require are the forms the service documents.
        kwargs[key] = value if isinstance(value, str) else value[-1]
    return {k: v for k, v in kwargs.items() if v is not None}


async def create_pool(settings: Settings, *, application_name: str = "chatstream") -> asyncpg.Pool:
    """A lazily connecting pool for the per-turn statements, sized like the ORM's pool.

    Connections that PostgreSQL closed (a restart, a failover) are noticed by asyncpg
    when their socket closes and replaced at the next acquire.
    """
    pool = await asyncpg.create_pool(
        min_size=0,
        max_size=settings.db_pool_size,
        max_inactive_connection_lifetime=300,
        timeout=10,
        command_timeout=30,
        server_settings={"application_name": application_name},
        **connect_kwargs(settings.database_url),
    )
    assert pool is not None
    return pool


class HotPath:
    """The per-turn statements; every method is one round trip in autocommit mode."""

    def __init__(self, pool: asyncpg.Pool, *, log_transactions: bool = False) -> None:
        self._pool = pool
        self._log_transactions = log_transactions

    async def start_turn(
        self,
        *,
        owner: str,
        conversation_id: uuid.UUID | None,
        turn_id: uuid.UUID,
        request_id: str | None,
        user_text: str,
        model: str,
        lease: timedelta,
    ) -> Turn | None:
        """Unit of work 1 in one statement; None (nothing written) when it cannot decide."""
        new = conversation_id is None
        target = uuid.uuid4() if conversation_id is None else conversation_id
        row = await self._fetchrow(
            "start_turn",
            _START_NEW_CONVERSATION if new else _START_IN_CONVERSATION,
            target,
            owner,
            turn_id,
            request_id,
            user_text,
            model,
            lease,
        )
        if row is None:
            return None
        return Turn(
            id=turn_id,
            conversation_id=target,
            owner=owner,
            seq=row["seq"],
            request_id=request_id,
            user_text=user_text,
            assistant_text="",
            status=TurnStatus.STREAMING,
            stop_reason=None,
            usage=Usage(),
            model=model,
            created_at=row["created_at"],
            completed_at=None,
        )

    async def store_outcome(
        self,
        *,
        turn_id: uuid.UUID,
        assistant_text: str,
        status: TurnStatus,
        stop_reason: str | None,
        usage: Usage,
        error_reason: str | None,
    ) -> Turn | None:
        """Unit of work 2 in one statement: the stored turn, or None if it is gone (deleted)."""
        row = await self._fetchrow(
            "store_outcome",
            _STORE_OUTCOME,
            turn_id,
            assistant_text,
            status.value,
            stop_reason,
            usage.input_tokens,
            usage.output_tokens,
            error_reason,
        )
        if row is None:
            return None
        return Turn(
            id=row["id"],
            conversation_id=row["conversation_id"],
            owner=row["owner"],
            seq=row["seq"],
            request_id=row["request_id"],
            user_text=row["user_text"],
            assistant_text=row["assistant_text"],
            status=TurnStatus(row["status"]),
            stop_reason=row["stop_reason"],
            usage=Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"]),
            model=row["model"],
            created_at=row["created_at"],
            completed_at=row["completed_at"],
        )

    async def insert_messages(self, turns: Sequence[Turn]) -> int:
        """Persists the user and assistant messages of ended turns in one statement; returns rows inserted.

        Idempotent: (turn_id, role) is unique and conflicts are skipped, so redelivered
        entries insert nothing. Turns whose conversation was deleted meanwhile are
        skipped instead of failing the batch. Conversation counters grow by what was
        really inserted, and the turns are marked persisted so the relay leaves them alone.
        """
        if not turns:
            return 0
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
        ids, conversation_ids, turn_ids, seqs, roles, texts, statuses, created = columns
        for turn in turns:
            for role, body in ((Role.USER, turn.user_text), (Role.ASSISTANT, turn.assistant_text)):
                ids.append(message_id(turn.id, role))
                conversation_ids.append(turn.conversation_id)
                turn_ids.append(turn.id)
                seqs.append(turn.seq)
                roles.append(role.value)
                texts.append(body)
                statuses.append(turn.status.value)
                created.append(turn.created_at)
        unique_turns = list({turn.id: None for turn in turns})
        inserted = await self._fetchval("insert_messages", _PERSIST_BATCH, *columns, unique_turns)
        return int(inserted)

    async def list_exchanges(
        self, *, conversation_id: uuid.UUID, before_seq: int, limit: int
    ) -> list[Exchange]:
        """The last ``limit`` ended turns before ``before_seq``, oldest first (read from turn rows, I11)."""
        if limit <= 0:
            return []
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_LIST_EXCHANGES, conversation_id, before_seq, limit)
        exchanges = [
            Exchange(seq=r["seq"], user_text=r["user_text"], assistant_text=r["assistant_text"]) for r in rows
        ]
        exchanges.reverse()
        return exchanges

    async def _fetchval(self, what: str, sql: str, *args: object) -> Any:
        row = await self._fetchrow(what, sql, *args)
        return None if row is None else row[0]

    async def _fetchrow(self, what: str, sql: str, *args: object) -> asyncpg.Record | None:
        async with self._pool.acquire() as conn:
            if not self._log_transactions:
                return await conn.fetchrow(sql, *args)
            # The same BEGIN/COMMIT lines as server.db.engine.log_transactions: a single
            # statement is a transaction that ends when the statement does.
            began = time.perf_counter()
            transaction_logger.info("BEGIN (single statement %s)", what)
            try:
                row = await conn.fetchrow(sql, *args)
            except BaseException:
                held_ms = (time.perf_counter() - began) * 1000
                transaction_logger.info("ROLLBACK after %.1f ms (single statement %s)", held_ms, what)
                raise
            held_ms = (time.perf_counter() - began) * 1000
            transaction_logger.info("COMMIT after %.1f ms (single statement %s)", held_ms, what)
            return row
