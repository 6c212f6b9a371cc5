"""Coalescing: what is produced faster than it can be read is joined, never delayed.

A turn's producer numbers each delta as the model sends it and hands it over without
waiting. A reader that is idle gets it at once, so an idle stream holds nothing back.
Deltas that arrive while the reader is busy (a gRPC write in flight for a slow client or a
busy server, a Redis pipeline in flight for the live log) are joined into one: the text of
all, the number (``seq``) of the last, the offset of the first. Under load that cuts the
number of messages, and their per-message CPU, without adding latency when idle; numbers
then skip, which the proto allows. What the model produced is kept by the producer
(``server/production.py``), not here, so a turn that ends early stores all of it.

An outbox can be gated: then an event reaches the caller only once something durable holds
it, the turn's live log (its writer releases what each pipeline wrote) or the stored outcome
(the producer releases everything). A caller therefore never holds text that a turn whose
server died could not end with (server/leases.py builds it from the live log).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

from server.domain import Sequenced, TextDelta
from server.errors import ChatError


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
