"""Settings: read once from CHATSTREAM_* environment variables, then passed down explicitly."""

from __future__ import annotations

import enum
import os
import re
import socket
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from server import constants


class SettingsError(ValueError):
    """An environment variable is missing or malformed."""


class AuthMode(enum.StrEnum):
    """Whether calls must carry a credential (docs/security.md)."""

    NONE = "none"
    """Every call acts as the single owner ``default``: tests and single-tenant embedding only."""
    REQUIRED = "required"
    """Every ChatService call needs an API key, a JWT or a verified client certificate."""


class RedisClusterMode(enum.StrEnum):
    """Whether CHATSTREAM_REDIS_URL names a Redis Cluster node (server/redis_client.py)."""

    AUTO = "auto"
    """Ask the server at start-up (``INFO cluster``: ``cluster_enabled``)."""
    TRUE = "true"
    """A Redis Cluster: every client is a ``redis.asyncio.cluster.RedisCluster``."""
    FALSE = "false"
    """A single Redis (or one reached through a proxy that hides the cluster)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyEntry:
    """One accepted API key, stored as the SHA-256 of the key, never the key itself."""

    subject: str
    """The principal the key authenticates; the owner of its data."""
    sha256: str
    """Lower-case hex SHA-256 of the whole key string."""
    act_for_users: bool = False
    """Whether calls with this key may name an end user in ``x-chatstream-user``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the server, consumer and relay need to run."""

    database_url: str = field(repr=False)
    """SQLAlchemy URL, ``postgresql+asyncpg://user:pass@host/db`` (CHATSTREAM_DATABASE_URL)."""
    redis_url: str = field(repr=False)
    """``redis://host:port/db`` or ``unix:///path.sock`` (CHATSTREAM_REDIS_URL); for a Redis Cluster,
    any one node's ``redis://host:port``."""
    redis_cluster: RedisClusterMode = RedisClusterMode.AUTO
    """Whether that Redis is a cluster (CHATSTREAM_REDIS_CLUSTER: auto, true or false); ``auto``
    asks the server once at start-up, and falls back to a single Redis if it cannot be reached."""
    listen: str = "127.0.0.1:50051"
    """gRPC listen address (CHATSTREAM_LISTEN); port 0 picks a free port."""

    anthropic_api_key: str | None = field(default=None, repr=False)
    """The SDK's own ANTHROPIC_API_KEY; None means dev mode serves the demo model."""
    anthropic_base_url: str | None = None
    """The SDK's own ANTHROPIC_BASE_URL; None means the SDK default."""
    model: str = "claude-sonnet-4-5"
    """Model id sent upstream (CHATSTREAM_MODEL)."""
    max_tokens: int = 1024
    """Upper bound on one reply's tokens (CHATSTREAM_MAX_TOKENS)."""
    system_prompt: str = ""
    """System prompt for every turn; empty sends none (CHATSTREAM_SYSTEM_PROMPT)."""
    llm_timeout_s: float = 60.0
    """Longest silence allowed from upstream, before or during a reply (CHATSTREAM_LLM_TIMEOUT_S)."""
    llm_max_retries: int = 2
    """SDK retries of 429/5xx/connection errors before the first token (CHATSTREAM_LLM_MAX_RETRIES)."""

    shards: int = 4
    """Number of ``chat:turns:{k}`` streams (CHATSTREAM_SHARDS); changing it re-maps conversations."""
    context_max_turns: int = 50
    """Earlier turns sent to the model as context (CHATSTREAM_CONTEXT_MAX_TURNS)."""
    context_max_chars: int = 100_000
    """Largest prompt sent upstream, in characters: system prompt, earlier turns and the new
    message together (CHATSTREAM_CONTEXT_MAX_CHARS). Earlier turns are added newest first while
    they fit, so the prompt and the cached context stay bounded however long the conversation.
    Characters, not tokens: about 4 per token in English, down to 1 per token in CJK text. Must
    hold the longest accepted message plus the system prompt; the server refuses to start otherwise."""
    context_cache_ttl_s: int = 3600
    """How long a conversation's context stays cached in Redis (CHATSTREAM_CONTEXT_CACHE_TTL_S)."""
    max_text_chars: int = 32_768
    """Longest user message accepted (CHATSTREAM_MAX_TEXT_CHARS)."""

    turn_lease_s: int = 30
    """Seconds an unrenewed STREAMING turn lives before it counts as interrupted (CHATSTREAM_TURN_LEASE_S).

    The serving process renews its turns every third of this; a turn whose server died
    becomes INTERRUPTED (and its conversation usable again) about this long after."""

    db_pool_size: int = 10
    """PostgreSQL connections per process (CHATSTREAM_DB_POOL_SIZE)."""
    live_log: bool = True
    """Write each turn's events to its live log in Redis, for WatchTurn, WatchConversation, resuming
    and CancelTurn from any replica (CHATSTREAM_LIVE_LOG). Off, those serve ended turns from
    PostgreSQL only."""
    live_ttl_s: float = 300.0
    """How long a turn's live log lives after its last event; resuming later is served from
    PostgreSQL (CHATSTREAM_LIVE_TTL_S)."""
    live_maxlen: int = 10_000
    """The most events one turn's live log keeps (CHATSTREAM_LIVE_MAXLEN)."""
    max_turn_s: float = 600.0
    """The longest a turn may stream, also when it continues without its client
    (``ON_DISCONNECT_CONTINUE``); past it the turn ends CANCELLED (CHATSTREAM_MAX_TURN_S)."""

    write_timeout_s: float = 30.0
    """Longest a stream's event may wait for the client to accept it (HTTP/2 flow control) before
    the call counts as gone: its turn ends CANCELLED with its partial text and frees its slot
    (CHATSTREAM_WRITE_TIMEOUT_S)."""

    shutdown_grace_s: float = 10.0
    """How long in-flight streams may finish after SIGTERM (CHATSTREAM_SHUTDOWN_GRACE_S)."""

    shutdown_drain_s: float = 0.0
    """After SIGTERM, seconds health reports NOT_SERVING while calls are still accepted, so load
    balancers stop routing here before the server refuses calls (CHATSTREAM_SHUTDOWN_DRAIN_S)."""

    log_transactions: bool = False
    """Log BEGIN/COMMIT/ROLLBACK of every unit of work with its duration (CHATSTREAM_LOG_TRANSACTIONS)."""

    metrics_listen: str = ""
    """``host:port`` of the Prometheus endpoint (/metrics), e.g. ``0.0.0.0:9464``; empty turns
    it off (CHATSTREAM_METRICS_LISTEN). Port 0 picks a free port."""

    relay_interval_s: float = 5.0
    """How often the relay looks for unpersisted turns and expired leases (CHATSTREAM_RELAY_INTERVAL_S)."""
    relay_grace_s: float = 30.0
    """How long after it ended a turn may stay unpersisted before the relay re-publishes it
    (CHATSTREAM_RELAY_GRACE_S)."""

    consumer_name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """This consumer's name in the group (CHATSTREAM_CONSUMER_NAME); unique per process."""
    consumer_batch: int = 200
    """Entries read per XREADGROUP call (CHATSTREAM_CONSUMER_BATCH)."""
    consumer_block_ms: int = 1000
    """How long one XREADGROUP waits for new entries (CHATSTREAM_CONSUMER_BLOCK_MS)."""
    consumer_max_deliveries: int = 5
    """Deliveries after which an entry that keeps failing goes to the dead-letter stream
    (CHATSTREAM_CONSUMER_MAX_DELIVERIES). Outages of PostgreSQL never count toward it."""
    consumer_claim_idle_ms: int = 30_000
    """Idle time after which another consumer's pending entry is claimed (XAUTOCLAIM); longer than
    any batch takes (CHATSTREAM_CONSUMER_CLAIM_IDLE_MS)."""

    # Authentication (docs/security.md). The dataclass default is NONE so tests and embedded
    # use keep the single-owner behaviour; from_env defaults to REQUIRED, so a production
    # `chatstream serve` refuses to start without credentials unless told otherwise.
    auth_mode: AuthMode = AuthMode.NONE
    """``required`` or ``none`` (CHATSTREAM_AUTH_MODE; ``required`` when unset in the environment)."""
    api_keys: tuple[ApiKeyEntry, ...] = ()
    """Accepted API keys (CHATSTREAM_API_KEYS): comma-separated ``subject:sha256hex[:act_for_users]``."""
    jwt_hs256_secret: str | None = field(default=None, repr=False)
    """Shared secret of HS256 JWTs, at least 32 bytes (CHATSTREAM_JWT_HS256_SECRET)."""
    jwt_public_key_file: str | None = None
    """PEM public key (RSA for RS256, P-256 for ES256) of signed JWTs (CHATSTREAM_JWT_PUBLIC_KEY_FILE)."""
    jwt_jwks_file: str | None = None
    """JWKS file of RS256/ES256 keys, chosen by the token's ``kid`` (CHATSTREAM_JWT_JWKS_FILE)."""
    jwt_issuer: str | None = None
    """Required ``iss`` of JWTs; None skips the check (CHATSTREAM_JWT_ISSUER)."""
    jwt_audience: str | None = None
    """Required ``aud`` of JWTs; None skips the check (CHATSTREAM_JWT_AUDIENCE)."""
    jwt_leeway_s: int = 30
    """Clock skew tolerated on ``exp``/``nbf``/``iat`` (CHATSTREAM_JWT_LEEWAY_S)."""
    jwt_act_for_users: tuple[str, ...] = ()
    """JWT subjects that may send ``x-chatstream-user`` (CHATSTREAM_JWT_ACT_FOR_USERS, comma-separated)."""

    # TLS (docs/security.md): plaintext unless both the certificate and its key are set.
    tls_cert_file: str | None = None
    """PEM certificate chain the server presents (CHATSTREAM_TLS_CERT_FILE)."""
    tls_key_file: str | None = None
    """PEM private key of that certificate (CHATSTREAM_TLS_KEY_FILE)."""
    tls_client_ca_file: str | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mTLS), and a
    verified certificate authenticates its holder (CHATSTREAM_TLS_CLIENT_CA_FILE)."""
    tls_act_for_users: tuple[str, ...] = ()
    """Client-certificate identities (SAN, else CN) that may send ``x-chatstream-user``
    (CHATSTREAM_TLS_ACT_FOR_USERS, comma-separated)."""

    # Limits on what one peer can make the server hold.
    max_request_bytes: int = 1024 * 1024
    """Largest request message accepted (CHATSTREAM_MAX_REQUEST_BYTES)."""
    max_metadata_bytes: int = 16 * 1024
    """Largest total of one call's metadata (headers) accepted (CHATSTREAM_MAX_METADATA_BYTES)."""
    max_streams: int = 1000
    """Concurrent Chat streams per server process (CHATSTREAM_MAX_STREAMS)."""
    max_streams_per_owner: int = 32
    """Concurrent Chat streams per owner and server process (CHATSTREAM_MAX_STREAMS_PER_OWNER);
    with auth mode ``none`` there is one owner and only ``max_streams`` applies."""
    keepalive_min_ping_interval_s: float = 10.0
    """Client pings closer together than this, without data, are strikes
    (CHATSTREAM_KEEPALIVE_MIN_PING_INTERVAL_S)."""
    keepalive_max_ping_strikes: int = 2
    """Strikes after which a connection is closed with GOAWAY (CHATSTREAM_KEEPALIVE_MAX_PING_STRIKES)."""
    handshake_timeout_s: float = 10.0
    """Longest a new connection may take to finish its TLS and HTTP/2 handshake
    (CHATSTREAM_HANDSHAKE_TIMEOUT_S)."""
    max_connections: int = 1000
    """Open client connections per server process (CHATSTREAM_MAX_CONNECTIONS); past it a new
    connection is accepted and closed at once. Keep the process's file-descriptor limit above
    this plus ``max_streams`` and the database pools (the server warns at start-up otherwise)."""
    max_streams_per_connection: int = 100
    """Concurrent calls (HTTP/2 streams) of any service on one connection, advertised as
    SETTINGS_MAX_CONCURRENT_STREAMS (CHATSTREAM_MAX_STREAMS_PER_CONNECTION); gRPC clients queue
    calls past it, and a peer that sends them anyway has them reset (RST_STREAM)."""
    max_concurrent_rpcs: int = 3000
    """Concurrent calls of every service together, per process (CHATSTREAM_MAX_CONCURRENT_RPCS);
    past it gRPC answers RESOURCE_EXHAUSTED. Above ``max_streams`` plus the health-watch and
    reflection caps, so those never starve Chat."""
    max_health_watches: int = 1000
    """Concurrent ``grpc.health.v1.Health/Watch`` streams per process (CHATSTREAM_MAX_HEALTH_WATCHES);
    one more gets RESOURCE_EXHAUSTED / TOO_MANY_STREAMS. Client-side health checking opens one
    per client channel; load-balancer probes use Check, which is not limited."""
    max_reflection_streams: int = 64
    """Concurrent server-reflection streams per process (CHATSTREAM_MAX_REFLECTION_STREAMS)."""
    keepalive_time_s: float = 60.0
    """The server pings a connection with calls in flight after this long without traffic
    (CHATSTREAM_KEEPALIVE_TIME_S)."""
    keepalive_timeout_s: float = 20.0
    """A ping unanswered for this long closes the connection and cancels its calls
    (CHATSTREAM_KEEPALIVE_TIMEOUT_S)."""
    max_connection_idle_s: float = 300.0
    """A connection without calls for this long gets GOAWAY (CHATSTREAM_MAX_CONNECTION_IDLE_S);
    clients reconnect on their next call."""
    max_connection_age_s: float = 1800.0
    """A connection older than this (±10 % jitter) gets GOAWAY, so that clients reconnect and
    load balancers rebalance (CHATSTREAM_MAX_CONNECTION_AGE_S)."""
    max_connection_age_grace_s: float = 60.0
    """After that GOAWAY, calls in flight get this long to finish before the connection is
    closed (CHATSTREAM_MAX_CONNECTION_AGE_GRACE_S)."""
    readiness_interval_s: float = 5.0
    """How often the server checks that it can reach PostgreSQL and has file descriptors to
    spare; health turns NOT_SERVING after two failed checks in a row and SERVING again after one
    good one (CHATSTREAM_READINESS_INTERVAL_S)."""
    min_free_fds: int = 64
    """Free file descriptors below which the process reports itself NOT_SERVING: a Chat needs
    sockets for the model and the database (CHATSTREAM_MIN_FREE_FDS)."""
    default_page_size: int = 50
    """Page size when a list request asks for 0 (CHATSTREAM_DEFAULT_PAGE_SIZE)."""
    max_page_size: int = 1000
    """Larger page sizes are lowered to this (CHATSTREAM_MAX_PAGE_SIZE)."""

    log_user_content: bool = False
    """Whether DEBUG logs may contain users' messages; never in production (CHATSTREAM_LOG_USER_CONTENT)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Builds Settings from the environment; raises SettingsError naming the bad variable."""
        env = os.environ if environ is None else environ
        database_url = env.get(constants.ENV_DATABASE_URL, "")
        redis_url = env.get(constants.ENV_REDIS_URL, "")
        if not database_url:
            raise SettingsError(f"{constants.ENV_DATABASE_URL} is not set (postgresql+asyncpg://...)")
        if not redis_url:
            raise SettingsError(f"{constants.ENV_REDIS_URL} is not set (redis://host:6379/0)")
        defaults = cls(database_url="", redis_url="")
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            redis_cluster=_choice(env, constants.ENV_REDIS_CLUSTER, RedisClusterMode, defaults.redis_cluster),
            listen=env.get(constants.ENV_LISTEN, defaults.listen),
            anthropic_api_key=env.get("ANTHROPIC_API_KEY") or None,
            anthropic_base_url=env.get("ANTHROPIC_BASE_URL") or None,
            model=env.get("CHATSTREAM_MODEL", defaults.model),
            max_tokens=_int(env, "CHATSTREAM_MAX_TOKENS", defaults.max_tokens, minimum=1),
            system_prompt=env.get("CHATSTREAM_SYSTEM_PROMPT", defaults.system_prompt),
            llm_timeout_s=_float(env, "CHATSTREAM_LLM_TIMEOUT_S", defaults.llm_timeout_s),
            llm_max_retries=_int(env, "CHATSTREAM_LLM_MAX_RETRIES", defaults.llm_max_retries, minimum=0),
            shards=_int(env, "CHATSTREAM_SHARDS", defaults.shards, minimum=1),
            context_max_turns=_int(
                env, "CHATSTREAM_CONTEXT_MAX_TURNS", defaults.context_max_turns, minimum=0
            ),
            context_max_chars=_int(
                env, "CHATSTREAM_CONTEXT_MAX_CHARS", defaults.context_max_chars, minimum=1
            ),
            context_cache_ttl_s=_int(
                env, "CHATSTREAM_CONTEXT_CACHE_TTL_S", defaults.context_cache_ttl_s, minimum=1
            ),
            max_text_chars=_int(env, "CHATSTREAM_MAX_TEXT_CHARS", defaults.max_text_chars, minimum=1),
            turn_lease_s=_int(env, "CHATSTREAM_TURN_LEASE_S", defaults.turn_lease_s, minimum=1),
            db_pool_size=_int(env, "CHATSTREAM_DB_POOL_SIZE", defaults.db_pool_size, minimum=1),
            live_log=_bool(env, "CHATSTREAM_LIVE_LOG", defaults.live_log),
            live_ttl_s=_float(env, "CHATSTREAM_LIVE_TTL_S", defaults.live_ttl_s, minimum=0.1),
            live_maxlen=_int(env, "CHATSTREAM_LIVE_MAXLEN", defaults.live_maxlen, minimum=10),
            max_turn_s=_float(env, "CHATSTREAM_MAX_TURN_S", defaults.max_turn_s, minimum=1.0),
            write_timeout_s=_float(env, "CHATSTREAM_WRITE_TIMEOUT_S", defaults.write_timeout_s, minimum=0.1),
            shutdown_grace_s=_float(env, "CHATSTREAM_SHUTDOWN_GRACE_S", defaults.shutdown_grace_s),
            shutdown_drain_s=_float(
                env, "CHATSTREAM_SHUTDOWN_DRAIN_S", defaults.shutdown_drain_s, minimum=0.0
            ),
            metrics_listen=env.get("CHATSTREAM_METRICS_LISTEN", defaults.metrics_listen),
            log_transactions=_bool(env, "CHATSTREAM_LOG_TRANSACTIONS", defaults.log_transactions),
            relay_interval_s=_float(env, "CHATSTREAM_RELAY_INTERVAL_S", defaults.relay_interval_s),
            relay_grace_s=_float(env, "CHATSTREAM_RELAY_GRACE_S", defaults.relay_grace_s),
            consumer_name=env.get("CHATSTREAM_CONSUMER_NAME", defaults.consumer_name),
            consumer_batch=_int(env, "CHATSTREAM_CONSUMER_BATCH", defaults.consumer_batch, minimum=1),
            consumer_max_deliveries=_int(
                env, "CHATSTREAM_CONSUMER_MAX_DELIVERIES", defaults.consumer_max_deliveries, minimum=1
            ),
            consumer_claim_idle_ms=_int(
                env, "CHATSTREAM_CONSUMER_CLAIM_IDLE_MS", defaults.consumer_claim_idle_ms, minimum=1
            ),
            consumer_block_ms=_int(
                env, "CHATSTREAM_CONSUMER_BLOCK_MS", defaults.consumer_block_ms, minimum=1
            ),
            auth_mode=_choice(env, "CHATSTREAM_AUTH_MODE", AuthMode, AuthMode.REQUIRED),
            api_keys=_api_keys(env, "CHATSTREAM_API_KEYS"),
            jwt_hs256_secret=env.get("CHATSTREAM_JWT_HS256_SECRET") or None,
            jwt_public_key_file=env.get("CHATSTREAM_JWT_PUBLIC_KEY_FILE") or None,
            jwt_jwks_file=env.get("CHATSTREAM_JWT_JWKS_FILE") or None,
            jwt_issuer=env.get("CHATSTREAM_JWT_ISSUER") or None,
            jwt_audience=env.get("CHATSTREAM_JWT_AUDIENCE") or None,
            jwt_leeway_s=_int(env, "CHATSTREAM_JWT_LEEWAY_S", defaults.jwt_leeway_s, minimum=0),
            jwt_act_for_users=_list(env, "CHATSTREAM_JWT_ACT_FOR_USERS"),
            tls_cert_file=env.get("CHATSTREAM_TLS_CERT_FILE") or None,
            tls_key_file=env.get("CHATSTREAM_TLS_KEY_FILE") or None,
            tls_client_ca_file=env.get("CHATSTREAM_TLS_CLIENT_CA_FILE") or None,
            tls_act_for_users=_list(env, "CHATSTREAM_TLS_ACT_FOR_USERS"),
            max_request_bytes=_int(
                env, "CHATSTREAM_MAX_REQUEST_BYTES", defaults.max_request_bytes, minimum=1024
            ),
            max_metadata_bytes=_int(
                env, "CHATSTREAM_MAX_METADATA_BYTES", defaults.max_metadata_bytes, minimum=1024
            ),
            max_streams=_int(env, "CHATSTREAM_MAX_STREAMS", defaults.max_streams, minimum=1),
            max_streams_per_owner=_int(
                env, "CHATSTREAM_MAX_STREAMS_PER_OWNER", defaults.max_streams_per_owner, minimum=1
            ),
            keepalive_min_ping_interval_s=_float(
                env, "CHATSTREAM_KEEPALIVE_MIN_PING_INTERVAL_S", defaults.keepalive_min_ping_interval_s
            ),
            keepalive_max_ping_strikes=_int(
                env, "CHATSTREAM_KEEPALIVE_MAX_PING_STRIKES", defaults.keepalive_max_ping_strikes, minimum=0
            ),
            handshake_timeout_s=_float(env, "CHATSTREAM_HANDSHAKE_TIMEOUT_S", defaults.handshake_timeout_s),
            max_connections=_int(env, "CHATSTREAM_MAX_CONNECTIONS", defaults.max_connections, minimum=1),
            max_streams_per_connection=_int(
                env, "CHATSTREAM_MAX_STREAMS_PER_CONNECTION", defaults.max_streams_per_connection, minimum=1
            ),
            max_concurrent_rpcs=_int(
                env, "CHATSTREAM_MAX_CONCURRENT_RPCS", defaults.max_concurrent_rpcs, minimum=1
            ),
            max_health_watches=_int(
                env, "CHATSTREAM_MAX_HEALTH_WATCHES", defaults.max_health_watches, minimum=0
            ),
            max_reflection_streams=_int(
                env, "CHATSTREAM_MAX_REFLECTION_STREAMS", defaults.max_reflection_streams, minimum=0
            ),
            keepalive_time_s=_float(env, "CHATSTREAM_KEEPALIVE_TIME_S", defaults.keepalive_time_s),
            keepalive_timeout_s=_float(env, "CHATSTREAM_KEEPALIVE_TIMEOUT_S", defaults.keepalive_timeout_s),
            max_connection_idle_s=_float(
                env, "CHATSTREAM_MAX_CONNECTION_IDLE_S", defaults.max_connection_idle_s
            ),
            max_connection_age_s=_float(
                env, "CHATSTREAM_MAX_CONNECTION_AGE_S", defaults.max_connection_age_s
            ),
            max_connection_age_grace_s=_float(
                env, "CHATSTREAM_MAX_CONNECTION_AGE_GRACE_S", defaults.max_connection_age_grace_s
            ),
            readiness_interval_s=_float(
                env, "CHATSTREAM_READINESS_INTERVAL_S", defaults.readiness_interval_s
            ),
            min_free_fds=_int(env, "CHATSTREAM_MIN_FREE_FDS", defaults.min_free_fds, minimum=0),
            default_page_size=_int(
                env, "CHATSTREAM_DEFAULT_PAGE_SIZE", defaults.default_page_size, minimum=1
            ),
            max_page_size=_int(env, "CHATSTREAM_MAX_PAGE_SIZE", defaults.max_page_size, minimum=1),
            log_user_content=_bool(env, "CHATSTREAM_LOG_USER_CONTENT", defaults.log_user_content),
        )


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float | None = None) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if minimum is None and value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


_TRUE: frozenset[str] = frozenset({"1", "true", "yes", "on"})
_FALSE: frozenset[str] = frozenset({"0", "false", "no", "off"})


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


_E = typing.TypeVar("_E", bound=enum.StrEnum)


def _choice(env: Mapping[str, str], name: str, kind: type[_E], default: _E) -> _E:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw.lower())
    except ValueError:
        allowed = "|".join(member.value for member in kind)
        raise SettingsError(f"{name} must be one of {allowed}, got {raw!r}") from None


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


_API_KEY_ENTRY = re.compile(r"([A-Za-z0-9._@-]{1,128}):([0-9a-f]{64})(:act_for_users)?")


def _api_keys(env: Mapping[str, str], name: str) -> tuple[ApiKeyEntry, ...]:
    entries: list[ApiKeyEntry] = []
    for item in _list(env, name):
        match = _API_KEY_ENTRY.fullmatch(item)
        if match is None:
            # Never echo the entry: an operator may have pasted a key instead of its hash.
            raise SettingsError(
                f"{name}: entry {len(entries) + 1} is not subject:sha256hex[:act_for_users] "
                "(see chatstream new-key)"
            )
        entries.append(ApiKeyEntry(subject=match[1], sha256=match[2], act_for_users=match[3] is not None))
    return tuple(entries)
