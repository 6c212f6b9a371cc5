// The public surface of the chatstream TypeScript client.

export { Code } from "@connectrpc/connect";

export {
  type CallOptions,
  ChatClient,
  type ChatClientOptions,
  type ChatOptions,
  type ChatReply,
  type ListOptions,
  type PageOptions,
  type WatchConversationOptions,
  type WatchTurnOptions,
} from "./client.js";
export { ChatClientError, type ChatClientErrorDetails, type FieldViolation } from "./errors.js";
// Messages, enums (TurnStatus, Role, ...) and the service descriptor, generated from the proto.
export * from "./gen/chatstream/v1/chat_service_pb.js";
