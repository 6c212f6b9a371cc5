"""The prompt's size budget: which earlier turns fit, newest first. Pure functions, no I/O.

A conversation grows without end, but the prompt sent upstream must fit the model's
context window, and each turn pays for every character it sends. The budget
(``CHATSTREAM_CONTEXT_MAX_CHARS``) covers the whole prompt: the system prompt, the
earlier turns and the new message. Earlier turns are taken newest first while they
fit, and the first one that does not fit ends the context: a prompt never skips a
turn and keeps older ones, which would show the model a conversation with a hole.

The budget is in characters, the unit the request limits use; a token estimate would
vary by model and language (about 4 characters per token in English, 1 in CJK text).
"""

from __future__ import annotations

from collections.abc import Sequence

from server.config import Settings, SettingsError
from server.domain import Exchange


def exchange_chars(exchange: Exchange) -> int:
    """The characters an earlier turn adds to the prompt."""
    return len(exchange.user_text) + len(exchange.assistant_text)


def fit_context(exchanges: Sequence[Exchange], budget: int) -> list[Exchange]:
    """The newest ``exchanges`` (oldest first, as given) whose text fits in ``budget`` characters.

    Stops at the first exchange, counting from the newest, that does not fit.
    """
    used = 0
    kept = 0
    for exchange in reversed(exchanges):
        used += exchange_chars(exchange)
        if used > budget:
            break
        kept += 1
    return list(exchanges[len(exchanges) - kept :])


def history_budget(settings: Settings, *, text_chars: int) -> int:
    """Characters left for earlier turns once the system prompt and a message of ``text_chars`` are in."""
    return max(0, settings.turns.context_max_chars - len(settings.llm.system_prompt) - text_chars)


def check_prompt_budget(settings: Settings) -> None:
    """Refuses a budget that could not hold the longest accepted message.

    With it, every message the edge accepts (``CHATSTREAM_MAX_TEXT_CHARS``) fits the
    prompt, so a message that can never fit is refused up front with INVALID_ARGUMENT
    instead of failing after its turn was stored.

    Raises:
        SettingsError: the budget is smaller than the system prompt plus the longest message.
    """
    needed = settings.turns.max_text_chars + len(settings.llm.system_prompt)
    if settings.turns.context_max_chars < needed:
        raise SettingsError(
            f"CHATSTREAM_CONTEXT_MAX_CHARS ({settings.turns.context_max_chars}) must be at least "
            f"CHATSTREAM_MAX_TEXT_CHARS plus the system prompt's length ({needed})"
        )
