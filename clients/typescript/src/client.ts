// ChatClient: chatstream.v1.ChatService over gRPC (HTTP/2), with Connect's Node.js transport.

import { randomUUID } from "node:crypto";
import type * as http2 from "node:http2";
import { setTimeout as sleep } from "node:timers/promises";

import { type Client, Code, type Transport, createClient } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

import {
  type ChatResponse,
  ChatService,
  type Conversation,
  type ListConversationsResponse,
  type ListMessagesResponse,
  type Message,
  OnDisconnect,
  type TurnEvent,
  type TurnStatus,
  type Usage,
} from "./gen/chatstream/v1/chat_service_pb.js";
import { ChatClientError } from "./errors.js";

/** How to reach the server and who the caller is. */
export interface ChatClientOptions {
  /**
   * The server: `http://host:port` for plaintext HTTP/2 (prior knowledge), `https://host:port`
   * for TLS.
   */
  readonly baseUrl: string;
  /** An API key or a JWT, sent as `authorization: Bearer <token>` with every call. */
  readonly token?: string;
  /** Act for this end user (`x-chatstream-user`); the server must allow it for the token. */
  readonly user?: string;
  /** More headers for every call. */
  readonly headers?: Readonly<Record<string, string>>;
  /** Deadline of each unary call and of each page of a list, in ms. Default 30 s. */
  readonly timeoutMs?: number;
  /** Deadline of a whole `chat` call, in ms. Default 5 min. */
  readonly chatTimeoutMs?: number;
  /** Options for Node's `http2.connect`, e.g. `{ ca }` for a private CA or `{ cert, key }` for mTLS. */
  readonly nodeOptions?: http2.SecureClientSessionOptions;
}

/** Options of one `chat` call. */
export interface ChatOptions {
  /** `conversations/{conversation}` to continue; "" or absent starts a new one. */
  readonly conversation?: string;
  /**
   * Idempotency key; a new UUID4 by default. Retry a failed call with the same key: a
   * completed turn is replayed, not regenerated.
   */
  readonly requestId?: string;
  /** Aborting it cancels the call; the server stores the turn as CANCELLED with its partial text. */
  readonly signal?: AbortSignal;
  /** Deadline of the whole call, retries and resumes included, in ms; `chatTimeoutMs` by default. */
  readonly timeoutMs?: number;
  /**
   * Resume the turn after a dropped connection; true by default. The server then goes on
   * producing the turn while no connection is left (`ON_DISCONNECT_CONTINUE`). False ties the
   * turn to this one connection and retries nothing: a drop fails the call, and the server
   * cancels the turn.
   */
  readonly resume?: boolean;
}

/** Options of `watchTurn`. */
export interface WatchTurnOptions {
  /** The `seq` of the last event already received; 0 or absent for every event. */
  readonly afterSeq?: bigint;
  /**
   * How much of the reply was already received, in Unicode code points: the last
   * `textDelta`'s `offset` plus its text's length in code points (not `text.length`, which
   * counts UTF-16 units).
   */
  readonly afterOffset?: bigint;
  /** Aborting it ends the watch; the turn goes on. */
  readonly signal?: AbortSignal;
  /** Deadline of the whole watch, resumes included, in ms; `chatTimeoutMs` by default. */
  readonly timeoutMs?: number;
}

/** Options of `watchConversation`. */
export interface WatchConversationOptions {
  /** Aborting it ends the watch. */
  readonly signal?: AbortSignal;
  /** Deadline of the watch, in ms; none by default: the watch runs until the caller leaves. */
  readonly timeoutMs?: number;
}

/** A whole turn, as `chatReply` returns it. */
export interface ChatReply {
  /** `conversations/{conversation}`. */
  readonly conversation: string;
  /** `conversations/{conversation}/turns/{turn}`. */
  readonly turn: string;
  /** The reply's text: every `textDelta` concatenated. */
  readonly text: string;
  readonly status: TurnStatus;
  readonly stopReason: string;
  readonly usage: Usage | undefined;
  readonly model: string;
}

/** Options of one unary call or one page. */
export interface CallOptions {
  readonly signal?: AbortSignal;
  /** Deadline in ms; the client's `timeoutMs` by default. */
  readonly timeoutMs?: number;
}

/** Options of a paged list. */
export interface ListOptions extends CallOptions {
  /** Items per page; 0 or absent lets the server choose (50), at most 1000. */
  readonly pageSize?: number;
}

/** Options of one page of a list. */
export interface PageOptions extends ListOptions {
  /** `nextPageToken` of the previous page; "" or absent for the first. */
  readonly pageToken?: string;
}

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_CHAT_TIMEOUT_MS = 5 * 60_000;
// As the Python SDK's RetryPolicy: calls per stream in total, full-jitter backoff between them.
const MAX_ATTEMPTS = 4;
const INITIAL_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 2_000;
// The CancelTurn sent when the caller leaves a turn must not hold the caller for long.
const CANCEL_TIMEOUT_MS = 5_000;

/**
 * A client for `chatstream.v1.ChatService`.
 *
 * Every failed call throws `ChatClientError`. `chat` and `watchTurn` resume a turn by
 * themselves after a dropped connection; nothing else is retried. Call `close()` once when done.
 *
 * @example
 * const client = new ChatClient({ baseUrl: "http://127.0.0.1:50051", token: process.env.CHATSTREAM_TOKEN });
 * for await (const event of client.chat("Hello!")) {
 *   if (event.kind.case === "textDelta") process.stdout.write(event.kind.value.text);
 * }
 * client.close();
 */
export class ChatClient {
  readonly #sessions: Http2SessionManager;
  readonly #client: Client<typeof ChatService>;
  readonly #headers: Readonly<Record<string, string>>;
  readonly #timeoutMs: number;
  readonly #chatTimeoutMs: number;
  #closed = false;

  constructor(options: ChatClientOptions) {
    // Our own session manager, so that close() can end the connection at once.
    this.#sessions = new Http2SessionManager(options.baseUrl, {}, options.nodeOptions);
    const transport: Transport = createGrpcTransport({
      baseUrl: options.baseUrl,
      sessionManager: this.#sessions,
    });
    this.#client = createClient(ChatService, transport);
    this.#headers = {
      ...options.headers,
      ...(options.token === undefined ? {} : { authorization: `Bearer ${options.token}` }),
      ...(options.user === undefined ? {} : { "x-chatstream-user": options.user }),
    };
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.#chatTimeoutMs = options.chatTimeoutMs ?? DEFAULT_CHAT_TIMEOUT_MS;
  }

  /**
   * Closes the connection, cancelling the calls in flight; nothing is resumed after it. A
   * turn a `chat` was following goes on to its end on the server (no connection is left
   * to cancel it on).
   */
  close(): void {
    this.#closed = true;
    this.#sessions.abort();
  }

  /**
   * Sends one user message and yields the events of the assistant's reply as they arrive:
   * one `started` (the turn is durable), `textDelta`s, then `completed`.
   *
   * A connection that drops (UNAVAILABLE without a `reason`: the network, a proxy, a server
   * going away) is taken over: before `started` the call is retried with the same
   * `requestId`, so the model never runs twice; after it, the turn is resumed with
   * `WatchTurn` after the last event seen, on whichever server answers. The caller sees one
   * stream, nothing missing and nothing repeated. A status the service sends itself ends the
   * call (e.g. `UPSTREAM_UNAVAILABLE`: the turn is stored FAILED). `resume: false` turns
   * all of this off.
   *
   * Leaving the loop early (`break`, `return`, an exception) or aborting `signal` cancels
   * the turn (with `CancelTurn` once the turn is known); the server stores it as CANCELLED
   * with the text produced so far.
   */
  async *chat(text: string, options: ChatOptions = {}): AsyncGenerator<TurnEvent, void, undefined> {
    const resume = options.resume ?? true;
    const request = {
      text,
      conversation: options.conversation ?? "",
      requestId: options.requestId ?? randomUUID(),
      onDisconnect: resume ? OnDisconnect.CONTINUE : OnDisconnect.CANCEL,
    };
    const position = new ResumePoint();
    let failed = false;
    try {
      yield* this.#follow(position, options, resume ? MAX_ATTEMPTS : 1, (callOptions) =>
        position.turn === ""
          ? this.#client.chat(request, callOptions)
          : this.#client.watchTurn(position.watchRequest(), callOptions),
      );
    } catch (error) {
      // An aborted signal is the caller leaving; anything else is the call failing.
      failed = options.signal?.aborted !== true;
      throw error;
    } finally {
      if (resume && !position.completed && !this.#closed) {
        // The server goes on producing a resumable turn without its connection; the caller
        // is gone for good, so stop the turn. Best effort: it ends by itself at the latest
        // after the server's CHATSTREAM_MAX_TURN_S.
        if (position.turn !== "") {
          await this.cancelTurn(position.turn, { timeoutMs: CANCEL_TIMEOUT_MS }).catch(() => undefined);
        } else if (!failed) {
          await this.#cancelUnseen(request).catch(() => undefined);
        }
      }
    }
  }

  /**
   * Cancels the turn of a caller that left before the turn's name arrived. Sending the request
   * again (same `requestId`) attaches to that turn, or starts it if the first never arrived;
   * its first event names it, and leaving cancels it anyway (`ON_DISCONNECT_CANCEL`).
   */
  async #cancelUnseen(request: { readonly requestId: string }): Promise<void> {
    const call = new AbortController();
    let turn = "";
    try {
      const probe = { ...request, onDisconnect: OnDisconnect.CANCEL };
      const options = { headers: { ...this.#headers }, signal: call.signal, timeoutMs: CANCEL_TIMEOUT_MS };
      for await (const response of this.#client.chat(probe, options)) {
        if (response.event?.kind.case === "started") {
          turn = response.event.kind.value.turn;
        }
        break;
      }
    } finally {
      call.abort();
    }
    if (turn !== "") {
      await this.cancelTurn(turn, { timeoutMs: CANCEL_TIMEOUT_MS });
    }
  }

  /**
   * Yields a turn's events after `afterSeq` (and `afterOffset` code points of text), then
   * follows it live to its `completed`, whatever its status. Works on any server, while the
   * turn streams and after it ended, and resumes after a dropped connection like `chat`.
   * Leaving the loop does not stop the turn.
   *
   * @throws ChatClientError NOT_FOUND (`TURN_NOT_FOUND`) for a turn that does not exist or is
   *   someone else's.
   */
  async *watchTurn(turn: string, options: WatchTurnOptions = {}): AsyncGenerator<TurnEvent, void, undefined> {
    const position = new ResumePoint(turn, options.afterSeq, options.afterOffset);
    yield* this.#follow(position, options, MAX_ATTEMPTS, (callOptions) =>
      this.#client.watchTurn(position.watchRequest(), callOptions),
    );
  }

  /**
   * Yields the events of each new turn of `conversation` as it happens, from its `started`
   * to its `completed`, until the caller leaves the loop. Turns that started before the call
   * are not sent. Not resumed after a dropped connection: the turns in between would be lost.
   *
   * @throws ChatClientError NOT_FOUND (`CONVERSATION_NOT_FOUND`) for a conversation that does
   *   not exist or is someone else's.
   */
  async *watchConversation(
    conversation: string,
    options: WatchConversationOptions = {},
  ): AsyncGenerator<TurnEvent, void, undefined> {
    const deadline = options.timeoutMs === undefined ? {} : { timeoutMs: options.timeoutMs };
    yield* this.#events(
      (signal) =>
        this.#client.watchConversation({ conversation }, { headers: this.#headers, signal, ...deadline }),
      options.signal,
    );
  }

  /**
   * Ends a streaming turn CANCELLED, keeping its partial reply, on whichever server produces
   * it, and resolves with its final status. Idempotent: an ended turn's status is returned
   * and nothing changes.
   */
  async cancelTurn(turn: string, options: CallOptions = {}): Promise<TurnStatus> {
    const response = await this.#unary(() => this.#client.cancelTurn({ turn }, this.#callOptions(options)));
    return response.status;
  }

  /**
   * Sends one user message and resolves with the whole reply once the turn has completed.
   *
   * @throws ChatClientError The call failed, or the stream ended without `completed`.
   */
  async chatReply(text: string, options: ChatOptions = {}): Promise<ChatReply> {
    let conversation = "";
    let turn = "";
    const parts: string[] = [];
    for await (const event of this.chat(text, options)) {
      switch (event.kind.case) {
        case "started":
          ({ conversation, turn } = event.kind.value);
          break;
        case "textDelta":
          parts.push(event.kind.value.text);
          break;
        case "completed": {
          const { status, stopReason, usage, model } = event.kind.value;
          return { conversation, turn, text: parts.join(""), status, stopReason, usage, model };
        }
      }
    }
    // The server always ends a successful stream with `completed`; as the Python SDK does.
    throw new ChatClientError(Code.Internal, "the chat stream ended without a completed event");
  }

  /** Creates an empty conversation; idempotent on `requestId` (a new UUID4 by default). */
  async createConversation(
    options: CallOptions & { readonly conversationId?: string; readonly requestId?: string } = {},
  ): Promise<Conversation> {
    const request = {
      conversationId: options.conversationId ?? "",
      requestId: options.requestId ?? randomUUID(),
    };
    const response = await this.#unary(() =>
      this.#client.createConversation(request, this.#callOptions(options)),
    );
    return required(response.conversation);
  }

  /** Returns one conversation; NOT_FOUND (`CONVERSATION_NOT_FOUND`) if it is missing or someone else's. */
  async getConversation(name: string, options: CallOptions = {}): Promise<Conversation> {
    const response = await this.#unary(() =>
      this.#client.getConversation({ name }, this.#callOptions(options)),
    );
    return required(response.conversation);
  }

  /** Deletes a conversation with its turns and messages; NOT_FOUND if it does not exist. */
  async deleteConversation(name: string, options: CallOptions = {}): Promise<void> {
    await this.#unary(() => this.#client.deleteConversation({ name }, this.#callOptions(options)));
  }

  /** Yields all the caller's conversations, most recently created first, page by page. */
  async *listConversations(options: ListOptions = {}): AsyncGenerator<Conversation, void, undefined> {
    let pageToken = "";
    do {
      const page = await this.listConversationsPage({ ...options, pageToken });
      yield* page.conversations;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
  }

  /** One page of the caller's conversations. */
  async listConversationsPage(options: PageOptions = {}): Promise<ListConversationsResponse> {
    const request = { pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" };
    return this.#unary(() => this.#client.listConversations(request, this.#callOptions(options)));
  }

  /**
   * Yields all the messages of a conversation in order, page by page. Eventually consistent:
   * a turn's messages appear shortly after it ends.
   */
  async *listMessages(parent: string, options: ListOptions = {}): AsyncGenerator<Message, void, undefined> {
    let pageToken = "";
    do {
      const page = await this.listMessagesPage(parent, { ...options, pageToken });
      yield* page.messages;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
  }

  /** One page of a conversation's messages. */
  async listMessagesPage(parent: string, options: PageOptions = {}): Promise<ListMessagesResponse> {
    const request = { parent, pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" };
    return this.#unary(() => this.#client.listMessages(request, this.#callOptions(options)));
  }

  #callOptions(options: CallOptions): {
    headers: Record<string, string>;
    timeoutMs: number;
    signal?: AbortSignal;
  } {
    return {
      headers: { ...this.#headers },
      timeoutMs: options.timeoutMs ?? this.#timeoutMs,
      ...(options.signal === undefined ? {} : { signal: options.signal }),
    };
  }

  /**
   * The one loop of `chat` and `watchTurn`: calls `open` until the turn's stream ends,
   * again after each failure `retryDelayMs` allows, and drops the events a resume repeats.
   */
  async *#follow(
    position: ResumePoint,
    options: { readonly signal?: AbortSignal; readonly timeoutMs?: number },
    maxAttempts: number,
    open: (callOptions: StreamCallOptions) => AsyncIterable<ChatResponse>,
  ): AsyncGenerator<TurnEvent, void, undefined> {
    const deadline = Date.now() + (options.timeoutMs ?? this.#chatTimeoutMs);
    for (let attempt = 1; ; attempt++) {
      try {
        const events = this.#events(
          (signal) => open({ headers: this.#headers, signal, timeoutMs: deadline - Date.now() }),
          options.signal,
        );
        for await (const event of events) {
          if (position.accept(event)) {
            yield event;
          }
        }
        return;
      } catch (error) {
        const failure = ChatClientError.from(error);
        const delayMs = attempt < maxAttempts ? retryDelayMs(failure, attempt, position) : undefined;
        if (delayMs === undefined || delayMs >= deadline - Date.now()) {
          throw failure;
        }
        await sleep(delayMs, undefined, { signal: options.signal }).catch((abort: unknown) => {
          throw ChatClientError.from(abort);
        });
      }
    }
  }

  /** The events of one streaming call; leaving early (or aborting `signal`) cancels the call. */
  async *#events(
    open: (signal: AbortSignal) => AsyncIterable<ChatResponse>,
    signal: AbortSignal | undefined,
  ): AsyncGenerator<TurnEvent, void, undefined> {
    const call = new AbortController();
    const cancel = (): void => call.abort(signal?.reason);
    if (signal?.aborted) {
      cancel();
    }
    signal?.addEventListener("abort", cancel, { once: true });
    const responses = open(call.signal)[Symbol.asyncIterator]();
    let ended = false;
    try {
      for (;;) {
        const next = await responses.next();
        if (next.done === true) {
          ended = true;
          return;
        }
        if (next.value.event !== undefined) {
          yield next.value.event;
        }
      }
    } catch (error) {
      ended = true;
      throw ChatClientError.fromStream(error, call.signal.aborted || this.#closed);
    } finally {
      signal?.removeEventListener("abort", cancel);
      if (!ended) {
        // The caller left the loop early. Connect's stream has no return(): abort the call
        // so the server stops sending, then read once more. Connect clears its deadline
        // timer only when a read ends or fails, and a pending timer would keep the process
        // alive until the deadline.
        call.abort();
        await responses.next().catch(() => undefined);
      }
    }
  }

  async #unary<T>(call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (error) {
      throw ChatClientError.from(error);
    }
  }
}

interface StreamCallOptions {
  readonly headers: Readonly<Record<string, string>>;
  readonly signal: AbortSignal;
  readonly timeoutMs: number;
}

/**
 * Where a stream of one turn is: the turn, the last event's `seq`, and how much text has
 * arrived. Everything a `WatchTurn` needs to go on from there, on whichever server answers.
 */
class ResumePoint {
  turn: string;
  seq: bigint;
  offset: bigint;
  completed = false;

  constructor(turn = "", seq = 0n, offset = 0n) {
    this.turn = turn;
    this.seq = seq;
    this.offset = offset;
  }

  /** Takes the next event; false for one already seen (a resume may overlap what came before). */
  accept(event: TurnEvent): boolean {
    // seq increases within a turn but may skip numbers: compare, never count.
    if (this.seq > 0n && event.seq <= this.seq) {
      return false;
    }
    this.seq = event.seq;
    switch (event.kind.case) {
      case "started":
        this.turn = event.kind.value.turn;
        break;
      case "textDelta":
        // Offsets count Unicode code points, as the server does; a string iterates by them.
        this.offset = event.kind.value.offset + BigInt([...event.kind.value.text].length);
        break;
      case "completed":
        this.completed = true;
        break;
    }
    return true;
  }

  watchRequest(): { turn: string; afterSeq: bigint; afterOffset: bigint } {
    return { turn: this.turn, afterSeq: this.seq, afterOffset: this.offset };
  }
}

/**
 * How long to wait before calling again after `error`, or undefined to give up.
 *
 * Only an UNAVAILABLE the service did not explain (no `reason`: a dropped connection, a
 * proxy, a server going away) is taken over once the turn is known: a reason such as
 * `UPSTREAM_UNAVAILABLE` means the service ended the turn, and a resume would only fetch its
 * FAILED `completed` and hide the error. Before the turn is known, any UNAVAILABLE is
 * retried (the same `requestId` never runs the model twice), after the server's RetryInfo
 * delay at the least.
 */
function retryDelayMs(error: ChatClientError, attempt: number, position: ResumePoint): number | undefined {
  if (error.code !== Code.Unavailable || (position.turn !== "" && error.reason !== "")) {
    return undefined;
  }
  const ceiling = Math.min(MAX_BACKOFF_MS, INITIAL_BACKOFF_MS * 2 ** (attempt - 1));
  return Math.max(Math.random() * ceiling, error.retryDelayMs ?? 0);
}

function required<T>(value: T | undefined): T {
  if (value === undefined) {
    // The server always sets the conversation; a response without one is not ours.
    throw new ChatClientError(Code.Internal, "the response carried no conversation");
  }
  return value;
}
