"""Who is calling: the owner every RPC is scoped to."""

from __future__ import annotations

from typing import Protocol, TypeVar

import grpc

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class Authenticator(Protocol):
    """Maps a call's metadata to the owner of the data it may touch."""

    def owner(self, context: grpc.aio.ServicerContext[RequestT, ResponseT]) -> str:
        """The verified owner; raises UnauthenticatedError when there is none."""
        ...


class SingleOwner:
    """Every caller acts as one fixed owner: for dev mode and single-tenant deployments.

    Credential-based authentication (API keys, JWT, mTLS) replaces this; see issue
    "Only the owner gets in".
    """

    def __init__(self, owner: str = "default") -> None:
        self._owner = owner

    def owner(self, context: grpc.aio.ServicerContext[RequestT, ResponseT]) -> str:
        """Always the configured owner."""
        return self._owner
