"""The delta coalescer on its own: joined under back-pressure, nothing held when idle, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib

from server.coalescer import DeltaCoalescer


async def test_an_idle_stream_hands_over_each_delta_at_once() -> None:
    coalescer = DeltaCoalescer()
    batches = coalescer.batches()
    for word in ("one", "two", "three"):
        coalescer.put(word)
        # The writer is idle: the delta is there on the very next step, alone.
        assert await asyncio.wait_for(anext(batches), timeout=1) == word
    coalescer.close()
    assert [b async for b in batches] == []


async def test_deltas_that_arrive_during_a_write_are_joined_into_the_next_batch() -> None:
    coalescer = DeltaCoalescer()
    written: list[str] = []
    write_started = asyncio.Event()
    release_write = asyncio.Event()

    async def slow_writer() -> None:
        async for text in coalescer.batches():
            written.append(text)
            write_started.set()
            await release_write.wait()
            release_write.clear()

    writer = asyncio.create_task(slow_writer())
    coalescer.put("a")
    await write_started.wait()
    # While "a" is being written, three more deltas pile up.
    for text in ("b", "c", "d"):
        coalescer.put(text)
    write_started.clear()
    release_write.set()
    await write_started.wait()
    coalescer.close()
    release_write.set()
    await writer
    assert written == ["a", "bcd"]
    assert coalescer.produced == "abcd"


async def test_text_put_but_never_written_is_accounted_for_when_the_writer_is_cancelled() -> None:
    coalescer = DeltaCoalescer()
    written: list[str] = []
    stuck = asyncio.Event()

    async def writer_that_blocks() -> None:
        async for text in coalescer.batches():
            written.append(text)
            await stuck.wait()  # a client that stopped reading

    writer = asyncio.create_task(writer_that_blocks())
    coalescer.put("part one, ")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    coalescer.put("part two")
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    assert written == ["part one, "]
    assert coalescer.produced == "part one, part two"
    assert coalescer.started


async def test_close_ends_the_batches_after_what_is_waiting() -> None:
    coalescer = DeltaCoalescer()
    assert not coalescer.started
    coalescer.put("x")
    coalescer.put("y")
    coalescer.close()
    assert [b async for b in coalescer.batches()] == ["xy"]
