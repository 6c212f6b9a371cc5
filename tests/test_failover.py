"""Failover under load: a Redis primary, a server and a consumer killed with kill -9 while turns flow.

Real processes throughout (tests/failover.py): 2 `chatstream serve`, 2 `chatstream consume`, a
Redis Cluster of the test's own (3 primaries, 3 replicas) and the session's PostgreSQL. Afterwards
I1, I2 and I7 hold, the acknowledged writes the failover lost came through the relay, and the
report line says how long convergence took. With the relay off (`consume --no-relay`) it fails:
the lost writes and the publishes that failed during the failover never reach PostgreSQL.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import Services
from tests.failover import run_scenario
from tests.fake_anthropic import FakeAnthropic

pytestmark = pytest.mark.skipif(
    os.environ.get("CHATSTREAM_TEST_REDIS", "both") == "single", reason="CHATSTREAM_TEST_REDIS=single"
)


# 20-40 s on a loaded two-core machine: six Redis nodes and six process starts dominate.
@pytest.mark.timeout(180)
async def test_no_completed_turn_is_lost_or_duplicated_through_a_failover_and_kills(
    services: Services, fake: FakeAnthropic
) -> None:
    report = await run_scenario(database_url=services.database_url, fake=fake)
    print(f"failover scenario: {report}")
