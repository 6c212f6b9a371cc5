"""Admission of streams: concurrency limits per owner and per server process, and the measured load."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from typing import Final

from server.errors import ErrorReason, OverloadedError, ResourceExhaustedError
from server.load import LoadMonitor
from server.metrics import Metrics

MIN_LOAD_LIMIT: Final = 16
"""The fewest streams the measured load limit allows, and where it starts."""
BACKOFF: Final = 0.9
"""Overloaded: the limit becomes this share of the streams held."""
FAST_GROWTH: Final = 2.0
"""Growth per window of a limit calls press against, while both readings are under half their thresholds."""
SLOW_GROWTH: Final = 1.1
"""... and while either is closer to its threshold than that."""


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

    The readings lag what a new stream costs (its first tokens come after its start), so a
    burst of calls would all be admitted before they show. So the load also keeps a count,
    the streams the measured load allows, learnt as TCP learns its window.
    Once a window, if the process was overloaded it becomes 90 % of the streams held; if
    calls pressed against it and the load is fine, it grows, doubling while both readings
    are under half their thresholds, by 10 % nearer to them. It starts at
    ``MIN_LOAD_LIMIT`` and never passes ``max_streams``.
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
        load: The measured load that refuses sheddable calls; None, or one with both signals
            off, admits by the counts alone.
        """
        self._max_streams = max_streams
        self._max_per_owner = max_per_owner
        self._load = load if load is not None and load.enabled else None
        self._refused = metrics.streams_refused
        self._limit_gauge = metrics.admission_limit
        self._total = 0
        self._per_owner: Counter[str] = Counter()
        self._load_limit = float(min(MIN_LOAD_LIMIT, max_streams))
        self._pressed = False
        """Whether a call found the load limit reached (or nearly) since the last adjustment."""
        self._adjusted_at = time.monotonic()
        self._limit_gauge.set(self._load_limit if self._load is not None else max_streams)

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
        if sheddable and self._load is not None and not self._load_admits(self._load):
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

    def _load_admits(self, load: LoadMonitor) -> bool:
        """Whether the measured load takes one more stream; adjusts the load limit once a window."""
        now = time.monotonic()
        if now - self._adjusted_at >= load.window_s:
            self._adjust(load)
            self._adjusted_at = now
        if self._total + 1 >= self._load_limit * 0.9:
            self._pressed = True
        return load.overload is None and self._total < int(self._load_limit)

    def _adjust(self, load: LoadMonitor) -> None:
        reading = load.reading
        if reading.overload is not None:
            limit = max(MIN_LOAD_LIMIT, BACKOFF * min(self._load_limit, self._total))
        elif self._pressed:
            growth = FAST_GROWTH if load.headroom(reading) >= 0.5 else SLOW_GROWTH
            limit = self._load_limit * growth + 1
        else:
            limit = self._load_limit
        self._load_limit = min(float(self._max_streams), limit)
        self._pressed = False
        self._limit_gauge.set(self._load_limit)

    def _count_refusal(self, cause: str) -> None:
        self._refused.labels(cause).inc()
