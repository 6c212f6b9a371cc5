"""The consumer's writes: a batch of ended turns becomes message rows in one statement."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import text

from server.db.engine import Database
from server.domain import Role, Turn

# The same message (turn, role) always gets the same id, so its resource name is
# stable whichever of several redundant deliveries wins the insert.
_MESSAGE_ID_NAMESPACE: Final = uuid.UUID("0b8f7d4e-3c1a-4f55-9a43-7d1c2a9e6b10")

# The consumer's batch: the messages of ended turns, the conversations' counters grown
# by what was really inserted, and the turns marked persisted, in one statement.
# - ON CONFLICT skips messages a redelivery already wrote (idempotent, I2), and the
#   EXISTS skips turns whose conversation was deleted meanwhile.
# - The counters' rows are locked in id order (the FOR UPDATE subquery sorts before it
#   locks), so two consumers whose batches share conversations cannot deadlock.
_PERSIST_BATCH: Final = text("""
WITH m AS (
    INSERT INTO chat.messages
        (id, conversation_id, turn_id, turn_seq, role, text, turn_status, created_at)
    SELECT m.id, m.conversation_id, m.turn_id, m.turn_seq, m.role, m.text, m.turn_status, m.created_at
    FROM unnest(
        CAST(:ids AS uuid[]), CAST(:conversation_ids AS uuid[]), CAST(:turn_ids AS uuid[]),
        CAST(:seqs AS int[]), CAST(:roles AS smallint[]), CAST(:texts AS text[]),
        CAST(:statuses AS text[]), CAST(:created AS timestamptz[])
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
    WHERE id = ANY(CAST(:unique_turns AS uuid[])) AND persisted_at IS NULL
)
SELECT coalesce(sum(n), 0)::int FROM n
""")


def message_id(turn_id: uuid.UUID, role: Role) -> uuid.UUID:
    """The deterministic id of one message of a turn."""
    return uuid.uuid5(_MESSAGE_ID_NAMESPACE, f"{turn_id}/{role.value}")


async def insert_messages(database: Database, turns: Sequence[Turn]) -> int:
    """Persists the user and assistant messages of ended turns in one statement; returns rows inserted.

    Idempotent: (turn_id, role) is unique and conflicts are skipped, so redelivered
    entries insert nothing. Turns whose conversation was deleted meanwhile are
    skipped instead of failing the batch. Conversation counters grow by what was
    really inserted, and the turns are marked persisted so the relay leaves them alone.
    """
    if not turns:
        return 0
    columns: dict[str, list[Any]] = {
        name: []
        for name in ("ids", "conversation_ids", "turn_ids", "seqs", "roles", "texts", "statuses", "created")
    }
    for turn in turns:
        for role, body in ((Role.USER, turn.user_text), (Role.ASSISTANT, turn.assistant_text)):
            columns["ids"].append(message_id(turn.id, role))
            columns["conversation_ids"].append(turn.conversation_id)
            columns["turn_ids"].append(turn.id)
            columns["seqs"].append(turn.seq)
            columns["roles"].append(role.value)
            columns["texts"].append(body)
            columns["statuses"].append(turn.status.value)
            columns["created"].append(turn.created_at)
    unique_turns = list({turn.id: None for turn in turns})
    async with database.autocommit("persist batch") as conn:
        inserted = await conn.scalar(_PERSIST_BATCH, {**columns, "unique_turns": unique_turns})
    return int(inserted or 0)
