"""The SDK's Role and TurnStatus: names that print, numbers that are the proto's; and the views
through which every message and event that carries one reaches a user."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, get_type_hints

import chatstream
import pytest
from chatstream import (
    AsyncChatClient,
    ChatClient,
    ChatReply,
    ListMessagesResponse,
    Message,
    Role,
    TurnCompleted,
    TurnEvent,
    TurnStatus,
)
from chatstream._enums import ProtoEnum
from chatstream.v1 import chat_service_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message as ProtoMessage

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


async def test_listed_messages_carry_roles_and_statuses_as_named_members_through_both_clients(
    server: ChatServer, client: AsyncChatClient, fake: FakeAnthropic, consume: Consume
) -> None:
    fake.script(Stream(["Hi", " there"]))
    reply = await client.chat_reply("hello")
    await consume()

    def blocking_list() -> tuple[list[Message], ListMessagesResponse]:
        with ChatClient(server.address, timeout=timedelta(seconds=10)) as sync_client:
            return list(sync_client.list_messages(reply.conversation)), sync_client.list_messages_page(
                reply.conversation
            )

    listed = [message async for message in client.list_messages(reply.conversation)]
    page = await client.list_messages_page(reply.conversation, page_size=1)
    sync_listed, sync_page = await asyncio.to_thread(blocking_list)

    for messages in (listed, sync_listed, sync_page.messages, [*page.messages]):
        assert [(m.role, m.turn_status) for m in messages] == [
            (Role.USER, TurnStatus.COMPLETED),
            (Role.ASSISTANT, TurnStatus.COMPLETED),
        ][: len(messages)]
        # What a user sees when printing them: names, not 1 and 2.
        assert [f"{m.role} {m.turn_status}" for m in messages][:1] == ["USER COMPLETED"]
        assert all(type(m.role) is Role and type(m.turn_status) is TurnStatus for m in messages)
    assert page.next_page_token
    assert [m.text for m in listed] == ["hello", "Hi there"]
    # The generated message stays at hand, for protobuf's own functions.
    assert isinstance(listed[0].proto, chat_service_pb2.Message)
    assert MessageToDict(listed[0].proto)["role"] == "ROLE_USER"
    assert listed[0].create_time == listed[0].proto.create_time
    assert listed == sync_listed


async def test_streamed_events_carry_the_status_as_a_named_member_from_chat_and_both_watches(
    server: ChatServer, client: AsyncChatClient, fake: FakeAnthropic
) -> None:
    fake.script(Stream(["one"]), Stream(["two"]), Stream(["three"]))
    chatted = [event async for event in client.chat("first")]
    turn = chatted[0].started.turn
    conversation = chatted[0].started.conversation
    watched = [event async for event in client.watch_turn(turn)]

    async def watch_next_turn() -> list[TurnEvent]:
        seen: list[TurnEvent] = []
        async for event in client.watch_conversation(conversation, timeout=timedelta(seconds=20)):
            seen.append(event)
            if event.WhichOneof("kind") == "completed":
                return seen
        return seen

    watching = asyncio.ensure_future(watch_next_turn())
    await asyncio.sleep(0.5)  # the watch is waiting for the conversation's next turn
    await client.chat_reply("second", conversation=conversation)
    conversation_events = await asyncio.wait_for(watching, timeout=20)

    def blocking_chat() -> list[TurnEvent]:
        with ChatClient(server.address, timeout=timedelta(seconds=10)) as sync_client:
            return list(sync_client.chat("third", conversation=conversation))

    sync_chatted = await asyncio.to_thread(blocking_chat)

    for events in (chatted, watched, conversation_events, sync_chatted):
        completed = events[-1].completed
        assert completed.status is TurnStatus.COMPLETED
        assert (str(completed.status), f"{events[-1].completed.status}") == ("COMPLETED", "COMPLETED")
        # Read as the generated event was: its kind, its fields, its text form.
        assert [event.WhichOneof("kind") for event in events] == ["started", "text_delta", "completed"]
        assert events[1].HasField("text_delta")
        assert not events[1].HasField("completed")
        assert events[-1].seq > events[0].seq == 1
        assert completed.stop_reason == "end_turn"
        assert completed.usage.output_tokens > 0
        assert str(events[-1]) == str(events[-1].proto)
        assert "status: TURN_STATUS_COMPLETED" in repr(events[-1])
    assert chatted == watched
    assert isinstance(chatted[-1].proto, chat_service_pb2.TurnEvent)
    # The completed event of an event of another kind is all defaults, as the generated one's is.
    assert chatted[0].completed.status is TurnStatus.UNSPECIFIED


@pytest.mark.parametrize(
    ("view", "generated"),
    [
        (Message, chat_service_pb2.Message),
        (ListMessagesResponse, chat_service_pb2.ListMessagesResponse),
        (TurnEvent, chat_service_pb2.TurnEvent),
        (TurnCompleted, chat_service_pb2.TurnCompleted),
    ],
)
def test_each_view_reads_every_field_of_its_message_and_names_its_enums(
    view: type[Any], generated: type[ProtoMessage]
) -> None:
    # A field added to the proto must be added to the view too: this fails until it is.
    enums = {"Role": Role, "TurnStatus": TurnStatus}
    for field in generated.DESCRIPTOR.fields:
        accessor = getattr(view, field.name, None)
        assert isinstance(accessor, property), f"{view.__name__} has no {field.name}"
        returns = get_type_hints(accessor.fget)["return"]
        if field.enum_type is not None:
            assert returns is enums[field.enum_type.name], f"{view.__name__}.{field.name}"
    # And the SDK exports the views, not the generated classes, under the proto's names.
    assert getattr(chatstream, view.__name__) is view


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
