"""How client commands reach a running server (target, bearer token, TLS) and print its errors."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Final

import click
import grpc
from chatstream import ChatClient, ChatClientError
from google.protobuf.timestamp_pb2 import Timestamp

from server import constants
from server.devenv import read_dev_env

DEFAULT_TARGET: Final = "127.0.0.1:50051"
CONVERSATION_PREFIX: Final = "conversations/"


@dataclass(frozen=True, slots=True, kw_only=True)
class Remote:
    """Where the server is and how to authenticate to it."""

    target: str
    """``host:port`` of the server."""
    token: str | None = field(default=None, repr=False)
    """Sent as ``authorization: Bearer <token>``: an API key or a JWT."""
    tls_ca: Path | None = None
    """PEM bundle of the CAs to trust; implies TLS."""
    tls: bool = False
    """TLS with the system's trusted CAs."""

    def connect(self) -> ChatClient:
        """A blocking SDK client; close it (``with``) when done.

        Blocking on purpose: a terminal program waits on the user anyway, and Ctrl-C then
        interrupts the call in our own frame, where the SDK cancels it.
        """
        credentials: grpc.ChannelCredentials | None = None
        if self.tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.tls_ca.read_bytes())
        elif self.tls:
            credentials = grpc.ssl_channel_credentials()
        metadata = [("authorization", f"Bearer {self.token}")] if self.token else []
        return ChatClient(
            self.target,
            credentials=credentials,
            metadata=metadata,
            timeout=timedelta(seconds=30),
            chat_timeout=timedelta(minutes=10),
        )


_OPTIONS: Final = (
    click.option(
        "--target",
        envvar=constants.ENV_LISTEN,
        default=None,
        show_envvar=True,
        help=f"Server address, host:port. Default: with neither --target nor --token given, the "
        f"`chatstream dev` running for this folder (its address and key), else {DEFAULT_TARGET}.",
    ),
    click.option(
        "--token",
        envvar=constants.ENV_TOKEN,
        show_envvar=True,
        default=None,
        help="API key or JWT, sent as 'authorization: Bearer <token>'. Prefer the env var: "
        "a command line is visible to other users of the machine.",
    ),
    click.option(
        "--tls-ca",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Use TLS, trusting the CAs in this PEM file.",
    ),
    click.option("--tls", is_flag=True, help="Use TLS, trusting the system's CAs."),
)


def remote_options(command: Callable[..., None]) -> Callable[..., None]:
    """Adds --target, --token, --tls-ca and --tls to a command, which receives them as ``remote``."""

    @functools.wraps(command)
    def with_remote(
        *, target: str | None, token: str | None, tls_ca: Path | None, tls: bool, **kwargs: object
    ) -> None:
        token = token.strip() if token else None
        if target is None and token is None and tls_ca is None and not tls:
            # Address and key come as a pair from dev's env file, never one of them: a token
            # of the user's own must not go to an address a file in the folder names.
            dev = read_dev_env()
            if dev is not None:
                target, token = dev.get(constants.ENV_LISTEN), dev.get(constants.ENV_TOKEN)
        remote = Remote(target=target or DEFAULT_TARGET, token=token or None, tls_ca=tls_ca, tls=tls)
        command(remote=remote, **kwargs)

    decorated: Callable[..., None] = with_remote
    for option in reversed(_OPTIONS):
        decorated = option(decorated)
    return decorated


def describe(error: ChatClientError) -> str:
    """One line for people: ``CODE REASON: message (field: problem)``, saying nothing twice.

    The reason is left out where it only repeats the code (``INVALID_ARGUMENT``), and a field
    violation where the message already says it.
    """
    head = error.code.name
    if error.reason and error.reason != error.code.name:
        head += f" {error.reason}"
    message = error.message or "no message"
    violations = [f"{name}: {problem}" for name, problem in error.field_violations]
    unsaid = [violation for violation in violations if violation not in message]
    text = f"{head}: {message}" + (" (" + "; ".join(unsaid) + ")" if unsaid else "")
    # gRPC's own connection errors can span lines; an error line must stay one line.
    return " ".join(text.split())


class ConversationName(click.ParamType[str, object]):
    """A conversation as the user may paste it, ``conversations/ID`` or just ``ID`` (a UUID).

    Checked here, so that a bad value is reported against the option the user typed rather
    than against the request field the server would name.
    """

    name = "conversation"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """``conversations/{uuid}``, or a usage error naming the option."""
        text = str(value).strip()
        try:
            return CONVERSATION_PREFIX + str(uuid.UUID(text.removeprefix(CONVERSATION_PREFIX)))
        except ValueError:
            self.fail(f"{text!r} is not conversations/ID or ID, where ID is a UUID", param, ctx)


def timestamp(value: Timestamp) -> str | None:
    """RFC 3339 in UTC (``2025-01-31T12:00:00.123456Z``), or None for an unset field."""
    if value.seconds == 0 and value.nanos == 0:
        return None
    return value.ToDatetime(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z")
