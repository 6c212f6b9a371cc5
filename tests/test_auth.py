"""Authentication at the edge: API keys, JWTs, delegation, and what an unauthenticated call gets."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.app import ChatServer
from server.auth import CredentialVerifier, hash_api_key
from server.config import ApiKeyEntry, AuthMode, Settings, SettingsError
from tests.conftest import StartServer
from tests.credentials import (
    HS256_SECRET,
    Metadata,
    api_key,
    bearer,
    ec_keys,
    jwt_token,
    rsa_keys,
    write_jwks,
)
from tests.fake_anthropic import FakeAnthropic
from tests.probes import assert_clean_error, assert_no_side_effects, health_status

ServiceKey = tuple[str, ApiKeyEntry]


@pytest.fixture
def service_key() -> ServiceKey:
    return api_key("billing")


@pytest.fixture
async def auth_server(start_server: StartServer, service_key: ServiceKey) -> ChatServer:
    """A server that requires credentials: one API key, HS256 JWTs."""
    return await start_server(
        auth_mode=AuthMode.REQUIRED, api_keys=(service_key[1],), jwt_hs256_secret=HS256_SECRET
    )


OpenClient = Callable[..., Awaitable[AsyncChatClient]]


@pytest.fixture
async def open_client(auth_server: ChatServer) -> AsyncIterator[OpenClient]:
    """Opens SDK clients against ``auth_server`` with the given call metadata."""
    clients: list[AsyncChatClient] = []

    async def open_one(metadata: Metadata = ()) -> AsyncChatClient:
        client = AsyncChatClient(auth_server.address, metadata=metadata, timeout=timedelta(seconds=10))
        clients.append(client)
        return client

    yield open_one
    for client in clients:
        await client.close()


async def _every_rpc_fails(client: AsyncChatClient) -> list[ChatClientError]:
    """Calls each RPC once with well-formed arguments; returns the errors (all must fail)."""
    name = f"conversations/{uuid.uuid4()}"
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.chat_reply("hello"),
        lambda: client.create_conversation(),
        lambda: client.get_conversation(name),
        lambda: client.list_conversations_page(),
        lambda: client.delete_conversation(name),
        lambda: client.list_messages_page(name),
    ]
    errors = []
    for call in calls:
        with pytest.raises(ChatClientError) as caught:
            await call()
        errors.append(caught.value)
    return errors


async def test_api_key_authenticates_and_its_subject_owns_the_data(
    open_client: OpenClient, service_key: ServiceKey, db: asyncpg.Connection
) -> None:
    client = await open_client(bearer(service_key[0]))
    reply = await client.chat_reply("hello")
    assert reply.text
    owners = await db.fetch("SELECT owner FROM chat.conversations")
    assert [r["owner"] for r in owners] == ["billing"]


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "CREDENTIALS_MISSING"),
        ((("authorization", "Bearer csk_not-a-configured-key"),), "CREDENTIALS_INVALID"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "CREDENTIALS_INVALID"),
        ((("authorization", "Bearer "),), "CREDENTIALS_INVALID"),
        ((("authorization", "Bearer a.b.c"),), "CREDENTIALS_INVALID"),
        ((("authorization", "Bearer " + "x" * 9000),), "CREDENTIALS_INVALID"),
        ((("x-chatstream-user", "alice"),), "CREDENTIALS_MISSING"),
    ],
    ids=["missing", "unknown-key", "basic-scheme", "empty-bearer", "garbage-jwt", "oversized", "user-only"],
)
async def test_bad_credentials_get_unauthenticated_on_every_rpc_before_any_side_effect(
    open_client: OpenClient,
    fake: FakeAnthropic,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
    metadata: Metadata,
    reason: str,
) -> None:
    client = await open_client(metadata)
    for err in await _every_rpc_fails(client):
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
        assert err.reason == reason
        assert_clean_error(err, forbidden=["csk_not-a-configured-key", "dXNlcjpwYXNz"])
    await assert_no_side_effects(db, redis, fake)


async def test_a_repeated_authorization_header_is_refused(
    open_client: OpenClient, service_key: ServiceKey
) -> None:
    client = await open_client((*bearer(service_key[0]), *bearer(service_key[0])))
    with pytest.raises(ChatClientError) as caught:
        await client.get_conversation(f"conversations/{uuid.uuid4()}")
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIALS_INVALID",
    )


async def test_hs256_jwt_subject_owns_the_data(open_client: OpenClient, db: asyncpg.Connection) -> None:
    client = await open_client(bearer(jwt_token("svc-reports")))
    await client.create_conversation()
    assert await db.fetchval("SELECT owner FROM chat.conversations") == "svc-reports"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (lambda: jwt_token("svc", expires_in_s=-120), "CREDENTIALS_EXPIRED"),
        (
            lambda: jwt_token(
                "svc", key="another-secret-that-is-long-enough-0123456789-abcdefghijklmnopqrstuvwxyz"
            ),
            "CREDENTIALS_INVALID",
        ),
        (lambda: jwt_token("svc", expires_in_s=None), "CREDENTIALS_INVALID"),
        (lambda: jwt_token(None), "CREDENTIALS_INVALID"),
        (lambda: jwt_token("svc", algorithm="HS512"), "CREDENTIALS_INVALID"),
        (lambda: jwt_token("svc", claims={"nbf": 9_999_999_999}), "CREDENTIALS_INVALID"),
        (lambda: jwt_token("svc", key="", algorithm="none"), "CREDENTIALS_INVALID"),
        (lambda: jwt_token("svc")[:-4], "CREDENTIALS_INVALID"),
        (lambda: jwt_token(""), "CREDENTIALS_INVALID"),
        (lambda: jwt_token("line\nbreak"), "CREDENTIALS_INVALID"),
    ],
    ids=[
        "expired",
        "wrong-secret",
        "no-exp",
        "no-sub",
        "other-alg",
        "not-yet-valid",
        "alg-none",
        "bad-signature",
        "empty-sub",
        "control-char-sub",
    ],
)
async def test_invalid_jwts_are_unauthenticated(
    open_client: OpenClient, fake: FakeAnthropic, token: Callable[[], str], reason: str
) -> None:
    client = await open_client(bearer(token()))
    with pytest.raises(ChatClientError) as caught:
        await client.chat_reply("hello")
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason)
    assert fake.requests == []


async def test_rs256_from_a_public_key_file_and_hs256_confusion_is_refused(
    start_server: StartServer, tmp_path: Path
) -> None:
    keys = rsa_keys()
    public = tmp_path / "jwt.pub"
    public.write_bytes(keys.public_pem)
    server = await start_server(auth_mode=AuthMode.REQUIRED, jwt_public_key_file=str(public))
    good = jwt_token("svc-rsa", key=keys.private_pem, algorithm="RS256")
    async with AsyncChatClient(server.address, metadata=bearer(good)) as client:
        created = await client.create_conversation()
        assert created.name.startswith("conversations/")
    # The classic confusion: an HS256 token "signed" with the public key as the secret.
    forged = jwt_token("svc-rsa", key=b"x" * 64, algorithm="HS256")
    async with AsyncChatClient(server.address, metadata=bearer(forged)) as client:
        with pytest.raises(ChatClientError) as caught:
            await client.create_conversation()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_es256_and_rs256_from_a_jwks_file_pick_the_key_by_kid(
    start_server: StartServer, tmp_path: Path, db: asyncpg.Connection
) -> None:
    ec_pair, rsa_pair = ec_keys(), rsa_keys()
    jwks = write_jwks(
        tmp_path / "jwks.json",
        [ec_pair.jwk(kid="ec-1", algorithm="ES256"), rsa_pair.jwk(kid="rsa-1", algorithm="RS256")],
    )
    server = await start_server(
        auth_mode=AuthMode.REQUIRED,
        jwt_jwks_file=str(jwks),
        jwt_issuer="https://idp.test",
        jwt_audience="chat",
    )
    claims = {"iss": "https://idp.test", "aud": "chat"}
    tokens = {
        "svc-ec": jwt_token(
            "svc-ec", key=ec_pair.private_pem, algorithm="ES256", headers={"kid": "ec-1"}, claims=claims
        ),
        "svc-rsa": jwt_token(
            "svc-rsa", key=rsa_pair.private_pem, algorithm="RS256", headers={"kid": "rsa-1"}, claims=claims
        ),
    }
    for token in tokens.values():
        async with AsyncChatClient(server.address, metadata=bearer(token)) as client:
            await client.create_conversation()
    owners = await db.fetch("SELECT owner FROM chat.conversations ORDER BY owner")
    assert [r["owner"] for r in owners] == ["svc-ec", "svc-rsa"]

    refused = [
        # Signed by the EC key but claiming the RSA key's kid.
        jwt_token("x", key=ec_pair.private_pem, algorithm="ES256", headers={"kid": "rsa-1"}, claims=claims),
        jwt_token("x", key=ec_pair.private_pem, algorithm="ES256", headers={"kid": "unknown"}, claims=claims),
        jwt_token(
            "x", key=ec_pair.private_pem, algorithm="ES256", headers={"kid": "ec-1"}, claims={"aud": "chat"}
        ),
        jwt_token(
            "x",
            key=ec_pair.private_pem,
            algorithm="ES256",
            headers={"kid": "ec-1"},
            claims={"iss": "https://idp.test"},
        ),
        jwt_token(
            "x",
            key=ec_pair.private_pem,
            algorithm="ES256",
            headers={"kid": "ec-1"},
            claims={"iss": "https://evil", "aud": "chat"},
        ),
    ]
    for token in refused:
        async with AsyncChatClient(server.address, metadata=bearer(token)) as client:
            with pytest.raises(ChatClientError) as caught:
                await client.create_conversation()
        assert (caught.value.code, caught.value.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_INVALID",
        )


async def test_acting_for_a_user_needs_an_allowed_credential(
    start_server: StartServer,
    fake: FakeAnthropic,
    db: asyncpg.Connection,
    redis: aioredis.Redis,
) -> None:
    plain_key, plain = api_key("reports")
    trusted_key, trusted = api_key("frontend", act_for_users=True)
    server = await start_server(
        auth_mode=AuthMode.REQUIRED,
        api_keys=(plain, trusted),
        jwt_hs256_secret=HS256_SECRET,
        jwt_act_for_users=("svc-gateway",),
    )
    denied = [bearer(plain_key, user="alice"), bearer(jwt_token("svc-other"), user="alice")]
    for metadata in denied:
        async with AsyncChatClient(server.address, metadata=metadata) as client:
            with pytest.raises(ChatClientError) as caught:
                await client.chat_reply("hello")
        assert (caught.value.code, caught.value.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "DELEGATION_NOT_ALLOWED",
        )
    await assert_no_side_effects(db, redis, fake)

    for metadata in (
        bearer(trusted_key, user="alice"),
        bearer(jwt_token("svc-gateway"), user="bob@example.com"),
    ):
        async with AsyncChatClient(server.address, metadata=metadata) as client:
            await client.chat_reply("hello")
    owners = await db.fetch("SELECT owner FROM chat.conversations ORDER BY owner")
    assert [r["owner"] for r in owners] == ["user:alice", "user:bob@example.com"]


@pytest.mark.parametrize("user", ["", "a b", "x" * 129, "<script>", "../etc", "a,b"])
async def test_malformed_user_metadata_is_invalid_argument(
    start_server: StartServer, fake: FakeAnthropic, user: str
) -> None:
    key, entry = api_key("frontend", act_for_users=True)
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(entry,))
    metadata = (("authorization", f"Bearer {key}"), ("x-chatstream-user", user))
    async with AsyncChatClient(server.address, metadata=metadata) as client:
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply("hello")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in caught.value.field_violations] == ["x-chatstream-user"]
    assert fake.requests == []


async def test_health_and_reflection_need_no_credentials(auth_server: ChatServer) -> None:
    assert await health_status(auth_server.address) == health_pb2.HealthCheckResponse.SERVING
    assert (
        await health_status(auth_server.address, service="chatstream.v1.ChatService")
        == health_pb2.HealthCheckResponse.SERVING
    )
    async with grpc.aio.insecure_channel(auth_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = [s.name async for r in responses for s in r.list_services_response.service]
    assert "chatstream.v1.ChatService" in services


async def test_required_auth_without_any_credential_refuses_to_start(settings: Settings) -> None:
    server = ChatServer(settings.with_overrides(auth_mode=AuthMode.REQUIRED))
    with pytest.raises(SettingsError, match="CHATSTREAM_AUTH_MODE=none"):
        await server.start()
    await server.stop(grace_s=0)


def test_from_env_requires_auth_unless_told_otherwise() -> None:
    base = {"CHATSTREAM_DATABASE_URL": "postgresql+asyncpg://x/y", "CHATSTREAM_REDIS_URL": "redis://x"}
    assert Settings.from_env(base).auth.auth_mode is AuthMode.REQUIRED
    assert Settings.from_env({**base, "CHATSTREAM_AUTH_MODE": "none"}).auth.auth_mode is AuthMode.NONE
    with pytest.raises(SettingsError, match="CHATSTREAM_AUTH_MODE"):
        Settings.from_env({**base, "CHATSTREAM_AUTH_MODE": "maybe"})
    with pytest.raises(SettingsError, match="CHATSTREAM_AUTH_MODE"):
        CredentialVerifier(Settings.from_env(base))


def test_api_key_entries_parse_and_a_pasted_key_is_never_echoed() -> None:
    base = {"CHATSTREAM_DATABASE_URL": "postgresql+asyncpg://x/y", "CHATSTREAM_REDIS_URL": "redis://x"}
    digest = hash_api_key("csk_example")
    settings = Settings.from_env({**base, "CHATSTREAM_API_KEYS": f"a:{digest}, b:{digest}:act_for_users"})
    assert settings.auth.api_keys == (
        ApiKeyEntry(subject="a", sha256=digest),
        ApiKeyEntry(subject="b", sha256=digest, act_for_users=True),
    )
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**base, "CHATSTREAM_API_KEYS": "a:csk_pasted-the-key-by-mistake"})
    assert "csk_pasted" not in str(caught.value)
    with pytest.raises(SettingsError, match="reserved prefix"):
        CredentialVerifier(
            Settings.from_fields(
                database_url="", redis_url="", api_keys=(ApiKeyEntry(subject="user:x", sha256=digest),)
            )
        )
    with pytest.raises(SettingsError, match="at least 32 bytes"):
        CredentialVerifier(Settings.from_fields(database_url="", redis_url="", jwt_hs256_secret="short"))


async def test_new_key_tool_output_configures_a_working_key(start_server: StartServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "new-key", "ops-tool"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    key = lines["API key (give it to the service; it is not stored anywhere)"]
    entry = lines["CHATSTREAM_API_KEYS entry"]
    env = {
        "CHATSTREAM_DATABASE_URL": "postgresql+asyncpg://x/y",
        "CHATSTREAM_REDIS_URL": "redis://x",
        "CHATSTREAM_API_KEYS": entry,
    }
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=Settings.from_env(env).auth.api_keys)
    async with AsyncChatClient(server.address, metadata=bearer(key)) as client:
        await client.create_conversation()
