"""Admission of streams: concurrency limits per owner and per server process, and the measured load."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from server.errors import ErrorReason, OverloadedError, ResourceExhaustedError
from server.load import LoadMonitor
from server.metrics import Metrics


class StreamLimiter:
    """Counts the streams in flight and refuses one more past a limit, or while the process is overloaded.

    The counts live in this process: with N replicas behind a load balancer an owner may
    hold up to N times ``max_per_owner`` streams in all. That still bounds what one
    owner can take from any one process, which is what protects the others there.
    Only the event loop's thread touches the counters, and check-then-increment has no
    await in between, so no lock is needed.

    The counts are hard caps. Below them, a call that starts new work (``sheddable``: a
    Chat) is also refused while ``load`` says the process is overloaded, so that the
    streams it already runs stay on time; a stream once admitted is never cut for load.
    """

    def __init__(
        self,
        *,
        max_streams: int,
        max_per_owner: int,
        metrics: Metrics,
        load: LoadMonitor | None = None,
    ) -> None:
        """Args:
        max_streams: Streams this process holds at most.
        max_per_owner: Streams one owner holds at most in this process.
        metrics: Where refusals are counted (``chatstream_streams_refused_total``).
        load: The measured load that refuses sheddable calls; None admits by the counts alone.
        """
        self._max_streams = max_streams
        self._max_per_owner = max_per_owner
        self._load = load
        self._refused = metrics.streams_refused
        self._total = 0
        self._per_owner: Counter[str] = Counter()

    @property
    def in_flight(self) -> int:
        """Streams currently admitted."""
        return self._total

    @contextlib.contextmanager
    def admit(self, owner: str, *, sheddable: bool = False) -> Iterator[None]:
        """Holds one stream slot for ``owner`` for the duration of the block.

        Args:
            owner: Whose stream it is.
            sheddable: The call starts new work (a Chat), which the measured load may refuse;
                a watch of work already running is bounded by the counts only.

        Raises:
            ResourceExhaustedError: the server or the owner is at its limit; nothing was held.
            OverloadedError: the process is overloaded; nothing was held.
        """
        if self._total >= self._max_streams:
            self._count_refusal("server_limit")
            raise ResourceExhaustedError(
                "the server is handling too many streams; retry shortly",
                reason=ErrorReason.ERROR_REASON_TOO_MANY_STREAMS,
                metadata={"scope": "server", "limit": str(self._max_streams)},
            )
        if self._per_owner[owner] >= self._max_per_owner:
            self._count_refusal("owner_limit")
            raise ResourceExhaustedError(
                "too many concurrent streams for this owner; retry when one ends",
                reason=ErrorReason.ERROR_REASON_TOO_MANY_STREAMS,
                metadata={"scope": "owner", "limit": str(self._max_per_owner)},
            )
        if sheddable and self._load is not None and self._load.overload is not None:
            self._count_refusal("overload")
            raise OverloadedError(
                "the server is overloaded; retry shortly",
                retry_after=self._load.retry_after(),
                metadata={"scope": "server"},
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

    def _count_refusal(self, cause: str) -> None:
        self._refused.labels(cause).inc()
