"""What the fake upstream, the systems under test and the load generators agree on.

Reply text. Every reply is deterministic apart from its first token, so a load client can check
that every token arrived, in order, whatever way the server coalesces deltas:

* token 0 is ``<NNNNNNNNNNNNNNNNNNN>``: the fake's ``time.monotonic_ns()`` when it wrote that
  token to the socket, zero-padded to 19 digits (21 characters). CLOCK_MONOTONIC is one clock for
  every process on a Linux machine, so ``client receive time - this`` is the time the first token
  spent between the fake and the client (P2's "server-added time to first token").
* tokens 1.. are 4-character ASCII words taken round-robin from ``VOCAB``.

Request spec. The load client asks for a reply shape in the user message itself, which every system
passes upstream unchanged: ``bench n=<tokens> r=<tokens per second>`` (r=0: as fast as possible).
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
PYTHON: Final = sys.executable

FIRST_W: Final = 21
"""Width of the first token, ``<`` + 19 digits + ``>``."""
TOKEN_W: Final = 4
"""Width of every other token."""

_WORDS: Final = (
    *("the", "cat", "sat", "on", "a", "mat", "and", "saw", "two", "big", "red", "fox", "run", "far", "off"),
    *(
        "now",
        "but",
        "not",
        "yet",
        "you",
        "can",
        "see",
        "our",
        "day",
        "sun",
        "set",
        "all",
        "way",
        "new",
        "old",
    ),
    *(
        "hot",
        "fun",
        "top",
        "low",
        "key",
        "map",
        "cup",
        "pen",
        "ink",
        "box",
        "bag",
        "hat",
        "toy",
        "car",
        "bus",
    ),
    *("van", "sky", "sea", "air"),
)
VOCAB: Final = tuple(f" {w:<3}"[:TOKEN_W] for w in _WORDS)
"""Tokens of exactly 4 ASCII characters (nothing JSON or SSE would escape)."""
assert all(len(t) == TOKEN_W for t in VOCAB), VOCAB

MAX_TOKENS: Final = 20_000
_BODY: Final = "".join(VOCAB[i % len(VOCAB)] for i in range(MAX_TOKENS))

_SPEC: Final = re.compile(r"bench n=(\d+) r=([0-9.]+)")


def body_text(tokens: int) -> str:
    """Tokens 1..tokens-1 of a reply of ``tokens`` tokens, joined."""
    return _BODY[: TOKEN_W * max(tokens - 1, 0)]


def token(i: int) -> str:
    """Token ``i`` (i >= 1) of every reply."""
    return VOCAB[(i - 1) % len(VOCAB)]


def first_token(now_ns: int) -> str:
    """The first token, carrying the fake's send time."""
    return f"<{now_ns:019d}>"


def parse_first_token(text: str) -> int | None:
    """The send time (monotonic ns) from a text that starts with the first token, or None."""
    if len(text) >= FIRST_W and text[0] == "<" and text[FIRST_W - 1] == ">":
        try:
            return int(text[1 : FIRST_W - 1])
        except ValueError:
            return None
    return None


def check_reply(text: str, tokens: int) -> bool:
    """Whether ``text`` is exactly the reply of ``tokens`` tokens (any first-token timestamp)."""
    return len(text) == FIRST_W + TOKEN_W * (tokens - 1) and text[FIRST_W:] == body_text(tokens)


def spec_text(tokens: int, rate: float, note: str = "") -> str:
    """The user message that asks the fake for a reply of this shape."""
    return f"bench n={tokens} r={rate:g} {note}".rstrip()


def parse_spec(text: str) -> tuple[int, float] | None:
    """(tokens, rate) from a user message written by ``spec_text``."""
    match = _SPEC.search(text)
    if match is None:
        return None
    return min(int(match.group(1)), MAX_TOKENS), float(match.group(2))


# -- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (q in 0..100); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[min(rank, len(ordered)) - 1]


def hist_percentile(hist: Mapping[int, int], q: float, *, bin_s: float) -> float | None:
    """Percentile from a histogram of ``{bin index: count}`` (upper edge of the bin)."""
    total = sum(hist.values())
    if total == 0:
        return None
    wanted = max(math.ceil(q / 100 * total), 1)
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= wanted:
            return (index + 1) * bin_s
    return (max(hist) + 1) * bin_s


def merge_hists(hists: Iterable[Mapping[str | int, int]]) -> dict[int, int]:
    """Sums histograms (JSON turns their keys into strings)."""
    merged: dict[int, int] = {}
    for hist in hists:
        for key, count in hist.items():
            merged[int(key)] = merged.get(int(key), 0) + count
    return merged


def median(values: Sequence[float | None]) -> float | None:
    """Median of the non-None values; None if there are none."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2


# -- processes and ports -----------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; a tiny race we accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def asyncpg_dsn(database_url: str) -> str:
    """``postgresql+asyncpg://...`` (SQLAlchemy) -> ``postgresql://...`` (asyncpg)."""
    return re.sub(r"^postgresql\+asyncpg://", "postgresql://", database_url)


def monotonic() -> float:
    """``time.monotonic()``; named here so every process visibly uses the same clock."""
    return time.monotonic()


def env_with(extra: Mapping[str, str]) -> dict[str, str]:
    """The current environment plus ``extra``, with the repository on PYTHONPATH."""
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env
