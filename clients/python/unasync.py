#!/usr/bin/env python3
"""Writes the blocking SDK client, `chatstream/_sync_client.py`, from the asyncio one.

The method of encode/httpcore's `scripts/unasync.py`: each line of `_async_client.py` goes
through one ordered list of word-bounded regular expressions (`async def` -> `def`, `await ` ->
"", `grpc.aio.Channel` -> `grpc.Channel`, ...); two rules then work across lines, and `ruff
format` lays the result out like the rest of the code. A rule that matches nothing is an error,
so the list cannot rot unseen. CI re-runs this script and fails when the committed file differs.

Not the `unasync` package from PyPI: it renames single name tokens, so it cannot turn
`grpc.aio.Channel` into `grpc.Channel` or `await asyncio.sleep(...)` into `time.sleep(...)`, add
the third parameter of `Generator[T, None, None]`, or reword a docstring; and it leaves the
layout as it was, which `ruff format --check` would then reject.

Usage: python clients/python/unasync.py [--check]
"""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from pathlib import Path
from typing import Final

PACKAGE: Final = Path(__file__).resolve().parent / "chatstream"
SOURCE: Final = PACKAGE / "_async_client.py"
TARGET: Final = PACKAGE / "_sync_client.py"
HEADER: Final = "# Generated from _async_client.py by clients/python/unasync.py: do not edit.\n"

# Applied in this order to every line, each bounded by word boundaries as in httpcore's script.
LINE_RULES: Final = (
    # The standard library.
    ("import asyncio", "import time"),
    (r"asyncio\.sleep", "time.sleep"),
    (r"AsyncGenerator\[(.+), None\]", r"Generator[\1, None, None]"),
    ("AsyncGenerator", "Generator"),
    ("AsyncIterator", "Iterator"),
    # grpc: the blocking API is grpc's top level; its calls raise grpc.RpcError.
    (r"grpc\.aio\.AioRpcError", "grpc.RpcError"),
    ("AioRpcError", "RpcError"),
    (r"grpc\.aio\.", "grpc."),
    ("ChatServiceAsyncStub", "ChatServiceStub"),
    # The client and what its docstrings say about it.
    ("AsyncChatClient", "ChatClient"),
    ("Asynchronous client", "Blocking client"),
    ("create it inside a running event loop", "it may be shared between threads"),
    # The language.
    ("async def", "def"),
    ("async with", "with"),
    ("async for", "for"),
    ("await ", ""),
    ("__aenter__", "__enter__"),
    ("__aiter__", "__iter__"),
    ("__aexit__", "__exit__"),
    ("aclosing", "closing"),
    ("aclose", "close"),
)

TEXT_RULES: Final = (
    # The comments between the module docstring and the imports speak of the async source
    # (how it is turned into this file, its ruff exemption); the header replaces them.
    (r'\A("""[^\n]*"""\n)\n(?:#[^\n]*\n)+', r"\1"),
    # An async generator cannot `yield from`; a plain one should (ruff UP028).
    (r"^( *)for (\w+) in ([^\n]+):\n *yield \2\n", r"\1yield from \3\n"),
)


def _word_bounded(rule: str) -> re.Pattern[str]:
    # `aclose` must not match inside `aclosing`, nor `AsyncIterator` inside `MyAsyncIterator`;
    # a rule ending in punctuation or a space (`grpc\.aio\.`, `await `) needs no bound there.
    end = r"(?!\w)" if rule[-1].isalnum() or rule[-1] == "_" else ""
    return re.compile(rf"(?<!\w){rule}{end}")


_LINE_PATTERNS: Final = tuple((_word_bounded(old), new) for old, new in LINE_RULES)
_TEXT_PATTERNS: Final = tuple((re.compile(old, re.MULTILINE), new) for old, new in TEXT_RULES)


def unasync(source: str) -> str:
    """The blocking client's code for the asyncio client's `source`, before formatting.

    Raises:
        SystemExit: A rule matched nothing, so the source changed under it.
    """
    used: set[str] = set()
    lines = []
    for line in source.splitlines(keepends=True):
        for pattern, new in _LINE_PATTERNS:
            line, count = pattern.subn(new, line)
            if count:
                used.add(pattern.pattern)
        lines.append(line)
    text = "".join(lines)
    for pattern, new in _TEXT_PATTERNS:
        text, count = pattern.subn(new, text)
        if count:
            used.add(pattern.pattern)
    unused = [p.pattern for p, _ in (*_LINE_PATTERNS, *_TEXT_PATTERNS) if p.pattern not in used]
    if unused:
        raise SystemExit(f"unasync: rules that matched nothing in {SOURCE.name}: {unused}")
    return HEADER + text


def ruff_format(code: str, path: Path) -> str:
    """`code` with its imports sorted and laid out by `ruff` under the project's configuration.

    Sorting is needed because a renamed import (`asyncio` -> `time`) can move in the order.
    """
    sorted_code = _ruff(
        ["check", "--fix", "--select", "I", "--quiet", "--stdin-filename", str(path), "-"], code
    )
    return _ruff(["format", "--stdin-filename", str(path), "-"], sorted_code)


def _ruff(args: list[str], code: str) -> str:
    # ruff has no Python API; the command line is fixed, with only our own path in it.
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "ruff", *args],
        input=code,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"unasync: ruff {args[0]} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def main(argv: list[str]) -> int:
    """Writes `_sync_client.py`; with `--check`, only reports whether it is current."""
    generated = ruff_format(unasync(SOURCE.read_text()), TARGET)
    if "--check" not in argv:
        TARGET.write_text(generated)
        return 0
    current = TARGET.read_text() if TARGET.exists() else ""
    if current == generated:
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            generated.splitlines(keepends=True),
            f"{TARGET.name} (committed)",
            f"{TARGET.name} (generated)",
        )
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
