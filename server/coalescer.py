"""Coalescing: what is produced faster than it can be read is joined, never delayed.

A turn's producer numbers each delta as the model sends it and hands it over without
waiting. A reader that is idle gets it at once, so an idle stream holds nothing back.
Deltas that arrive while the reader is busy (a gRPC write in flight for a slow client or a
busy server, a Redis pipeline in flight for the live log) are joined into one: the text of
all, the number (``seq``) of the last, the offset of the first. Under load that cuts the
number of messages, and their per-message CPU, without adding latency when idle; numbers
then skip, which the proto allows. What the model produced is kept by the producer
(``server/production.py``), not here, so a turn that ends early stores all of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.domain import Sequenced, TextDelta
from server.errors import ChatError


class Outbox:
    """The produced events on their way to the call that started the turn.

    Deltas that pile up while the call writes (a slow client, a busy server) are joined
    into one TextDelta with the number of the last and the offset of the first.
    """

    def __init__(self) -> None:
        self._waiting: list[Sequenced] = []
        self._arrived = asyncio.Event()
        self._closed = False
        self._error: ChatError | None = None

    def put(self, item: Sequenced) -> None:
        """Adds an event; never waits."""
        self._waiting.append(item)
        self._arrived.set()

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    def close(self, error: ChatError | None = None) -> None:
        """No more events; the reader raises ``error`` once it has the rest."""
        self._error = error
        self._closed = True
        self._arrived.set()

    async def items(self) -> AsyncIterator[Sequenced]:
        """The events, joined under back-pressure; raises the failure the turn ended with."""
        while True:
            if not self._waiting and not self._closed:
                await self._arrived.wait()
                self._arrived.clear()
            if self._waiting:
                batch, self._waiting = self._waiting, []
                for item in join_deltas(batch):
                    yield item
            elif self._closed:
                if self._error is not None:
                    raise self._error
                return


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
