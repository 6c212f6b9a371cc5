"""Role and TurnStatus: the proto's enums as Python enums, whose members print their names.

The generated `chatstream.v1.chat_service_pb2.Role` and `TurnStatus` hand out bare numbers
(`reply.status` printed `2`). These are `IntEnum`s over the same numbers: a member is its wire
value, so it goes wherever the number went, and `Role(message.role)` prints `USER`.
tests/test_sdk_enums.py checks them against the proto's descriptor.
"""

from __future__ import annotations

import enum
from typing import Self

from google.protobuf.descriptor import EnumDescriptor

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
    """Who wrote a message (`chatstream.v1.Role`); `Role(message.role)` prints `USER` or `ASSISTANT`."""

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

    `ChatReply.status` is one; `TurnStatus(event.completed.status)` turns the field of a
    streamed event into one.
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
