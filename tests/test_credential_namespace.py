"""One user namespace for every kind of credential (issue 15, item 4).

A trusted gateway acting for end user alice stores alice's data under the owner
``user:alice``. No credential of any kind may have that as its own subject: an API key
(refused at start-up), a JWT ``sub`` or a client certificate's identity (refused per call,
UNAUTHENTICATED / SUBJECT_RESERVED, before any side effect).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError

from server.app import ChatServer
from server.config import ApiKeyEntry, AuthMode, SettingsError
from tests.conftest import StartServer
from tests.credentials import HS256_SECRET, CertificateAuthority, Issued, api_key, bearer, jwt_token
from tests.fake_anthropic import FakeAnthropic
from tests.probes import assert_clean_error, assert_still_serving

ALICE = [("x-chatstream-user", "alice")]


@pytest.mark.parametrize("subject", ["user:alice", "USER:alice", "User:"])
async def test_an_api_key_whose_subject_is_in_the_user_namespace_refuses_to_start(
    start_server: StartServer, subject: str
) -> None:
    with pytest.raises(SettingsError, match="reserved prefix"):
        await start_server(
            auth_mode=AuthMode.REQUIRED, api_keys=(ApiKeyEntry(subject=subject, sha256="0" * 64),)
        )


async def _alices_conversation(server: ChatServer, gateway_metadata: list[tuple[str, str]]) -> str:
    async with AsyncChatClient(server.address, metadata=gateway_metadata) as gateway:
        return (await gateway.create_conversation()).name


async def _assert_refused_everywhere(
    server: ChatServer,
    conversation: str,
    *,
    metadata: list[tuple[str, str]],
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    async with AsyncChatClient(
        server.address,
        metadata=metadata,
        credentials=credentials,
        timeout=timedelta(seconds=5),
        options=[("grpc.enable_retries", 0)],
    ) as impostor:
        calls = (
            impostor.list_conversations_page(),
            impostor.get_conversation(conversation),
            impostor.list_messages_page(conversation),
            impostor.chat_reply("what did alice say?", conversation=conversation),
            impostor.delete_conversation(conversation),
        )
        for call in calls:
            with pytest.raises(ChatClientError) as caught:
                await call
            assert (caught.value.code, caught.value.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "SUBJECT_RESERVED",
            )
            assert_clean_error(caught.value, forbidden=["alice"])


@pytest.mark.parametrize("subject", ["user:alice", "USER:alice"])
async def test_a_jwt_whose_subject_is_in_the_user_namespace_reads_nothing(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection, subject: str
) -> None:
    key, entry = api_key("gateway", act_for_users=True)
    server = await start_server(auth_mode=AuthMode.REQUIRED, api_keys=(entry,), jwt_hs256_secret=HS256_SECRET)
    conversation = await _alices_conversation(server, [*bearer(key), *ALICE])
    await _assert_refused_everywhere(server, conversation, metadata=list(bearer(jwt_token(subject))))
    assert fake.requests == []
    assert await db.fetchval("SELECT count(*) FROM chat.conversations") == 1
    # Other subjects still work, the gateway still reaches alice's conversation.
    await assert_still_serving(server.address, metadata=bearer(jwt_token("svc-reporting")))
    async with AsyncChatClient(server.address, metadata=[*bearer(key), *ALICE]) as gateway:
        assert [c.name for c in (await gateway.list_conversations_page()).conversations] == [conversation]


async def test_a_client_certificate_whose_identity_is_in_the_user_namespace_reads_nothing(
    start_server: StartServer, fake: FakeAnthropic, redis: aioredis.Redis, tmp_path: Path
) -> None:
    ca = CertificateAuthority("namespace test CA")
    server_cert, server_key = ca.issue_server().write(tmp_path, "server")
    gateway = ca.issue_client("gateway", uris=["spiffe://test/gateway"])
    impostor = ca.issue_client("mallory", uris=["user:alice"])
    server = await start_server(
        auth_mode=AuthMode.REQUIRED,
        tls_cert_file=str(server_cert),
        tls_key_file=str(server_key),
        tls_client_ca_file=str(ca.write(tmp_path, "ca")),
        tls_act_for_users=("spiffe://test/gateway",),
    )

    def credentials(client: Issued) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem, private_key=client.key_pem, certificate_chain=client.cert_pem
        )

    async with AsyncChatClient(server.address, credentials=credentials(gateway), metadata=ALICE) as gw:
        conversation = (await gw.create_conversation()).name
    await _assert_refused_everywhere(server, conversation, metadata=[], credentials=credentials(impostor))
    assert fake.requests == []
    await assert_still_serving(server.address, credentials=credentials(gateway))
