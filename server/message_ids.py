"""The deterministic ids of a turn's two messages: uuid5 of the turn id and the role.

The same message (turn, role) always gets the same id, so its resource name
(``conversations/{c}/messages/{id}``) is stable whichever of several redundant deliveries
wins the insert, and whichever release persisted it. Duplicates are kept out by the unique
(turn_id, role), not by the id; the id must still never change for a turn, because
callers hold it in resource names.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Final

from server.domain import Role

NAMESPACE: Final = uuid.UUID("0b8f7d4e-3c1a-4f55-9a43-7d1c2a9e6b10")

_NAMESPACE_BYTES: Final = NAMESPACE.bytes
# RFC 4122 version 5 and variant bits, as uuid.UUID(bytes=..., version=5) sets them.
_KEEP: Final = ~((0xF000 << 64) | (0xC000 << 48))
_VERSION_5: Final = (0x5000 << 64) | (0x8000 << 48)


def message_id(turn_id: uuid.UUID, role: Role) -> uuid.UUID:
    """The id of the ``role`` message of turn ``turn_id``: the definition, the first release's."""
    return uuid.uuid5(NAMESPACE, f"{turn_id}/{role.value}")


def message_ids_hex(turn_id: str) -> tuple[str, str]:
    """The user and assistant message ids of a turn, as 32 hex digits each: ``message_id``'s values.

    The consumer's hot path: about three times cheaper than two ``uuid5`` calls (no UUID
    objects; the hash input's prefix is built once), and PostgreSQL's driver takes the hex
    as it is.

    Args:
        turn_id: The turn id in canonical form, ``str(uuid.UUID(...))``: lowercase, hyphenated.
    """
    prefix = _NAMESPACE_BYTES + turn_id.encode()
    user = int.from_bytes(hashlib.sha1(prefix + b"/1", usedforsecurity=False).digest()[:16])
    assistant = int.from_bytes(hashlib.sha1(prefix + b"/2", usedforsecurity=False).digest()[:16])
    return f"{user & _KEEP | _VERSION_5:032x}", f"{assistant & _KEEP | _VERSION_5:032x}"
