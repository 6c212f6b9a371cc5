"""The proto's ErrorReason is the whole list of reasons the server sends, with the codes it promises.

What a reason means to a caller (its gRPC code, whether it carries RetryInfo) is written in the
proto's comments; these tests hold the server to them: every reason an error of ours can carry
is in the enum, has exactly the code the comment names, and carries RetryInfo exactly when the
comment says so. ``tests/probes.py::assert_clean_error`` checks the same for every error the
hostile-input, auth, limits and tenancy tests provoke on the wire.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import grpc
import pytest
from chatstream import AsyncChatClient, ChatClientError
from chatstream.v1.chat_service_pb2 import ErrorReason

import server.app  # noqa: F401  # imports every module on the serving path, and so every ChatError class
from server.errors import ChatError, RetryableError, reason_name
from server.grpc_errors import STATUS_CODES, to_status
from tests.fake_anthropic import FakeAnthropic, Gate, Stream

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "chatstream" / "v1" / "chat_service.proto"
SENT = set(ErrorReason.values()) - {ErrorReason.ERROR_REASON_UNSPECIFIED}


def _error_classes() -> list[type[ChatError]]:
    found: list[type[ChatError]] = []
    pending: list[type[ChatError]] = [ChatError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def _documented() -> dict[str, str]:
    """Each ErrorReason value's name and the comment above it, read from the proto itself."""
    text = PROTO.read_text()
    body = text[text.index("enum ErrorReason {") :]
    body = body[: body.index("\n}")]
    documented: dict[str, str] = {}
    comment: list[str] = []
    for line in body.splitlines()[1:]:
        line = line.strip()
        if line.startswith("//"):
            comment.append(line.removeprefix("//").strip())
        elif match := re.fullmatch(r"(ERROR_REASON_\w+) = \d+;", line):
            documented[match[1]] = " ".join(comment)
            comment = []
    return documented


def test_every_error_class_carries_a_reason_of_the_enum_or_must_be_given_one() -> None:
    for cls in _error_classes():
        if cls.default_reason == ErrorReason.ERROR_REASON_UNSPECIFIED:
            with pytest.raises(TypeError):
                cls("no reason given")
        else:
            assert cls.default_reason in SENT, cls
            assert cls("x").reason == reason_name(cls.default_reason)


def test_every_reason_has_the_status_code_its_comment_names() -> None:
    documented = _documented()
    assert set(documented) == {ErrorReason.Name(r) for r in ErrorReason.values()}
    assert set(STATUS_CODES) == SENT
    for reason, code in STATUS_CODES.items():
        comment = documented[ErrorReason.Name(reason)]
        assert re.search(rf"\bCode {code.name}\b", comment), (ErrorReason.Name(reason), comment)
        assert ChatError("x", reason=reason).reason == ErrorReason.Name(reason).removeprefix("ERROR_REASON_")


def test_retry_info_comes_exactly_with_the_reasons_whose_comment_promises_it() -> None:
    promised = {name for name, comment in _documented().items() if "RetryInfo" in comment}
    retryable = {
        ErrorReason.Name(cls.default_reason)
        for cls in _error_classes()
        if issubclass(cls, RetryableError) and cls.default_reason != ErrorReason.ERROR_REASON_UNSPECIFIED
    }
    assert promised == retryable
    for cls in _error_classes():
        if cls.default_reason == ErrorReason.ERROR_REASON_UNSPECIFIED:
            continue
        type_urls = [detail.type_url for detail in to_status(cls("x")).details]
        has_retry_info = "type.googleapis.com/google.rpc.RetryInfo" in type_urls
        assert has_retry_info == (ErrorReason.Name(cls.default_reason) in promised), cls


def test_reasons_and_error_details_are_built_only_from_the_enum_in_one_place() -> None:
    """No string reason and no hand-built ErrorInfo anywhere else in the server."""
    for path in sorted((ROOT / "server").rglob("*.py")):
        source = path.read_text()
        assert re.search(r"\breason=[\"']", source) is None, path
        if path.name != "grpc_errors.py":
            assert "ErrorInfo(" not in source, path


async def test_turn_in_progress_is_aborted_with_retry_info(
    client: AsyncChatClient, fake: FakeAnthropic
) -> None:
    first = await client.chat_reply("one")
    gate = Gate()
    fake.script(Stream(["slow"], hold=gate))
    async with contextlib.aclosing(client.chat("two", conversation=first.conversation)) as events:
        await anext(events)
        await gate.wait_reached(timeout=5)
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply("three", conversation=first.conversation)
        gate.open()
        _ = [event async for event in events]
    err = caught.value
    assert (err.code, err.reason) == (grpc.StatusCode.ABORTED, "TURN_IN_PROGRESS")
    assert err.retry_delay is not None
    assert err.retry_delay.total_seconds() > 0
    assert err.metadata == {"conversation": first.conversation}
