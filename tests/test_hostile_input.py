"""I9/I10 under hostile input: fuzzed fields, malformed protobuf, abusive metadata, SQL-looking text.

Whatever arrives, the server answers with a status and ErrorInfo, never an internal
error, SQL, a traceback or another owner's ids; legal text is stored verbatim; and
afterwards health is SERVING and a normal chat still works.

Hypothesis drives the examples from a worker thread, and each example runs its calls on
the test's event loop (where the in-process server lives) through
``asyncio.run_coroutine_threadsafe``: hypothesis' ``@given`` cannot wrap a coroutine.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, TypeVar

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import ChatServer
from server.config import AuthMode
from tests.conftest import Consume, StartServer
from tests.credentials import api_key, bearer
from tests.fake_anthropic import FakeAnthropic
from tests.probes import assert_clean_error, assert_no_side_effects, assert_still_serving, rpc_error
from tests.raw_http2 import RawHttp2

T = TypeVar("T")

SERVICE: Final = "/chatstream.v1.ChatService/"
# Codes a hostile but well-framed request may earn; INTERNAL, UNKNOWN or UNAVAILABLE would mean
# the input reached somewhere it should not have.
EXPECTED_CODES: Final = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
}


@dataclass
class Target:
    """A server with two owners: the attacker (A) and a victim (B) with one conversation."""

    server: ChatServer
    attacker_key: str
    channel: grpc.aio.Channel
    stub: pb_grpc.ChatServiceAsyncStub
    victim_conversation: str
    """B's conversation name: it must never show up in anything A receives."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.attacker_key)

    @property
    def forbidden(self) -> list[str]:
        return [self.victim_conversation.rsplit("/", 1)[1], "tenant-b"]


@pytest.fixture
async def target(start_server: StartServer) -> AsyncIterator[Target]:
    key_a, entry_a = api_key("tenant-a")
    key_b, entry_b = api_key("tenant-b")
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(entry_a, entry_b))
    async with AsyncChatClient(server.address, metadata=bearer(key_b)) as victim:
        victims = await victim.chat_reply("B's private words")
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield Target(
            server=server,
            attacker_key=key_a,
            channel=channel,
            stub=pb_grpc.ChatServiceStub(channel),
            victim_conversation=victims.conversation,
        )


def _run_from_thread(loop: asyncio.AbstractEventLoop, coro: Coroutine[object, object, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)


# -- strategies over every request field ---------------------------------------------------

# Any valid Unicode scalar (protobuf strings must be UTF-8, so no lone surrogates), control
# characters and NUL included.
_any_text = st.text(st.characters(codec="utf-8"), max_size=64)
_tricky_text = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "'; DROP TABLE chat.turns; --",
        '" OR 1=1 --',
        "%s%s%n",
        "{{7*7}}",
        "\r\nX-Injected: yes",
        "\u202e\u2028\ufeff",
        "\U0001f600" * 10,
        "x" * 40_000,
    ]
)
_texts = st.one_of(_any_text, _tricky_text)
_uuid_names = st.uuids().map(lambda u: f"conversations/{u}")
_names = st.one_of(
    _texts,
    _uuid_names,
    st.uuids().map(lambda u: f"conversations/{str(u).upper()}"),
    st.uuids().map(lambda u: f"conversations/{u.hex}"),
    st.sampled_from(
        ["conversations/", "conversations/../../etc/passwd", "conversations/%00", "conversations/*"]
    ),
)
_request_ids = st.one_of(_texts, st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True))
_page_sizes = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_page_tokens = st.one_of(_texts, st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode()))

Call = tuple[str, Message]


def _requests(victim: str) -> st.SearchStrategy[Call]:
    names = st.one_of(_names, st.just(victim))
    return st.one_of(
        st.builds(
            lambda c, t, r: ("Chat", pb.ChatRequest(conversation=c, text=t, request_id=r)),
            st.one_of(st.just(""), names),
            _texts,
            st.one_of(st.just(""), _request_ids),
        ),
        # The victim's id is left out here: creating an id that exists answers ALREADY_EXISTS
        # (docs/security.md, "Known limits").
        st.builds(
            lambda i, r: (
                "CreateConversation",
                pb.CreateConversationRequest(conversation_id=i, request_id=r),
            ),
            st.one_of(st.just(""), _texts, st.uuids().map(str)),
            st.one_of(st.just(""), _request_ids),
        ),
        st.builds(lambda n: ("GetConversation", pb.GetConversationRequest(name=n)), names),
        st.builds(lambda n: ("DeleteConversation", pb.DeleteConversationRequest(name=n)), names),
        st.builds(
            lambda s, t: ("ListConversations", pb.ListConversationsRequest(page_size=s, page_token=t)),
            _page_sizes,
            _page_tokens,
        ),
        st.builds(
            lambda p, s, t: ("ListMessages", pb.ListMessagesRequest(parent=p, page_size=s, page_token=t)),
            names,
            _page_sizes,
            _page_tokens,
        ),
    )


async def _call(target: Target, method: str, request: Message) -> list[Message]:
    """Calls ``method`` through the generated stub; the responses (all of a stream)."""
    timeout = 10
    if method == "Chat":
        assert isinstance(request, pb.ChatRequest)
        call = target.stub.Chat(request, metadata=target.metadata, timeout=timeout)
        return [response async for response in call]
    unary = getattr(target.stub, method)
    return [await unary(request, metadata=target.metadata, timeout=timeout)]


async def _check_fuzzed_call(target: Target, db: asyncpg.Connection, method: str, request: Message) -> None:
    try:
        responses = await _call(target, method, request)
    except grpc.aio.AioRpcError as exc:
        err = rpc_error(exc)
        assert err.code in EXPECTED_CODES, (method, request, err)
        assert_clean_error(err, forbidden=target.forbidden)
        return
    if method == "Chat":
        # Legal text is stored exactly as sent.
        assert isinstance(request, pb.ChatRequest)
        started = responses[0]
        assert isinstance(started, pb.ChatResponse)
        turn_id = uuid.UUID(started.event.started.turn.rsplit("/", 1)[1])
        assert await db.fetchval("SELECT user_text FROM chat.turns WHERE id = $1", turn_id) == request.text


async def test_hypothesis_over_every_request_field(target: Target, db: asyncpg.Connection) -> None:
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(call=_requests(target.victim_conversation))
    def fuzz(call: Call) -> None:
        _run_from_thread(loop, _check_fuzzed_call(target, db, *call))

    await asyncio.to_thread(fuzz)

    # The victim's conversation survived every Get/Delete/Chat/List aimed at it.
    owner = await db.fetchval(
        "SELECT owner FROM chat.conversations WHERE id = $1",
        uuid.UUID(target.victim_conversation.rsplit("/", 1)[1]),
    )
    assert owner == "tenant-b"
    await assert_still_serving(target.server.address, metadata=target.metadata)


# -- malformed protobuf bytes through a generic stub ------------------------------------------

MALFORMED: Final = {
    "truncated-varint": b"\x20\xff\xff",  # field 4 varint that never ends
    "truncated-length": b"\x12\x10abc",  # field 2 claims 16 bytes, has 3
    # Fields 1 and 2 are strings in every request but one (where 1 is page_size, 2 a string).
    "invalid-utf8": b"\x0a\x02\xff\xfe\x12\x02\xfd\xfc",
    "deeply-nested-groups": b"\x0b" * 100_000,  # start-group markers far past any recursion limit
    "unterminated-group": b"\x0b\x0b\x0b",
    "field-zero": b"\x00\x01",
    "wire-type-7": b"\x0f",
    "huge-length": b"\x12\xff\xff\xff\xff\x0f",
    "overlong-varint": b"\x08" + b"\xff" * 11 + b"\x01",
}
METHODS: Final = (
    "Chat",
    "CreateConversation",
    "GetConversation",
    "ListConversations",
    "DeleteConversation",
    "ListMessages",
)


async def _raw_call(
    channel: grpc.aio.Channel, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...]
) -> None:
    """Sends ``payload`` as the request message, unparsed; responses are ignored."""
    # No serializers: the payload goes on the wire exactly as given.
    if method == "Chat":
        stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(SERVICE + method)
        async for _ in stream(payload, metadata=metadata, timeout=10):
            pass
    else:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(SERVICE + method)
        await unary(payload, metadata=metadata, timeout=10)


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_protobuf_is_invalid_argument_on_every_rpc_after_authentication(
    target: Target, fake: FakeAnthropic, db: asyncpg.Connection, payload: bytes
) -> None:
    requests_before = len(fake.requests)
    turns_before = await db.fetchval("SELECT count(*) FROM chat.turns")
    for method in METHODS:
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await _raw_call(target.channel, method, payload, ())
        assert rpc_error(anonymous.value).reason == "CREDENTIALS_MISSING", method
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _raw_call(target.channel, method, payload, target.metadata)
        err = rpc_error(caught.value)
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"), method
        assert_clean_error(err, forbidden=target.forbidden)
    assert len(fake.requests) == requests_before
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == turns_before
    await assert_still_serving(target.server.address, metadata=target.metadata)


async def test_hypothesis_random_bytes_on_every_rpc(target: Target) -> None:
    loop = asyncio.get_running_loop()

    async def check(method: str, payload: bytes) -> None:
        try:
            await _raw_call(target.channel, method, payload, target.metadata)
        except grpc.aio.AioRpcError as exc:
            err = rpc_error(exc)
            assert err.code in EXPECTED_CODES, (method, payload, err)
            assert_clean_error(err, forbidden=target.forbidden)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(method=st.sampled_from(METHODS), payload=st.binary(max_size=256))
    def fuzz(method: str, payload: bytes) -> None:
        _run_from_thread(loop, check(method, payload))

    await asyncio.to_thread(fuzz)
    await assert_still_serving(target.server.address, metadata=target.metadata)


# -- metadata no gRPC client would send ------------------------------------------------------


def _hostile_metadata(key: str) -> dict[str, list[tuple[bytes, bytes]]]:
    valid = f"Bearer {key}".encode()
    return {
        "crlf-in-authorization": [(b"authorization", valid + b"\r\nx-chatstream-user: alice")],
        "crlf-in-user": [(b"authorization", valid), (b"x-chatstream-user", b"alice\r\nauthorization: x")],
        "lf-in-custom": [(b"authorization", valid), (b"x-note", b"a\nb")],
        "nul-and-high-bytes": [(b"authorization", valid), (b"x-note", b"\x00\x01\xff\xfe")],
        "non-ascii-user": [(b"authorization", valid), (b"x-chatstream-user", "ali\u00e7e".encode())],
        "uppercase-name": [(b"Authorization", valid)],
        "space-in-name": [(b"authorization", valid), (b"x bad", b"v")],
        "huge-value": [(b"authorization", valid), (b"x-padding", b"p" * 40_000)],
        "many-headers": [(b"authorization", valid), *[(f"x-h{i}".encode(), b"v" * 100) for i in range(500)]],
        "huge-authorization": [(b"authorization", b"Bearer " + b"A" * 40_000)],
    }


@pytest.mark.parametrize("acknowledge_settings", [True, False], ids=["acked", "unacked"])
@pytest.mark.parametrize("case", list(_hostile_metadata("k")))
async def test_metadata_with_crlf_and_huge_values_never_authenticates_or_reaches_a_handler(
    start_server: StartServer,
    fake: FakeAnthropic,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    case: str,
    acknowledge_settings: bool,
) -> None:
    key, entry = api_key("tenant-a")
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(entry,))
    request = pb.ChatRequest(text="hello").SerializeToString()
    async with await RawHttp2.connect(server.address, acknowledge_settings=acknowledge_settings) as raw:
        outcome = await raw.unary(SERVICE + "Chat", request, _hostile_metadata(key)[case])
    # Refused one way or another: a gRPC error status, a reset stream, or a closed connection.
    refused = (
        (outcome.grpc_status is not None and outcome.grpc_status != 0)
        or outcome.reset_code is not None
        or outcome.goaway_code is not None
        or outcome.closed
    )
    assert refused, outcome
    assert b"alice" not in outcome.data
    await assert_no_side_effects(db, redis, fake)
    await assert_still_serving(server.address, metadata=bearer(key))


async def test_sql_looking_and_control_character_text_is_stored_and_returned_verbatim(
    target: Target, fake: FakeAnthropic, consume: Consume, db: asyncpg.Connection
) -> None:
    texts = [
        "Robert'); DROP TABLE chat.messages;--",
        "1' OR '1'='1",
        "SELECT * FROM chat.conversations WHERE owner <> 'tenant-a'",
        "$1 $2 :owner %(owner)s ? \\x00",
        "\x01\x02\x07\x08\x1b[31mred\x1b[0m\x7f",
        "tab\tcr\rlf\nend",
        "\u202eevil\u202c \u2028 \u2029 \ufeff \u200b",
        "\U0001f9d1\u200d\U0001f4bb \U0001f1fa\U0001f1f3 \u00e9\u0301",
        "<script>alert(1)</script> {{7*7}} ${jndi:ldap://x}",
    ]
    async with AsyncChatClient(
        target.server.address, metadata=target.metadata, timeout=timedelta(seconds=10)
    ) as client:
        conversation = (await client.create_conversation()).name
        for text in texts:
            await client.chat_reply(text, conversation=conversation)
        await consume()
        stored = [m.text async for m in client.list_messages(conversation)]
    assert stored[0::2] == texts
    # The model saw the exact text too, in the last prompt's context.
    last_prompt = fake.requests[-1].body
    assert last_prompt is not None
    messages = last_prompt["messages"]
    assert isinstance(messages, list)
    assert [m["content"] for m in messages if isinstance(m, dict) and m["role"] == "user"] == texts
    rows = await db.fetch("SELECT user_text FROM chat.turns WHERE owner = 'tenant-a' ORDER BY seq")
    assert [r["user_text"] for r in rows] == texts


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("request_id", {"request_id": "x'; DROP TABLE chat.turns; --"}),
        ("conversation", {"conversation": "conversations/' OR 1=1 --"}),
        ("text", {"text": "NUL \x00 inside"}),
    ],
)
async def test_illegal_values_are_refused_at_the_edge_not_stored(
    target: Target, fake: FakeAnthropic, db: asyncpg.Connection, field: str, kwargs: dict[str, str]
) -> None:
    turns_before = await db.fetchval("SELECT count(*) FROM chat.turns")
    request = {"text": "hi", "conversation": "", "request_id": "", **kwargs}
    async with AsyncChatClient(target.server.address, metadata=target.metadata) as client:
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply(
                request["text"],
                conversation=request["conversation"],
                request_id=request["request_id"] or None,
            )
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in caught.value.field_violations] == [field]
    assert_clean_error(caught.value, forbidden=target.forbidden)
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == turns_before
