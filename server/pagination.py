"""Page sizes and opaque page tokens (a keyset cursor bound to the request that made it)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import Final

from server.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000

Cursor = Sequence[str | int]


def page_size(value: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """AIP-158 bounds: 0 means the default, above the maximum is coerced, negative is invalid."""
    if value < 0:
        raise InvalidArgumentError.for_field("page_size", "must not be negative")
    if value == 0:
        return min(default, maximum)
    return min(value, maximum)


def _binding(parts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def encode_token(cursor: Cursor, *, bound_to: Sequence[str]) -> str:
    """An opaque token for the page after ``cursor``, valid only with the same ``bound_to`` values."""
    body = json.dumps({"c": list(cursor), "b": _binding(bound_to)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_token(token: str, *, bound_to: Sequence[str]) -> list[str | int] | None:
    """The cursor inside ``token``; None for an empty token (first page).

    Raises InvalidArgumentError if the token is malformed or was made for other
    request parameters (AIP-158: the other fields must not change between pages).
    """
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        cursor = data["c"]
        binding = data["b"]
        if not isinstance(cursor, list) or not all(isinstance(v, str | int) for v in cursor):
            raise TypeError("cursor")
    except (ValueError, KeyError, TypeError):
        raise InvalidArgumentError.for_field("page_token", "is not a token this service issued") from None
    if binding != _binding(bound_to):
        raise InvalidArgumentError.for_field("page_token", "was issued for different request parameters")
    return cursor
