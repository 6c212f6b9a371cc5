"""I1, I2 and I7 as an outsider checks them: PostgreSQL rows and the Redis pending lists.

Shared by the fault scenario (tests/faults.py) and the failover scenario (tests/failover.py):
wait until the system has settled, then check that every turn whose TurnCompleted reached a
client has exactly its two rows, with the text the client received, that nothing is
duplicated, and that the counters agree with the rows. Settled also means that no turn is
left STREAMING and that every pending list has drained.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from server.constants import DEAD_LETTER_STREAM, PERSISTENCE_GROUP, turns_stream


@dataclass(frozen=True, slots=True)
class ClientTurn:
    """A turn whose TurnCompleted reached a client, as that client saw it."""

    user_text: str
    reply_text: str


@dataclass(frozen=True, slots=True)
class State:
    """What PostgreSQL and Redis hold, summed over every turn and shard."""

    turns: int
    streaming: int
    unpersisted: int
    messages: int
    pending: int
    dead: int

    def settled(self, *, dead_letters: int = 0) -> bool:
        """No turn streaming or unpersisted, two rows per turn, nothing pending, the dead letters in.

        ``dead_letters`` is how many entries were poisoned on purpose; redelivery may copy one
        twice, so more are allowed here and the exact set is for the caller to check.
        """
        return (
            self.streaming == 0
            and self.unpersisted == 0
            and self.messages == 2 * self.turns
            and self.pending == 0
            and self.dead >= dead_letters
        )


async def read_state(db: asyncpg.Connection, redis_client: aioredis.Redis, shards: int) -> State:
    """One look at the tables and at every shard's pending list (group chat-persistence)."""
    pending = 0
    for k in range(shards):
        try:
            pending += (await redis_client.xpending(turns_stream(k), PERSISTENCE_GROUP))["pending"]
        except redis.exceptions.ResponseError as exc:
            # NOGROUP: no stream yet, or Redis lost it; nothing is pending there. Any other
            # failure (a node down) must not read as "nothing pending".
            if "NOGROUP" not in str(exc):
                raise
    return State(
        turns=await db.fetchval("SELECT count(*) FROM chat.turns"),
        streaming=await db.fetchval("SELECT count(*) FROM chat.turns WHERE status = 'STREAMING'"),
        unpersisted=await db.fetchval("SELECT count(*) FROM chat.turns WHERE persisted_at IS NULL"),
        messages=await db.fetchval("SELECT count(*) FROM chat.messages"),
        pending=pending,
        dead=await redis_client.xlen(DEAD_LETTER_STREAM),
    )


async def wait_settled(
    db: asyncpg.Connection,
    redis_client: aioredis.Redis,
    shards: int,
    *,
    timeout_s: float,
    dead_letters: int = 0,
    poll_s: float = 0.2,
) -> State:
    """Polls ``read_state`` until it has settled; fails with the last state after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state: State | BaseException = await read_state(db, redis_client, shards)
        except (redis.exceptions.RedisError, OSError) as exc:
            state = exc
        if isinstance(state, State) and state.settled(dead_letters=dead_letters):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled after {timeout_s:.0f}s: {state!r}")
        await asyncio.sleep(poll_s)


async def assert_completed_turns_stored(db: asyncpg.Connection, completed: Mapping[str, ClientTurn]) -> None:
    """I1: each turn (by resource name) has exactly one user and one assistant row, with its client's text."""
    by_id = {name.rsplit("/", 1)[1]: turn for name, turn in completed.items()}
    rows = await db.fetch(
        "SELECT turn_id::text AS turn_id, role, text FROM chat.messages"
        " WHERE turn_id::text = ANY($1::text[]) ORDER BY turn_id, role",
        list(by_id),
    )
    stored: dict[str, list[tuple[int, str]]] = {}
    for row in rows:
        stored.setdefault(row["turn_id"], []).append((row["role"], row["text"]))
    wrong = {
        turn_id: stored.get(turn_id)
        for turn_id, turn in by_id.items()
        if stored.get(turn_id) != [(1, turn.user_text), (2, turn.reply_text)]
    }
    sample = dict(list(wrong.items())[:5])
    assert not wrong, f"{len(wrong)} completed turn(s) without exactly their two rows, e.g. {sample}"


async def assert_interrupted_turns_kept(
    db: asyncpg.Connection, interrupted: Mapping[str, ClientTurn]
) -> None:
    """Turns a dead server left INTERRUPTED keep their two rows: the user's text, and a reply that
    holds all the client got of it (the live log is written ahead of the caller)."""
    by_id = {name.rsplit("/", 1)[1]: turn for name, turn in interrupted.items()}
    rows = await db.fetch(
        "SELECT t.id::text AS turn_id, t.status, m.role, m.text FROM chat.turns t"
        " JOIN chat.messages m ON m.turn_id = t.id WHERE t.id::text = ANY($1::text[]) ORDER BY t.id, m.role",
        list(by_id),
    )
    stored: dict[str, list[tuple[str, int, str]]] = {}
    for row in rows:
        stored.setdefault(row["turn_id"], []).append((row["status"], row["role"], row["text"]))
    wrong = {}
    for turn_id, turn in by_id.items():
        got = stored.get(turn_id, [])
        ok = (
            len(got) == 2
            and all(status == "INTERRUPTED" for status, _, _ in got)
            and got[0][1:] == (1, turn.user_text)
            and got[1][1] == 2
            and got[1][2].startswith(turn.reply_text)
        )
        if not ok:
            wrong[turn_id] = (got, turn.reply_text)
    sample = dict(list(wrong.items())[:5])
    assert not wrong, f"{len(wrong)} interrupted turn(s) without their rows or the text seen, e.g. {sample}"


async def assert_no_duplicates(db: asyncpg.Connection) -> None:
    """I2: no (turn, role) twice, and each conversation's counter agrees with its rows."""
    duplicates = await db.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM chat.messages GROUP BY turn_id, role HAVING count(*) > 1) d"
    )
    assert duplicates == 0, f"{duplicates} duplicated message rows"
    miscounted = await db.fetchval(
        "SELECT count(*) FROM chat.conversations c WHERE c.message_count <>"
        " (SELECT count(*) FROM chat.messages m WHERE m.conversation_id = c.id)"
    )
    assert miscounted == 0, f"{miscounted} conversations whose message_count disagrees with their rows"


async def relayed_turns(db: asyncpg.Connection) -> int:
    """Turns the relay had to publish again (Redis lost them, a publish failed, or the consumer lagged)."""
    count: int = await db.fetchval("SELECT count(*) FROM chat.turns WHERE relay_count > 0")
    return count
