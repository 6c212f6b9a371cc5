"""Role and TurnStatus, the proto's enums as Python enums whose members print their names; and
the views through which the clients hand out the messages that carry them.

The generated `chatstream.v1.chat_service_pb2.Role` and `TurnStatus` hand out bare numbers
(`reply.status` printed `2`). These are `IntEnum`s over the same numbers: a member is its wire
value, so it goes wherever the number went, and `Role.USER` prints `USER`.

A generated message cannot be made to return them (its fields are read in C, and its class cannot
be subclassed), so `list_messages`, `chat` and the watches yield views: `Message`, `TurnEvent` and
`TurnCompleted` read the generated message they wrap, hold it as `proto`, and type its enum fields
as these enums. tests/test_sdk_enums.py checks both against the proto's descriptor.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Self, TypeVar

from google.protobuf import text_format
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp

from chatstream.v1 import chat_service_pb2


class ProtoEnum(enum.IntEnum):
    """An `IntEnum` over the proto enum of the same name: same numbers, names without the prefix.

    Members print as their names (`str` and `format`), where a plain `IntEnum` prints the
    number. The proto's full names stay, as plain numbers (`TurnStatus.TURN_STATUS_COMPLETED ==
    2`), and `Name` and `Value` answer as the generated enum's do, so code written against the
    generated enum keeps working.
    """

    def __str__(self) -> str:
        return self.name

    def __format__(self, format_spec: str) -> str:
        return format(self.name, format_spec)

    @classmethod
    def _missing_(cls, value: object) -> Self | None:
        # A number added to the proto after this client was built (proto3 enums are open): keep
        # it as a member named by its number, so that a newer server never breaks an older client.
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = str(value)
        member._value_ = value
        return member

    @classmethod
    def descriptor(cls) -> EnumDescriptor:
        """The proto enum this one mirrors, from the generated code."""
        return chat_service_pb2.DESCRIPTOR.enum_types_by_name[cls.__name__]

    @classmethod
    def Name(cls, number: int) -> str:
        """The proto's name of `number`, e.g. `TURN_STATUS_COMPLETED`, as the generated enum's `Name`.

        Raises:
            ValueError: The proto has no value with that number.
        """
        value = cls.descriptor().values_by_number.get(number)
        if value is None:
            raise ValueError(f"enum {cls.__name__} has no name defined for value {number!r}")
        return value.name

    @classmethod
    def Value(cls, name: str) -> int:
        """The number of the proto's name `name`, e.g. `TURN_STATUS_COMPLETED`, as the generated `Value`.

        The number is returned as the member that has it, typed `int` as the generated enum's is.

        Raises:
            ValueError: The proto has no value of that name.
        """
        value = cls.descriptor().values_by_name.get(name)
        if value is None:
            raise ValueError(f"enum {cls.__name__} has no value defined for name {name!r}")
        return cls(value.number)


class Role(ProtoEnum):
    """Who wrote a message (`chatstream.v1.Role`); `Message.role` is one, and prints `USER` or `ASSISTANT`."""

    UNSPECIFIED = 0
    """Never used."""
    USER = 1
    """The caller's end user."""
    ASSISTANT = 2
    """The model."""

    # The proto's names, as the generated enum has them: plain numbers, not members. Typed
    # `int`, they compare under mypy --strict both with members and with the generated
    # messages' fields, which mypy-protobuf types as a NewType that no member overlaps.
    ROLE_UNSPECIFIED = enum.nonmember(0)
    ROLE_USER = enum.nonmember(1)
    ROLE_ASSISTANT = enum.nonmember(2)


class TurnStatus(ProtoEnum):
    """How a turn ended, or that it has not ended yet (`chatstream.v1.TurnStatus`).

    `ChatReply.status`, `TurnCompleted.status` (`event.completed.status`) and
    `Message.turn_status` are one; `TurnStatus(number)` turns a generated message's field into one.
    """

    UNSPECIFIED = 0
    """Never used."""
    STREAMING = 1
    """The reply is still being streamed."""
    COMPLETED = 2
    """The model finished its reply."""
    CANCELLED = 3
    """The client cancelled the call or its deadline passed; partial text is kept."""
    FAILED = 4
    """The model or the server failed mid-reply; partial text is kept."""
    INTERRUPTED = 5
    """The server serving the turn died; found when its lease expired."""

    # The proto's names, plain numbers as in Role.
    TURN_STATUS_UNSPECIFIED = enum.nonmember(0)
    TURN_STATUS_STREAMING = enum.nonmember(1)
    TURN_STATUS_COMPLETED = enum.nonmember(2)
    TURN_STATUS_CANCELLED = enum.nonmember(3)
    TURN_STATUS_FAILED = enum.nonmember(4)
    TURN_STATUS_INTERRUPTED = enum.nonmember(5)


def _one_line(proto: ProtoMessage) -> str:
    # The proto's text format names enum values (`status: TURN_STATUS_COMPLETED`).
    return text_format.MessageToString(proto, as_one_line=True)


_Proto = TypeVar("_Proto", bound=ProtoMessage)


@dataclass(frozen=True, slots=True, repr=False)
class _View(Generic[_Proto]):
    """A read-only view of one generated message; `str` prints it as protobuf does, enums by name."""

    proto: _Proto
    """The generated message, for protobuf's own functions (`MessageToDict`, `SerializeToString`)."""

    def __str__(self) -> str:
        return str(self.proto)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_one_line(self.proto)})"


@dataclass(frozen=True, slots=True, repr=False)
class Message(_View[chat_service_pb2.Message]):
    """One message of a conversation, as `list_messages` yields it (`chatstream.v1.Message`).

    `role` and `turn_status` are `Role` and `TurnStatus` members; the generated message is `proto`.
    """

    @property
    def name(self) -> str:
        """Resource name, `conversations/{conversation}/messages/{message}`."""
        return self.proto.name

    @property
    def role(self) -> Role:
        """Who wrote it: `Role.USER` or `Role.ASSISTANT`."""
        return Role(self.proto.role)

    @property
    def text(self) -> str:
        """The text; for the reply of a turn that did not complete, the part produced before it ended."""
        return self.proto.text

    @property
    def turn(self) -> str:
        """Resource name of its turn, `conversations/{conversation}/turns/{turn}`."""
        return self.proto.turn

    @property
    def turn_status(self) -> TurnStatus:
        """How its turn ended."""
        return TurnStatus(self.proto.turn_status)

    @property
    def create_time(self) -> Timestamp:
        """When its turn started."""
        return self.proto.create_time


@dataclass(frozen=True, slots=True, repr=False)
class ListMessagesResponse(_View[chat_service_pb2.ListMessagesResponse]):
    """One page of a conversation's messages, as `list_messages_page` returns it."""

    @property
    def messages(self) -> Sequence[Message]:
        """The page's messages, in conversation order."""
        return [Message(message) for message in self.proto.messages]

    @property
    def next_page_token(self) -> str:
        """The `page_token` of the next page; "" on the last page."""
        return self.proto.next_page_token


@dataclass(frozen=True, slots=True, repr=False)
class TurnCompleted(_View[chat_service_pb2.TurnCompleted]):
    """The last event of a turn (`chatstream.v1.TurnCompleted`): how it ended, `status`, a `TurnStatus`."""

    @property
    def status(self) -> TurnStatus:
        """How the turn ended: `TurnStatus.COMPLETED`, `CANCELLED`, `FAILED` or `INTERRUPTED`."""
        return TurnStatus(self.proto.status)

    @property
    def stop_reason(self) -> str:
        """The model's stop reason, e.g. `end_turn` or `max_tokens`."""
        return self.proto.stop_reason

    @property
    def usage(self) -> chat_service_pb2.Usage:
        """Token counts for the turn."""
        return self.proto.usage

    @property
    def model(self) -> str:
        """The model that produced the reply."""
        return self.proto.model

    @property
    def error_reason(self) -> str:
        """For a turn that did not complete, why (`CANCELLED`, `LEASE_EXPIRED`, an `ErrorInfo` reason)."""
        return self.proto.error_reason


@dataclass(frozen=True, slots=True, repr=False)
class TurnEvent(_View[chat_service_pb2.TurnEvent]):
    """One event of a turn, as `chat`, `watch_turn` and `watch_conversation` yield it.

    Read it as the generated `chatstream.v1.TurnEvent`: `WhichOneof("kind")` or `HasField` says
    which of `started`, `text_delta` and `completed` it is, and `completed.status` is a
    `TurnStatus`. The generated event is `proto`.
    """

    @property
    def seq(self) -> int:
        """Increasing within the turn, `started` being 1; may skip. Resume after the last one seen."""
        return self.proto.seq

    @property
    def started(self) -> chat_service_pb2.TurnStarted:
        """The first event: the conversation and the turn, durable once it is sent."""
        return self.proto.started

    @property
    def text_delta(self) -> chat_service_pb2.TextDelta:
        """A piece of the reply."""
        return self.proto.text_delta

    @property
    def completed(self) -> TurnCompleted:
        """The last event, with how the turn ended; all defaults (status `UNSPECIFIED`) on another kind."""
        return TurnCompleted(self.proto.completed)

    def HasField(self, field_name: Literal["started", "text_delta", "completed", "kind"]) -> bool:
        """Whether the event is of that kind, as the generated event's `HasField`."""
        return self.proto.HasField(field_name)

    def WhichOneof(
        self, oneof_group: Literal["kind"]
    ) -> Literal["started", "text_delta", "completed"] | None:
        """`"started"`, `"text_delta"` or `"completed"`; None for a kind newer than this client."""
        return self.proto.WhichOneof(oneof_group)
