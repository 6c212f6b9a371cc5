// ChatClient: chatstream.v1.ChatService over gRPC (HTTP/2), with Connect's Node.js transport.

import { randomUUID } from "node:crypto";
import type * as http2 from "node:http2";

import { type Client, Code, type Transport, createClient } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

import {
  ChatService,
  type Conversation,
  type ListConversationsResponse,
  type ListMessagesResponse,
  type Message,
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
  /** Deadline of the whole call, in ms; the client's `chatTimeoutMs` by default. */
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

/**
 * A client for `chatstream.v1.ChatService`.
 *
 * Every failed call throws `ChatClientError`. Nothing is retried automatically; retry `chat`
 * only with the same `requestId`. Call `close()` once when done.
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

  /** Closes the connection, cancelling the calls in flight. */
  close(): void {
    this.#sessions.abort();
  }

  /**
   * Sends one user message and yields the events of the assistant's reply as they arrive:
   * one `started` (the turn is durable), `textDelta`s, then `completed`.
   *
   * Leaving the loop early (`break`, `return`, an exception) or aborting `signal` cancels
   * the call; the server then stores the turn as CANCELLED with the text produced so far.
   */
  async *chat(text: string, options: ChatOptions = {}): AsyncGenerator<TurnEvent, void, undefined> {
    const call = new AbortController();
    const cancel = (): void => call.abort(options.signal?.reason);
    if (options.signal?.aborted) {
      cancel();
    }
    options.signal?.addEventListener("abort", cancel, { once: true });
    const responses = this.#client
      .chat(
        { text, conversation: options.conversation ?? "", requestId: options.requestId ?? randomUUID() },
        { headers: this.#headers, signal: call.signal, timeoutMs: options.timeoutMs ?? this.#chatTimeoutMs },
      )
      [Symbol.asyncIterator]();
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
      throw ChatClientError.from(error);
    } finally {
      options.signal?.removeEventListener("abort", cancel);
      if (!ended) {
        // The caller left the loop early. Connect's stream has no return(): abort the call
        // so the server stops the turn, then read once more. Connect clears its deadline
        // timer only when a read ends or fails, and a pending timer would keep the process
        // alive until the deadline.
        call.abort();
        await responses.next().catch(() => undefined);
      }
    }
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

  async #unary<T>(call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (error) {
      throw ChatClientError.from(error);
    }
  }
}

function required<T>(value: T | undefined): T {
  if (value === undefined) {
    // The server always sets the conversation; a response without one is not ours.
    throw new ChatClientError(Code.Internal, "the response carried no conversation");
  }
  return value;
}
