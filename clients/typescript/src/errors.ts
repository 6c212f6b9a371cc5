// The one error the client throws for a failed call, with the server's rich status unpacked.

import { Code, ConnectError } from "@connectrpc/connect";

import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";

/** One invalid field of a request, from `google.rpc.BadRequest`. */
export interface FieldViolation {
  /** The field's proto name, e.g. `page_size`. */
  readonly field: string;
  /** Why it is invalid, for people. */
  readonly description: string;
}

/** What a `ChatClientError` carries besides its code and message. */
export interface ChatClientErrorDetails {
  readonly reason?: string;
  readonly domain?: string;
  readonly metadata?: Readonly<Record<string, string>>;
  readonly fieldViolations?: readonly FieldViolation[];
  readonly retryDelayMs?: number;
  readonly cause?: unknown;
}

/**
 * A call to ChatService failed.
 *
 * The server sends a `google.rpc.Status` in the `grpc-status-details-bin` trailer;
 * Connect decodes the trailer and this class unpacks the details that chatstream sends.
 * Match on `reason`, never on the message.
 */
export class ChatClientError extends Error {
  override readonly name = "ChatClientError";
  /** The gRPC status code, e.g. `Code.NotFound` (the numbers are gRPC's). */
  readonly code: Code;
  /** The server's message for people; do not parse it. */
  readonly rawMessage: string;
  /**
   * `ErrorInfo.reason`, a stable UPPER_SNAKE identifier such as `CONVERSATION_NOT_FOUND`;
   * "" when the status carried no ErrorInfo (a deadline or a connection failure seen by
   * the client itself).
   */
  readonly reason: string;
  /** `ErrorInfo.domain`: `chatstream.v1.ChatService` for errors from the service. */
  readonly domain: string;
  /** `ErrorInfo.metadata`: the dynamic parts of the message, e.g. `conversation`. */
  readonly metadata: Readonly<Record<string, string>>;
  /** From `google.rpc.BadRequest`, for INVALID_ARGUMENT. */
  readonly fieldViolations: readonly FieldViolation[];
  /** How long the server asks the caller to wait before retrying (`google.rpc.RetryInfo`). */
  readonly retryDelayMs: number | undefined;

  constructor(code: Code, rawMessage: string, details: ChatClientErrorDetails = {}) {
    const reason = details.reason ?? "";
    super(`${codeName(code)}: ${rawMessage}${reason ? ` [${reason}]` : ""}`, {
      cause: details.cause,
    });
    this.code = code;
    this.rawMessage = rawMessage;
    this.reason = reason;
    this.domain = details.domain ?? "";
    this.metadata = { ...details.metadata };
    this.fieldViolations = [...(details.fieldViolations ?? [])];
    this.retryDelayMs = details.retryDelayMs;
  }

  /** The gRPC name of `code`, e.g. `NOT_FOUND`. */
  get codeName(): string {
    return codeName(this.code);
  }

  /**
   * `from` for a streaming call that the caller did not stop. Node reports the streams of a
   * reset HTTP/2 connection as CANCELED, and Connect a reset socket as ABORTED; gRPC calls a
   * lost connection UNAVAILABLE, which is what tells `chat` to resume. The service's own
   * ABORTED always carries a reason, so it is kept.
   */
  static fromStream(error: unknown, stoppedByCaller: boolean): ChatClientError {
    const converted = ChatClientError.from(error);
    const lost =
      !stoppedByCaller &&
      converted.reason === "" &&
      (converted.code === Code.Canceled || converted.code === Code.Aborted);
    return lost ? new ChatClientError(Code.Unavailable, converted.rawMessage, { cause: error }) : converted;
  }

  /** Converts anything a Connect call threw (or an AbortSignal's reason) into a ChatClientError. */
  static from(error: unknown): ChatClientError {
    if (error instanceof ChatClientError) {
      return error;
    }
    const connectError = ConnectError.from(error);
    // findDetails skips details of other types and any it cannot decode: the code and
    // message still reach the caller.
    const info = connectError.findDetails(ErrorInfoSchema)[0];
    const fieldViolations = connectError
      .findDetails(BadRequestSchema)
      .flatMap((badRequest) => badRequest.fieldViolations)
      .map(({ field, description }) => ({ field, description }));
    const retryDelay = connectError.findDetails(RetryInfoSchema)[0]?.retryDelay;
    return new ChatClientError(connectError.code, connectError.rawMessage, {
      reason: info?.reason ?? "",
      domain: info?.domain ?? "",
      metadata: info?.metadata ?? {},
      fieldViolations,
      retryDelayMs:
        retryDelay === undefined
          ? undefined
          : Number(retryDelay.seconds) * 1000 + retryDelay.nanos / 1e6,
      cause: error,
    });
  }
}

function codeName(code: Code): string {
  // Connect names codes in PascalCase (`NotFound`); gRPC and the server's docs say NOT_FOUND.
  return (Code[code] ?? `CODE_${code}`).replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}
