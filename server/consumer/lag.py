"""How far the persistence consumer is behind, per shard, read from Redis alone.

Used by `chatstream lag` and by the consumer's metrics.

For each ``chat:turns:{k}`` and the group ``chat-persistence``:

- **undelivered**: entries the group has not read yet. Redis >= 7 reports it as ``lag`` in
  XINFO GROUPS. Older servers (and the embedded 6.2 of the tests), or a 7.x that cannot tell
  (after XDEL, for instance, ``lag`` is nil), get a count of the entries after the group's
  ``last-delivered-id``: XRANGE from the exclusive start ``(id``, page by page, up to
  `COUNT_CAP` entries; past that the number is a lower bound, flagged ``undelivered_capped``.
  XLEN cannot be used instead: the stream also holds delivered entries not yet trimmed.
- **pending**: delivered but not yet acknowledged (XPENDING summary).
- **ages**: of the oldest undelivered and the oldest pending entry, from the milliseconds in
  their ids (when they were published) against the Redis server's clock, so that the clock of
  the machine running this command does not matter. The oldest pending entry's **idle** time
  (since its last delivery; XPENDING extended form) tells a stuck consumer from a slow one.

Plus the length of the dead-letter stream ``chat:turns:dlq``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Final, cast

import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions

from server.constants import DEAD_LETTER_STREAM, PERSISTENCE_GROUP, turns_stream

COUNT_CAP: Final = 10_000
"""Most entries counted per shard when Redis does not report the lag itself."""
_PAGE: Final = 1000

_Entries = Sequence[tuple[bytes, Mapping[bytes, bytes]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardLag:
    """The persistence group's position on one shard."""

    shard: int
    """The shard index ``k``."""
    stream: str
    """Its stream key, ``chat:turns:{k}``."""
    length: int
    """XLEN: undelivered, pending and persisted-but-not-yet-trimmed entries."""
    group_exists: bool
    """False until a consumer has started; then every entry is undelivered."""
    undelivered: int
    """Entries the group has not read yet (a lower bound when `undelivered_capped`)."""
    undelivered_capped: bool
    """True when counting stopped at `COUNT_CAP`."""
    pending: int
    """Entries delivered to a consumer and not acknowledged."""
    oldest_undelivered_age_s: float | None
    """Seconds since the oldest undelivered entry was published; None when there is none."""
    oldest_pending_age_s: float | None
    """Seconds since the oldest pending entry was published; None when there is none."""
    oldest_pending_idle_s: float | None
    """Seconds since the oldest pending entry was last delivered; None when there is none."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LagReport:
    """Every shard, the dead-letter count, and when Redis says it measured them."""

    group: str
    """The consumer group measured, ``chat-persistence``."""
    measured_at: dt.datetime
    """The Redis server's clock (TIME) when the measurement started, UTC."""
    shards: tuple[ShardLag, ...]
    """One per shard, in shard order."""
    dead_letters: int
    """XLEN of ``chat:turns:dlq``."""

    @property
    def undelivered(self) -> int:
        """Undelivered entries over all shards."""
        return sum(shard.undelivered for shard in self.shards)

    @property
    def pending(self) -> int:
        """Pending entries over all shards."""
        return sum(shard.pending for shard in self.shards)

    def to_json(self) -> dict[str, object]:
        """The report as JSON-ready data; the field names are the dataclass names."""
        return {
            "group": self.group,
            "measured_at": self.measured_at.isoformat().replace("+00:00", "Z"),
            "shards": [asdict(shard) for shard in self.shards],
            "total": {
                "length": sum(shard.length for shard in self.shards),
                "undelivered": self.undelivered,
                "undelivered_capped": any(shard.undelivered_capped for shard in self.shards),
                "pending": self.pending,
            },
            "dead_letters": self.dead_letters,
        }


async def measure_lag(redis: aioredis.Redis, *, shards: int) -> LagReport:
    """Reads the persistence group's position on every shard and the dead-letter count.

    Read-only: it never creates the group or a stream.

    Args:
        redis: The Redis that holds the turn streams.
        shards: How many ``chat:turns:{k}`` streams there are (CHATSTREAM_SHARDS).

    Returns:
        One row per shard plus the dead-letter count.
    """
    seconds, microseconds = await redis.time()
    now_ms = seconds * 1000 + microseconds // 1000
    return LagReport(
        group=PERSISTENCE_GROUP,
        measured_at=dt.datetime.fromtimestamp(seconds + microseconds / 1e6, dt.UTC),
        shards=tuple([await _shard_lag(redis, shard, now_ms) for shard in range(shards)]),
        dead_letters=await redis.xlen(DEAD_LETTER_STREAM),
    )


async def _shard_lag(redis: aioredis.Redis, shard: int, now_ms: int) -> ShardLag:
    stream = turns_stream(shard)
    try:
        groups = cast(list[dict[str, object]], await redis.xinfo_groups(stream))
    except redis_exceptions.ResponseError as exc:
        if "no such key" not in str(exc).lower():
            raise
        groups = []
    length = await redis.xlen(stream)
    group = next((g for g in groups if _text(g.get("name")) == PERSISTENCE_GROUP), None)
    if group is None:
        # The consumer creates the group at id 0, so it will read every entry there is.
        first = cast(_Entries, await redis.xrange(stream, count=1))
        return ShardLag(
            shard=shard,
            stream=stream,
            length=length,
            group_exists=False,
            undelivered=length,
            undelivered_capped=False,
            pending=0,
            oldest_undelivered_age_s=_age_s(first[0][0], now_ms) if first else None,
            oldest_pending_age_s=None,
            oldest_pending_idle_s=None,
        )
    after = "(" + _text(group.get("last-delivered-id"))
    reported = group.get("lag")  # Redis >= 7; absent before, nil when it cannot tell
    if isinstance(reported, int):
        undelivered, capped = reported, False
    else:
        undelivered, capped = await _count_from(redis, stream, after)
    next_up = cast(_Entries, await redis.xrange(stream, min=after, count=1))
    pending = cast(dict[str, object], await redis.xpending(stream, PERSISTENCE_GROUP))
    pending_count = cast(int, pending["pending"])
    oldest_age_s = oldest_idle_s = None
    if pending_count:
        oldest = cast(
            list[dict[str, object]],
            await redis.xpending_range(stream, PERSISTENCE_GROUP, min="-", max="+", count=1),
        )
        if oldest:  # acknowledged between the two calls otherwise
            oldest_age_s = _age_s(oldest[0]["message_id"], now_ms)
            oldest_idle_s = cast(int, oldest[0]["time_since_delivered"]) / 1000
    return ShardLag(
        shard=shard,
        stream=stream,
        length=length,
        group_exists=True,
        undelivered=undelivered,
        undelivered_capped=capped,
        pending=pending_count,
        oldest_undelivered_age_s=_age_s(next_up[0][0], now_ms) if next_up else None,
        oldest_pending_age_s=oldest_age_s,
        oldest_pending_idle_s=oldest_idle_s,
    )


async def _count_from(redis: aioredis.Redis, stream: str, start: str) -> tuple[int, bool]:
    """Entries from ``start`` (an XRANGE bound) to the end, counting at most `COUNT_CAP`."""
    counted = 0
    while counted < COUNT_CAP:
        page = cast(_Entries, await redis.xrange(stream, min=start, count=min(_PAGE, COUNT_CAP - counted)))
        if not page:
            return counted, False
        counted += len(page)
        start = "(" + _text(page[-1][0])
    more = cast(_Entries, await redis.xrange(stream, min=start, count=1))
    return counted, bool(more)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _age_s(entry_id: object, now_ms: int) -> float:
    published_ms = int(_text(entry_id).split("-", 1)[0])
    # Ids come from the same Redis clock, but a failover can move it backwards.
    return max(0, now_ms - published_ms) / 1000
