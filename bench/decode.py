"""The consumer's decode, old against new, in one process: ``.venv/bin/python -m bench.decode [N]``.

Both turn N stream entries (P5's: ``bench.backlog.make_turns``, encoded by ``encode_turn``) into
the parameters of the consumer's statement:
- *before*: ``decode_turn`` into a ``Turn`` per entry, then the first release's column building
  (two rows per turn, eight lists, uuid5 ``UUID`` objects as message ids), as
  ``message_store.insert_messages`` did until issue 13;
- *after*: ``TurnColumns.append`` per entry (msgspec, one element per turn, ids as text).
The rounds alternate, and each side's best round counts, so that other tenants of the machine
disturb both alike. What the driver then spends encoding the arrays is in P5, not here.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from bench.backlog import make_turns
from server.domain import Role
from server.message_ids import message_id
from server.turn_codec import TurnColumns, decode_turn, encode_turn

Entries = Sequence[Mapping[bytes, bytes]]


def before(entries: Entries) -> int:
    """decode_turn, then the statement's per-row columns as the first release built them."""
    turns = [decode_turn(fields) for fields in entries]
    columns: dict[str, list[uuid.UUID | int | str | datetime]] = {
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
    return len(columns["ids"]) // 2


def after(entries: Entries) -> int:
    """TurnColumns, straight from the stream fields."""
    columns = TurnColumns()
    for fields in entries:
        columns.append(fields)
    return len(columns)


def best_of(rounds: int, entries: Entries, *sides: Callable[[Entries], int]) -> list[float]:
    """Each side's fastest round, in seconds, the sides alternating round by round."""
    best = [float("inf")] * len(sides)
    for _ in range(rounds):
        for i, side in enumerate(sides):
            t0 = time.perf_counter()
            assert side(entries) == len(entries)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    turns, _ = make_turns(n, 4, 20)
    entries = [encode_turn(turn) for turn in turns]
    old_s, new_s = best_of(7, entries, before, after)
    print(f"entries: {n} ({len(entries[0][b'turn'])} bytes of JSON each)")
    print(f"before (decode_turn + per-row columns, uuid5): {old_s * 1e6 / n:6.2f} µs per entry")
    print(f"after  (TurnColumns, msgspec, hex ids):        {new_s * 1e6 / n:6.2f} µs per entry")
    print(f"after / before: {new_s / old_s:.3f} (before is {old_s / new_s:.1f}x the time)")


if __name__ == "__main__":
    main()
