"""Settings: read once from CHATSTREAM_* environment variables, then passed down explicitly.

Settings come in groups, one frozen dataclass each (database, redis, llm, ...), and each component
takes its own group. Every field declares its environment variable, and for numbers its lower
bound, beside its default, as ``field(metadata=env(...))``; one loader (server/envvars.py) reads
every group from those declarations, so a variable is spelled once. tests/test_settings.py
checks the README's settings table and docs/ against the declarations.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import socket
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from server import constants
from server.envvars import EnvVar, env, env_var, load_group, split_list
from server.envvars import SettingsError as SettingsError  # re-exported: callers catch it from here
from server.limit_settings import AdmissionSettings as AdmissionSettings  # re-exported, as the next
from server.limit_settings import LimitsSettings as LimitsSettings  # re-exported: one import for every group


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


_API_KEY_ENTRY = re.compile(r"([A-Za-z0-9._@-]{1,128}):([0-9a-f]{64})(:act_for_users)?")


def _api_keys(name: str, raw: str) -> tuple[ApiKeyEntry, ...]:
    entries: list[ApiKeyEntry] = []
    for item in split_list(raw):
        match = _API_KEY_ENTRY.fullmatch(item)
        if match is None:
            # Never echo the entry: an operator may have pasted a key instead of its hash.
            raise SettingsError(
                f"{name}: entry {len(entries) + 1} is not subject:sha256hex[:act_for_users] "
                "(see chatstream new-key)"
            )
        entries.append(ApiKeyEntry(subject=match[1], sha256=match[2], act_for_users=match[3] is not None))
    return tuple(entries)


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseSettings:
    """The PostgreSQL database: one engine and one pool per process."""

    database_url: str = field(
        repr=False, metadata=env(constants.ENV_DATABASE_URL, example="postgresql+asyncpg://...")
    )
    """SQLAlchemy URL, ``postgresql+asyncpg://user:pass@host/db``."""
    db_pool_size: int = field(default=10, metadata=env("CHATSTREAM_DB_POOL_SIZE", minimum=1))
    """PostgreSQL connections per process."""
    log_transactions: bool = field(default=False, metadata=env("CHATSTREAM_LOG_TRANSACTIONS"))
    """Log BEGIN/COMMIT/ROLLBACK of every unit of work with its duration."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisSettings:
    """The Redis server: turn streams, live logs, context cache."""

    redis_url: str = field(repr=False, metadata=env(constants.ENV_REDIS_URL, example="redis://host:6379/0"))
    """``redis://host:port/db`` or ``unix:///path.sock``; for a Redis Cluster, any one node's
    ``redis://host:port``."""
    redis_cluster: RedisClusterMode = field(
        default=RedisClusterMode.AUTO, metadata=env(constants.ENV_REDIS_CLUSTER)
    )
    """Whether that Redis is a cluster (auto, true or false); ``auto`` asks the server once at
    start-up, and falls back to a single Redis if it cannot be reached."""
    shards: int = field(default=4, metadata=env(constants.ENV_SHARDS, minimum=1))
    """Number of ``chat:turns:{k}`` streams; changing it re-maps conversations."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LlmSettings:
    """The upstream model (Anthropic Messages API)."""

    anthropic_api_key: str | None = field(default=None, repr=False, metadata=env("ANTHROPIC_API_KEY"))
    """The SDK's own ANTHROPIC_API_KEY; None means dev mode serves the demo model."""
    anthropic_base_url: str | None = field(default=None, metadata=env("ANTHROPIC_BASE_URL"))
    """The SDK's own ANTHROPIC_BASE_URL; None means the SDK default."""
    model: str = field(default="claude-sonnet-4-5", metadata=env("CHATSTREAM_MODEL"))
    """Model id sent upstream."""
    max_tokens: int = field(default=1024, metadata=env("CHATSTREAM_MAX_TOKENS", minimum=1))
    """Upper bound on one reply's tokens."""
    system_prompt: str = field(default="", metadata=env("CHATSTREAM_SYSTEM_PROMPT"))
    """System prompt for every turn; empty sends none."""
    llm_timeout_s: float = field(default=60.0, metadata=env("CHATSTREAM_LLM_TIMEOUT_S"))
    """Longest silence allowed from upstream, before or during a reply."""
    llm_max_retries: int = field(default=2, metadata=env("CHATSTREAM_LLM_MAX_RETRIES", minimum=0))
    """SDK retries of 429/5xx/connection errors before the first token."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnsSettings:
    """What one turn may send, keep and hold: message size, context, leases, live log."""

    max_text_chars: int = field(default=32_768, metadata=env("CHATSTREAM_MAX_TEXT_CHARS", minimum=1))
    """Longest user message accepted."""
    context_max_turns: int = field(default=50, metadata=env("CHATSTREAM_CONTEXT_MAX_TURNS", minimum=0))
    """Earlier turns sent to the model as context."""
    context_max_chars: int = field(default=100_000, metadata=env("CHATSTREAM_CONTEXT_MAX_CHARS", minimum=1))
    """Largest prompt sent upstream, in characters: system prompt, earlier turns and the new
    message together. Earlier turns are added newest first while they fit, so the prompt and the
    cached context stay bounded however long the conversation.
    Characters, not tokens: about 4 per token in English, down to 1 per token in CJK text. Must
    hold the longest accepted message plus the system prompt; the server refuses to start otherwise."""
    context_cache_ttl_s: int = field(default=3600, metadata=env("CHATSTREAM_CONTEXT_CACHE_TTL_S", minimum=1))
    """How long a conversation's context stays cached in Redis."""
    turn_lease_s: int = field(default=30, metadata=env("CHATSTREAM_TURN_LEASE_S", minimum=1))
    """Seconds an unrenewed STREAMING turn lives before it counts as interrupted.

    The serving process renews its turns every third of this; a turn whose server died
    becomes INTERRUPTED (and its conversation usable again) about this long after."""
    max_turn_s: float = field(default=600.0, metadata=env("CHATSTREAM_MAX_TURN_S", minimum=1.0))
    """The longest a turn may stream, also when it continues without its client
    (``ON_DISCONNECT_CONTINUE``); past it the turn ends CANCELLED."""
    write_timeout_s: float = field(default=30.0, metadata=env("CHATSTREAM_WRITE_TIMEOUT_S", minimum=0.1))
    """Longest a stream's event may wait for the client to accept it (HTTP/2 flow control) before
    the call counts as gone: its turn ends CANCELLED with its partial text and frees its slot."""
    live_log: bool = field(default=True, metadata=env("CHATSTREAM_LIVE_LOG"))
    """Write each turn's events to its live log in Redis, for WatchTurn, WatchConversation, resuming
    and CancelTurn from any replica. Off, those serve ended turns from PostgreSQL only."""
    live_ttl_s: float = field(default=300.0, metadata=env("CHATSTREAM_LIVE_TTL_S", minimum=0.1))
    """How long a turn's live log lives after its last event; resuming later is served from
    PostgreSQL."""
    live_maxlen: int = field(default=10_000, metadata=env("CHATSTREAM_LIVE_MAXLEN", minimum=10))
    """The most events one turn's live log keeps."""
    flush_max_ms: float = field(default=20.0, metadata=env("CHATSTREAM_FLUSH_MAX_MS", minimum=0.0))
    """The longest the live log's writer lets a busy process's deltas pile up before it writes
    them, in milliseconds; what a turn produced meanwhile reaches its caller as one message
    (server/coalescer.py). 0 while both readings of the load are under half their admission
    thresholds, growing to this at the thresholds; with admission by load off, or the live log
    off, always 0. A stream's gap grows by up to this much: 50 ms between tokens at 20 tokens/s,
    plus this, plus 20 ms of loop lag (the admission threshold) stays within a 100 ms gap. Keep it
    at or under ``CHATSTREAM_ADMISSION_MAX_LAG_MS``: each pipeline releases an interval's worth
    of writes at once, which the loop's lag reading sees, and the batching alone must not make
    the process shed. 0 turns it off."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerSettings:
    """The persistence consumer and the relay."""

    consumer_name: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        metadata=env("CHATSTREAM_CONSUMER_NAME"),
    )
    """This consumer's name in the group; unique per process."""
    consumer_batch: int = field(default=200, metadata=env("CHATSTREAM_CONSUMER_BATCH", minimum=1))
    """Entries read per XREADGROUP call."""
    consumer_block_ms: int = field(default=1000, metadata=env("CHATSTREAM_CONSUMER_BLOCK_MS", minimum=1))
    """How long one XREADGROUP waits for new entries."""
    consumer_max_deliveries: int = field(
        default=5, metadata=env("CHATSTREAM_CONSUMER_MAX_DELIVERIES", minimum=1)
    )
    """Deliveries after which an entry that keeps failing goes to the dead-letter stream. Outages
    of PostgreSQL never count toward it."""
    consumer_claim_idle_ms: int = field(
        default=30_000, metadata=env("CHATSTREAM_CONSUMER_CLAIM_IDLE_MS", minimum=1)
    )
    """Idle time after which another consumer's pending entry is claimed (XAUTOCLAIM); longer than
    any batch takes."""
    relay_interval_s: float = field(default=5.0, metadata=env("CHATSTREAM_RELAY_INTERVAL_S"))
    """How often the relay looks for unpersisted turns and expired leases."""
    relay_grace_s: float = field(default=30.0, metadata=env("CHATSTREAM_RELAY_GRACE_S"))
    """How long after it ended a turn may stay unpersisted before the relay re-publishes it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """Authentication (docs/security.md)."""

    auth_mode: AuthMode = field(
        default=AuthMode.NONE, metadata=env("CHATSTREAM_AUTH_MODE", unset=AuthMode.REQUIRED)
    )
    """``required`` or ``none``. The dataclass default is ``none`` so that tests and embedded use
    keep the single-owner behaviour; unset in the environment it is ``required``, so a production
    ``chatstream serve`` refuses to start without credentials unless told otherwise."""
    api_keys: tuple[ApiKeyEntry, ...] = field(
        default=(), metadata=env("CHATSTREAM_API_KEYS", parse=_api_keys)
    )
    """Accepted API keys: comma-separated ``subject:sha256hex[:act_for_users]``."""
    jwt_hs256_secret: str | None = field(
        default=None, repr=False, metadata=env("CHATSTREAM_JWT_HS256_SECRET")
    )
    """Shared secret of HS256 JWTs, at least 32 bytes."""
    jwt_public_key_file: str | None = field(default=None, metadata=env("CHATSTREAM_JWT_PUBLIC_KEY_FILE"))
    """PEM public key (RSA for RS256, P-256 for ES256) of signed JWTs."""
    jwt_jwks_file: str | None = field(default=None, metadata=env("CHATSTREAM_JWT_JWKS_FILE"))
    """JWKS file of RS256/ES256 keys, chosen by the token's ``kid``."""
    jwt_issuer: str | None = field(default=None, metadata=env("CHATSTREAM_JWT_ISSUER"))
    """Required ``iss`` of JWTs; None skips the check."""
    jwt_audience: str | None = field(default=None, metadata=env("CHATSTREAM_JWT_AUDIENCE"))
    """Required ``aud`` of JWTs; None skips the check."""
    jwt_leeway_s: int = field(default=30, metadata=env("CHATSTREAM_JWT_LEEWAY_S", minimum=0))
    """Clock skew tolerated on ``exp``/``nbf``/``iat``."""
    jwt_act_for_users: tuple[str, ...] = field(default=(), metadata=env("CHATSTREAM_JWT_ACT_FOR_USERS"))
    """JWT subjects that may send ``x-chatstream-user`` (comma-separated)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """TLS (docs/security.md): plaintext unless both the certificate and its key are set."""

    tls_cert_file: str | None = field(default=None, metadata=env("CHATSTREAM_TLS_CERT_FILE"))
    """PEM certificate chain the server presents."""
    tls_key_file: str | None = field(default=None, metadata=env("CHATSTREAM_TLS_KEY_FILE"))
    """PEM private key of that certificate."""
    tls_client_ca_file: str | None = field(default=None, metadata=env("CHATSTREAM_TLS_CLIENT_CA_FILE"))
    """PEM CA bundle; when set, clients must present a certificate it signed (mTLS), and a
    verified certificate authenticates its holder."""
    tls_act_for_users: tuple[str, ...] = field(default=(), metadata=env("CHATSTREAM_TLS_ACT_FOR_USERS"))
    """Client-certificate identities (SAN, else CN) that may send ``x-chatstream-user``
    (comma-separated)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionsSettings:
    """How the server keeps and ends client connections (HTTP/2 keepalive, age, idle)."""

    handshake_timeout_s: float = field(default=10.0, metadata=env("CHATSTREAM_HANDSHAKE_TIMEOUT_S"))
    """Longest a new connection may take to finish its TLS and HTTP/2 handshake."""
    keepalive_time_s: float = field(default=60.0, metadata=env("CHATSTREAM_KEEPALIVE_TIME_S"))
    """The server pings a connection with calls in flight after this long without traffic."""
    keepalive_timeout_s: float = field(default=20.0, metadata=env("CHATSTREAM_KEEPALIVE_TIMEOUT_S"))
    """A ping unanswered for this long closes the connection and cancels its calls."""
    keepalive_min_ping_interval_s: float = field(
        default=10.0, metadata=env("CHATSTREAM_KEEPALIVE_MIN_PING_INTERVAL_S")
    )
    """Client pings closer together than this, without data, are strikes."""
    keepalive_max_ping_strikes: int = field(
        default=2, metadata=env("CHATSTREAM_KEEPALIVE_MAX_PING_STRIKES", minimum=0)
    )
    """Strikes after which a connection is closed with GOAWAY."""
    max_connection_idle_s: float = field(default=300.0, metadata=env("CHATSTREAM_MAX_CONNECTION_IDLE_S"))
    """A connection without calls for this long gets GOAWAY;
    clients reconnect on their next call."""
    max_connection_age_s: float = field(default=1800.0, metadata=env("CHATSTREAM_MAX_CONNECTION_AGE_S"))
    """A connection older than this (±10 % jitter) gets GOAWAY, so that clients reconnect and
    load balancers rebalance."""
    max_connection_age_grace_s: float = field(
        default=60.0, metadata=env("CHATSTREAM_MAX_CONNECTION_AGE_GRACE_S")
    )
    """After that GOAWAY, calls in flight get this long to finish before the connection is
    closed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """The serving process: where it listens, how it starts serving and how it stops."""

    listen: str = field(default="127.0.0.1:50051", metadata=env(constants.ENV_LISTEN))
    """gRPC listen address; port 0 picks a free port."""
    shutdown_grace_s: float = field(default=10.0, metadata=env("CHATSTREAM_SHUTDOWN_GRACE_S"))
    """How long in-flight streams may finish after SIGTERM."""
    shutdown_drain_s: float = field(default=0.0, metadata=env("CHATSTREAM_SHUTDOWN_DRAIN_S", minimum=0.0))
    """After SIGTERM, seconds health reports NOT_SERVING while calls are still accepted, so load
    balancers stop routing here before the server refuses calls."""
    readiness_interval_s: float = field(default=5.0, metadata=env("CHATSTREAM_READINESS_INTERVAL_S"))
    """How often the server checks that it can reach PostgreSQL and has file descriptors to
    spare; health turns NOT_SERVING after two failed checks in a row and SERVING again after one
    good one."""
    min_free_fds: int = field(default=64, metadata=env("CHATSTREAM_MIN_FREE_FDS", minimum=0))
    """Free file descriptors below which the process reports itself NOT_SERVING: a Chat needs
    sockets for the model and the database."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ObservabilitySettings:
    """Metrics and what logs may contain."""

    metrics_listen: str = field(default="", metadata=env("CHATSTREAM_METRICS_LISTEN"))
    """``host:port`` of the Prometheus endpoint (/metrics), e.g. ``0.0.0.0:9464``; empty turns
    it off. Port 0 picks a free port."""
    log_user_content: bool = field(default=False, metadata=env("CHATSTREAM_LOG_USER_CONTENT"))
    """Whether DEBUG logs may contain users' messages; never in production."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the server, consumer and relay need to run, one group per concern.

    Field names are unique across groups, so that `with_overrides` can take them flat.
    """

    database: DatabaseSettings
    redis: RedisSettings
    llm: LlmSettings = field(default_factory=LlmSettings)
    turns: TurnsSettings = field(default_factory=TurnsSettings)
    consumer: ConsumerSettings = field(default_factory=ConsumerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    connections: ConnectionsSettings = field(default_factory=ConnectionsSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Builds Settings from the environment; raises SettingsError naming the bad variable."""
        env = os.environ if environ is None else environ
        return cls(
            database=load_group(DatabaseSettings, env),
            redis=load_group(RedisSettings, env),
            llm=load_group(LlmSettings, env),
            turns=load_group(TurnsSettings, env),
            consumer=load_group(ConsumerSettings, env),
            auth=load_group(AuthSettings, env),
            tls=load_group(TlsSettings, env),
            limits=load_group(LimitsSettings, env),
            admission=load_group(AdmissionSettings, env),
            connections=load_group(ConnectionsSettings, env),
            server=load_group(ServerSettings, env),
            observability=load_group(ObservabilitySettings, env),
        )

    @classmethod
    def from_fields(cls, *, database_url: str, redis_url: str, **flat: object) -> Settings:
        """The defaults with some fields set, named flat whatever their group (see `with_overrides`)."""
        database, redis = DatabaseSettings(database_url=database_url), RedisSettings(redis_url=redis_url)
        return cls(database=database, redis=redis).with_overrides(**flat)

    def with_overrides(self, **flat: object) -> Settings:
        """A copy with some fields replaced, named flat (``max_streams=1``) whatever their group.

        Raises:
            TypeError: No group has a field of that name.
        """
        changes: dict[str, dict[str, object]] = {}
        for name, value in flat.items():
            group = _GROUP_OF_FIELD.get(name)
            if group is None:
                raise TypeError(f"Settings has no field {name!r}")
            changes.setdefault(group, {})[name] = value
        return dataclasses.replace(
            self,
            **{
                group: dataclasses.replace(getattr(self, group), **fields)
                for group, fields in changes.items()
            },
        )


_GROUPS: typing.Final[Mapping[str, type[object]]] = {
    f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)
}


def _group_of_field() -> dict[str, str]:
    owner: dict[str, str] = {}
    for group_name, group in _GROUPS.items():
        for f in dataclasses.fields(group):  # type: ignore[arg-type]  # every group is a dataclass
            if f.name in owner:
                raise TypeError(f"settings field {f.name!r} is in both {owner[f.name]} and {group_name}")
            env_var(f)  # raises if it declares none
            owner[f.name] = group_name
    return owner


_GROUP_OF_FIELD: typing.Final = _group_of_field()


def variable_of(field_name: str) -> str:
    """The environment variable of a Settings field, named flat (``"metrics_listen"``).

    Raises:
        KeyError: No group has a field of that name.
    """
    group = _GROUPS[_GROUP_OF_FIELD[field_name]]
    field_ = next(f for f in dataclasses.fields(group) if f.name == field_name)  # type: ignore[arg-type]
    return env_var(field_).name


def declared_variables() -> Iterator[tuple[str, dataclasses.Field[object], EnvVar]]:
    """Every declared variable: its group's name in Settings, its field and its declaration."""
    for group_name, group in _GROUPS.items():
        for f in dataclasses.fields(group):  # type: ignore[arg-type]  # every group is a dataclass
            yield group_name, f, env_var(f)
