"""`chatstream serve --workers N`: real supervisor and worker processes sharing one port.

Which worker served a chat is read from the outside: each worker has its own metrics port
(CHATSTREAM_METRICS_LISTEN's port plus its index), and its turn counter moves only for the
calls that reached it. Each chat uses a channel of its own, so a fresh TCP connection,
which the kernel hands to either worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

from chatstream import AsyncChatClient, TurnStatus
from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings
from server.supervisor import MAX_QUICK_EXITS
from tests.conftest import eventually
from tests.processes import ChatstreamProcess, free_port, settings_env, wait_for_port
from tests.terminal import run_cli

# Without it, channels to one target in one process share their connection.
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _free_port_pair() -> int:
    """A port that was free a moment ago, and so was the next one."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def _children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is ``pid``."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def _completed_turns(metrics_port: int) -> float:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            if sample.name == "chatstream_turns_total" and sample.labels.get("status") == "COMPLETED":
                return sample.value
    return 0.0


class _Workers:
    """A `chatstream serve` supervisor of two workers on a fixed port, each with its metrics port."""

    def __init__(self, settings: Settings, *, use_env: bool = False) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        metrics_base = _free_port_pair()
        self.metrics_ports = [metrics_base, metrics_base + 1]
        env = settings_env(
            settings,
            CHATSTREAM_LISTEN=self.address,
            CHATSTREAM_METRICS_LISTEN=f"127.0.0.1:{metrics_base}",
            CHATSTREAM_SHUTDOWN_GRACE_S="1",
        )
        if use_env:
            env["CHATSTREAM_WORKERS"] = "2"
        self.process = ChatstreamProcess(["serve"] if use_env else ["serve", "--workers", "2"], env)

    def wait_serving(self) -> set[int]:
        """Waits until both workers serve; returns their PIDs."""
        # A worker opens its metrics port once its gRPC port is bound and serving.
        for port in self.metrics_ports:
            wait_for_port(f"127.0.0.1:{port}", process=self.process)
        workers = _children(self.process.pid)
        assert len(workers) == 2, self.process.log()
        return workers

    async def chat_until_every_worker_served(self, *, max_chats: int = 40) -> int:
        """Chats over fresh connections until each worker has completed a turn; returns how many."""
        for chats in range(1, max_chats + 1):
            async with AsyncChatClient(self.address, options=_OWN_CONNECTION) as client:
                reply = await client.chat_reply(f"message {chats}")
            assert reply.status == TurnStatus.TURN_STATUS_COMPLETED
            assert reply.text == "Hello from the fake model."
            if all([await _completed_turns(port) for port in self.metrics_ports]):
                return chats
        raise AssertionError(f"{max_chats} connections never reached both workers:\n{self.process.log()}")

    async def completed_turns(self) -> list[float]:
        return [await _completed_turns(port) for port in self.metrics_ports]


# What a serving process needs and the supervisor, which lives as long as its workers, must
# not carry (issue 13: its memory): found by the supervisor's module names and, in the
# running supervisor, by the extension modules it has mapped.
_WORKERS_ONLY = frozenset(
    {
        "aiohttp",
        "anthropic",
        "asyncpg",
        "chatstream",
        "cryptography",
        "google",
        "grpc",
        "hiredis",
        "httpx2",
        "jwt",
        "msgspec",
        "opentelemetry",
        "prometheus_client",
        "pydantic",
        "pydantic_core",
        "redis",
        "sqlalchemy",
    }
)
_SUPERVISOR_IMPORTS = """
import json, sys
sys.argv = ["chatstream", "serve", "--workers", "2"]
from server.__main__ import cli
from server.config import Settings
from server.supervisor import Supervisor, check_settings
check_settings(Settings.from_env(), workers=2)
Supervisor(["true"], [{}, {}])
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def _site_packages_mapped(pid: int) -> set[str]:
    """The top-level packages of site-packages whose extension modules process ``pid`` has mapped."""
    site = sysconfig.get_paths()["purelib"] + "/"
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if path.startswith(site):
            found.add(path.removeprefix(site).split("/")[0].split(".")[0])
    return found


async def test_the_supervisor_imports_nothing_only_its_workers_need(settings: Settings) -> None:
    """It runs the server's start checks in a child, and imports neither gRPC, nor the stores, nor the SDK."""
    env = settings_env(settings, CHATSTREAM_LISTEN=f"127.0.0.1:{free_port()}")
    result = subprocess.run(
        [sys.executable, "-c", _SUPERVISOR_IMPORTS], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    imported = set(json.loads(result.stdout))
    assert {"server", "click", "uvloop"} <= imported
    assert not imported & _WORKERS_ONLY


async def test_two_workers_serve_on_one_port_and_sigterm_stops_them_all_with_exit_0(
    settings: Settings,
) -> None:
    workers = _Workers(settings)
    try:
        pids = workers.wait_serving()
        chats = await workers.chat_until_every_worker_served()
        # The running supervisor too, after its workers started and served.
        assert _site_packages_mapped(workers.process.pid) <= {"uvloop"}
        assert {"grpc", "pydantic_core"} <= set.union(*(_site_packages_mapped(pid) for pid in pids))

        async def every_turn_counted_once() -> bool:
            return sum(await workers.completed_turns()) == chats

        await eventually(every_turn_counted_once, what="both workers' counters to add up to the chats")

        assert workers.process.terminate(timeout_s=20) == 0, workers.process.log()
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        workers.process.close()


async def test_a_killed_worker_is_restarted_and_the_service_keeps_answering(settings: Settings) -> None:
    workers = _Workers(settings)
    try:
        victim, survivor = sorted(workers.wait_serving())
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            current = _children(workers.process.pid)
            return len(current) == 2 and survivor in current and victim not in current

        await eventually(replaced, timeout_s=15, what="the killed worker to be replaced")
        workers.wait_serving()
        # The new worker's counter starts at zero, so this proves it serves too.
        await workers.chat_until_every_worker_served()
        assert "was killed by SIGKILL" in workers.process.log()
        assert workers.process.terminate(timeout_s=20) == 0, workers.process.log()
    finally:
        workers.process.close()


async def test_sigkill_of_the_supervisor_stops_its_workers(settings: Settings) -> None:
    workers = _Workers(settings, use_env=True)
    try:
        pids = workers.wait_serving()
        workers.process.kill()

        async def all_gone() -> bool:
            return not [pid for pid in pids if _alive(pid)]

        await eventually(all_gone, timeout_s=15, what="the orphaned workers to exit")
    finally:
        workers.process.close()


async def test_workers_refuse_listen_port_0(settings: Settings) -> None:
    result = await run_cli(
        "serve", "--workers", "2", env=settings_env(settings, CHATSTREAM_LISTEN="127.0.0.1:0")
    )
    assert result.returncode == 1
    assert "port 0" in result.stderr


async def test_a_configuration_the_server_refuses_fails_before_any_worker_starts(
    settings: Settings,
) -> None:
    env = settings_env(
        settings,
        CHATSTREAM_LISTEN=f"127.0.0.1:{free_port()}",
        CHATSTREAM_AUTH_MODE="required",
        CHATSTREAM_LOG_LEVEL="INFO",
    )
    result = await run_cli("serve", "--workers", "2", env=env, timeout_s=15)
    assert result.returncode == 1
    assert "no credential is configured" in result.stderr
    assert "started (pid" not in result.stderr


async def test_workers_that_cannot_start_make_the_supervisor_exit_1_instead_of_restarting_forever(
    settings: Settings,
) -> None:
    # A socket without SO_REUSEPORT on the port: every worker's bind fails, as when another
    # program holds the port.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        address = f"127.0.0.1:{squatter.getsockname()[1]}"
        result = await run_cli(
            "serve", "--workers", "2", env=settings_env(settings, CHATSTREAM_LISTEN=address), timeout_s=90
        )
    assert result.returncode == 1, result.stderr
    assert f"{MAX_QUICK_EXITS} times in a row" in result.stderr
