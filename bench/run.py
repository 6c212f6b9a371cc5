"""One command for the whole benchmark: ``.venv/bin/python bench/run.py [--quick] [--only P1,P2]``.

Starts embedded PostgreSQL and Redis (or uses CHATSTREAM_BENCH_DATABASE_URL / _REDIS_URL), the fake
upstream, ``chatstream serve`` + ``chatstream consume``, the gRPC floor and the SSE peer, drives them
from separate load processes, prints a JSON summary, and writes bench/results/<time>/ (and, for a full
run, docs/benchmarks.md and docs/benchmarks.png). Details: docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script: make the repository importable so `bench` is a package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.harness import main

    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
