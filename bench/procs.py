"""Child processes of the harness: started in their own process groups, always stopped, measured."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from bench.common import ROOT


@dataclass(slots=True)
class Child:
    """One child process and its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


class Procs:
    """Starts children in new sessions and stops every group it started, newest first.

    Each child leads its own process group, so a Ctrl-C on the terminal reaches only the harness,
    which then stops the children itself (SIGTERM to the group, SIGKILL after a grace period).
    """

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._children: list[Child] = []
        self._logs: list[IO[bytes]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout_pipe: bool = False,
    ) -> Child:
        log_path = self._log_dir / f"{name}.log"
        log = log_path.open("ab")
        self._logs.append(log)
        popen = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=dict(env),
            stdin=stdin,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            start_new_session=True,
        )
        child = Child(name=name, popen=popen, log_path=log_path)
        self._children.append(child)
        return child

    def stop(self, child: Child, grace_s: float = 10.0) -> int | None:
        """SIGTERM to the child's group, SIGKILL after ``grace_s``; returns the exit code."""
        if child.alive():
            _signal_group(child.pid, signal.SIGTERM)
            try:
                child.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(child.pid, signal.SIGKILL)
                child.popen.wait(5)
        # Stragglers of the group (a child's own children) go too.
        _signal_group(child.pid, signal.SIGKILL)
        if child in self._children:
            self._children.remove(child)
        return child.popen.returncode

    def stop_all(self) -> None:
        for child in reversed(list(self._children)):
            with contextlib.suppress(Exception):
                self.stop(child, grace_s=5.0)
        for log in self._logs:
            with contextlib.suppress(OSError):
                log.close()
        self._logs.clear()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_until(check: Callable[[], bool], *, timeout_s: float, what: str, child: Child | None = None) -> None:
    """Polls ``check`` until it is true; raises with the child's log tail on timeout or exit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(
                f"{what}: {child.name} exited with {child.popen.returncode}\n{log_tail(child)}"
            )
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {timeout_s:.0f}s\n{log_tail(child) if child else ''}")


def log_tail(child: Child, lines: int = 30) -> str:
    if child.log_path is None or not child.log_path.exists():
        return ""
    return "\n".join(child.log_path.read_text(errors="replace").splitlines()[-lines:])


def tree_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) of these processes, their live descendants, and the children
    they have already reaped (PostgreSQL's backends come and go)."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            total += times.children_user + times.children_system
            family = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        for p in family:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                total += times.user + times.system
    return total


def machine_busy_s() -> float:
    """CPU seconds this machine's processes have run since boot (all cores; not steal or idle)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def listener_pid(path: str) -> int | None:
    """The pid of the process listening on a Unix socket ``path`` (embedded PostgreSQL, Redis)."""
    for conn in psutil.net_connections(kind="unix"):
        if conn.laddr == path and conn.pid:
            return int(conn.pid)
    return None


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its live descendants (``serve --workers N`` is N+1 processes)."""
    root = psutil.Process(pid)
    total = 0
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


@dataclass(slots=True)
class Sampler:
    """Samples CPU of named process groups at given instants, and RSS of one process tree, in a thread."""

    groups: dict[str, list[int]]
    rss_pid: int | None = None
    watch: list[subprocess.Popen[bytes]] = field(default_factory=list)
    """When one of these exits, every pending mark is taken at once (its CPU would be lost)."""
    period_s: float = 0.25
    marks: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_max: int = 0
    rss_last: int = 0
    _pending: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def mark_at(self, when: float, label: str) -> None:
        """Records every group's CPU seconds at monotonic time ``when`` (to within ``period_s``)."""
        self._pending.append((when, label))
        self._pending.sort()

    def mark_now(self, label: str) -> None:
        mark = {name: tree_cpu_s(pids) for name, pids in self.groups.items()}
        mark["_machine"] = machine_busy_s()
        mark["_t"] = time.monotonic()
        self.marks[label] = mark

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for _, label in self._pending:  # instants never reached: take them now
            self.mark_now(label)
        self._pending.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            if self._pending and any(p.poll() is not None for p in self.watch):
                now = float("inf")
            while self._pending and self._pending[0][0] <= now:
                _, label = self._pending.pop(0)
                self.mark_now(label)
            if self.rss_pid is not None:
                with contextlib.suppress(psutil.Error):
                    self.rss_last = tree_rss(self.rss_pid)
                    self.rss_max = max(self.rss_max, self.rss_last)
            wait = self.period_s
            if self._pending:
                wait = min(wait, max(self._pending[0][0] - time.monotonic(), 0.001))
            self._stop.wait(wait)

    def cpu_between(self, start: str, end: str) -> dict[str, float]:
        a, b = self.marks.get(start), self.marks.get(end)
        if a is None or b is None:
            return {}
        out = {name: round(b[name] - a[name], 3) for name in self.groups}
        # Everything else the machine did meanwhile (another engineer's test run, say): a run
        # with a large "other" was measured on a busy machine.
        out["other"] = round(b["_machine"] - a["_machine"] - sum(out.values()), 3)
        out["available"] = round((b["_t"] - a["_t"]) * (psutil.cpu_count() or 1), 3)
        return out
