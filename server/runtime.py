"""How the long-running commands run their event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` to completion on a uvloop event loop.

    uvloop's libuv-based loop makes each task step, socket read and write cheaper than
    the stdlib selector loop; on the hot path (one task step per relayed delta, several
    socket round trips per turn) that is CPU the server gets back for streams
    (docs/benchmarks.md). grpc.aio, asyncpg and redis-py all run on it unchanged.
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
