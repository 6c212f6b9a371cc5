"""Concurrency limits on Chat streams, per owner and per server process."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from server.errors import ErrorReason, ResourceExhaustedError


class StreamLimiter:
    """Counts the streams in flight and refuses one more past a limit.

    The counts live in this process: with N replicas behind a load balancer an owner may
    hold up to N times ``max_per_owner`` streams in all. That still bounds what one
    owner can take from any one process, which is what protects the others there.
    Only the event loop's thread touches the counters, and check-then-increment has no
    await in between, so no lock is needed.
    """

    def __init__(self, *, max_streams: int, max_per_owner: int) -> None:
        self._max_streams = max_streams
        self._max_per_owner = max_per_owner
        self._total = 0
        self._per_owner: Counter[str] = Counter()

    @property
    def in_flight(self) -> int:
        """Streams currently admitted."""
        return self._total

    @contextlib.contextmanager
    def admit(self, owner: str) -> Iterator[None]:
        """Holds one stream slot for ``owner`` for the duration of the block.

        Raises:
            ResourceExhaustedError: the server or the owner is at its limit; nothing was held.
        """
        if self._total >= self._max_streams:
            raise ResourceExhaustedError(
                "the server is handling too many streams; retry shortly",
                reason=ErrorReason.ERROR_REASON_TOO_MANY_STREAMS,
                metadata={"scope": "server", "limit": str(self._max_streams)},
            )
        if self._per_owner[owner] >= self._max_per_owner:
            raise ResourceExhaustedError(
                "too many concurrent streams for this owner; retry when one ends",
                reason=ErrorReason.ERROR_REASON_TOO_MANY_STREAMS,
                metadata={"scope": "owner", "limit": str(self._max_per_owner)},
            )
        self._total += 1
        self._per_owner[owner] += 1
        try:
            yield
        finally:
            self._total -= 1
            self._per_owner[owner] -= 1
            if self._per_owner[owner] <= 0:
                # Drop the key so that owners who come and go cannot grow the map forever.
                del self._per_owner[owner]
