"""TLS and mTLS: certificates from a CA the test makes, and clients that must be refused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError
from grpc_health.v1 import health_pb2

from server.app import ChatServer
from server.config import AuthMode, Settings, SettingsError
from server.tls import server_credentials
from tests.conftest import StartServer
from tests.credentials import CertificateAuthority, Issued, api_key, bearer
from tests.probes import assert_still_serving, health_status


@dataclass(frozen=True)
class Pki:
    """A trusted CA with a server certificate and two client certificates, plus a rogue CA."""

    directory: Path
    ca: CertificateAuthority
    server_cert: Path
    server_key: Path
    ca_file: Path
    gateway: Issued
    """Client certificate of spiffe://test/gateway, allowed to act for users."""
    worker: Issued
    """Client certificate with only a common name, worker.internal."""
    rogue: Issued
    """Client certificate from another CA, claiming to be the gateway."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority("chatstream test CA")
    server_cert, server_key = ca.issue_server().write(directory, "server")
    rogue_ca = CertificateAuthority("rogue CA")
    return Pki(
        directory=directory,
        ca=ca,
        server_cert=server_cert,
        server_key=server_key,
        ca_file=ca.write(directory, "ca"),
        gateway=ca.issue_client("gateway", uris=["spiffe://test/gateway"]),
        worker=ca.issue_client("worker.internal"),
        rogue=rogue_ca.issue_client("gateway", uris=["spiffe://test/gateway"]),
    )


def _client_credentials(pki: Pki, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem, private_key=client.key_pem, certificate_chain=client.cert_pem
    )


def _client(
    server: ChatServer, credentials: grpc.ChannelCredentials | None, metadata: Sequence[tuple[str, str]] = ()
) -> AsyncChatClient:
    return AsyncChatClient(
        server.address,
        credentials=credentials,
        metadata=metadata,
        timeout=timedelta(seconds=5),
        # One attempt: a refused handshake must fail now, not after retries.
        options=[("grpc.enable_retries", 0)],
    )


async def test_tls_serves_with_an_api_key_and_refuses_plaintext(start_server: StartServer, pki: Pki) -> None:
    key, entry = api_key("svc")
    server = await start_server(
        auth_mode=AuthMode.REQUIRED,
        api_keys=(entry,),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
    )
    credentials = _client_credentials(pki)
    await assert_still_serving(server.address, credentials=credentials, metadata=bearer(key))
    async with _client(server, credentials) as anonymous:
        with pytest.raises(ChatClientError) as caught:
            await anonymous.create_conversation()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with _client(server, None, bearer(key)) as plaintext:
        with pytest.raises(ChatClientError) as caught:
            await plaintext.create_conversation()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
async def mtls_server(start_server: StartServer, pki: Pki) -> ChatServer:
    return await start_server(
        auth_mode=AuthMode.REQUIRED,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca_file),
        tls_act_for_users=("spiffe://test/gateway",),
    )


@pytest.mark.parametrize("client", ["none", "rogue"])
async def test_mtls_refuses_a_client_without_a_certificate_or_with_one_from_another_ca(
    mtls_server: ChatServer, pki: Pki, db: asyncpg.Connection, client: str
) -> None:
    credentials = _client_credentials(pki, pki.rogue if client == "rogue" else None)
    async with _client(mtls_server, credentials) as refused:
        with pytest.raises(ChatClientError) as caught:
            await refused.create_conversation()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == ""  # refused in the handshake: no handler ever ran
    # Not even health answers without a trusted certificate: the port itself is closed to them.
    with pytest.raises(grpc.aio.AioRpcError):
        await health_status(mtls_server.address, credentials=credentials)
    assert await db.fetchval("SELECT count(*) FROM chat.conversations") == 0
    await assert_still_serving(mtls_server.address, credentials=_client_credentials(pki, pki.gateway))


async def test_mtls_identity_owns_its_data_and_only_allowed_identities_act_for_users(
    mtls_server: ChatServer, pki: Pki, db: asyncpg.Connection
) -> None:
    as_alice = [("x-chatstream-user", "alice")]
    async with _client(mtls_server, _client_credentials(pki, pki.worker)) as worker:
        await worker.create_conversation()
    async with _client(mtls_server, _client_credentials(pki, pki.worker), as_alice) as worker_for_alice:
        with pytest.raises(ChatClientError) as caught:
            await worker_for_alice.create_conversation()
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "DELEGATION_NOT_ALLOWED",
    )
    async with _client(mtls_server, _client_credentials(pki, pki.gateway), as_alice) as gateway:
        await gateway.create_conversation()
    owners = await db.fetch("SELECT owner FROM chat.conversations ORDER BY owner")
    assert [r["owner"] for r in owners] == ["user:alice", "worker.internal"]
    assert await health_status(mtls_server.address, credentials=_client_credentials(pki, pki.worker)) == (
        health_pb2.HealthCheckResponse.SERVING
    )


def test_half_configured_tls_is_a_settings_error(settings: Settings, pki: Pki) -> None:
    with pytest.raises(SettingsError, match="set together"):
        server_credentials(replace(settings.tls, tls_cert_file=str(pki.server_cert)))
    with pytest.raises(SettingsError, match="needs CHATSTREAM_TLS_CERT_FILE"):
        server_credentials(replace(settings.tls, tls_client_ca_file=str(pki.ca_file)))
    with pytest.raises(SettingsError, match="cannot read"):
        server_credentials(
            replace(
                settings.tls,
                tls_cert_file=str(pki.directory / "missing.crt"),
                tls_key_file=str(pki.server_key),
            )
        )
