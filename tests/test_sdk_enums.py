"""The SDK's Role and TurnStatus: names that print, numbers that are the proto's."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from chatstream import AsyncChatClient, ChatClient, ChatReply, Role, TurnStatus
from chatstream._enums import ProtoEnum
from chatstream.v1 import chat_service_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from server.app import ChatServer
from tests.conftest import Consume
from tests.fake_anthropic import FakeAnthropic, Stream

PAIRS: list[tuple[type[ProtoEnum], EnumTypeWrapper, str]] = [
    (Role, EnumTypeWrapper(chat_service_pb2.Role.DESCRIPTOR), "ROLE_"),
    (TurnStatus, EnumTypeWrapper(chat_service_pb2.TurnStatus.DESCRIPTOR), "TURN_STATUS_"),
]


async def test_chat_reply_status_prints_its_name_through_both_clients(
    server: ChatServer, client: AsyncChatClient, fake: FakeAnthropic
) -> None:
    fake.script(Stream(["Hello", " asyncio"]), Stream(["Hello", " blocking"]))

    async_reply = await client.chat_reply("hi")

    def blocking_chat_reply() -> ChatReply:
        with ChatClient(server.address, timeout=timedelta(seconds=10)) as sync_client:
            return sync_client.chat_reply("hi")

    # In a thread: the server runs on this test's event loop.
    sync_reply = await asyncio.to_thread(blocking_chat_reply)

    for reply in (async_reply, sync_reply):
        assert reply.status is TurnStatus.COMPLETED
        assert (str(reply.status), f"{reply.status}", repr(reply.status)) == (
            "COMPLETED",
            "COMPLETED",
            "<TurnStatus.COMPLETED: 2>",
        )
        # Still the proto's number, for code that compares or stores it.
        assert reply.status == TurnStatus.TURN_STATUS_COMPLETED == chat_service_pb2.TURN_STATUS_COMPLETED
        assert TurnStatus.Name(reply.status) == "TURN_STATUS_COMPLETED"


async def test_roles_and_statuses_of_listed_messages_convert_to_named_members(
    client: AsyncChatClient, fake: FakeAnthropic, consume: Consume
) -> None:
    fake.script(Stream(["Hi", " there"]))
    reply = await client.chat_reply("hello")
    await consume()

    messages = [message async for message in client.list_messages(reply.conversation)]

    assert [(str(Role(m.role)), str(TurnStatus(m.turn_status))) for m in messages] == [
        ("USER", "COMPLETED"),
        ("ASSISTANT", "COMPLETED"),
    ]


@pytest.mark.parametrize(("python_enum", "proto_enum", "prefix"), PAIRS)
def test_members_are_the_proto_values_without_their_prefix(
    python_enum: type[ProtoEnum], proto_enum: EnumTypeWrapper, prefix: str
) -> None:
    # A value added to the proto must be added here too: this fails until it is.
    assert [(member.name, member.value) for member in python_enum] == [
        (name.removeprefix(prefix), number) for name, number in proto_enum.items()
    ]
    for name, number in proto_enum.items():
        # The generated enum's spellings keep working on the SDK's.
        assert getattr(python_enum, name) == number
        assert python_enum.Name(number) == proto_enum.Name(number) == name
        assert python_enum.Value(name) == proto_enum.Value(name) == number
    with pytest.raises(ValueError, match="no name defined for value 99"):
        python_enum.Name(99)
    with pytest.raises(ValueError, match="no value defined for name 'NOPE'"):
        python_enum.Value("NOPE")


def test_a_status_unknown_to_this_client_keeps_its_number() -> None:
    # A newer server may send a status this client was built without; proto3 enums are open.
    status = TurnStatus(9)

    assert isinstance(status, TurnStatus)
    assert (status, str(status), f"{status:>3}") == (9, "9", "  9")
    assert status not in list(TurnStatus)
