#!/usr/bin/env python3
"""One entry point for a fresh machine: `python3 run.py dev` or `python3 run.py test`.

Needs only Python 3.11+ (with its venv module) and a C compiler. It creates .venv/,
installs the server, the SDK and the dev tools into it (again only when a
pyproject.toml or the SDK's list of files changed), then runs `chatstream dev` or
pytest inside it. Everything else (PostgreSQL, Redis, grpcurl) comes from PyPI packages.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".chatstream-installed"
SDK = ROOT / "clients" / "python"
MANIFESTS = (ROOT / "pyproject.toml", SDK / "pyproject.toml")
# Part of the stamp: changing how this script installs redoes the .venvs made the old way.
INSTALL_SCHEME = "2: the SDK as a strict editable install"
USAGE = """usage: python3 run.py COMMAND [ARGS...]

  dev     run the service: embedded PostgreSQL and Redis, server and consumer
          (offline demo model unless ANTHROPIC_API_KEY is set); ARGS go to `chatstream dev`
  test    run the test suite; ARGS go to pytest
  sh      run any command inside the project's virtual environment, e.g. `run.py sh mypy`
"""


def _environment_digest() -> str:
    digest = hashlib.sha256(INSTALL_SCHEME.encode())
    for manifest in MANIFESTS:
        digest.update(manifest.read_bytes())
    # The SDK's link tree (see ensure_environment) holds the files that were there at install
    # time: a module added or removed needs a new tree, so the SDK's file names count too.
    for path in sorted(SDK.glob("chatstream/**/*")):
        if path.suffix in {".py", ".pyi"} or path.name == "py.typed":
            digest.update(path.relative_to(SDK).as_posix().encode())
    return digest.hexdigest()


def _sdk_links_present() -> bool:
    # `git clean -dfX` or removing build/ by hand takes the SDK out of the venv with it.
    return any((SDK / "build").glob("__editable__.chatstream_client-*/chatstream"))


def ensure_environment() -> None:
    """Creates .venv and installs the project into it unless it is already current."""
    # The project targets 3.11, but this script must also run on an older python3 to say so.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(f"chatstream needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = _environment_digest()
    if STAMP.exists() and STAMP.read_text() == wanted and _sdk_links_present():
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    python = str(BIN / "python")
    print(
        "installing chatstream, its SDK and dev tools into .venv (first run takes a minute) ...", flush=True
    )
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    # The SDK goes in first and on its own, as a *strict* editable install: a tree of links to
    # its files in clients/python/build/, put on sys.path by a plain .pth line. setuptools'
    # default editable mode adds an import hook instead, consulted only after the normal path
    # search has failed, and a folder named `chatstream` anywhere on sys.path (a clone called
    # chatstream in the current directory) does not fail it: it becomes an empty namespace
    # package and wins, "cannot import name 'AsyncChatClient' from 'chatstream' (unknown
    # location)". A regular package on a path entry beats such a folder wherever it stands.
    # Edits show at once; a new or removed file needs a new tree, which the digest asks for.
    # The server's own install then finds its `chatstream-client` requirement met.
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--config-settings", "editable_mode=strict", "-e", str(SDK)], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    """Dispatches to `chatstream dev`, pytest, or any tool in .venv."""
    if not argv or argv[0] not in {"dev", "test", "sh"}:
        print(USAGE, file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    ensure_environment()
    os.chdir(ROOT)
    if command == "dev":
        cmd = [str(BIN / "chatstream"), "dev", *args]
    elif command == "test":
        cmd = [str(BIN / "python"), "-m", "pytest", *args]
    else:
        if not args:
            print(USAGE, file=sys.stderr)
            return 2
        cmd = [str(BIN / args[0]), *args[1:]]
    # Replace this process so signals (Ctrl-C, SIGTERM) reach the command directly.
    os.execv(cmd[0], cmd)
    return 0  # unreachable: execv does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
