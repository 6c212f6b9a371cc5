"""Coalescing on its own: joined under back-pressure, nothing held when idle, nothing lost or reordered."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from server import live
from server.coalescer import Outbox, join_deltas
from server.domain import Sequenced, TextDelta, TurnCompleted, TurnStarted, TurnStatus, Usage
from server.errors import UpstreamUnavailableError


def _delta(seq: int, text: str, offset: int) -> Sequenced:
    return Sequenced(seq, TextDelta(text=text, offset=offset))


def _texts(items: list[Sequenced]) -> list[tuple[int, str, int]]:
    return [(i.seq, i.event.text, i.event.offset) for i in items if isinstance(i.event, TextDelta)]


async def test_an_idle_reader_gets_each_event_at_once() -> None:
    outbox = Outbox()
    items = outbox.items()
    offset = 0
    for seq, word in enumerate(("one", "two", "three"), start=2):
        outbox.put(_delta(seq, word, offset))
        offset += len(word)
        # The reader is idle: the delta is there on the very next step, alone and unchanged.
        item = await asyncio.wait_for(anext(items), timeout=1)
        assert _texts([item]) == [(seq, word, offset - len(word))]
    outbox.close()
    assert [i async for i in items] == []


async def test_deltas_that_arrive_during_a_write_are_joined_with_the_last_seq_and_first_offset() -> None:
    outbox = Outbox()
    written: list[Sequenced] = []
    write_started = asyncio.Event()
    release_write = asyncio.Event()

    async def slow_writer() -> None:
        async for item in outbox.items():
            written.append(item)
            write_started.set()
            await release_write.wait()
            release_write.clear()

    writer = asyncio.create_task(slow_writer())
    outbox.put(_delta(2, "a", 0))
    await write_started.wait()
    # While "a" is being written, three more deltas pile up.
    for seq, (text, offset) in enumerate((("b", 1), ("c", 2), ("d", 3)), start=3):
        outbox.put(_delta(seq, text, offset))
    write_started.clear()
    release_write.set()
    await write_started.wait()
    outbox.close()
    release_write.set()
    await writer
    assert _texts(written) == [(2, "a", 0), (5, "bcd", 1)]


def test_only_consecutive_deltas_are_joined_and_order_is_kept() -> None:
    started = Sequenced(1, TurnStarted(conversation_id=uuid.uuid4(), turn_id=uuid.uuid4()))
    done = Sequenced(
        5, TurnCompleted(status=TurnStatus.COMPLETED, stop_reason="end_turn", usage=Usage(), model="m")
    )
    joined = join_deltas([started, _delta(2, "x", 0), _delta(3, "y", 1), _delta(4, "z", 2), done])
    assert joined[0] is started
    assert _texts(joined) == [(4, "xyz", 0)]
    assert joined[-1] is done
    assert "".join(i.event.text for i in joined if isinstance(i.event, TextDelta)) == "xyz"


async def test_a_failure_reaches_the_reader_after_the_events_before_it() -> None:
    outbox = Outbox()
    outbox.put(_delta(2, "partial", 0))
    outbox.close(UpstreamUnavailableError("the model is temporarily unavailable"))
    items = outbox.items()
    assert _texts([await anext(items)]) == [(2, "partial", 0)]
    with pytest.raises(UpstreamUnavailableError):
        await anext(items)
    assert outbox.closed


async def test_a_gated_outbox_holds_each_event_until_it_is_released() -> None:
    """What the live log does not hold yet, the caller does not get (server/production.py)."""
    outbox = Outbox(gated=True)
    items = outbox.items()
    outbox.put(_delta(2, "a", 0))
    outbox.put(_delta(3, "b", 1))
    outbox.put(_delta(4, "c", 2))
    reading = asyncio.ensure_future(anext(items))
    await asyncio.sleep(0)
    assert not reading.done()
    outbox.release(3)
    assert _texts([await asyncio.wait_for(reading, timeout=1)]) == [(3, "ab", 0)]
    outbox.release_all()  # the outcome is stored: everything may go, what comes later too
    outbox.put(_delta(5, "d", 3))
    outbox.close()
    assert _texts([i async for i in items]) == [(5, "cd", 2)]


async def test_a_gated_outbox_drops_what_was_never_released_when_it_closes() -> None:
    outbox = Outbox(gated=True)
    outbox.put(_delta(2, "logged", 0))
    outbox.put(_delta(3, "lost", 6))
    outbox.release(2)
    outbox.close(UpstreamUnavailableError("the model is temporarily unavailable"))
    items = outbox.items()
    assert _texts([await anext(items)]) == [(2, "logged", 0)]
    with pytest.raises(UpstreamUnavailableError):
        await anext(items)


def test_the_text_of_a_live_log_stops_at_a_hole_and_never_repeats() -> None:
    """A log that lost an entry in a Redis failover, or holds a retried pipeline's text twice."""
    whole = [_delta(2, "one ", 0), _delta(3, "two ", 4), _delta(5, "three", 8)]
    assert live.text_of(whole) == "one two three"
    assert live.text_of([_delta(2, "one ", 0), _delta(5, "three", 8)]) == "one "
    assert live.text_of([_delta(3, "two ", 4)]) == ""
    overlapping = [_delta(2, "one ", 0), _delta(3, "two ", 4), _delta(4, "two three", 4)]
    assert live.text_of(overlapping) == "one two three"
