"""The turn codec and the message ids: what is on the wire and in chat.messages must not drift."""

from __future__ import annotations

import uuid

import pytest

from server.db.message_store import message_id
from server.domain import Role

# Recorded from the first release's uuid5 ids. A message's id is part of its resource name
# (conversations/{c}/messages/{id}), and a turn published by one release may be persisted
# by the next: the same turn must always get these ids.
_RECORDED_IDS = [
    (
        "5f0c4a2e-8b7d-4c1e-9a3f-2d6b8e1f0a47",
        "43ae5bab-713f-5cf4-806e-b3a04d6725c6",
        "da370371-3ba6-53e7-81c7-91d4f5f73b3d",
    ),
    (
        "00000000-0000-0000-0000-000000000000",
        "ed09b145-5e37-5fd1-8e91-d85422672d6b",
        "ca58d8cd-6b08-56bf-9d0d-fb642c9eca7a",
    ),
]


@pytest.mark.parametrize(("turn_id", "user_id", "assistant_id"), _RECORDED_IDS)
def test_message_ids_of_a_turn_are_the_recorded_ones(turn_id: str, user_id: str, assistant_id: str) -> None:
    turn = uuid.UUID(turn_id)
    assert message_id(turn, Role.USER) == uuid.UUID(user_id)
    assert message_id(turn, Role.ASSISTANT) == uuid.UUID(assistant_id)
