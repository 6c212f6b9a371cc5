"""`chatstream dev` as a new user runs it, poked with the real grpcurl binary through reflection."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

GRPCURL = Path(sys.executable).parent / "grpcurl"
# The banner prints the dev API key inside the grpcurl flag a user would copy.
_AUTH_FLAG = re.compile(r"-H 'authorization: Bearer (\S+)'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class DevServer:
    """Where `chatstream dev` listens, and the API key its banner printed."""

    address: str
    api_key: str

    @property
    def auth(self) -> list[str]:
        return ["-H", f"authorization: Bearer {self.api_key}"]


@pytest.fixture(scope="module")
def dev_server() -> Iterator[DevServer]:
    address = f"127.0.0.1:{_free_port()}"
    data_dir = Path(tempfile.mkdtemp(prefix="cs-dev-", dir="/tmp"))  # short: it holds Unix sockets
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CHATSTREAM_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "dev", "--listen", address, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    output: list[str] = []
    assert process.stdout is not None
    # A thread drains the pipe: the child must never block on a full pipe, and a
    # buffered readline() does not mix with select().
    reader = threading.Thread(target=lambda: output.extend(process.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not (keys := [m[1] for line in list(output) if (m := _AUTH_FLAG.search(line))]):
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError("dev server did not start:\n" + "".join(output))
            time.sleep(0.1)
        assert any("chatstream dev server on" in line for line in output)
        assert any("DEMO MODEL" in line for line in output), "the demo-model banner must say so loudly"
        yield DevServer(address=address, api_key=keys[0])
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=30)
        finally:
            process.kill()
            reader.join(timeout=5)
            process.stdout.close()
            shutil.rmtree(data_dir, ignore_errors=True)
        assert code == 0, "dev server did not stop cleanly on SIGINT"


def _run_grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=30)


def _grpcurl(*args: str) -> str:
    result = _run_grpcurl(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_the_service_through_reflection_without_a_key(dev_server: DevServer) -> None:
    services = _grpcurl(dev_server.address, "list").split()
    assert "chatstream.v1.ChatService" in services
    assert "grpc.health.v1.Health" in services
    description = _grpcurl(dev_server.address, "describe", "chatstream.v1.ChatService")
    assert (
        "rpc Chat ( .chatstream.v1.ChatRequest ) returns ( stream .chatstream.v1.ChatResponse )"
        in description
    )


def test_grpcurl_streams_a_chat_reply_from_the_dev_server(dev_server: DevServer) -> None:
    out = _grpcurl(
        *dev_server.auth, "-d", '{"text":"hello"}', dev_server.address, "chatstream.v1.ChatService/Chat"
    )
    decoder = json.JSONDecoder()
    events = []
    index = 0
    while index < len(out):
        if out[index].isspace():
            index += 1
            continue
        event, index = decoder.raw_decode(out, index)
        events.append(event["event"])
    assert "started" in events[0]
    deltas = [e["text_delta"]["text"] for e in events if "text_delta" in e]
    assert len(deltas) >= 2
    assert "You said: hello" in "".join(deltas)
    assert events[-1]["completed"]["status"] == "TURN_STATUS_COMPLETED"
    health = _grpcurl(dev_server.address, "grpc.health.v1.Health/Check")
    assert "SERVING" in health


def test_grpcurl_without_the_dev_key_is_unauthenticated(dev_server: DevServer) -> None:
    result = _run_grpcurl("-d", '{"text":"hello"}', dev_server.address, "chatstream.v1.ChatService/Chat")
    assert result.returncode != 0
    assert "Unauthenticated" in result.stderr
    assert "CREDENTIALS_MISSING" in result.stderr
