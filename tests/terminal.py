"""Runs `python -m server ...` as a user would, in a pseudo-terminal or with pipes, without blocking the loop.

Both helpers are asynchronous on purpose: the `server` fixture serves on the test's own event
loop, so a blocking read of the child's output would stop the very server the child talks to.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import pty
import re
import subprocess
import sys
import termios
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

# The child makes the pty its controlling terminal before running the CLI, so that Ctrl-C
# typed into the pty reaches it as SIGINT, as in a real terminal. Doing this in the child
# after exec avoids forking this multi-threaded test process (pty.fork / pexpect would).
_BOOT: Final = (
    "import fcntl, runpy, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "runpy.run_module('server', run_name='__main__', alter_sys=True)"
)


@dataclass(frozen=True, slots=True)
class Completed:
    """What a finished CLI run left behind."""

    returncode: int
    stdout: str
    stderr: str


async def run_cli(
    *args: str, env: Mapping[str, str], stdin: str | None = None, timeout_s: float = 30
) -> Completed:
    """Runs `python -m server ARGS` with pipes (so stdin is not a terminal) and waits for it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(None if stdin is None else stdin.encode()), timeout_s
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())


class Terminal:
    """`python -m server ARGS` on a pseudo-terminal of its own: type into it, wait for output."""

    def __init__(self, *args: str, env: Mapping[str, str]) -> None:
        """Starts the child; call from a coroutine (output is read by the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._master, slave = pty.openpty()
        termios.tcsetwinsize(self._master, (40, 200))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "TERM": "dumb"},  # no colours or cursor tricks in what we match
            start_new_session=True,
        )
        os.close(slave)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.output = ""
        self._position = 0
        self._eof = False
        self._changed = asyncio.Event()
        self._loop.add_reader(self._master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: the child has exited and closed its side
            data = b""
        if data:
            self.output += self._decoder.decode(data)
        else:
            self._eof = True
            self._loop.remove_reader(self._master)
        self._changed.set()

    async def expect(self, pattern: str, *, timeout_s: float = 15) -> re.Match[str]:
        """Waits for ``pattern`` (a regex) in the output after the previous match; returns the match."""
        regex = re.compile(pattern)
        try:
            async with asyncio.timeout(timeout_s):
                while (match := regex.search(self.output, self._position)) is None:
                    if self._eof:
                        raise AssertionError(f"the CLI exited before {pattern!r}; output:\n{self.output}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} within {timeout_s}s; output:\n{self.output}") from None
        self._position = match.end()
        return match

    def send(self, keys: str) -> None:
        """Types ``keys``: ``\\r`` is Enter, ``\\x03`` Ctrl-C, ``\\x04`` Ctrl-D."""
        os.write(self._master, keys.encode())

    async def wait(self, *, timeout_s: float = 15) -> int:
        """Waits for the child to exit; returns its exit status."""
        deadline = time.monotonic() + timeout_s
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the CLI is still running after {timeout_s}s; output:\n{self.output}")
            await asyncio.sleep(0.02)
        return code

    def close(self) -> None:
        """Kills the child if it still runs and releases the terminal."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if not self._eof:
            self._loop.remove_reader(self._master)
            self._eof = True
        os.close(self._master)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
