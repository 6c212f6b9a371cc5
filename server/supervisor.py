"""`chatstream serve --workers N`: N serving processes on one port, restarted when they die.

One process cannot use much more than one core: grpc.aio's poller thread and the event
loop share one GIL. So the supervisor runs N ordinary single-process servers
(``python -m server serve --workers 1``). gRPC core binds its listening sockets with
SO_REUSEPORT on Linux (channel option ``grpc.so_reuseport``, on by default), so every
worker binds the same address and the kernel spreads new connections over them; a
connection, and every call on it, stays with the worker that accepted it.

The supervisor forwards SIGTERM and SIGINT to the workers and waits for their graceful
stop. A worker that dies is restarted; one that keeps dying right after its start makes the
supervisor stop the others and exit 1, so the orchestrator sees the failure instead of a
restart loop hidden inside the pod. If the supervisor itself is killed, the kernel sends
SIGTERM to every worker (``PR_SET_PDEATHSIG``). Linux only, for that signal and for
SO_REUSEPORT's balancing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from server import preflight, runtime
from server.config import Settings, SettingsError, variable_of

logger = logging.getLogger(__name__)

ENV_WORKERS: Final = "CHATSTREAM_WORKERS"
"""Serving processes `chatstream serve` runs; 1 (the default) serves in-process, without a supervisor."""
ENV_WORKER_INDEX: Final = "CHATSTREAM_WORKER_INDEX"
"""A worker's index, ``0`` to ``N-1``, set by the supervisor; its log lines carry it as ``worker``."""
ENV_METRICS_LISTEN: Final = variable_of("metrics_listen")

QUICK_EXIT_S: Final = 30.0
"""A worker that exits sooner than this after its start failed to start rather than crashed while serving.

Generous: a start takes a second or two, but several times that on a busy host, and a failed
start that took longer than this would escape the count below."""
MAX_QUICK_EXITS: Final = 3
"""Quick exits in a row of one worker after which the supervisor gives up and exits 1.

A failed start is almost always deterministic (a port held by another program, a file the
server cannot read), so more attempts would only delay the failure the orchestrator must see."""
RESTART_DELAY_S: Final = 0.1
"""Delay before restarting a worker that crashed after serving; doubled for each quick exit in a row."""
MAX_RESTART_DELAY_S: Final = 5.0

# Exit statuses of a worker that count as a clean stop once a stop was requested: a worker
# that the forwarded signal reached before it had installed its handlers had nothing to drain.
_CLEAN_EXITS: Final = frozenset({0, -signal.SIGTERM, -signal.SIGINT})

_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


def serve_workers(settings: Settings, *, workers: int) -> int:
    """Checks ``settings``, then runs ``workers`` serving processes until SIGTERM or SIGINT.

    Args:
        settings: What the workers will read from the same environment; checked here once.
        workers: How many serving processes; at least 2.

    Returns:
        The exit status: 0 when a requested stop ended every worker cleanly, else 1.

    Raises:
        SettingsError: a setting that cannot work with several processes, or that every
            worker would refuse at its start.
    """
    check_settings(settings, workers=workers)
    command = [sys.executable, "-m", "server", "serve", "--workers", "1"]
    environs = [
        worker_environ(
            os.environ,
            index=index,
            metrics_listen=metrics_listen(settings.observability.metrics_listen, index),
        )
        for index in range(workers)
    ]
    return runtime.run(Supervisor(command, environs).run())


def check_settings(settings: Settings, *, workers: int) -> None:
    """Refuses what breaks with several processes, and what every worker would refuse at its start.

    The second part runs the checks the server makes before it opens anything, in a
    process of its own (``server.preflight``): failing here once, with the server's own
    message, beats N workers failing until the supervisor gives up on them, and the
    supervisor stays free of what those checks import (gRPC, the SDK, the crypto stack).

    Raises:
        SettingsError: naming the setting.
    """
    if sys.platform != "linux":
        raise SettingsError(f"--workers {workers} needs Linux (SO_REUSEPORT balancing, PR_SET_PDEATHSIG)")
    _, sep, port = settings.server.listen.rpartition(":")
    if not sep or not port.isdigit():
        raise SettingsError(
            f"--workers {workers} needs CHATSTREAM_LISTEN as host:port, got {settings.server.listen!r}"
        )
    if int(port) == 0:
        raise SettingsError(
            f"--workers {workers} needs a fixed port in CHATSTREAM_LISTEN: with port 0 every worker "
            "would listen on a port of its own"
        )
    for index in range(workers):
        metrics_listen(settings.observability.metrics_listen, index)

    # The same environment as the workers', so the same settings.
    check = subprocess.run(  # noqa: S603 - our own interpreter and module, no input in the command
        [sys.executable, "-m", preflight.__name__], capture_output=True, text=True, check=False
    )
    if check.returncode == preflight.REFUSED:
        raise SettingsError(check.stderr.strip())
    if check.returncode != 0:
        raise RuntimeError(
            f"the server's start checks failed (exit status {check.returncode}):\n{check.stderr}"
        )


def metrics_listen(base: str, index: int) -> str:
    """Worker ``index``'s CHATSTREAM_METRICS_LISTEN: ``base``'s port plus ``index``.

    Empty (metrics off) stays empty, and port 0 stays 0 (each worker picks a free port).

    Raises:
        SettingsError: ``base`` is not ``host:port``, or a worker's port would pass 65535.
    """
    if not base:
        return base
    host, sep, port_text = base.rpartition(":")
    if not sep or not port_text.isdigit():
        raise SettingsError(f"{ENV_METRICS_LISTEN} must be host:port, got {base!r}")
    port = int(port_text)
    if port == 0:
        return base
    if port + index > 65535:
        raise SettingsError(f"{ENV_METRICS_LISTEN}: worker {index} would need port {port + index}")
    return f"{host}:{port + index}"


def worker_environ(environ: Mapping[str, str], *, index: int, metrics_listen: str) -> dict[str, str]:
    """The environment of worker ``index``: ``environ`` with its index and its own metrics address."""
    env = dict(environ)
    env[ENV_WORKER_INDEX] = str(index)
    if metrics_listen:
        env[ENV_METRICS_LISTEN] = metrics_listen
    return env


class Supervisor:
    """Keeps one process per environment running until SIGTERM or SIGINT, then stops them all."""

    def __init__(self, command: Sequence[str], environs: Sequence[Mapping[str, str]]) -> None:
        """Args:
        command: The worker's command line, the same for every worker.
        environs: One environment per worker.
        """
        self._command = tuple(command)
        self._environs = tuple(environs)
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._stop_signal = signal.SIGTERM
        self._gave_up = False
        self._final_statuses: dict[int, int] = {}
        self._preexec = _die_with_parent()

    async def run(self) -> int:
        """Starts every worker and supervises them until they have all stopped.

        Returns:
            0 when a requested stop ended every worker cleanly; 1 when a worker failed to
            stop cleanly or kept dying at its start.
        """
        # Not runtime.serve_until_signal: every signal, repeats included, is passed on to the
        # workers as it is (a second Ctrl-C reaches them too), and the supervisor runs until
        # its workers have exited rather than until the first signal.
        with runtime.on_stop_signals(self.stop):
            async with asyncio.TaskGroup() as tasks:
                for index in range(len(self._environs)):
                    tasks.create_task(self._keep_running(index), name=f"worker {index}")
        if self._gave_up:
            return 1
        unclean = {i: s for i, s in self._final_statuses.items() if s not in _CLEAN_EXITS}
        for index, status in sorted(unclean.items()):
            logger.error("worker %d %s while stopping", index, _describe(status))
        return 1 if unclean else 0

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Sends ``sig`` to every running worker and restarts none from now on.

        Each worker stops gracefully within its own drain and grace periods. Calling it
        again sends the signal again, which a worker that is already stopping ignores.
        """
        if not self._stopping.is_set():
            logger.info("stopping the workers on %s", sig.name)
            self._stop_signal = sig
            self._stopping.set()
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    async def _keep_running(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        quick_exits = 0
        while not self._stopping.is_set():
            started_at = loop.time()
            process = await asyncio.create_subprocess_exec(
                *self._command, env=self._environs[index], preexec_fn=self._preexec
            )
            self._processes[index] = process
            logger.info("worker %d started (pid %d)", index, process.pid)
            if self._stopping.is_set():
                # stop() ran while this worker was being spawned, and could not signal it.
                process.send_signal(self._stop_signal)
            status = await process.wait()
            uptime_s = loop.time() - started_at
            if self._stopping.is_set():
                self._final_statuses[index] = status
                logger.info("worker %d (pid %d) %s", index, process.pid, _describe(status))
                return
            quick_exits = quick_exits + 1 if uptime_s < QUICK_EXIT_S else 0
            if quick_exits >= MAX_QUICK_EXITS:
                logger.error(
                    "worker %d %s %.1fs after its start, %d times in a row; stopping the others",
                    index,
                    _describe(status),
                    uptime_s,
                    quick_exits,
                )
                self._gave_up = True
                self.stop()
                return
            delay_s = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2**quick_exits)
            logger.warning(
                "worker %d (pid %d) %s after %.1fs; restarting it in %.1fs",
                index,
                process.pid,
                _describe(status),
                uptime_s,
                delay_s,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._stopping.wait()


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel send SIGTERM to the worker when the supervisor dies.

    That covers SIGKILL and OOM kills of the supervisor, which it cannot forward. SIGTERM
    rather than SIGKILL, so orphaned workers still drain and record their turns. The
    signal follows the death of the thread that forked, so workers must be spawned from
    the event loop's thread, which lives as long as the supervisor.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    supervisor_pid = os.getpid()

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != supervisor_pid:
            # The supervisor died between fork() and prctl(): no signal will ever come.
            os._exit(1)

    return preexec


def _describe(status: int) -> str:
    if status >= 0:
        return f"exited with status {status}"
    with contextlib.suppress(ValueError):
        return f"was killed by {signal.Signals(-status).name}"
    return f"was killed by signal {-status}"
