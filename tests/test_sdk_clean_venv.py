"""The SDK as a user gets it: `chatstream-client` in a fresh virtual environment, nothing else.

The wheel is built from clients/python and installed (not editable) into a new venv, which
pip fills with the declared dependencies only. A script run by that venv's Python, in
isolated mode and away from the repository, then drives the real server through both
clients; the same script is type-checked with `mypy --strict` against the installed
package, as a user's code would be.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from server.app import ChatServer
from tests.fake_anthropic import FakeAnthropic, Stream

ROOT = Path(__file__).resolve().parents[1]
SDK = ROOT / "clients" / "python"
SDK_DEPENDENCIES = {"grpcio", "grpcio-status", "protobuf"}
SERVER_ONLY = {"chatstream", "sqlalchemy", "asyncpg", "redis", "anthropic", "alembic", "click"}
# What a user adds for `mypy --strict`: the stubs of the SDK's own dependencies.
TYPING_STUBS = ("types-grpcio", "types-protobuf")

# Run by the clean venv's Python with the server's address as its argument; prints one JSON
# object. Typed: test_sdk_usage_type_checks_against_the_installed_package runs mypy on it.
USAGE_SCRIPT = '''\
"""Uses the installed chatstream-client the way a service would; prints what it saw as JSON."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from datetime import timedelta
from importlib import metadata, resources

import chatstream
import grpc
from chatstream import AsyncChatClient, ChatClient, ChatClientError, ChatReply, TurnEvent, TurnStatus

TIMEOUT = timedelta(seconds=10)
CHAT_TIMEOUT = timedelta(seconds=30)


def reply_summary(reply: ChatReply) -> dict[str, object]:
    return {
        "text": reply.text,
        "status": TurnStatus.Name(reply.status),
        "conversation": reply.conversation,
        "output_tokens": reply.usage.output_tokens,
    }


def stream_summary(events: list[TurnEvent]) -> dict[str, object]:
    return {
        "kinds": [event.WhichOneof("kind") for event in events],
        "seqs": [event.seq for event in events],
        "conversation": events[0].started.conversation,
        "text": "".join(event.text_delta.text for event in events if event.HasField("text_delta")),
    }


def error_summary(error: ChatClientError) -> dict[str, object]:
    code: grpc.StatusCode = error.code
    return {
        "code": code.name,
        "reason": error.reason,
        "domain": error.domain,
        "metadata": dict(error.metadata),
        "fields": [field for field, _description in error.field_violations],
    }


def run_sync(address: str) -> dict[str, object]:
    result: dict[str, object] = {}
    with ChatClient(address, timeout=TIMEOUT, chat_timeout=CHAT_TIMEOUT) as client:
        reply = client.chat_reply("Hello from the blocking client")
        result["reply"] = reply_summary(reply)
        events = list(client.chat("And a stream, please", conversation=reply.conversation))
        result["stream"] = stream_summary(events)
        created = client.create_conversation()
        result["created"] = created.name
        result["got"] = client.get_conversation(created.name).name
        result["listed"] = [conversation.name for conversation in client.list_conversations()]
        client.delete_conversation(created.name)
        try:
            client.get_conversation(created.name)
        except ChatClientError as error:
            result["not_found"] = error_summary(error)
        try:
            client.chat_reply("   ")
        except ChatClientError as error:
            result["invalid"] = error_summary(error)
    return result


async def run_async(address: str) -> dict[str, object]:
    result: dict[str, object] = {}
    async with AsyncChatClient(address, timeout=TIMEOUT, chat_timeout=CHAT_TIMEOUT) as client:
        reply = await client.chat_reply("Hello from the asyncio client")
        result["reply"] = reply_summary(reply)
        stream = client.chat("And a stream, please", conversation=reply.conversation)
        events = [event async for event in stream]
        result["stream"] = stream_summary(events)
        created = await client.create_conversation()
        result["created"] = created.name
        result["got"] = (await client.get_conversation(created.name)).name
        result["listed"] = [conversation.name async for conversation in client.list_conversations()]
        await client.delete_conversation(created.name)
        try:
            await client.get_conversation(created.name)
        except ChatClientError as error:
            result["not_found"] = error_summary(error)
        try:
            await client.chat_reply("   ")
        except ChatClientError as error:
            result["invalid"] = error_summary(error)
    return result


def package() -> dict[str, object]:
    files = resources.files("chatstream")
    return {
        "file": chatstream.__file__,
        "prefix": sys.prefix,
        "version": metadata.version("chatstream-client"),
        "py_typed": files.joinpath("py.typed").is_file(),
        "stubs": files.joinpath("v1", "chat_service_pb2.pyi").is_file(),
        "server_importable": importlib.util.find_spec("server") is not None,
        "sqlalchemy_importable": importlib.util.find_spec("sqlalchemy") is not None,
    }


def main() -> None:
    address = sys.argv[1]
    sync_result = run_sync(address)
    async_result = asyncio.run(run_async(address))
    print(json.dumps({"package": package(), "sync": sync_result, "async": async_result}))


if __name__ == "__main__":
    main()
'''


@dataclass(frozen=True, slots=True)
class CleanVenv:
    """A fresh virtual environment with the SDK wheel installed, and what pip put in it."""

    root: Path
    python: Path
    site_packages: Path
    installed: dict[str, str]
    """Normalized distribution name -> version, listed by pip right after the install."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip(*args: str | Path) -> subprocess.CompletedProcess[str]:
    # The project's pip drives the clean venv (--python), which so needs no pip of its own.
    result = subprocess.run(
        [sys.executable, "-m", "pip", *(str(a) for a in args)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> CleanVenv:
    root = tmp_path_factory.mktemp("sdk-clean-venv")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = root / "src"
    shutil.copytree(SDK, source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", root / "dist", source)
    (wheel,) = (root / "dist").glob("chatstream_client-*.whl")

    venv.EnvBuilder(with_pip=False, clear=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    # Dependencies come from the package index (or pip's cache) as for any user; wheels only.
    _pip("--python", python, "install", "--quiet", "--only-binary=:all:", wheel)
    listed = json.loads(_pip("--python", python, "list", "--format=json").stdout)
    site_packages = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return CleanVenv(
        root=root,
        python=python,
        site_packages=Path(site_packages),
        installed={_normalize(d["name"]): d["version"] for d in listed},
    )


def _dependency_closure(site_packages: Path, root: str) -> set[str]:
    """`root` and everything its requirements pull in, as installed in `site_packages`."""
    distributions = {
        _normalize(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site_packages)])
    }
    closure: set[str] = set()
    todo = [_normalize(root)]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        for line in distributions[name].requires or ():
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_normalize(requirement.name))
    return closure


def test_clean_venv_holds_the_sdk_and_its_declared_dependencies_only(clean_venv: CleanVenv) -> None:
    installed = set(clean_venv.installed)
    sdk = metadata.distributions(path=[str(clean_venv.site_packages)])
    direct = {
        _normalize(Requirement(line).name)
        for d in sdk
        if _normalize(d.metadata["Name"]) == "chatstream-client"
        for line in d.requires or ()
    }
    assert direct == SDK_DEPENDENCIES
    assert installed == _dependency_closure(clean_venv.site_packages, "chatstream-client")
    assert not installed & SERVER_ONLY, f"server packages leaked into the SDK: {installed & SERVER_ONLY}"


async def test_sdk_from_a_clean_venv_drives_the_server(
    clean_venv: CleanVenv, server: ChatServer, fake: FakeAnthropic
) -> None:
    fake.script(
        Stream(["Hello", " blocking"]),
        Stream(["streamed", " ", "blocking"]),
        Stream(["Hello", " asyncio"]),
        Stream(["streamed", " ", "asyncio"]),
    )
    script = clean_venv.root / "usage.py"
    script.write_text(USAGE_SCRIPT)
    # -I: no PYTHONPATH, no user site, no script directory; the repository is not the cwd either.
    process = await asyncio.create_subprocess_exec(
        str(clean_venv.python),
        "-I",
        str(script),
        server.address,
        cwd=clean_venv.root,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode == 0, stderr.decode()
    result = json.loads(stdout)

    package = result["package"]
    assert Path(package["file"]).is_relative_to(clean_venv.site_packages)
    assert Path(package["prefix"]) == clean_venv.python.parent.parent
    assert package["version"] == clean_venv.installed["chatstream-client"]
    assert package["py_typed"] is True
    assert package["stubs"] is True
    assert package["server_importable"] is False
    assert package["sqlalchemy_importable"] is False

    for flavour, word in (("sync", "blocking"), ("async", "asyncio")):
        run = result[flavour]
        assert run["reply"]["text"] == f"Hello {word}", flavour
        assert run["reply"]["status"] == "TURN_STATUS_COMPLETED", flavour
        assert run["reply"]["output_tokens"] == 2, flavour
        stream = run["stream"]
        # Deltas may be coalesced under load, so their number is not part of the contract.
        kinds = stream["kinds"]
        assert (kinds[0], kinds[-1]) == ("started", "completed"), flavour
        assert set(kinds[1:-1]) == {"text_delta"}, flavour
        # Numbered where produced: a joined delta carries its last part's number, so they may skip.
        assert stream["seqs"][0] == 1, flavour
        assert stream["seqs"] == sorted(set(stream["seqs"])), flavour
        assert stream["text"] == f"streamed {word}", flavour
        assert stream["conversation"] == run["reply"]["conversation"], flavour
        assert run["got"] == run["created"], flavour
        assert {run["created"], run["reply"]["conversation"]} <= set(run["listed"]), flavour
        not_found = run["not_found"]
        assert (not_found["code"], not_found["reason"]) == ("NOT_FOUND", "CONVERSATION_NOT_FOUND"), flavour
        assert (not_found["domain"], not_found["fields"]) == ("chatstream.v1.ChatService", []), flavour
        invalid = run["invalid"]
        assert (invalid["code"], invalid["fields"]) == ("INVALID_ARGUMENT", ["text"]), flavour
    # Four turns reached the model; the rejected ones never did.
    assert len(fake.requests) == 4


def test_sdk_usage_type_checks_against_the_installed_package(clean_venv: CleanVenv) -> None:
    # The stubs go in after the fixture listed the venv, so they do not blur that check.
    versions = [f"{name}=={metadata.version(name)}" for name in TYPING_STUBS]
    _pip("--python", clean_venv.python, "install", "--quiet", "--no-deps", *versions)
    script = clean_venv.root / "typed_usage.py"
    script.write_text(USAGE_SCRIPT)
    # Run from the venv's folder so that the project's own mypy configuration stays out of it.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--python-executable",
            str(clean_venv.python),
            "--cache-dir",
            str(clean_venv.root / ".mypy_cache"),
            str(script),
        ],
        cwd=clean_venv.root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
