"""Container health check: exits 0 when the local server's gRPC health service answers SERVING.

The image's HEALTHCHECK (and compose's) runs this, so a container is healthy only while
``chatstream serve`` accepts calls; during a graceful stop the server reports NOT_SERVING
and the check fails, as it should. Kubernetes does not use it: its native gRPC probes ask
the same health service directly (deploy/k8s/server.yaml).

Usage: ``python healthcheck.py [TARGET] [SERVICE]``. TARGET defaults to the port of
CHATSTREAM_LISTEN on the loopback interface; SERVICE defaults to
``chatstream.v1.ChatService`` ("" asks about the process as a whole).
It needs only grpcio and grpcio-health-checking, both dependencies of the server.
"""

from __future__ import annotations

import os
import sys
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_LISTEN: Final = "127.0.0.1:50051"
DEFAULT_SERVICE: Final = "chatstream.v1.ChatService"
TIMEOUT_S: Final = 3.0


def local_target(listen: str) -> str:
    """Where to dial a server listening on ``listen``: wildcard hosts become loopback."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "*"):  # noqa: S104  # a listen address, only read, never bound
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def check(target: str, service: str) -> str:
    """The serving status of ``service`` at ``target``, or the gRPC error that prevented asking."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            return f"error {code.name}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: list[str]) -> int:
    """Prints the status and returns the exit code Docker's HEALTHCHECK expects (0 healthy, 1 not)."""
    target = argv[0] if argv else local_target(os.environ.get("CHATSTREAM_LISTEN", DEFAULT_LISTEN))
    service = argv[1] if len(argv) > 1 else DEFAULT_SERVICE
    status = check(target, service)
    print(f"{target} {service or '<server>'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
