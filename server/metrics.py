"""Prometheus metrics: one registry per process component, served on its own port.

Names follow Prometheus conventions (base units, ``_total`` counters). Each server or
consumer gets its own ``Metrics`` (and registry) instead of the global default, so
several instances in one process (tests, dev mode) never mix their numbers.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Latency buckets from 1 ms to 30 s: first tokens and commits live at the low end,
# upstream stalls at the high end.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _FrozenHeap(Collector):
    """How many objects the process took out of the garbage collector's passes at start-up."""

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "chatstream_gc_frozen_objects",
            "Objects alive after start-up that no garbage collection walks (gc.freeze, "
            "server/runtime.py); 0 in a process that was not started as a service.",
            value=gc.get_freeze_count(),
        )


class Metrics:
    """Every metric chatstream exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_FrozenHeap())
        self.time_to_first_token = Histogram(
            "chatstream_time_to_first_token_seconds",
            "From the start of a Chat call to its first token: `stage` is upstream (the model's first "
            "text delta arrived) or written (the first TextDelta was handed to gRPC).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_turn_started = Histogram(
            "chatstream_time_to_turn_started_seconds",
            "From the start of a Chat call to TurnStarted (unit of work 1 included).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.text_deltas = Counter(
            "chatstream_text_deltas_total", "Text deltas received from the model.", registry=r
        )
        self.output_tokens = Counter(
            "chatstream_output_tokens_total", "Output tokens reported by the model.", registry=r
        )
        self.active_streams = Gauge(
            "chatstream_active_streams", "Chat calls streaming a reply right now.", registry=r
        )
        self.streams_refused = Counter(
            "chatstream_streams_refused_total",
            "Streaming calls refused at admission, before any side effect, by cause: server_limit "
            "(CHATSTREAM_MAX_STREAMS), owner_limit (CHATSTREAM_MAX_STREAMS_PER_OWNER), overload "
            "(measured load: new Chat calls only).",
            ["cause"],
            registry=r,
        )
        self.shedding = Gauge(
            "chatstream_shedding",
            "1 while this process refuses new Chat calls because of its measured load, else 0.",
            registry=r,
        )
        self.admission_limit = Gauge(
            "chatstream_admission_limit",
            "Streams the measured load lets this process hold now: learnt from the load readings "
            "(grows while calls press against it and the load is fine, drops when overloaded), "
            "at most CHATSTREAM_MAX_STREAMS.",
            registry=r,
        )
        self.event_loop_lag = Gauge(
            "chatstream_event_loop_lag_seconds",
            "How late the event loop runs: the 90th percentile of its lag over the last "
            "CHATSTREAM_ADMISSION_WINDOW_S.",
            registry=r,
        )
        self.event_loop_cpu = Gauge(
            "chatstream_event_loop_cpu_ratio",
            "Share of one core used by the event loop's thread over the last CHATSTREAM_ADMISSION_WINDOW_S.",
            registry=r,
        )
        self.flush_interval = Gauge(
            "chatstream_flush_interval_seconds",
            "How long the live log's writer lets deltas pile up before its next pipeline, from the "
            "measured load: 0 when idle, up to CHATSTREAM_FLUSH_MAX_MS at the admission thresholds.",
            registry=r,
        )
        self.turns = Counter(
            "chatstream_turns_total", "Turns ended, by terminal status.", ["status"], registry=r
        )
        self.unit_of_work = Histogram(
            "chatstream_unit_of_work_seconds",
            "Duration of a unit of work, commit included: start (unit 1), finish (unit 2), "
            "persist (consumer).",
            ["unit"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "chatstream_consumer_lag_entries",
            "Entries of a shard not yet delivered to group chat-persistence.",
            ["shard"],
            registry=r,
        )
        self.consumer_pending = Gauge(
            "chatstream_consumer_pending_entries",
            "Entries delivered but not yet acknowledged, per shard.",
            ["shard"],
            registry=r,
        )
        self.consumer_oldest_pending = Gauge(
            "chatstream_consumer_oldest_pending_seconds",
            "Age of the oldest pending entry per shard (0 when none).",
            ["shard"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "chatstream_dead_letters", "Entries in the dead-letter stream chat:turns:dlq.", registry=r
        )
        self.messages_persisted = Counter(
            "chatstream_messages_persisted_total", "Message rows inserted by the consumer.", registry=r
        )
        self.dead_lettered = Counter(
            "chatstream_dead_lettered_total", "Entries moved to the dead-letter stream.", registry=r
        )
        self.relay_republished = Counter(
            "chatstream_relay_republished_total",
            "Ended turns the relay published again because they were not persisted in time.",
            registry=r,
        )
        self.relay_interrupted = Counter(
            "chatstream_relay_interrupted_total",
            "STREAMING turns marked INTERRUPTED because their server stopped renewing the lease.",
            registry=r,
        )


@dataclass
class MetricsServer:
    """The HTTP endpoint serving one registry at /metrics."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (useful when asked for port 0)."""
        return int(self.server.server_address[1])

    def close(self) -> None:
        """Stops serving; idempotent."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(metrics: Metrics, listen: str) -> MetricsServer | None:
    """Serves ``metrics`` on ``host:port``; None when ``listen`` is empty (metrics off)."""
    if not listen:
        return None
    host, port = listen.rsplit(":", 1)
    server, thread = start_http_server(int(port), addr=host, registry=metrics.registry)
    endpoint = MetricsServer(server=server, thread=thread)
    logger.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
