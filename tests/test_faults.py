"""I1, I2, I7 under real faults: consumers SIGKILLed, Redis and PostgreSQL restarted while turns flow.

`CHATSTREAM_FAULT_TURNS` and `CHATSTREAM_FAULT_SEED` change its size and its dice;
bench/soak.py runs the same scenario with 100,000 turns.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.fake_anthropic import FakeAnthropic
from tests.faults import run_scenario


# A few minutes on a loaded two-core machine: process restarts dominate.
@pytest.mark.timeout(900)
async def test_no_turn_is_lost_or_duplicated_through_kills_and_restarts(fake: FakeAnthropic) -> None:
    turns = int(os.environ.get("CHATSTREAM_FAULT_TURNS", "2000"))
    seed = int(os.environ.get("CHATSTREAM_FAULT_SEED", str(random.randrange(1 << 30))))
    print(f"fault scenario: {turns} turns, seed {seed} (CHATSTREAM_FAULT_SEED reproduces it)")
    report = await run_scenario(turns=turns, seed=seed, upstream_url=fake.url)
    print(f"fault scenario: {report}")
