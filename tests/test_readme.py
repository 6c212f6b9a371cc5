"""The README's grpcurl walkthrough runs as written against `chatstream dev`, carrying real ids."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_grpcurl import DevServer, dev_server

__all__ = ["dev_server"]  # the module-scoped `chatstream dev` fixture, shared with test_grpcurl

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _new_shell_env() -> dict[str, str]:
    """A new user's shell: nothing of .venv on the PATH, so the walkthrough must put it there itself."""
    tools = ("grpcurl", "chatstream")
    path = [
        entry
        for entry in os.environ["PATH"].split(os.pathsep)
        if entry and not any(os.access(Path(entry) / tool, os.X_OK) for tool in tools)
    ]
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONHOME"}}
    env["PATH"] = os.pathsep.join(path)
    assert shutil.which("grpcurl", path=env["PATH"]) is None
    return env


def _walkthrough() -> str:
    text = README.read_text()
    section = text[text.index("## Try it with grpcurl") :]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the grpcurl section has no sh block"
    return match[1]


@pytest.mark.skipif(shutil.which("jq") is None, reason="the walkthrough pipes grpcurl's JSON through jq")
def test_the_grpcurl_walkthrough_runs_as_written_and_carries_real_ids(dev_server: DevServer) -> None:
    script = _walkthrough()
    assert "<id>" not in script, "a step must use the id the previous step printed"
    script = script.replace("127.0.0.1:50051", dev_server.address)
    script = script.replace("$(cat .chatstream/dev-api-key)", dev_server.api_key)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_new_shell_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    names = re.findall(rf"^conversations/{_UUID}$", done.stdout, re.MULTILINE)
    # The echoed name of the created conversation, and the one Alice's Chat started.
    assert len(set(names)) == 2, done.stdout
    # The second turn went to the created conversation: the demo model counts its earlier messages.
    assert "You said: and then?. This conversation has 2 earlier messages." in done.stdout
    assert "SERVING" in done.stdout
