"""Context bounded by size (issue 15, item 5): the prompt and the cache entry stay within the
character budget however long the conversation, and a message that could never fit is refused
before any side effect."""

from __future__ import annotations

import json

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from chatstream import AsyncChatClient, ChatClientError

from server.config import SettingsError
from server.constants import context_key
from server.context_budget import fit_context
from server.domain import Exchange
from tests.conftest import StartServer
from tests.fake_anthropic import FakeAnthropic, Stream

BUDGET = 3000
MAX_TEXT = 1000
USER_CHARS = 700
REPLY_CHARS = 200
# 2 x 900 = 1800 fits the 2000 characters left after keeping room for a 1000-character message;
# 3 x 900 does not.
EARLIER_TURNS_IN_PROMPT = 2


def _exchange(seq: int, chars: int) -> Exchange:
    return Exchange(seq=seq, user_text="u" * (chars // 2), assistant_text="a" * (chars - chars // 2))


def test_fit_context_keeps_the_newest_that_fit_and_never_skips_one() -> None:
    exchanges = [_exchange(1, 10), _exchange(2, 500), _exchange(3, 30), _exchange(4, 40)]
    assert [e.seq for e in fit_context(exchanges, 1000)] == [1, 2, 3, 4]
    assert [e.seq for e in fit_context(exchanges, 580)] == [1, 2, 3, 4]
    assert [e.seq for e in fit_context(exchanges, 579)] == [2, 3, 4]
    # The big turn 2 does not fit: the context ends there, turn 1 is not brought in after it.
    assert [e.seq for e in fit_context(exchanges, 100)] == [3, 4]
    assert fit_context(exchanges, 39) == []
    assert fit_context([], 100) == []


async def _conversation_of(client: AsyncChatClient, fake: FakeAnthropic, turns: int) -> str:
    conversation = ""
    for n in range(turns):
        fake.script(Stream(["r" * REPLY_CHARS]))
        reply = await client.chat_reply(f"{n}" + "m" * (USER_CHARS - 1), conversation=conversation)
        conversation = reply.conversation
    return conversation


def _prompt(fake: FakeAnthropic) -> list[str]:
    body = fake.requests[-1].body
    assert body is not None
    messages = body["messages"]
    assert isinstance(messages, list)
    return [str(m["content"]) for m in messages if isinstance(m, dict)]


async def test_the_prompt_and_the_cache_entry_stay_within_the_budget_newest_first(
    start_server: StartServer, fake: FakeAnthropic, redis: aioredis.Redis
) -> None:
    server = await start_server(context_max_chars=BUDGET, max_text_chars=MAX_TEXT)
    async with AsyncChatClient(server.address) as client:
        conversation = await _conversation_of(client, fake, 6)
        # Turn 6 (from the cache): turns 4 and 5, then its own message (turn n's text starts
        # with n - 1).
        prompt = _prompt(fake)
        assert len(prompt) == 2 * EARLIER_TURNS_IN_PROMPT + 1
        assert [p[0] for p in prompt[::2]] == ["3", "4", "5"]
        assert sum(map(len, prompt)) <= BUDGET

        # The cache entry holds at most the budget (what any next prompt could use), not 6 turns.
        conversation_id = conversation.split("/")[-1]
        cached = await redis.get(context_key(conversation_id))
        assert cached is not None
        entry = json.loads(cached)
        assert sum(len(u) + len(a) for _, u, a in entry["x"]) <= BUDGET
        assert [seq for seq, _, _ in entry["x"]] == [4, 5, 6]

        # From PostgreSQL when the cache is gone: the same bound.
        await redis.delete(context_key(conversation_id))
        fake.script(Stream(["r" * REPLY_CHARS]))
        await client.chat_reply("6" + "m" * (USER_CHARS - 1), conversation=conversation)
        prompt = _prompt(fake)
        assert [p[0] for p in prompt[::2]] == ["4", "5", "6"]
        assert sum(map(len, prompt)) <= BUDGET


async def test_a_message_that_could_never_fit_is_invalid_argument_before_any_side_effect(
    start_server: StartServer, fake: FakeAnthropic, db: asyncpg.Connection
) -> None:
    server = await start_server(context_max_chars=BUDGET, max_text_chars=MAX_TEXT)
    async with AsyncChatClient(server.address) as client:
        with pytest.raises(ChatClientError) as caught:
            await client.chat_reply("x" * (MAX_TEXT + 1))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field_violations == (("text", f"must be at most {MAX_TEXT} characters"),)
    assert fake.requests == []
    assert await db.fetchval("SELECT count(*) FROM chat.turns") == 0


@pytest.mark.parametrize(("budget", "system_prompt"), [(MAX_TEXT - 1, ""), (MAX_TEXT, "Answer briefly.")])
async def test_a_budget_that_cannot_hold_the_longest_message_refuses_to_start(
    start_server: StartServer, budget: int, system_prompt: str
) -> None:
    """Otherwise a message the edge accepts could never fit, and would fail only after its turn was stored."""
    with pytest.raises(SettingsError, match="CHATSTREAM_CONTEXT_MAX_CHARS"):
        await start_server(context_max_chars=budget, max_text_chars=MAX_TEXT, system_prompt=system_prompt)
