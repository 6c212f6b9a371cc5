"""The turn codec and the message ids: what is on the wire and in chat.messages must not drift.

``TurnColumns`` (the consumer's decoder) must accept exactly the entries ``decode_turn``
accepts, with the same values, and reject the others with the same message: that is what
keeps dead-lettering exact. Checked on hand-picked edge cases and on generated payloads.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from server.domain import Role, Turn, TurnStatus, Usage
from server.message_ids import message_id, message_ids_hex
from server.turn_codec import EventDecodeError, TurnColumns, decode_turn, encode_turn

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
    assert message_ids_hex(turn_id) == (uuid.UUID(user_id).hex, uuid.UUID(assistant_id).hex)


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.uuids())
def test_the_consumers_message_ids_are_uuid5_of_the_turn_and_role(turn: uuid.UUID) -> None:
    assert message_ids_hex(str(turn)) == (
        message_id(turn, Role.USER).hex,
        message_id(turn, Role.ASSISTANT).hex,
    )


_TURN = Turn(
    id=uuid.UUID("5f0c4a2e-8b7d-4c1e-9a3f-2d6b8e1f0a47"),
    conversation_id=uuid.UUID("9d4e3b2a-1c0f-4e8d-b7a6-5f4e3d2c1b0a"),
    owner="anonymous",
    seq=3,
    request_id="r-1",
    user_text="héllo \U0001f600",
    assistant_text="Hello from the fake model.",
    status=TurnStatus.COMPLETED,
    stop_reason="end_turn",
    usage=Usage(input_tokens=3, output_tokens=6),
    model="claude-test",
    created_at=datetime(2026, 12, 1, 5, 0, 0, 123456, tzinfo=UTC),
    completed_at=datetime(2026, 12, 1, 5, 0, 1, tzinfo=UTC),
)
_BODY = encode_turn(_TURN)[b"turn"]


def _payload(**changes: object) -> dict[str, object]:
    payload: dict[str, object] = json.loads(_BODY)
    for key, value in changes.items():
        if value is _MISSING:
            del payload[key]
        else:
            payload[key] = value
    return payload


_MISSING = object()


def _entry(body: bytes | dict[str, object], version: bytes = b"1") -> dict[bytes, bytes]:
    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return {b"v": version, b"turn": body}


Outcome = tuple[str, object]


def _reference(fields: Mapping[bytes, bytes]) -> Outcome:
    """What the first release's decoder made of an entry: a row, or the poison message."""
    try:
        turn = decode_turn(fields)
    except EventDecodeError as exc:
        return "poison", str(exc)
    return "row", (
        turn.id,
        turn.conversation_id,
        turn.seq,
        turn.status.value,
        repr(turn.created_at),
        message_id(turn.id, Role.USER),
        turn.user_text,
        message_id(turn.id, Role.ASSISTANT),
        turn.assistant_text,
    )


def _columns(fields: Mapping[bytes, bytes]) -> Outcome:
    columns = TurnColumns()
    try:
        columns.append(fields)
    except EventDecodeError as exc:
        assert len(columns) == 0, "a rejected entry left something in the columns"
        return "poison", str(exc)
    assert len(columns) == 1
    assert type(columns.seqs[0]) is int
    return "row", (
        uuid.UUID(columns.turn_ids[0]),
        uuid.UUID(columns.conversation_ids[0]),
        columns.seqs[0],
        columns.statuses[0],
        repr(columns.created[0]),
        uuid.UUID(columns.user_message_ids[0]),
        columns.user_texts[0],
        uuid.UUID(columns.assistant_message_ids[0]),
        columns.assistant_texts[0],
    )


_UPPER = str(_TURN.id).upper()
_EDGE_CASES: dict[str, tuple[dict[bytes, bytes], str]] = {
    "as encode_turn writes it": (_entry(_BODY), "row"),
    "upper-case id": (_entry(_payload(id=_UPPER)), "row"),
    "braced conversation id": (
        _entry(_payload(conversation_id="{" + str(_TURN.conversation_id) + "}")),
        "row",
    ),
    "urn id": (_entry(_payload(id=_TURN.id.urn)), "row"),
    "id without hyphens": (_entry(_payload(id=_TURN.id.hex)), "row"),
    "id with a sign (int() takes it)": (_entry(_payload(id="+" + _TURN.id.hex[1:])), "row"),
    "id not a uuid": (_entry(_payload(id="not-a-uuid")), "poison"),
    "id an int": (_entry(_payload(id=5)), "poison"),
    "seq true": (_entry(_payload(seq=True)), "poison"),
    "seq 1.0": (_entry(_payload(seq=1.0)), "poison"),
    "seq a string": (_entry(_payload(seq="1")), "poison"),
    "seq beyond 64 bits": (_entry(_payload(seq=2**70)), "row"),
    "status streaming": (_entry(_payload(status="STREAMING")), "poison"),
    "status lower case": (_entry(_payload(status="completed")), "poison"),
    "status failed": (_entry(_payload(status="FAILED")), "row"),
    "status a number": (_entry(_payload(status=7)), "poison"),
    "request_id nested": (_entry(_payload(request_id=[1, {"a": [None]}])), "row"),
    "stop_reason a number": (_entry(_payload(stop_reason=2.5)), "row"),
    "request_id NaN": (_entry(_payload(request_id=float("nan"))), "row"),
    "unknown key": (_entry(_payload(extra={"x": 1})), "row"),
    "no completed_at": (_entry(_payload(completed_at=_MISSING)), "poison"),
    "no request_id": (_entry(_payload(request_id=_MISSING)), "poison"),
    "no owner": (_entry(_payload(owner=_MISSING)), "poison"),
    "owner null": (_entry(_payload(owner=None)), "poison"),
    "model a list": (_entry(_payload(model=["m"])), "poison"),
    "tokens a bool": (_entry(_payload(output_tokens=False)), "poison"),
    "user text with a lone surrogate": (_entry(_payload(user_text="a\ud800b")), "row"),
    "escaped lone surrogate": (_entry(_BODY.replace(b'"h\xc3\xa9llo', b'"\\udc00h')), "row"),
    "created_at a date": (_entry(_payload(created_at="2026-12-01")), "row"),
    "created_at with Z": (_entry(_payload(created_at="2026-12-01T05:00:00Z")), "row"),
    "created_at naive": (_entry(_payload(created_at="2026-12-01T05:00:00")), "row"),
    "created_at garbage": (_entry(_payload(created_at="yesterday")), "poison"),
    "created_at a number": (_entry(_payload(created_at=1)), "poison"),
    "completed_at null": (_entry(_payload(completed_at=None)), "row"),
    "completed_at garbage": (_entry(_payload(completed_at="soon")), "poison"),
    "duplicate key, the last valid": (_entry(_BODY.replace(b'"seq":3', b'"seq":"x","seq":3')), "row"),
    "duplicate key, the last invalid": (_entry(_BODY.replace(b'"seq":3', b'"seq":3,"seq":"x"')), "poison"),
    "utf-8 bom": (_entry(b"\xef\xbb\xbf" + _BODY), "row"),
    "utf-16": (_entry(_BODY.decode().encode("utf-16")), "row"),
    "invalid utf-8": (_entry(_BODY.replace(b"\xc3\xa9", b"\xff")), "poison"),
    "not json": (_entry(b"{not json"), "poison"),
    "a list": (_entry(b"[]"), "poison"),
    "null": (_entry(b"null"), "poison"),
    "empty": (_entry(b""), "poison"),
    "too deep": (_entry(_BODY.replace(b'"r-1"', b"[" * 5000 + b"]" * 5000)), "poison"),
    "version 2": (_entry(_BODY, version=b"2"), "poison"),
    "no version": ({b"turn": _BODY}, "poison"),
    "no body": ({b"v": b"1"}, "poison"),
}


@pytest.mark.parametrize("case", list(_EDGE_CASES))
def test_the_consumers_decoder_agrees_with_decode_turn(case: str) -> None:
    fields, expected = _EDGE_CASES[case]
    outcome = _columns(fields)
    assert outcome == _reference(fields)
    assert outcome[0] == expected


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_uuid_texts = st.uuids().flatmap(
    lambda u: st.sampled_from([str(u)] * 6 + [str(u).upper(), u.hex, u.urn, "{" + str(u) + "}", str(u)[:-1]])
)
_datetimes = st.datetimes(timezones=st.none() | st.timezones()).map(datetime.isoformat)
_fields = {
    "id": _uuid_texts,
    "conversation_id": _uuid_texts,
    "owner": st.text(),
    "seq": st.integers(),
    "request_id": st.none() | st.text(),
    "user_text": st.text(),
    "assistant_text": st.text(),
    "status": st.sampled_from(["COMPLETED", "CANCELLED", "FAILED", "INTERRUPTED", "STREAMING"]),
    "stop_reason": st.none() | st.text(),
    "input_tokens": st.integers(min_value=0),
    "output_tokens": st.integers(min_value=0),
    "model": st.text(),
    "created_at": _datetimes,
    "completed_at": st.none() | _datetimes,
}


@st.composite
def _payloads(draw: st.DrawFn) -> bytes:
    """Mostly well-formed turns (about a third entirely), a field now and then missing or any JSON value."""
    payload: dict[str, object] = {}
    for key, valid in _fields.items():
        kind = draw(st.integers(min_value=0, max_value=99))
        if kind < 95:
            payload[key] = draw(valid)
        elif kind < 98:
            payload[key] = draw(_json_values)
    if draw(st.booleans()):
        payload.update(draw(st.dictionaries(st.text(max_size=8), _json_values, max_size=2)))
    text = json.dumps(payload, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=1000, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_payloads())
def test_the_consumers_decoder_agrees_with_decode_turn_on_generated_payloads(body: bytes) -> None:
    fields = _entry(body)
    outcome = _columns(fields)
    assert outcome == _reference(fields)
    event(outcome[0])
