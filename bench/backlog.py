"""P5: a persistence backlog built exactly as the server would have left it, and a raw-insert baseline.

``fill()`` writes N completed turns the way a server that ran while the consumer was down would have:
conversation and turn rows in ``chat.conversations`` / ``chat.turns`` (COPY; the consumer only
inserts messages of turns that exist) and one stream entry per turn, encoded by
``server.turn_codec.encode_turn`` and sharded by ``server.publisher.shard_for``. Conversations have a few
turns each, interleaved the way they arrive in production (turn 1 of every conversation, then turn
2, ...), so one consumer batch touches about as many conversations as it has entries.

``raw_inserts()`` writes the same message rows with plain asyncpg into a scratch copy of
``chat.messages`` (same columns, constraints and indexes, no foreign keys): ``executemany`` in
transactions of one consumer batch each (2 rows per turn) over as many connections as the consumer
has shard tasks, and, for reference, one COPY.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis

from bench.common import body_text, first_token
from server.constants import turns_stream
from server.domain import Role, Turn, TurnStatus, Usage
from server.message_ids import message_id
from server.publisher import shard_for
from server.turn_codec import encode_turn

OWNER = "bench-p5"
MODEL = "bench-backlog"
_CONVERSATION_COLUMNS = ["id", "owner", "turn_count", "message_count", "created_at", "updated_at"]
_TURN_COLUMNS = [
    "id",
    "conversation_id",
    "owner",
    "seq",
    "user_text",
    "assistant_text",
    "status",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "model",
    "created_at",
    "completed_at",
]
_MESSAGE_COLUMNS = [
    "id",
    "conversation_id",
    "turn_id",
    "turn_seq",
    "role",
    "text",
    "turn_status",
    "created_at",
]
MessageRecord = tuple[uuid.UUID, uuid.UUID, uuid.UUID, int, int, str, str, datetime]


@dataclass(slots=True)
class Backlog:
    """What ``fill`` wrote."""

    turns: list[Turn]
    conversations: int
    fill_db_s: float
    fill_redis_s: float
    stream_lengths: dict[str, int]


def make_turns(
    n_turns: int, turns_per_conversation: int, reply_tokens: int, *, reply: str | None = None
) -> tuple[list[Turn], int]:
    """``n_turns`` completed turns over ``ceil(n / k)`` conversations, interleaved by seq.

    ``reply`` replaces the bench's own reply text (tokens cycled from a small vocabulary).
    """
    k = max(turns_per_conversation, 1)
    n_conversations = -(-n_turns // k)
    conversations = [uuid.uuid4() for _ in range(n_conversations)]
    now = datetime.now(UTC)
    if reply is None:
        reply = first_token(time.monotonic_ns()) + body_text(reply_tokens)
    turns: list[Turn] = []
    for seq in range(1, k + 1):
        for i, conversation_id in enumerate(conversations):
            if len(turns) == n_turns:
                break
            turns.append(
                Turn(
                    id=uuid.uuid4(),
                    conversation_id=conversation_id,
                    owner=OWNER,
                    seq=seq,
                    request_id=None,
                    user_text=f"bench n={reply_tokens} r=0 backlog conversation {i} turn {seq}",
                    assistant_text=reply,
                    status=TurnStatus.COMPLETED,
                    stop_reason="end_turn",
                    usage=Usage(input_tokens=12, output_tokens=reply_tokens),
                    model=MODEL,
                    created_at=now,
                    completed_at=now,
                )
            )
    return turns, n_conversations


async def fill(
    dsn: str,
    redis_url: str,
    *,
    shards: int,
    n_turns: int,
    turns_per_conversation: int,
    reply_tokens: int,
    reply: str | None = None,
) -> Backlog:
    """Writes the rows and the stream entries; returns what was written."""
    turns, n_conversations = make_turns(n_turns, turns_per_conversation, reply_tokens, reply=reply)
    turn_counts: dict[uuid.UUID, int] = {}
    for turn in turns:
        turn_counts[turn.conversation_id] = max(turn_counts.get(turn.conversation_id, 0), turn.seq)
    t0 = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        now = turns[0].created_at
        await conn.copy_records_to_table(
            "conversations",
            schema_name="chat",
            columns=_CONVERSATION_COLUMNS,
            records=[(cid, OWNER, count, 0, now, now) for cid, count in turn_counts.items()],
        )
        await conn.copy_records_to_table(
            "turns",
            schema_name="chat",
            columns=_TURN_COLUMNS,
            records=[
                (
                    t.id,
                    t.conversation_id,
                    t.owner,
                    t.seq,
                    t.user_text,
                    t.assistant_text,
                    t.status.value,
                    t.stop_reason,
                    t.usage.input_tokens,
                    t.usage.output_tokens,
                    t.model,
                    t.created_at,
                    t.completed_at,
                )
                for t in turns
            ],
        )
        await conn.execute("ANALYZE chat.turns; ANALYZE chat.conversations")
    finally:
        await conn.close()
    fill_db_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    redis = aioredis.from_url(redis_url)
    try:
        for start in range(0, len(turns), 1000):
            async with redis.pipeline(transaction=False) as pipe:
                for turn in turns[start : start + 1000]:
                    stream = turns_stream(shard_for(turn.conversation_id, shards))
                    pipe.xadd(stream, encode_turn(turn))  # type: ignore[arg-type]
                await pipe.execute()
        lengths = {turns_stream(k): int(await redis.xlen(turns_stream(k))) for k in range(shards)}
    finally:
        await redis.aclose()
    return Backlog(
        turns=turns,
        conversations=n_conversations,
        fill_db_s=fill_db_s,
        fill_redis_s=time.perf_counter() - t0,
        stream_lengths=lengths,
    )


def message_records(turns: list[Turn]) -> list[MessageRecord]:
    """The rows the consumer writes for these turns (same ids, same values)."""
    records: list[MessageRecord] = []
    for t in turns:
        for role, text in ((Role.USER, t.user_text), (Role.ASSISTANT, t.assistant_text)):
            records.append(
                (
                    message_id(t.id, role),
                    t.conversation_id,
                    t.id,
                    t.seq,
                    role.value,
                    text,
                    t.status.value,
                    t.created_at,
                )
            )
    return records


async def persisted(dsn: str) -> dict[str, int | float | None]:
    """How much of the backlog the consumer wrote."""
    conn = await asyncpg.connect(dsn)
    try:
        messages = await conn.fetchval(
            "SELECT count(*) FROM chat.messages m JOIN chat.turns t ON t.id = m.turn_id WHERE t.owner = $1",
            OWNER,
        )
        turns = await conn.fetchval(
            "SELECT count(*) FROM chat.turns WHERE owner = $1 AND persisted_at IS NOT NULL", OWNER
        )
        counted = await conn.fetchval(
            "SELECT coalesce(sum(message_count), 0) FROM chat.conversations WHERE owner = $1", OWNER
        )
        # Cross-check of the drain time, from the consumer's own transaction timestamps.
        span = await conn.fetchval(
            "SELECT extract(epoch FROM max(persisted_at) - min(persisted_at))"
            " FROM chat.turns WHERE owner = $1",
            OWNER,
        )
        return {
            "messages": int(messages),
            "turns_persisted": int(turns),
            "message_count_sum": int(counted),
            "persisted_at_span_s": None if span is None else round(float(span), 3),
        }
    finally:
        await conn.close()


async def raw_inserts(
    dsn: str, records: list[MessageRecord], *, batch_rows: int, connections: int
) -> dict[str, float]:
    """Times executemany (batches of ``batch_rows``, ``connections`` at once) and one COPY."""
    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute(
            "DROP SCHEMA IF EXISTS bench_raw CASCADE; CREATE SCHEMA bench_raw;"
            "CREATE TABLE bench_raw.messages (LIKE chat.messages INCLUDING ALL)"
        )
        columns = ", ".join(_MESSAGE_COLUMNS)
        placeholders = ", ".join(f"${i}" for i in range(1, len(_MESSAGE_COLUMNS) + 1))
        # Column names are our own constants, not input.
        insert = f"INSERT INTO bench_raw.messages ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING"  # noqa: S608
        batches = [records[i : i + batch_rows] for i in range(0, len(records), batch_rows)]
        queue: asyncio.Queue[list[MessageRecord]] = asyncio.Queue()
        for batch in batches:
            queue.put_nowait(batch)
        pool = [await asyncpg.connect(dsn) for _ in range(connections)]

        async def worker(conn: asyncpg.Connection) -> None:
            while not queue.empty():
                batch = queue.get_nowait()
                async with conn.transaction():
                    await conn.executemany(insert, batch)

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(worker(c) for c in pool))
        finally:
            executemany_s = time.perf_counter() - t0
            for conn in pool:
                await conn.close()
        count = await setup.fetchval("SELECT count(*) FROM bench_raw.messages")
        if count != len(records):
            raise RuntimeError(f"raw executemany wrote {count} rows, expected {len(records)}")
        await setup.execute("TRUNCATE bench_raw.messages")
        t0 = time.perf_counter()
        await setup.copy_records_to_table(
            "messages", schema_name="bench_raw", columns=_MESSAGE_COLUMNS, records=records
        )
        copy_s = time.perf_counter() - t0
        await setup.execute("DROP SCHEMA bench_raw CASCADE")
    finally:
        await setup.close()
    return {
        "rows": len(records),
        "executemany_s": executemany_s,
        "executemany_rows_per_s": len(records) / executemany_s,
        "copy_s": copy_s,
        "copy_rows_per_s": len(records) / copy_s,
    }
