"""What the sync and async clients share: targets, channel options, requests, retry timing, reply assembly."""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, Self

import grpc

from chatstream._enums import TurnStatus
from chatstream._errors import ChatClientError
from chatstream.v1 import chat_service_pb2

SERVICE_NAME: Final = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name

# Reads have no side effect, so gRPC may replay them transparently; mutations are left to the
# caller (Create is idempotent through request_id, Delete reports NOT_FOUND the second time).
_RETRIED_READS: Final = ("GetConversation", "ListConversations", "ListMessages")

# round_robin: a target that resolves to several servers (a list of addresses, a DNS name with
# several records, a headless Kubernetes Service) gets a connection to each, and calls take
# turns over the ready ones. With one address it is the same as gRPC's default, pick_first;
# an address that does not answer (say ::1 of localhost) only gets reconnects in the background.
SERVICE_CONFIG: Final = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": SERVICE_NAME, "method": method} for method in _RETRIED_READS],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How `chat` retries a call that failed with UNAVAILABLE before its first event, resumes
    a turn whose connection dropped, and restarts a turn whose server died.

    A retry reuses the call's `request_id`, so the server never runs the model twice for it.
    Once an event has arrived the call is never retried: the caller has already seen part
    of the turn, so it is resumed (`resume_window`), or, once the turn ended INTERRUPTED,
    started again as a new turn (`max_restarts`).
    """

    max_attempts: int = 4
    """Attempts in total, the first one included; 1 disables retries."""
    initial_backoff: timedelta = timedelta(milliseconds=100)
    """Upper bound of the random wait before the first retry."""
    max_backoff: timedelta = timedelta(seconds=2)
    """Cap on the upper bound of any wait."""
    backoff_multiplier: float = 2.0
    """Growth of the upper bound from one retry to the next."""
    resume_window: timedelta = timedelta(seconds=30)
    """How long a stream whose turn is known keeps trying to resume after its connection
    failed (a server restarting, a failover), waiting at most `max_backoff` between tries."""
    max_restarts: int = 1
    """How many times one `chat` call starts its turn again after the server producing it
    died (the turn ended INTERRUPTED); 0 never does. Each restart runs the model again, and a
    request that kills its server would take down one more replica per restart, hence 1."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be at least 0, got {self.max_restarts}")
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier must be at least 1, got {self.backoff_multiplier}")

    def backoff_s(self, attempt: int) -> float:
        """The wait after failed attempt `attempt` (1-based): full jitter, as gRPC's own retries do."""
        ceiling = min(
            self.max_backoff.total_seconds(),
            self.initial_backoff.total_seconds() * self.backoff_multiplier ** (attempt - 1),
        )
        return random.uniform(0, ceiling)


DEFAULT_RETRY_POLICY: Final = RetryPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatReply:
    """A whole turn, as returned by `chat_reply`."""

    conversation: str
    """Resource name of the conversation, `conversations/{conversation}`."""
    turn: str
    """Resource name of the turn, `conversations/{conversation}/turns/{turn}`."""
    text: str
    """The assistant's reply: every `text_delta` of the turn, concatenated."""
    status: TurnStatus
    """How the turn ended, normally `TurnStatus.COMPLETED`; prints its name, equals its proto number."""
    stop_reason: str
    """The model's stop reason, e.g. `end_turn` or `max_tokens`."""
    usage: chat_service_pb2.Usage
    """Token counts for the turn."""
    model: str
    """The model that produced the reply."""
    replay: bool
    """True when the server replayed a turn already stored for this `request_id`."""
    events: int
    """How many events the stream carried (those of restarted turns included)."""
    restarts: int = 0
    """How many times the turn was started again because the server producing it died; the
    other fields, `text` included, are those of the last turn only."""


class ReplyBuilder:
    """Folds the events of one `chat` call into a `ChatReply`: those after its last `started`."""

    __slots__ = ("_completed", "_events", "_restarts", "_started", "_text")

    def __init__(self) -> None:
        self._started: chat_service_pb2.TurnStarted | None = None
        self._completed: chat_service_pb2.TurnCompleted | None = None
        self._text: list[str] = []
        self._events = 0
        self._restarts = 0

    def add(self, event: chat_service_pb2.TurnEvent) -> None:
        """Takes the next event of the stream."""
        self._events += 1
        match event.WhichOneof("kind"):
            case "started":
                if self._started is not None:
                    # A restart (see `chat`): the text so far belongs to the interrupted turn.
                    self._restarts += 1
                    self._text.clear()
                    self._completed = None
                self._started = event.started
            case "text_delta":
                self._text.append(event.text_delta.text)
            case "completed":
                self._completed = event.completed
            case None:
                # An event kind added to the proto after this client was built: skip it.
                pass

    def build(self) -> ChatReply:
        """The reply; raises ChatClientError if the stream ended without `started` and `completed`."""
        if self._started is None or self._completed is None:
            # The server ends every successful stream with `completed`; a clean end without it
            # is a broken contract, not a turn the caller should mistake for a whole reply.
            raise ChatClientError(
                grpc.StatusCode.INTERNAL,
                f"the chat stream ended after {self._events} events without a completed event",
            )
        usage = chat_service_pb2.Usage()
        usage.CopyFrom(self._completed.usage)
        return ChatReply(
            conversation=self._started.conversation,
            turn=self._started.turn,
            text="".join(self._text),
            status=TurnStatus(self._completed.status),
            stop_reason=self._completed.stop_reason,
            usage=usage,
            model=self._completed.model,
            replay=self._started.replay,
            events=self._events,
            restarts=self._restarts,
        )


@dataclass(frozen=True, slots=True)
class Deadline:
    """A point in time (monotonic clock) that spans all the attempts of one call, or none."""

    at: float | None

    @classmethod
    def after(cls, timeout_s: float | None) -> Self:
        """The deadline `timeout_s` from now; `None` means no deadline."""
        return cls(None if timeout_s is None else time.monotonic() + timeout_s)

    def remaining_s(self) -> float | None:
        """Seconds left (never negative), or `None` without a deadline."""
        return None if self.at is None else max(0.0, self.at - time.monotonic())


def chat_retry_delay_s(
    policy: RetryPolicy, *, attempt: int, events_received: int, error: ChatClientError, deadline: Deadline
) -> float | None:
    """How long to wait before retrying a failed `Chat` attempt, or `None` to give up.

    Only UNAVAILABLE before the first event is retried [AIP-194]: after that the caller has
    consumed part of the turn, and the same request_id would replay it from the start or
    return ABORTED. The server's RetryInfo, when present, is a lower bound on the wait.
    """
    if error.code is not grpc.StatusCode.UNAVAILABLE or events_received or attempt >= policy.max_attempts:
        return None
    delay_s = policy.backoff_s(attempt)
    if error.retry_delay is not None:
        delay_s = max(delay_s, error.retry_delay.total_seconds())
    remaining_s = deadline.remaining_s()
    if remaining_s is not None and delay_s >= remaining_s:
        return None
    return delay_s


class ClientState(enum.Enum):
    """Where a client is in its life: it opens once and closes once [httpx ClientState]."""

    UNOPENED = enum.auto()
    OPENED = enum.auto()
    CLOSED = enum.auto()


def check_enter(state: ClientState) -> None:
    """Refuses a second `with`, or a `with` on a closed client."""
    if state is ClientState.OPENED:
        raise RuntimeError("a chatstream client can be entered only once")
    if state is ClientState.CLOSED:
        raise RuntimeError("a closed chatstream client cannot be reopened")


def check_open(state: ClientState) -> None:
    """Refuses a call on a closed client, which gRPC would report with a less helpful error."""
    if state is ClientState.CLOSED:
        raise RuntimeError("this chatstream client is closed")


def channel_target(target: str | Sequence[str]) -> str:
    """The gRPC target of one server address, of a gRPC target string, or of several addresses.

    A string is gRPC's own: `host:port`, `dns:///host:port` (every record of the name),
    `ipv4:10.0.0.1:50051,10.0.0.2:50051`, `unix:/path`. A sequence of one address is that
    address. Several addresses must be IP addresses with their port, all IPv4 or all IPv6
    (`[fd00::1]:50051`): gRPC resolves a list of names only as one DNS name.

    Raises:
        ValueError: An empty sequence, or several addresses that are not all IPv4 or all IPv6.
    """
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0]
    parsed = [_ip_with_port(address) for address in addresses]
    versions = {ip.version for ip in parsed if ip is not None}
    if None in parsed or len(versions) != 1:
        raise ValueError(
            "several server addresses must be IP addresses with a port, all IPv4 or all IPv6 "
            "(10.0.0.1:50051, [fd00::1]:50051); for host names give one DNS name that has a "
            f"record per server, e.g. 'dns:///chat.internal:50051'; got {addresses!r}"
        )
    return f"ipv{versions.pop()}:{','.join(addresses)}"


def _ip_with_port(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return None
    # gRPC's ipv6: scheme wants the brackets, and without them the port is ambiguous.
    return ip if bracketed == (ip.version == 6) else None


def seconds(timeout: timedelta | None, default: timedelta | None) -> float | None:
    """The per-call timeout in seconds as gRPC wants it; `None` falls back to the client default."""
    chosen = default if timeout is None else timeout
    return None if chosen is None else chosen.total_seconds()


def new_request_id() -> str:
    """A fresh idempotency key."""
    return str(uuid.uuid4())


def chat_request(
    text: str, *, conversation: str, request_id: str | None, resume: bool
) -> chat_service_pb2.ChatRequest:
    """The request of one `Chat` call; every retry of the call sends this same request.

    A resuming call asks the server to go on producing the turn if the connection drops
    (`ON_DISCONNECT_CONTINUE`); the client cancels the turn itself if its caller leaves.
    """
    return chat_service_pb2.ChatRequest(
        conversation=conversation,
        text=text,
        request_id=new_request_id() if request_id is None else request_id,
        on_disconnect=(
            chat_service_pb2.ON_DISCONNECT_CONTINUE if resume else chat_service_pb2.ON_DISCONNECT_CANCEL
        ),
    )


class ResumePoint:
    """Where a stream of one turn is: its name, the last event's `seq`, and the text reached.

    Everything a `WatchTurn` needs to go on from there, on whichever server answers.
    """

    __slots__ = ("completed", "conversation", "failing_since", "offset", "seq", "turn")

    def __init__(self, turn: str = "", *, seq: int = 0, offset: int = 0) -> None:
        self.conversation = ""
        self.turn = turn
        self.seq = seq
        self.offset = offset
        self.completed = False
        self.failing_since: float | None = None
        """When the attempts to go on began failing (monotonic clock); None while events flow."""

    def accept(self, event: chat_service_pb2.TurnEvent) -> bool:
        """Takes the next event; False for one already seen (a resume may overlap)."""
        self.failing_since = None
        if self.seq and event.seq <= self.seq:
            return False
        self.seq = event.seq
        match event.WhichOneof("kind"):
            case "started":
                self.conversation = event.started.conversation
                self.turn = event.started.turn
            case "text_delta":
                self.offset = event.text_delta.offset + len(event.text_delta.text)
            case "completed":
                self.completed = True
            case None:
                pass
        return True

    def watch_request(self) -> chat_service_pb2.WatchTurnRequest:
        """The request that resumes the stream after the last event seen."""
        return chat_service_pb2.WatchTurnRequest(turn=self.turn, after_seq=self.seq, after_offset=self.offset)


def resume_delay_s(
    policy: RetryPolicy, *, attempt: int, position: ResumePoint, error: ChatClientError, deadline: Deadline
) -> float | None:
    """How long to wait before going on with a stream that failed, or `None` to give up.

    Before the turn is known, only `Chat`'s own retry rule applies. Once it is known, a
    transport UNAVAILABLE (a dropped connection, a server gone) resumes the turn with `WatchTurn`
    after the last event seen, on whichever server answers, for up to `policy.resume_window`.
    """
    if not position.turn:
        return chat_retry_delay_s(policy, attempt=attempt, events_received=0, error=error, deadline=deadline)
    # An UNAVAILABLE the server sent itself carries an ErrorInfo reason: the turn failed
    # (the model was unavailable) and is stored so. Only a transport failure, which has
    # none, means the turn may still be going on elsewhere.
    if error.code is not grpc.StatusCode.UNAVAILABLE or error.reason:
        return None
    now = time.monotonic()
    if position.failing_since is None:
        position.failing_since = now
    if now - position.failing_since > policy.resume_window.total_seconds():
        return None
    delay_s = policy.backoff_s(attempt)
    remaining_s = deadline.remaining_s()
    if remaining_s is not None and delay_s >= remaining_s:
        return None
    return delay_s


def restart_wanted(
    policy: RetryPolicy, *, event: chat_service_pb2.TurnEvent, restarts: int, deadline: Deadline
) -> bool:
    """Whether `chat` starts its turn again rather than pass on this event.

    Only the terminal event of a turn whose producing server died qualifies: status
    INTERRUPTED, which the server sets only when the turn's lease expired, never for a
    cancel (CANCELLED), a deadline (CANCELLED) or a model failure (FAILED). Restarts and
    time must remain.
    """
    if (
        event.WhichOneof("kind") != "completed"
        or event.completed.status != chat_service_pb2.TURN_STATUS_INTERRUPTED
        or restarts >= policy.max_restarts
    ):
        return False
    remaining_s = deadline.remaining_s()
    return remaining_s is None or remaining_s > 0


_MAX_REQUEST_ID_CHARS: Final = 128


def restart_request(
    request: chat_service_pb2.ChatRequest, *, conversation: str, restart: int
) -> chat_service_pb2.ChatRequest:
    """The request that starts an interrupted turn again: its message, in its conversation.

    The server keeps one turn per `request_id` and replays an ended one, an INTERRUPTED one
    included, so a restart needs a key of its own. It is derived from the call's key so that
    it is idempotent too: the call retried with the same `request_id` replays the interrupted
    turn, then attaches to (or replays) the restart it made the first time.
    """
    suffix = f":restart:{restart}"
    key = request.request_id
    if len(key) + len(suffix) > _MAX_REQUEST_ID_CHARS:
        key = hashlib.sha256(key.encode()).hexdigest()
    restarted = chat_service_pb2.ChatRequest()
    restarted.CopyFrom(request)
    restarted.conversation = conversation
    restarted.request_id = key + suffix
    return restarted


def channel_options(options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    """The client's channel options: retries for reads, overridable key by key by the caller's."""
    merged: dict[str, object] = {"grpc.enable_retries": 1, "grpc.service_config": SERVICE_CONFIG}
    merged.update(options)
    return list(merged.items())


def call_metadata(metadata: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Static metadata as the tuple gRPC expects; keys must be lowercase on the wire."""
    return tuple((key.lower(), value) for key, value in metadata)
