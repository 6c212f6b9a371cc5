// The client against a real chatstream server, run by tests/test_typescript_client.py.
//
// That pytest module starts the server (real PostgreSQL and Redis, the fake Anthropic API
// upstream, a persistence consumer), scripts the upstream for one group of tests, and runs
// this file with `--test-name-pattern '^<group>: '`. Every test name starts with its group.
//
// Environment:
//   CHATSTREAM_TEST_TARGET  the server, e.g. http://127.0.0.1:40123
//   CHATSTREAM_TEST_TOKEN   an API key the server accepts
//   CHATSTREAM_TEST_REPLY   the reply the upstream gives when not scripted otherwise

import assert from "node:assert/strict";
import { after, test } from "node:test";

import {
  ChatClient,
  ChatClientError,
  Code,
  type Message,
  Role,
  type TurnEvent,
  TurnStatus,
} from "../src/index.js";

const MISSING = "conversations/00000000-0000-0000-0000-000000000000";
const target = requiredEnv("CHATSTREAM_TEST_TARGET");
const token = requiredEnv("CHATSTREAM_TEST_TOKEN");
const client = new ChatClient({ baseUrl: target, token, timeoutMs: 10_000, chatTimeoutMs: 30_000 });
after(() => client.close());

test("turns: a turn streams started, text deltas, then completed", async () => {
  const events: TurnEvent[] = [];
  for await (const event of client.chat("hello")) {
    events.push(event);
  }
  assert.deepEqual(
    events.map((e) => e.seq),
    events.map((_, i) => BigInt(i + 1)),
    "seq counts 1, 2, 3, ... within the turn",
  );
  const [first, ...rest] = events;
  const last = rest.pop();
  if (first?.kind.case !== "started" || last?.kind.case !== "completed") {
    assert.fail(`expected started ... completed, got ${events.map((e) => e.kind.case).join(", ")}`);
  }
  assert.match(first.kind.value.conversation, /^conversations\/[0-9a-f-]{36}$/);
  assert.equal(last.kind.value.status, TurnStatus.COMPLETED);
  const deltas = rest.map((e) =>
    e.kind.case === "textDelta" ? e.kind.value.text : assert.fail(`unexpected ${e.kind.case}`),
  );
  assert.ok(deltas.length > 0);
  assert.equal(deltas.join(""), requiredEnv("CHATSTREAM_TEST_REPLY"));
});

test("turns: a second turn continues the same conversation", async () => {
  const first = await client.chatReply("my name is Ada");
  const second = await client.chatReply("what is my name?", { conversation: first.conversation });
  assert.equal(second.conversation, first.conversation);
  assert.notEqual(second.turn, first.turn);
  assert.equal(second.status, TurnStatus.COMPLETED);
  // The consumer writes messages shortly after each turn (ListMessages is eventually consistent).
  const messages = await eventuallyMessages(first.conversation, 4);
  assert.deepEqual(
    messages.map((m) => [m.role, m.text, m.turnStatus]),
    [
      [Role.USER, "my name is Ada", TurnStatus.COMPLETED],
      [Role.ASSISTANT, first.text, TurnStatus.COMPLETED],
      [Role.USER, "what is my name?", TurnStatus.COMPLETED],
      [Role.ASSISTANT, second.text, TurnStatus.COMPLETED],
    ],
  );
  const conversation = await client.getConversation(first.conversation);
  assert.equal(conversation.turnCount, 2n);
});

test("cancel: aborting the signal mid-stream stores the partial reply as CANCELLED", async () => {
  const controller = new AbortController();
  let conversation = "";
  let received = "";
  await assert.rejects(
    async () => {
      for await (const event of client.chat("tell me a long story", { signal: controller.signal })) {
        if (event.kind.case === "started") {
          conversation = event.kind.value.conversation;
        } else if (event.kind.case === "textDelta") {
          received += event.kind.value.text;
          controller.abort(); // the upstream now stalls: without the abort this call would hang
        }
      }
    },
    (error: unknown) => error instanceof ChatClientError && error.code === Code.Canceled,
  );
  await assertStoredAsCancelled(conversation, "tell me a long story", received);
});

test("cancel: leaving the loop early cancels the call", async () => {
  let conversation = "";
  let received = "";
  for await (const event of client.chat("tell me another story")) {
    if (event.kind.case === "started") {
      conversation = event.kind.value.conversation;
    } else if (event.kind.case === "textDelta") {
      received += event.kind.value.text;
      break;
    }
  }
  await assertStoredAsCancelled(conversation, "tell me another story", received);
});

test("errors: an unknown conversation is NOT_FOUND with its ErrorInfo", async () => {
  const error = await rejection(client.getConversation(MISSING));
  assert.equal(error.code, Code.NotFound);
  assert.equal(error.codeName, "NOT_FOUND");
  assert.equal(error.reason, "CONVERSATION_NOT_FOUND");
  assert.equal(error.domain, "chatstream.v1.ChatService");
  assert.equal(error.retryDelayMs, undefined);
  // The same through a stream: Chat on it fails before its first event.
  const chatError = await rejection(client.chatReply("hello?", { conversation: MISSING }));
  assert.equal(chatError.reason, "CONVERSATION_NOT_FOUND");
});

test("errors: a negative page size is INVALID_ARGUMENT with its field violation", async () => {
  const error = await rejection(client.listConversationsPage({ pageSize: -1 }));
  assert.equal(error.code, Code.InvalidArgument);
  assert.equal(error.reason, "INVALID_ARGUMENT");
  assert.deepEqual(error.metadata, { field: "page_size" });
  assert.deepEqual(
    error.fieldViolations.map((v) => v.field),
    ["page_size"],
  );
});

test("errors: a call without a credential is UNAUTHENTICATED", async () => {
  const anonymous = new ChatClient({ baseUrl: target });
  try {
    const error = await rejection(anonymous.getConversation(MISSING));
    assert.equal(error.code, Code.Unauthenticated);
    assert.equal(error.reason, "CREDENTIALS_MISSING");
  } finally {
    anonymous.close();
  }
});

test("retry: an overloaded upstream is UNAVAILABLE with a retry delay", async () => {
  const error = await rejection(client.chatReply("hello"));
  assert.equal(error.code, Code.Unavailable);
  assert.equal(error.reason, "UPSTREAM_UNAVAILABLE");
  assert.ok(error.retryDelayMs !== undefined && error.retryDelayMs > 0, `retryDelayMs ${error.retryDelayMs}`);
});

test("lists: the helpers iterate across pages", async () => {
  const created = [];
  for (let i = 0; i < 3; i++) {
    created.push((await client.createConversation()).name);
  }
  const firstPage = await client.listConversationsPage({ pageSize: 2 });
  assert.equal(firstPage.conversations.length, 2);
  assert.notEqual(firstPage.nextPageToken, "");
  const listed = [];
  for await (const conversation of client.listConversations({ pageSize: 2 })) {
    listed.push(conversation.name);
  }
  assert.deepEqual(listed, [...created].reverse(), "most recently created first, across two pages");

  const reply = await client.chatReply("one");
  await client.chatReply("two", { conversation: reply.conversation });
  await eventuallyMessages(reply.conversation, 4);
  const texts = [];
  for await (const message of client.listMessages(reply.conversation, { pageSize: 3 })) {
    texts.push(message.text);
  }
  assert.deepEqual(texts, ["one", reply.text, "two", reply.text]);

  await client.deleteConversation(reply.conversation);
  assert.equal((await rejection(client.getConversation(reply.conversation))).code, Code.NotFound);
});

async function assertStoredAsCancelled(
  conversation: string,
  userText: string,
  partial: string,
): Promise<void> {
  assert.notEqual(partial, "", "a delta arrived before the cancel");
  const messages = await eventuallyMessages(conversation, 2);
  assert.deepEqual(
    messages.map((m) => [m.role, m.text, m.turnStatus]),
    [
      [Role.USER, userText, TurnStatus.CANCELLED],
      [Role.ASSISTANT, partial, TurnStatus.CANCELLED],
    ],
  );
}

/** Polls ListMessages until the conversation has `count` messages; fails after 10 s. */
async function eventuallyMessages(conversation: string, count: number): Promise<Message[]> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const messages: Message[] = [];
    for await (const message of client.listMessages(conversation)) {
      messages.push(message);
    }
    if (messages.length >= count) {
      return messages;
    }
    if (Date.now() > deadline) {
      assert.fail(`${conversation} has ${messages.length} messages after 10 s, expected ${count}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function rejection(promise: Promise<unknown>): Promise<ChatClientError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof ChatClientError, `expected a ChatClientError, got ${String(error)}`);
    return error;
  }
  assert.fail("the call succeeded");
}

function requiredEnv(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run this suite through tests/test_typescript_client.py`);
  }
  return value;
}
