"""Soak: the fault scenario of tests/test_faults.py at 100,000 turns, outside the default test run.

    .venv/bin/python -m bench.soak [--turns 100000] [--seed N]

Consumers are SIGKILLed every 1-2.5 s, Redis is restarted without persistence at about
30% and PostgreSQL at about 60% of the load; afterwards every invariant is checked
(see tests/faults.py). The report is printed and written to docs/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import sys
from datetime import UTC, datetime
from pathlib import Path

from tests.fake_anthropic import FakeAnthropic
from tests.faults import run_scenario

DOC = Path(__file__).resolve().parent.parent / "docs" / "soak.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    parser.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/soak.md")
    args = parser.parse_args()
    with FakeAnthropic() as fake:
        report = asyncio.run(run_scenario(turns=args.turns, seed=args.seed, upstream_url=fake.url))
    print(report)
    if not args.no_doc:
        DOC.write_text(
            "# Soak run\n\n"
            "The fault scenario of `tests/test_faults.py` (consumers SIGKILLed at random, Redis restarted "
            "without persistence, PostgreSQL restarted, poison entries injected) at soak size, produced by "
            f"`.venv/bin/python -m bench.soak --turns {args.turns} --seed {args.seed}`.\n\n"
            f"- when: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
            f"- machine: {platform.machine()}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}\n\n"
            "```\n"
            f"{report}\n"
            "```\n\n"
            "Every invariant held: each turn whose `TurnCompleted` reached a client has exactly its user and "
            "assistant rows, every ended turn is persisted, no `(turn_id, role)` appears twice, conversation "
            "counters match the rows, all pending lists are empty and the dead-letter stream holds "
            "exactly the entries poisoned on purpose.\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
