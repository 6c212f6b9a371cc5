"""Coalescing: deltas produced faster than they are read are joined, and a busy process waits to join more.

A turn's producer numbers each delta as the model sends it and hands it over without
waiting. Deltas that arrive while the reader is busy (a gRPC write in flight for a slow client or a
busy server, a Redis pipeline in flight for the live log) are joined into one: the text of
all, the number (``seq``) of the last, the offset of the first. Numbers then skip, which the
proto allows. What the model produced is kept by the producer (``server/production.py``), not
here, so a turn that ends early stores all of it.

An outbox can be gated: then an event reaches the caller only once something durable holds
it, the turn's live log (its writer releases what each pipeline wrote) or the stored outcome
(the producer releases everything). A caller therefore never holds text that a turn whose
server died could not end with (server/leases.py builds it from the live log). What one release
covers, the reader joins into one TextDelta, so a caller gets at most one message per turn per
pipeline, and its number is that of a live-log entry (a resume point).

**The flush interval** (``FlushPolicy``) is what makes messages fuller under load. A stream's
deltas seldom arrive while its previous write is in flight, so joining under back-pressure
alone joins little, and every delta costs a gRPC message, a task step and a live-log entry.
So the live log's writer, the one place every gated outbox is released from, waits before
its next pipeline: not at all while the process is idle (an idle stream gets each delta at
once), and, as the measured load (server/load.py) nears the admission thresholds, up to
``CHATSTREAM_FLUSH_MAX_MS`` after the previous pipeline began. Each turn's deltas of that
interval then go in one live-log entry and reach the caller as one message. The bound is
small (20 ms: a stream's gap grows by up to that much, within a 100 ms budget, and it stays
under the admission lag threshold, see server/config.py), so it joins the deltas of streams
faster than one per interval; for slower ones (20 tokens/s: 50 ms apart) it saves pipelines
and wake-ups. With the live log off there is no such writer, and no interval: the outbox is
not gated and joins only what arrives while a write is in flight (one mechanism, not a
second timer per outbox).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Final

from server.domain import Sequenced, TextDelta
from server.errors import ChatError
from server.load import LoadMonitor

IDLE_HEADROOM: Final = 0.5
"""With at least this much of the admission thresholds left (both readings under half of theirs,
as the admission limit also counts "comfortable"), the flush interval is 0."""


def flush_interval(headroom: float, *, max_s: float) -> float:
    """How long the live log's writer lets events pile up, for a load ``headroom`` (server/load.py).

    0 while the headroom is at least ``IDLE_HEADROOM``; from there it grows linearly to ``max_s``
    at the thresholds (headroom 0), and stays there past them. Linear, so that a load that
    rises slowly lengthens messages slowly: each step trades a little latency for fewer writes,
    and the fewer writes lower the load the interval follows.
    """
    busy = (IDLE_HEADROOM - headroom) / IDLE_HEADROOM
    return max_s * min(1.0, max(0.0, busy))


class FlushPolicy:
    """The flush interval of this process now, from its ``LoadMonitor``'s last readings."""

    def __init__(self, load: LoadMonitor, *, max_s: float) -> None:
        """Args:
        load: The measured load; with both admission thresholds off it never says busy, and
            the interval stays 0.
        max_s: The interval at and past the thresholds (``CHATSTREAM_FLUSH_MAX_MS``); 0 turns it off.
        """
        self._load = load
        self._max_s = max_s if load.enabled else 0.0

    def interval(self) -> float:
        """Seconds to let pass after a pipeline began before the next one; 0 when idle."""
        if self._max_s <= 0:
            return 0.0
        return flush_interval(self._load.headroom(self._load.reading), max_s=self._max_s)


class Outbox:
    """The produced events on their way to the call that started the turn.

    Deltas that pile up while the call writes (a slow client, a busy server) are joined
    into one TextDelta with the number of the last and the offset of the first.
    """

    def __init__(self, *, gated: bool = False) -> None:
        """Args:
        gated: Hold each event until ``release`` covers its number (see the module docstring).
        """
        self._waiting: list[Sequenced] = []
        self._arrived = asyncio.Event()
        self._closed = False
        self._error: ChatError | None = None
        self._released: float = 0 if gated else math.inf

    def put(self, item: Sequenced) -> None:
        """Adds an event; never waits."""
        self._waiting.append(item)
        if item.seq <= self._released:
            # A gated event wakes the reader when it is released, not now: one wake per
            # release, not one per delta.
            self._arrived.set()

    def release(self, seq: int) -> None:
        """Events numbered up to ``seq`` may go to the reader: something durable holds them."""
        if seq > self._released:
            self._released = seq
            self._arrived.set()

    def release_all(self) -> None:
        """Every event may go to the reader, those to come too: the turn's outcome is stored."""
        self._released = math.inf
        self._arrived.set()

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    def close(self, error: ChatError | None = None) -> None:
        """No more events; the reader raises ``error`` once it has the rest that was released.

        Events never released by then are dropped: nothing durable holds them.
        """
        self._error = error
        self._closed = True
        self._arrived.set()

    async def items(self) -> AsyncIterator[Sequenced]:
        """The released events, joined under back-pressure; raises the failure the turn ended with."""
        while True:
            ready = self._ready()
            if not ready and not self._closed:
                await self._arrived.wait()
                self._arrived.clear()
                continue
            if ready:
                batch, self._waiting = self._waiting[:ready], self._waiting[ready:]
                for item in join_deltas(batch):
                    yield item
            else:
                if self._error is not None:
                    raise self._error
                return

    def _ready(self) -> int:
        """How many waiting events, from the first, are released."""
        ready = 0
        for item in self._waiting:
            if item.seq > self._released:
                break
            ready += 1
        return ready


def join_deltas(batch: list[Sequenced]) -> list[Sequenced]:
    """Consecutive TextDeltas as one: the text of all, the number of the last, the offset of the first."""
    joined: list[Sequenced] = []
    for item in batch:
        last = joined[-1] if joined else None
        if last is not None and isinstance(last.event, TextDelta) and isinstance(item.event, TextDelta):
            text = last.event.text + item.event.text
            joined[-1] = Sequenced(item.seq, TextDelta(text=text, offset=last.event.offset))
        else:
            joined.append(item)
    return joined
