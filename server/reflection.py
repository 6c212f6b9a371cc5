"""Server reflection as tools use it: `grpc.reflection.v1` beside `v1alpha`, and the error details.

grpcio-reflection implements only `grpc.reflection.v1alpha` (grpc/grpc#38576). Newer tools
ask for `grpc.reflection.v1` first (buf curl does, and falls back only after an
UNIMPLEMENTED round trip). The v1 messages are the v1alpha ones with the package renamed,
field for field, so one servicer answers both method paths with the same bytes, as grpc-go's
v1alpha service answers with its v1 code. v1's file descriptor, v1alpha's renamed, goes into
the pool too, so that `list` and `describe` show both services consistently.

Every error carries `google.rpc.ErrorInfo` (and `BadRequest` or `RetryInfo`) in the
`google.rpc.Status` of the `grpc-status-details-bin` trailer, packed in `Any`. A client decodes
them by asking reflection for the file that defines the type (grpcurl does), so those files
must be in the pool that reflection reads: importing their modules registers them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE_NAME: Final[str] = reflection.SERVICE_NAME
V1_SERVICE_NAME: Final = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES: Final = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
"""Both reflection services; public, like health (no credential needed)."""

ERROR_DETAIL_FILES: Final[tuple[str, ...]] = (
    status_pb2.DESCRIPTOR.name,
    error_details_pb2.DESCRIPTOR.name,
)
"""The google.rpc files that reflection serves for the details of every error."""

_V1_FILE: Final = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PREFIX: Final = ".grpc.reflection.v1alpha."
_V1_PREFIX: Final = ".grpc.reflection.v1."


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serves reflection, v1 and v1alpha, listing `service_names` and the reflection services.

    Any symbol in the default descriptor pool resolves, the google.rpc error details
    included; `service_names` only decides what `list` shows.
    """
    pool = descriptor_pool.Default()
    _add_v1_file(pool)
    servicer = reflection.aio.ReflectionServicer([*service_names, *SERVICE_NAMES], pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1_method}),)
    )


def _add_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds `grpc/reflection/v1/reflection.proto`, built from v1alpha's, once per process."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = _V1_FILE
    file.package = _V1_PREFIX.strip(".")
    file.ClearField("options")  # v1alpha's say "deprecated" and name v1alpha's Java and Go packages
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # scalars have none; setting "" would add one
                field.type_name = _renamed(field.type_name)
    for service in file.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    pool.AddSerializedFile(file.SerializeToString())


def _renamed(type_name: str) -> str:
    if type_name.startswith(_V1ALPHA_PREFIX):
        return _V1_PREFIX + type_name.removeprefix(_V1ALPHA_PREFIX)
    return type_name
