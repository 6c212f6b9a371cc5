"""The edge guards what it can, and refuses what it cannot guard rather than serving it unchecked."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from server.auth import CredentialVerifier
from server.config import AuthMode, Settings
from server.edge import EdgeInterceptor
from server.limits import StreamLimiter
from server.metrics import Metrics


async def _upload(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return b"".join([chunk async for chunk in requests])


async def test_a_request_streaming_method_of_a_protected_service_is_refused_not_served_unguarded() -> None:
    verifier = CredentialVerifier(
        Settings.from_fields(database_url="", redis_url="", auth_mode=AuthMode.NONE)
    )
    edge = EdgeInterceptor(
        verifier=verifier,
        limiter=StreamLimiter(max_streams=10, max_per_owner=10, metrics=Metrics()),
        public_services=(),
        sheddable_methods=(),
        max_metadata_bytes=8192,
    )
    server = grpc.aio.server(interceptors=[edge])
    # Raw bytes in and out: no serializers, so no proto is needed for a made-up service.
    upload: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_unary_rpc_method_handler(_upload)
    service = grpc.method_handlers_generic_handler("test.Uploader", {"Upload": upload})
    server.add_generic_rpc_handlers([service])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
                "/test.Uploader/Upload"
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(iter([b"a", b"b"]), timeout=10)
    finally:
        await server.stop(None)

    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
