"""Settings of what the server takes on: the limits per peer and per process.

Groups of ``server.config.Settings`` (and re-exported there), in a module of their own to keep
config.py readable; declared and loaded like every other group (server/envvars.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.envvars import env


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSettings:
    """Limits on what one peer can make the server hold."""

    max_request_bytes: int = field(
        default=1024 * 1024, metadata=env("CHATSTREAM_MAX_REQUEST_BYTES", minimum=1024)
    )
    """Largest request message accepted."""
    max_metadata_bytes: int = field(
        default=16 * 1024, metadata=env("CHATSTREAM_MAX_METADATA_BYTES", minimum=1024)
    )
    """Largest total of one call's metadata (headers) accepted."""
    max_streams: int = field(default=1000, metadata=env("CHATSTREAM_MAX_STREAMS", minimum=1))
    """Concurrent Chat streams per server process."""
    max_streams_per_owner: int = field(
        default=32, metadata=env("CHATSTREAM_MAX_STREAMS_PER_OWNER", minimum=1)
    )
    """Concurrent Chat streams per owner and server process;
    with auth mode ``none`` there is one owner and only ``max_streams`` applies."""
    max_connections: int = field(default=1000, metadata=env("CHATSTREAM_MAX_CONNECTIONS", minimum=1))
    """Open client connections per server process; past it a new
    connection is accepted and closed at once. Keep the process's file-descriptor limit above
    this plus ``max_streams`` and the database pools (the server warns at start-up otherwise)."""
    max_streams_per_connection: int = field(
        default=100, metadata=env("CHATSTREAM_MAX_STREAMS_PER_CONNECTION", minimum=1)
    )
    """Concurrent calls (HTTP/2 streams) of any service on one connection, advertised as
    SETTINGS_MAX_CONCURRENT_STREAMS; gRPC clients queue
    calls past it, and a peer that sends them anyway has them reset (RST_STREAM)."""
    max_concurrent_rpcs: int = field(default=3000, metadata=env("CHATSTREAM_MAX_CONCURRENT_RPCS", minimum=1))
    """Concurrent calls of every service together, per process;
    past it gRPC answers RESOURCE_EXHAUSTED. Above ``max_streams`` plus the health-watch and
    reflection caps, so those never starve Chat."""
    max_health_watches: int = field(default=1000, metadata=env("CHATSTREAM_MAX_HEALTH_WATCHES", minimum=0))
    """Concurrent ``grpc.health.v1.Health/Watch`` streams per process;
    one more gets RESOURCE_EXHAUSTED / TOO_MANY_STREAMS. Client-side health checking opens one
    per client channel; load-balancer probes use Check, which is not limited."""
    max_reflection_streams: int = field(
        default=64, metadata=env("CHATSTREAM_MAX_REFLECTION_STREAMS", minimum=0)
    )
    """Concurrent server-reflection streams per process."""
    default_page_size: int = field(default=50, metadata=env("CHATSTREAM_DEFAULT_PAGE_SIZE", minimum=1))
    """Page size when a list request asks for 0."""
    max_page_size: int = field(default=1000, metadata=env("CHATSTREAM_MAX_PAGE_SIZE", minimum=1))
    """Larger page sizes are lowered to this."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionSettings:
    """Admission by measured load: when a process refuses new Chat calls to keep its streams on time.

    Below the stream limits, a new Chat is refused (UNAVAILABLE, SERVER_OVERLOADED, with RetryInfo)
    while the process's event loop is too late or too busy over the last window
    (server/load.py, docs/reliability.md "Overload")."""

    admission_max_lag_ms: float = field(
        default=20.0, metadata=env("CHATSTREAM_ADMISSION_MAX_LAG_MS", minimum=0.0)
    )
    """Event-loop lag (the 90th percentile over the window) above which new Chat calls are
    refused, in milliseconds; 0 turns this signal off. A token waits about this long at each of
    the few hops of its path, so keep it well under the gap its clients tolerate: 20 ms leaves a
    stream at 20 tokens/s (50 ms apart) within a 100 ms gap."""
    admission_max_cpu: float = field(default=0.95, metadata=env("CHATSTREAM_ADMISSION_MAX_CPU", minimum=0.0))
    """Share of one core used by the event loop's thread over the window above which new Chat
    calls are refused; 0 turns this signal off."""
    admission_window_s: float = field(default=1.0, metadata=env("CHATSTREAM_ADMISSION_WINDOW_S", minimum=0.1))
    """How far back the load readings look. Shorter reacts sooner to a burst of new calls, and
    to a single pause."""
    admission_retry_after_s: float = field(
        default=1.0, metadata=env("CHATSTREAM_ADMISSION_RETRY_AFTER_S", minimum=0.1)
    )
    """Least wait a refused caller is told (RetryInfo); each refusal says this to twice this,
    at random, so that refused callers do not all come back at once."""
