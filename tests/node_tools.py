"""The npm tooling the tests drive (buf, tsc, node): found, installed from the lock file if missing.

The root package.json pins the buf CLI and holds the TypeScript client as an npm workspace,
so one `npm ci` at the root installs everything. Without `node` the tests that need it are
skipped on a developer's machine; under CI (the CI variable set) they fail instead, so a
machine without Node.js can never pass CI silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parent.parent
NODE_BIN: Final = ROOT / "node_modules" / ".bin"
BUF: Final = NODE_BIN / "buf"
TSC: Final = NODE_BIN / "tsc"
# A package only the TypeScript client needs: its absence means an install from before the workspace.
_CLIENT_DEPENDENCY: Final = ROOT / "node_modules" / "@connectrpc" / "connect-node" / "package.json"
_NPM_CI_TIMEOUT_S: Final = 300


def require_node() -> str:
    """The path of `node`; skips the test without it, or fails it under CI."""
    node = shutil.which("node")
    if node is None:
        message = "Node.js is not installed (needed for buf and the TypeScript client)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must have it")
        pytest.skip(message)
    return node


def ensure_node_modules() -> None:
    """Runs `npm ci` at the root when the pinned tools are not installed yet."""
    require_node()
    if BUF.exists() and TSC.exists() and _CLIENT_DEPENDENCY.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("node is installed but npm is not: cannot install the pinned tools")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=_NPM_CI_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"npm ci failed:\n{result.stdout}\n{result.stderr}")
