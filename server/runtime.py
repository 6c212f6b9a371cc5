"""How the long-running commands run: their event loop, and a component served until a stop signal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Final, Protocol, TypeVar

import uvloop

logger = logging.getLogger(__name__)

T = TypeVar("T")

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
"""What asks a long-running command to stop gracefully: the orchestrator's SIGTERM, a person's Ctrl-C."""


class Component(Protocol):
    """Something that runs in the background between ``start()`` and ``stop()``: a server, a consumer."""

    async def start(self) -> None:
        """Acquires what it needs and starts running; raises if it cannot."""

    async def stop(self) -> None:
        """Stops gracefully and releases everything; idempotent, and safe after a failed start.

        Raises the error that ended the component, if one did.
        """

    async def wait_stopped(self) -> None:
        """Returns once it has stopped: after ``stop()``, or by itself (failing)."""


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` to completion on a uvloop event loop.

    uvloop's libuv-based loop makes each task step, socket read and write cheaper than
    the stdlib selector loop; on the hot path (one task step per relayed delta, several
    socket round trips per turn) that is CPU the server gets back for streams
    (docs/benchmarks.md). grpc.aio, asyncpg and redis-py all run on it; redis-py needs one guard
    for a write after a connection reset (server/redis_client.py).
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def freeze_start_up_heap() -> None:
    """Takes everything alive before a component starts out of the cyclic collector's sight.

    A serving process's heap is mostly what start-up made: modules, protobuf descriptors,
    the SDKs' classes. Each full (generation 2) collection walked all of it: under P6's
    load (600 streams at 20 tokens/s) that was 100-200 ms with the loop stopped, every
    few seconds, and every stream saw the pause as a gap (docs/benchmarks.md, "garbage
    collector pauses"). ``gc.freeze`` moves those objects to a permanent generation that
    no collection visits; what calls and turns allocate later is collected as before
    (``serve_until_signal`` also freezes what the component's start made). The collection
    first leaves no import garbage frozen in.
    """
    gc.collect()
    gc.freeze()
    logger.debug("froze %d start-up objects out of the garbage collector's passes", gc.get_freeze_count())


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[signal.Signals], None]) -> Iterator[None]:
    """Calls ``handler(sig)`` on the running loop for every SIGTERM or SIGINT while the block runs.

    Every signal is passed on, repeats included: a handler may escalate on the second one.
    """
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def serve_until_signal(component: Component) -> None:
    """Starts ``component``, runs it until SIGTERM or SIGINT, then stops it gracefully.

    The signals are caught from before the start, so one that arrives while the component
    starts stops it once started rather than killing the process half-way. ``stop()`` runs
    however this ends: after a signal, after a failed start (releasing what was acquired),
    or after the component stopped by itself; the error that ended it is raised here.
    """
    requested = asyncio.Event()

    def request_stop(sig: signal.Signals) -> None:
        if not requested.is_set():
            logger.info("stopping on %s", sig.name)
        requested.set()

    # Before start: the collection stops the loop for a moment, which the load monitor
    # (server/load.py) would read as overload and shed the first calls for.
    freeze_start_up_heap()
    with on_stop_signals(request_stop):
        try:
            await component.start()
            # And what start made (clients, pools, the gRPC server): no second collection,
            # since gc.freeze alone only moves the collector's lists and does not stop the loop.
            gc.freeze()
            stopped = asyncio.create_task(component.wait_stopped(), name="component")
            signalled = asyncio.create_task(requested.wait(), name="stop signal")
            await asyncio.wait({stopped, signalled}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            signalled.cancel()
        finally:
            await component.stop()
