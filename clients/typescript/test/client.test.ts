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
// and for the "resume" group only:
//   CHATSTREAM_TEST_PROXY     a proxy in front of two servers that can cut every connection
//   CHATSTREAM_TEST_CUT_FILE  a path: the test creates the file to ask for a cut, and the
//                             pytest side removes it once the cut is done

import assert from "node:assert/strict";
import { existsSync, writeFileSync } from "node:fs";
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
const MISSING_TURN = `${MISSING}/turns/00000000-0000-0000-0000-000000000000`;
const target = requiredEnv("CHATSTREAM_TEST_TARGET");
const token = requiredEnv("CHATSTREAM_TEST_TOKEN");
const client = new ChatClient({ baseUrl: target, token, timeoutMs: 10_000, chatTimeoutMs: 30_000 });
after(() => client.close());

test("turns: a turn streams started, text deltas, then completed", async () => {
  const events: TurnEvent[] = [];
  for await (const event of client.chat("hello")) {
    events.push(event);
  }
  // Numbered where the turn is produced: a joined delta carries the number of its last part,
  // so the numbers start at 1 and increase, and may skip.
  const seqs = events.map((e) => e.seq);
  assert.equal(seqs[0], 1n, "started is seq 1");
  assert.ok(
    seqs.every((seq, i) => i === 0 || seq > (seqs[i - 1] ?? seq)),
    "seq increases within the turn",
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

test("cancel: cancelTurn stops a streaming turn and is idempotent", async () => {
  let conversation = "";
  let turn = "";
  let received = "";
  const events: TurnEvent[] = [];
  for await (const event of client.chat("tell me a third story")) {
    events.push(event);
    if (event.kind.case === "started") {
      ({ conversation, turn } = event.kind.value);
    } else if (event.kind.case === "textDelta") {
      received += event.kind.value.text;
      // The upstream now stalls: only the cancel can end the turn.
      assert.equal(await client.cancelTurn(turn), TurnStatus.CANCELLED);
    }
  }
  const last = events.at(-1);
  assert.equal(last?.kind.case === "completed" && last.kind.value.status, TurnStatus.CANCELLED);
  assert.equal(await client.cancelTurn(turn), TurnStatus.CANCELLED, "a second cancel changes nothing");
  await assertStoredAsCancelled(conversation, "tell me a third story", received);
});

test("cancel: close() mid-stream fails the call CANCELED and resumes nothing", async () => {
  const own = new ChatClient({ baseUrl: target, token, timeoutMs: 10_000, chatTimeoutMs: 30_000 });
  let turn = "";
  const error = await rejection(
    (async () => {
      for await (const event of own.chat("tell me a fourth story")) {
        if (event.kind.case === "started") {
          turn = event.kind.value.turn;
        } else if (event.kind.case === "textDelta") {
          own.close(); // the upstream now stalls: a resume would wait for the deadline
        }
      }
    })(),
  );
  assert.equal(error.code, Code.Canceled, error.message);
  // Nothing was left to cancel the turn on: it is still streaming until someone does.
  assert.equal(await client.cancelTurn(turn), TurnStatus.CANCELLED);
});

test("watch: watchTurn replays an ended turn from the start or from a resume point", async () => {
  const chatted: TurnEvent[] = [];
  for await (const event of client.chat("hello")) {
    chatted.push(event);
  }
  const started = chatted[0]?.kind.case === "started" ? chatted[0].kind.value : assert.fail("no started");
  const whole = await collect(client.watchTurn(started.turn));
  assert.equal(textOf(whole), requiredEnv("CHATSTREAM_TEST_REPLY"));
  assert.equal(whole.at(-1)?.kind.case, "completed");
  assertIncreasing(whole);

  // Resume after started and the first delta, as a client that lost its connection there
  // would. (A slow reader gets deltas joined: the first one may be the whole reply.)
  const seen = chatted.slice(0, 2);
  assert.equal(seen.at(-1)?.kind.case, "textDelta");
  const rest = await collect(
    client.watchTurn(started.turn, {
      afterSeq: seen.at(-1)?.seq ?? 0n,
      afterOffset: BigInt([...textOf(seen)].length),
    }),
  );
  assert.ok(rest.every((e) => e.seq > (seen.at(-1)?.seq ?? 0n)), "nothing at or before the resume point");
  assert.equal(textOf(seen) + textOf(rest), requiredEnv("CHATSTREAM_TEST_REPLY"));
  assert.equal(rest.at(-1)?.kind.case, "completed");
});

test("watch: an unknown turn is NOT_FOUND with reason TURN_NOT_FOUND", async () => {
  const watchError = await rejection(collect(client.watchTurn(MISSING_TURN)));
  assert.equal(watchError.code, Code.NotFound);
  assert.equal(watchError.reason, "TURN_NOT_FOUND");
  const cancelError = await rejection(client.cancelTurn(MISSING_TURN));
  assert.equal(cancelError.code, Code.NotFound);
  assert.equal(cancelError.reason, "TURN_NOT_FOUND");
});

test("watch: watchConversation streams the turns another call starts", async () => {
  const { name } = await client.createConversation();
  const controller = new AbortController();
  const watched: TurnEvent[] = [];
  let done = false;
  const watching = (async () => {
    for await (const event of client.watchConversation(name, { signal: controller.signal })) {
      watched.push(event);
      if (event.kind.case === "completed") {
        break;
      }
    }
    done = true;
  })();
  try {
    // Turns that start before the watch is in place are not sent: chat until one is seen.
    for (let i = 0; i < 20 && !done; i++) {
      await client.chatReply("hello", { conversation: name });
      await Promise.race([watching, new Promise((resolve) => setTimeout(resolve, 200))]);
    }
    await watching;
  } finally {
    controller.abort();
  }
  assert.equal(watched[0]?.kind.case, "started");
  assert.equal(watched.at(-1)?.kind.case, "completed");
  assert.equal(textOf(watched), requiredEnv("CHATSTREAM_TEST_REPLY"));
  assertIncreasing(watched);
});

test("resume: a cut connection mid-reply resumes on the other server with exactly the reply", async () => {
  const proxied = proxiedClient();
  try {
    const events: TurnEvent[] = [];
    for await (const event of proxied.chat("tell me a long story")) {
      events.push(event);
      if (events.length === 3) {
        await cutConnection(); // after started and two deltas
      }
    }
    assertIncreasing(events);
    assert.equal(events[0]?.kind.case, "started");
    const last = events.at(-1);
    assert.equal(last?.kind.case === "completed" && last.kind.value.status, TurnStatus.COMPLETED);
    assert.equal(textOf(events), requiredEnv("CHATSTREAM_TEST_REPLY"));
    assert.ok(events.length > 4, "events arrived after the cut");
  } finally {
    proxied.close();
  }
});

test("resume: with resume false a cut connection fails the call UNAVAILABLE", async () => {
  const proxied = proxiedClient();
  let received = 0;
  try {
    const error = await rejection(
      (async () => {
        for await (const _ of proxied.chat("tell me another long story", { resume: false })) {
          if (++received === 2) {
            await cutConnection();
          }
        }
      })(),
    );
    assert.equal(error.code, Code.Unavailable, error.message);
    assert.equal(error.reason, "");
    assert.equal(received, 2, "nothing after the cut");
  } finally {
    proxied.close();
  }
});

/** A client through the proxy that the "resume" tests cut. */
function proxiedClient(): ChatClient {
  const baseUrl = requiredEnv("CHATSTREAM_TEST_PROXY");
  return new ChatClient({ baseUrl, token, timeoutMs: 10_000, chatTimeoutMs: 30_000 });
}

/** Asks the pytest side to cut every connection through the proxy; resolves once it has. */
async function cutConnection(): Promise<void> {
  const cutFile = requiredEnv("CHATSTREAM_TEST_CUT_FILE");
  writeFileSync(cutFile, "cut");
  while (existsSync(cutFile)) {
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

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

async function collect(events: AsyncIterable<TurnEvent>): Promise<TurnEvent[]> {
  const collected: TurnEvent[] = [];
  for await (const event of events) {
    collected.push(event);
  }
  return collected;
}

/** The text deltas of `events`, joined, after checking that each starts where the last ended. */
function textOf(events: readonly TurnEvent[]): string {
  let text = "";
  let offset: bigint | undefined;
  for (const event of events) {
    if (event.kind.case === "textDelta") {
      const delta = event.kind.value;
      assert.equal(delta.offset, offset ?? delta.offset, "each delta starts where the previous ended");
      offset = delta.offset + BigInt([...delta.text].length);
      text += delta.text;
    }
  }
  return text;
}

/** seq increases (it may skip): no event came twice. */
function assertIncreasing(events: readonly TurnEvent[]): void {
  const seqs = events.map((e) => e.seq);
  assert.ok(
    seqs.every((seq, i) => i === 0 || seq > (seqs[i - 1] ?? 0n)),
    `seq must increase: ${seqs.join(", ")}`,
  );
}

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
