"""Readiness: health reports NOT_SERVING while this process cannot serve a Chat, and SERVING again by itself.

A process that cannot reach PostgreSQL, or has (nearly) run out of file descriptors,
fails every Chat with UNAVAILABLE while its port still answers. ``ReadinessMonitor``
probes both every ``CHATSTREAM_READINESS_INTERVAL_S`` and drives the gRPC health
status of the given services (the server passes ``chatstream.v1.ChatService``, the
readiness probe's service; ``""`` stays the liveness signal), so load balancers and
client-side health checking move traffic to replicas that can serve it. Two failed probes in a row turn it
NOT_SERVING (one slow probe under load is not an outage); one good probe turns it
back. The reason is logged on every change and exported as the gauge
``chatstream_degraded{reason}``.

Redis is not probed: without it turns are still stored and the relay publishes them later.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from prometheus_client import Gauge

from server.config import Settings
from server.db.engine import Database
from server.metrics import Metrics

logger = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[str | None]]
"""Returns None when the process can serve, else the reason it cannot (a short label)."""

POSTGRESQL: Final = "postgresql"
FILE_DESCRIPTORS: Final = "file_descriptors"
REASONS: Final = (POSTGRESQL, FILE_DESCRIPTORS)

FAILURES_TO_TRIP: Final = 2
_DATABASE_PROBE_TIMEOUT_S: Final = 2.0
# Descriptors a process needs besides its client connections: listeners, the event loop,
# logs, TLS files, the metrics endpoint, a child's pipes.
_FD_BASELINE: Final = 64
# A process has one pool of db_pool_size connections (server/db/engine.py).
_DB_CONNECTIONS_PER_POOL_SIZE: Final = 1
_REDIS_CONNECTIONS: Final = 256


class ReadinessMonitor:
    """Probes the process's dependencies on a timer and sets the health status from them."""

    def __init__(
        self,
        *,
        health: HealthServicer,
        services: Sequence[str],
        probes: Sequence[Probe],
        interval_s: float,
        metrics: Metrics,
    ) -> None:
        """Args:
        health: The servicer whose statuses this drives.
        services: Health service names to set ("" is the whole server).
        probes: Checked in order; the first failing one names the reason.
        interval_s: Time between two probes.
        metrics: Where ``chatstream_degraded`` is registered.
        """
        self._health = health
        self._services = tuple(services)
        self._probes = tuple(probes)
        self._interval_s = interval_s
        self._failures = 0
        self._reason: str | None = None
        self._degraded = Gauge(
            "chatstream_degraded",
            "1 while health reports NOT_SERVING for this reason (postgresql: unreachable; "
            "file_descriptors: fewer than CHATSTREAM_MIN_FREE_FDS free), else 0.",
            ["reason"],
            registry=metrics.registry,
        )
        for reason in REASONS:
            self._degraded.labels(reason).set(0)

    @property
    def reason(self) -> str | None:
        """Why health reports NOT_SERVING right now; None while SERVING."""
        return self._reason

    async def run(self) -> None:
        """Probes forever; cancel the task to stop."""
        while True:
            await self.check()
            await asyncio.sleep(self._interval_s)

    async def check(self) -> str | None:
        """Runs the probes once and updates the health status; returns the failure, if any."""
        failure = None
        for probe in self._probes:
            failure = await probe()
            if failure is not None:
                break
        if failure is None:
            self._failures = 0
            if self._reason is not None:
                logger.info("ready again after %s recovered: health is SERVING", self._reason)
                await self._publish(None)
            return None
        self._failures += 1
        if self._failures >= FAILURES_TO_TRIP and failure != self._reason:
            logger.warning("not ready (%s): health is NOT_SERVING until it recovers", failure)
            await self._publish(failure)
        return failure

    async def _publish(self, reason: str | None) -> None:
        self._reason = reason
        for known in REASONS:
            self._degraded.labels(known).set(1 if known == reason else 0)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if reason is None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in self._services:
            # Ignored once the server is shutting down: NOT_SERVING then stays.
            await self._health.set(service, status)


def database_probe(database: Database) -> Probe:
    """Fails while the process's pool cannot hand out a live connection within 2 s.

    A connection PostgreSQL dropped is replaced (``Database.ping`` tries twice), and only
    a server that refuses or ignores new connections fails the probe. No transaction is
    begun, so the probe never shows up in the transaction log.
    """

    async def probe() -> str | None:
        try:
            async with asyncio.timeout(_DATABASE_PROBE_TIMEOUT_S):
                await database.ping()
        except Exception as exc:  # noqa: BLE001 - any failure to reach it is the answer
            logger.info("database probe failed: %s", exc.__class__.__name__)
            return POSTGRESQL
        return None

    return probe


def file_descriptor_probe(min_free: int) -> Probe:
    """Fails while fewer than ``min_free`` file descriptors are left under the soft limit."""

    async def probe() -> str | None:
        free = free_file_descriptors()
        if free is not None and free < min_free:
            return FILE_DESCRIPTORS
        return None

    return probe


def free_file_descriptors() -> int | None:
    """Descriptors this process may still open; None where that cannot be known."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            # Listing a directory takes a descriptor itself; counted here, freed after.
            used = len(os.listdir(listing))
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return 0
            raise
        return max(0, soft - used)
    return None


def warn_if_too_few_file_descriptors(settings: Settings) -> None:
    """Logs a warning when the descriptor limit cannot hold the connections the settings allow.

    A process at its limit cannot open the sockets a Chat needs (the model, the
    database), so every Chat fails while idle connections hold the descriptors.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = (
        settings.limits.max_connections
        + settings.limits.max_streams  # one upstream HTTP connection per streaming turn, at worst
        + _DB_CONNECTIONS_PER_POOL_SIZE * settings.database.db_pool_size
        + _REDIS_CONNECTIONS
        + settings.server.min_free_fds
        + _FD_BASELINE
    )
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning(
            "the file-descriptor limit (%d) is below what these settings can use (%d): raise it "
            "(ulimit -n) or lower CHATSTREAM_MAX_CONNECTIONS / CHATSTREAM_MAX_STREAMS",
            soft,
            needed,
        )
