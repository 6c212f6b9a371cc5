"""The consumer's writes: a batch of ended turns becomes message rows in one statement."""

from __future__ import annotations

from typing import Final

from server.db.engine import Database, Statement
from server.turn_codec import TurnColumns

# The consumer's batch: the messages of ended turns, the conversations' counters grown
# by what was really inserted, and the turns marked persisted, in one statement.
# - The arrays hold one element per turn; each turn becomes its user and its assistant
#   row here (the LATERAL VALUES), so the driver encodes the shared columns once per turn.
# - ON CONFLICT skips messages a redelivery already wrote (idempotent, I2), and the
#   EXISTS skips turns whose conversation was deleted meanwhile.
# - The counters' rows are locked in id order (the FOR UPDATE subquery sorts before it
#   locks), so two consumers whose batches share conversations cannot deadlock.
_PERSIST_BATCH: Final = Statement("""
WITH t AS (
    SELECT * FROM unnest(
        CAST(:turn_ids AS uuid[]), CAST(:conversation_ids AS uuid[]), CAST(:seqs AS int[]),
        CAST(:statuses AS text[]), CAST(:created AS timestamptz[]),
        CAST(:user_message_ids AS uuid[]), CAST(:user_texts AS text[]),
        CAST(:assistant_message_ids AS uuid[]), CAST(:assistant_texts AS text[])
    ) AS t(turn_id, conversation_id, seq, status, created_at,
           user_message_id, user_text, assistant_message_id, assistant_text)
    WHERE EXISTS (SELECT 1 FROM chat.turns x WHERE x.id = t.turn_id)
), m AS (
    INSERT INTO chat.messages
        (id, conversation_id, turn_id, turn_seq, role, text, turn_status, created_at)
    SELECT r.id, t.conversation_id, t.turn_id, t.seq, r.role, r.text, t.status, t.created_at
    FROM t CROSS JOIN LATERAL (VALUES
        (t.user_message_id, 1::smallint, t.user_text),
        (t.assistant_message_id, 2::smallint, t.assistant_text)
    ) AS r(id, role, text)
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
    WHERE id = ANY(CAST(:turn_ids AS uuid[])) AND persisted_at IS NULL
)
SELECT coalesce(sum(n), 0)::int FROM n
""")


async def insert_messages(database: Database, turns: TurnColumns) -> int:
    """Persists the user and assistant messages of ended turns in one statement; returns rows inserted.

    Idempotent: (turn_id, role) is unique and conflicts are skipped, so redelivered
    entries insert nothing. Turns whose conversation was deleted meanwhile are
    skipped instead of failing the batch. Conversation counters grow by what was
    really inserted, and the turns are marked persisted so the relay leaves them alone.
    """
    if not turns:
        return 0
    parameters = {name: getattr(turns, name) for name in TurnColumns.__slots__}
    async with database.hot("persist batch") as conn:
        inserted = await conn.fetchval(_PERSIST_BATCH, parameters)
    return int(inserted or 0)
