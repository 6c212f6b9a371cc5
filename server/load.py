"""Measured load: how late this process's event loop runs, and how busy its thread is, over a short window.

Admission (``server/limits.py``) refuses new ``Chat`` calls while the process is overloaded, so that
the streams it already runs stay on time. A fixed stream count cannot say when that is: what a
stream costs depends on its token rate, its client, the model's pace and whatever else runs on the
host. ``LoadMonitor`` measures it instead, on the loop itself, every ``SAMPLE_INTERVAL_S``:

- **lag**: how late a short sleep wakes up. That is how long any ready work (a token to relay, a
  new call's unit of work 1) waits for its turn; a stream's gaps grow by about that much at every
  hop of its path.
- **CPU**: the share of one core used by the thread that runs the loop (``time.thread_time``). A
  loop near 100 % has no slack left; lag follows as soon as the load grows.

Over the last ``window_s`` it keeps the 90th percentile of the lag samples and the CPU share. The
process is overloaded from the moment either passes its threshold until both are back under
``RELEASE_FRACTION`` of theirs. A percentile over a window, not the last sample: one long pause
(a garbage collection, a slow synchronous call) does not trip it; a loop that is late on every turn
does. A threshold of 0 turns its signal off; the readings are exported either way.

Only new turns are refused (docs/reliability.md, "Overload"): health stays SERVING while the process
sheds, because the process is healthy and still serves everything it admitted; taking the whole pod
out of rotation would move all of its calls, the resumes of its own streams included, onto replicas
that are likely as busy.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from server.metrics import Metrics

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_S: Final = 0.025
"""Time between two samples: 40 a second, a few microseconds of work each."""
LAG_PERCENTILE: Final = 0.9
"""Which lag sample of the window stands for it: robust to one pause, not to a late loop."""
RELEASE_FRACTION: Final = 0.9
"""Shedding stops once both readings are under this fraction of their thresholds (hysteresis)."""


class Overload(enum.StrEnum):
    """Which measure says the process is overloaded."""

    LOOP_LAG = "loop_lag"
    CPU = "cpu"


@dataclass(frozen=True, slots=True)
class LoadReading:
    """The load over the last window."""

    lag_s: float
    """The 90th percentile of the event loop's lag, in seconds."""
    cpu: float
    """The share of one core the event loop's thread used (0 to about 1)."""
    overload: Overload | None
    """Why new turns are refused right now; None while they are admitted."""


_IDLE: Final = LoadReading(lag_s=0.0, cpu=0.0, overload=None)


class LoadMonitor:
    """Samples the event loop's lag and CPU, and says whether the process is overloaded.

    Run ``run()`` as a task on the loop it measures; read ``overload`` from that loop. The readings
    are updated by the sampling task only, so a check is a read of one attribute.
    """

    def __init__(
        self,
        *,
        max_lag_s: float,
        max_cpu: float,
        window_s: float,
        retry_after_s: float,
        metrics: Metrics,
    ) -> None:
        """Args:
        max_lag_s: Lag (90th percentile over the window) above which new turns are refused; 0: never.
        max_cpu: Share of one core above which new turns are refused; 0: never.
        window_s: How far back the readings look.
        retry_after_s: The least a refused caller is told to wait (``RetryInfo``); up to twice that,
            at random, so that refused callers do not all come back at once.
        metrics: Where the readings and the shedding state are exported.
        """
        self._max_lag_s = max_lag_s
        self._max_cpu = max_cpu
        self._window_s = window_s
        self._retry_after_s = retry_after_s
        self._metrics = metrics
        # (monotonic time, lag in seconds, the loop thread's CPU seconds), oldest first.
        self._samples: collections.deque[tuple[float, float, float]] = collections.deque()
        self._reading = _IDLE
        metrics.shedding.set(0)

    @property
    def window_s(self) -> float:
        """How far back the readings look."""
        return self._window_s

    @property
    def enabled(self) -> bool:
        """Whether any signal can refuse calls (a threshold above 0)."""
        return self._max_lag_s > 0 or self._max_cpu > 0

    def headroom(self, reading: LoadReading) -> float:
        """How far the readings are from their thresholds: 1 minus the larger reading/threshold."""
        used = 0.0
        if self._max_lag_s > 0:
            used = max(used, reading.lag_s / self._max_lag_s)
        if self._max_cpu > 0:
            used = max(used, reading.cpu / self._max_cpu)
        return 1.0 - used

    @property
    def reading(self) -> LoadReading:
        """The readings of the last window."""
        return self._reading

    @property
    def overload(self) -> Overload | None:
        """Why new turns are refused right now; None while they are admitted."""
        return self._reading.overload

    def retry_after(self) -> timedelta:
        """How long a refused caller should wait: ``retry_after_s`` to twice that, at random."""
        return timedelta(seconds=self._retry_after_s * (1.0 + random.random()))

    async def run(self) -> None:
        """Samples until cancelled."""
        while True:
            due = time.monotonic() + SAMPLE_INTERVAL_S
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            now = time.monotonic()
            # time.thread_time(): the CPU of the calling thread, which is the loop's.
            self.sample(now, lag_s=max(0.0, now - due), cpu_s=time.thread_time())

    def sample(self, now: float, *, lag_s: float, cpu_s: float) -> LoadReading:
        """Adds one sample and updates the readings; ``run()`` calls it on every wake-up."""
        samples = self._samples
        samples.append((now, lag_s, cpu_s))
        # Keep one sample at or before the window's start: the CPU share is measured from it.
        while len(samples) > 2 and samples[1][0] <= now - self._window_s:
            samples.popleft()
        lags = sorted(lag for _, lag, _ in samples)
        lag_p = lags[max(0, math.ceil(LAG_PERCENTILE * len(lags)) - 1)]
        first_t, _, first_cpu = samples[0]
        cpu = (cpu_s - first_cpu) / (now - first_t) if now > first_t else 0.0
        reading = LoadReading(lag_s=lag_p, cpu=cpu, overload=self._judge(lag_p, cpu))
        self._publish(reading)
        return reading

    def _judge(self, lag_s: float, cpu: float) -> Overload | None:
        """The overload, if any: past a threshold to start shedding, under a fraction of both to stop."""
        lag_on = self._max_lag_s > 0
        cpu_on = self._max_cpu > 0
        if lag_on and lag_s > self._max_lag_s:
            return Overload.LOOP_LAG
        if cpu_on and cpu > self._max_cpu:
            return Overload.CPU
        shedding = self._reading.overload
        if shedding is None:
            return None
        still_lag = lag_on and lag_s > RELEASE_FRACTION * self._max_lag_s
        still_cpu = cpu_on and cpu > RELEASE_FRACTION * self._max_cpu
        return shedding if still_lag or still_cpu else None

    def _publish(self, reading: LoadReading) -> None:
        before = self._reading.overload
        self._reading = reading
        self._metrics.event_loop_lag.set(reading.lag_s)
        self._metrics.event_loop_cpu.set(reading.cpu)
        if reading.overload == before:
            return
        self._metrics.shedding.set(0 if reading.overload is None else 1)
        if reading.overload is not None:
            logger.warning(
                "overloaded (%s): refusing new Chat calls; event-loop lag p90 %.1f ms, loop CPU %.0f %%",
                reading.overload,
                reading.lag_s * 1000,
                reading.cpu * 100,
            )
        else:
            logger.info(
                "load is back under the thresholds: admitting new Chat calls; "
                "event-loop lag p90 %.1f ms, loop CPU %.0f %%",
                reading.lag_s * 1000,
                reading.cpu * 100,
            )
