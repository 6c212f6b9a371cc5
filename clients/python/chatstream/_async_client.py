"""AsyncChatClient: ChatService over a `grpc.aio.Channel`."""

# The source of the blocking ChatClient too: clients/python/unasync.py writes _sync_client.py from
# this file (these comments left out), and CI fails when the two drift apart. Write code that still
# reads right with `async`, `await` and `aio` taken out.
#
# ASYNC109 prefers asyncio.timeout to a `timeout` argument, but ours becomes the gRPC deadline:
# it travels to the server, which stops the turn's work when it passes; a local timeout cannot.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Protocol, Self, TypeVar

import grpc

from chatstream._common import (
    DEFAULT_RETRY_POLICY,
    ChatReply,
    ClientState,
    Deadline,
    ReplyBuilder,
    ResumePoint,
    RetryPolicy,
    call_metadata,
    channel_options,
    channel_target,
    chat_request,
    check_enter,
    check_open,
    new_request_id,
    restart_request,
    restart_wanted,
    resume_delay_s,
    seconds,
)
from chatstream._enums import ListMessagesResponse, Message, TurnEvent, TurnStatus
from chatstream._errors import ChatClientError
from chatstream.v1 import chat_service_pb2, chat_service_pb2_grpc

logger = logging.getLogger(__name__)


class _ResponseStream(Protocol):
    """A server-streaming call as this client uses it: its responses, and a way to stop it."""

    def cancel(self) -> bool: ...

    def __aiter__(self) -> AsyncIterator[chat_service_pb2.ChatResponse]: ...


_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class AsyncChatClient:
    """Asynchronous client for `chatstream.v1.ChatService`.

    Close it once, preferably with `async with`; create it inside a running event loop.
    Every failed call raises `ChatClientError`. Reads (get and list) are retried by gRPC on
    UNAVAILABLE; `chat` retries UNAVAILABLE itself before its first event, resumes its turn
    after a dropped connection, and starts it again if the server producing it died.

    One client can use several servers: give it several addresses, or a DNS name with a
    record per server, and its calls take turns over them (gRPC's `round_robin`).

    Example:
        async with AsyncChatClient("localhost:50051", metadata=[("authorization", "Bearer t")]) as client:
            async for event in client.chat("Hello!"):
                print(event)

        # A fleet: every address of a name (a headless Kubernetes Service), or a list of IPs.
        AsyncChatClient("dns:///chatstream.chat.svc.cluster.local:50051")
        AsyncChatClient(["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"])
    """

    _channel: grpc.aio.Channel
    _owns_channel: bool
    _stub: chat_service_pb2_grpc.ChatServiceAsyncStub
    _metadata: tuple[tuple[str, str], ...]
    _timeout: timedelta | None
    _chat_timeout: timedelta | None
    _retry_policy: RetryPolicy
    _state: ClientState

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: timedelta | None = timedelta(seconds=30),
        chat_timeout: timedelta | None = timedelta(minutes=5),
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        """Opens a channel to `target`; the client owns it and closes it in `close`.

        Args:
            target: Where the servers are. One address (`chat.internal:443`,
                `localhost:50051`) or any gRPC target string: `dns:///chat.internal:443` (a
                connection to every address the name has), `ipv4:10.0.0.1:50051,10.0.0.2:50051`.
                Or a sequence of addresses, which must then be IP addresses with their port,
                all IPv4 or all IPv6 (`[fd00::1]:50051`); use a DNS name for host names. Calls
                are balanced `round_robin` over the servers that are up, and a server that goes
                away is reconnected in the background. With TLS and IP addresses, name the
                certificate's host with the option `("grpc.ssl_target_name_override", host)`.
            credentials: TLS credentials (`grpc.ssl_channel_credentials()`); None for plaintext.
            metadata: Sent with every call, e.g. `[("authorization", "Bearer ...")]`.
            timeout: Default deadline of unary calls, and of each page of a list; None for none.
            chat_timeout: Default deadline of a whole `chat` call, retries included; None for none.
            retry_policy: How `chat` retries, resumes and restarts (see `RetryPolicy`).
            options: Extra gRPC channel options; a key given here replaces the client's own
                (`grpc.service_config`, which holds `round_robin` and the retries of reads,
                and `grpc.enable_retries`).

        Raises:
            ValueError: An empty sequence of addresses, or several that are not IP addresses.
        """
        merged = channel_options(options)
        resolved = channel_target(target)
        channel = (
            grpc.aio.insecure_channel(resolved, options=merged)
            if credentials is None
            else grpc.aio.secure_channel(resolved, credentials, options=merged)
        )
        self._setup(
            channel,
            owns_channel=True,
            metadata=metadata,
            timeout=timeout,
            chat_timeout=chat_timeout,
            retry_policy=retry_policy,
        )

    @classmethod
    def from_channel(
        cls,
        channel: grpc.aio.Channel,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: timedelta | None = timedelta(seconds=30),
        chat_timeout: timedelta | None = timedelta(minutes=5),
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    ) -> Self:
        """A client over a channel the caller built and keeps owning; `close` leaves it open.

        Reads are retried by gRPC only if the channel was built with a service config that
        says so; the other arguments are as in the constructor.
        """
        client = cls.__new__(cls)
        client._setup(
            channel,
            owns_channel=False,
            metadata=metadata,
            timeout=timeout,
            chat_timeout=chat_timeout,
            retry_policy=retry_policy,
        )
        return client

    def _setup(
        self,
        channel: grpc.aio.Channel,
        *,
        owns_channel: bool,
        metadata: Sequence[tuple[str, str]],
        timeout: timedelta | None,
        chat_timeout: timedelta | None,
        retry_policy: RetryPolicy,
    ) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        self._metadata = call_metadata(metadata)
        self._timeout = timeout
        self._chat_timeout = chat_timeout
        self._retry_policy = retry_policy
        self._state = ClientState.UNOPENED

    async def __aenter__(self) -> Self:
        check_enter(self._state)
        self._state = ClientState.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel if the client owns it, cancelling calls in flight. Idempotent."""
        if self._state is ClientState.CLOSED:
            return
        self._state = ClientState.CLOSED
        if self._owns_channel:
            await self._channel.close()

    async def chat(
        self,
        text: str,
        *,
        conversation: str = "",
        request_id: str | None = None,
        timeout: timedelta | None = None,
        resume: bool = True,
    ) -> AsyncGenerator[TurnEvent, None]:
        """Sends one user message and yields the events of the assistant's reply.

        The events are one `started`, zero or more `text_delta`, then `completed`. If the
        call fails with UNAVAILABLE before the first event it is retried per the client's
        `RetryPolicy` with the same `request_id`, so the model never runs twice. If the
        connection drops or the server goes away mid-reply, the client resumes the turn
        with `WatchTurn` after the last event it saw, on whichever server answers: the
        caller sees one unbroken stream, nothing missing and nothing repeated.

        If the server producing the turn dies (killed, crashed), the turn cannot be
        finished: it ends INTERRUPTED once its lease expires (`CHATSTREAM_TURN_LEASE_S` on
        the server, 30 s by default), and the client starts it again, in the same
        conversation, up to `RetryPolicy.max_restarts` times (1 by default) and within the
        deadline. A cancelled or failed turn is never started again. The caller gets no
        `completed` for the interrupted turn; instead a second `started` arrives, naming
        the new turn, and that turn's events follow from `seq` 1. The events are then
        `started`, the interrupted turn's `text_delta`s, `started`, `text_delta`s,
        `completed`: the reply is the text after the last `started`, and text received
        before it is to be discarded (a caller that prints it as it comes starts a new
        line). Without restarts left, the interrupted turn's `completed` (status
        INTERRUPTED) ends the stream, as before. The restart is a `Chat` with the key
        `{request_id}:restart:{n}`, so it is idempotent too: the call retried with the same
        `request_id` replays the interrupted turn, then attaches to (or replays) the
        restart instead of making another. Both turns stay in the conversation, the
        interrupted one with its partial text.

        Leaving the loop early cancels the turn, and the server records it as cancelled.
        A `break` cancels it when the generator is collected; wrap the call in
        `contextlib.aclosing` to cancel at once.

        Args:
            text: The user's message.
            conversation: `conversations/{conversation}` to continue; "" starts a new one.
            request_id: Idempotency key; a new UUID4 by default. Pass the same key to resume
                a call that failed: a turn still streaming is attached to, an ended one is
                replayed, neither is regenerated.
            timeout: Deadline of the whole call, retries included; None uses `chat_timeout`.
            resume: Resume after a dropped connection (the server keeps producing the turn
                meanwhile), and restart a turn whose server died. False ties the turn to
                this one connection, as before.

        Yields:
            Each `TurnEvent` as it arrives: the generated event's fields, with
            `completed.status` a `TurnStatus`; the generated event itself is `event.proto`.

        Raises:
            ChatClientError: The call failed (after retries and resumes, where they apply).
        """
        # Typed AsyncGenerator rather than AsyncIterator so that callers may `aclose()` it:
        # the call holds a server-side turn open between events.
        check_open(self._state)
        request = chat_request(text, conversation=conversation, request_id=request_id, resume=resume)
        deadline = Deadline.after(seconds(timeout, self._chat_timeout))
        events = self._follow(request, ResumePoint(), deadline, resume=resume)
        try:
            async for event in events:
                yield TurnEvent(event)
        finally:
            await events.aclose()

    async def watch_turn(
        self, turn: str, *, after_seq: int = 0, after_offset: int = 0, timeout: timedelta | None = None
    ) -> AsyncGenerator[TurnEvent, None]:
        """Yields a turn's events after `after_seq` (and `after_offset` characters), then follows it live.

        Works on any server, while the turn streams and after it ended. Resumes by itself
        after a dropped connection, like `chat`. Leaving the loop does not stop the turn.

        Args:
            turn: `conversations/{conversation}/turns/{turn}`, as in `TurnStarted.turn`.
            after_seq: The `seq` of the last event already received; 0 for all of them.
            after_offset: How much of the reply was already received, in characters.
            timeout: Deadline of the whole watch; None uses `chat_timeout`.

        Raises:
            ChatClientError: NOT_FOUND for a turn that does not exist or is someone else's.
        """
        check_open(self._state)
        deadline = Deadline.after(seconds(timeout, self._chat_timeout))
        position = ResumePoint(turn, seq=after_seq, offset=after_offset)
        events = self._follow(None, position, deadline, resume=False)
        try:
            async for event in events:
                yield TurnEvent(event)
        finally:
            await events.aclose()

    async def watch_conversation(
        self, conversation: str, *, timeout: timedelta | None = None
    ) -> AsyncGenerator[TurnEvent, None]:
        """Yields the events of each new turn of `conversation` as it happens, until the loop ends.

        Args:
            conversation: `conversations/{conversation}`.
            timeout: Deadline of the whole watch; None for none.

        Raises:
            ChatClientError: NOT_FOUND for a conversation that does not exist or is someone else's.
        """
        check_open(self._state)
        request = chat_service_pb2.WatchConversationRequest(conversation=conversation)
        call = self._stub.WatchConversation(request, timeout=seconds(timeout, None), metadata=self._metadata)
        try:
            async for response in call:
                yield TurnEvent(response.event)
        except grpc.aio.AioRpcError as rpc_error:
            raise ChatClientError.from_rpc_error(rpc_error) from rpc_error
        finally:
            call.cancel()

    async def cancel_turn(self, turn: str, *, timeout: timedelta | None = None) -> TurnStatus:
        """Ends a streaming turn CANCELLED, on whichever server produces it; returns its final status.

        Idempotent: an ended turn's status is returned and nothing changes.
        """
        request = chat_service_pb2.CancelTurnRequest(turn=turn)
        response = await self._unary(self._stub.CancelTurn, request, timeout)
        return TurnStatus(response.status)

    async def _follow(
        self,
        request: chat_service_pb2.ChatRequest | None,
        position: ResumePoint,
        deadline: Deadline,
        *,
        resume: bool,
    ) -> AsyncGenerator[chat_service_pb2.TurnEvent, None]:
        """The one loop of `chat` and `watch_turn`: Chat until the turn is known, then WatchTurn.

        For `chat` (a `request`, resuming), a turn that ends INTERRUPTED starts over: Chat
        again, with the restart's own key, and a new position.
        """
        attempt = 0
        restarts = 0
        caller_left = False
        try:
            while True:
                attempt += 1
                call: _ResponseStream
                if request is not None and not position.turn:
                    call = self._stub.Chat(request, timeout=deadline.remaining_s(), metadata=self._metadata)
                else:
                    call = self._stub.WatchTurn(
                        position.watch_request(), timeout=deadline.remaining_s(), metadata=self._metadata
                    )
                restart: chat_service_pb2.ChatRequest | None = None
                try:
                    async for response in call:
                        if not position.accept(response.event):
                            continue
                        if (
                            request is not None
                            and resume
                            and restart_wanted(
                                self._retry_policy, event=response.event, restarts=restarts, deadline=deadline
                            )
                        ):
                            restart = restart_request(
                                request, conversation=position.conversation, restart=restarts + 1
                            )
                            break
                        yield response.event
                    if restart is None:
                        return
                    logger.info(
                        "%s was interrupted (its server died); starting it again as request %s",
                        position.turn,
                        restart.request_id,
                    )
                    request, position, attempt = restart, ResumePoint(), 0
                    restarts += 1
                    continue
                except grpc.aio.AioRpcError as rpc_error:
                    error = ChatClientError.from_rpc_error(rpc_error)
                    if request is not None and not resume and position.turn:
                        raise error from rpc_error
                    delay_s = resume_delay_s(
                        self._retry_policy, attempt=attempt, position=position, error=error, deadline=deadline
                    )
                    if delay_s is None:
                        raise error from rpc_error
                finally:
                    # A no-op once the call has ended; otherwise the consumer left early (aclose,
                    # break, its own exception or cancellation).
                    call.cancel()
                await asyncio.sleep(delay_s)
        except ChatClientError:
            raise
        except BaseException:
            # The consumer left early: aclose, break, its own exception or cancellation.
            caller_left = True
            raise
        finally:
            if resume and not position.completed:
                # The server keeps producing a resumable turn without its connection; the
                # caller is gone for good, so stop the turn.
                if position.turn:
                    await self._cancel_quietly(position.turn)
                elif request is not None and caller_left:
                    await self._cancel_unseen(request)

    async def _cancel_unseen(self, request: chat_service_pb2.ChatRequest) -> None:
        """Cancels the turn of a caller that left before the turn's name arrived.

        The request may have started a turn that goes on without its connection. Sending it
        again (same `request_id`) attaches to that turn, or starts it if the first never
        arrived, and its first event names it; the caller leaving again cancels it anyway
        (`ON_DISCONNECT_CANCEL`).
        """
        probe = chat_service_pb2.ChatRequest()
        probe.CopyFrom(request)
        probe.on_disconnect = chat_service_pb2.ON_DISCONNECT_CANCEL
        call: _ResponseStream = self._stub.Chat(probe, timeout=5.0, metadata=self._metadata)
        turn = ""
        try:
            async for response in call:
                turn = response.event.started.turn
                break
        except grpc.aio.AioRpcError as err:
            # Best effort, as in `_cancel_quietly`.
            logger.debug("finding the turn of request %s failed: %s", request.request_id, err.code())
        finally:
            call.cancel()
        if turn:
            await self._cancel_quietly(turn)

    async def _cancel_quietly(self, turn: str) -> None:
        try:
            await self.cancel_turn(turn, timeout=timedelta(seconds=5))
        except (ChatClientError, RuntimeError) as err:
            # Best effort: the turn still ends, at the latest after CHATSTREAM_MAX_TURN_S.
            logger.debug("cancelling %s failed: %s", turn, err)

    async def chat_reply(
        self,
        text: str,
        *,
        conversation: str = "",
        request_id: str | None = None,
        timeout: timedelta | None = None,
        resume: bool = True,
    ) -> ChatReply:
        """Sends one user message and returns the whole reply once the turn has completed.

        Args and retries are those of `chat`.

        Returns:
            The turn's reply text, outcome, usage and resource names.

        Raises:
            ChatClientError: The call failed, or the stream ended without a `completed` event.
        """
        builder = ReplyBuilder()
        events = self.chat(
            text, conversation=conversation, request_id=request_id, timeout=timeout, resume=resume
        )
        try:
            async for event in events:
                builder.add(event.proto)
        finally:
            await events.aclose()
        return builder.build()

    async def create_conversation(
        self,
        *,
        conversation_id: str = "",
        request_id: str | None = None,
        timeout: timedelta | None = None,
    ) -> chat_service_pb2.Conversation:
        """Creates an empty conversation.

        Not retried automatically. It is idempotent on `request_id`: after an UNAVAILABLE or
        DEADLINE_EXCEEDED the caller may call again with the same `request_id` and gets the
        conversation created the first time.

        Args:
            conversation_id: The id to give it (a UUID); generated by the server when "".
            request_id: Idempotency key; a new UUID4 by default.
            timeout: Deadline of the call; None uses the client's `timeout`.

        Returns:
            The conversation.

        Raises:
            ChatClientError: ALREADY_EXISTS (reason `CONVERSATION_EXISTS`) if the id is taken,
                INVALID_ARGUMENT for a malformed id, or another failure.
        """
        request = chat_service_pb2.CreateConversationRequest(
            conversation_id=conversation_id,
            request_id=new_request_id() if request_id is None else request_id,
        )
        response = await self._unary(self._stub.CreateConversation, request, timeout)
        return response.conversation

    async def get_conversation(
        self, name: str, *, timeout: timedelta | None = None
    ) -> chat_service_pb2.Conversation:
        """Returns one conversation.

        Args:
            name: `conversations/{conversation}`.
            timeout: Deadline of the call, gRPC retries included; None uses the client's `timeout`.

        Raises:
            ChatClientError: NOT_FOUND (reason `CONVERSATION_NOT_FOUND`) if it does not exist
                or belongs to someone else, or another failure.
        """
        request = chat_service_pb2.GetConversationRequest(name=name)
        response = await self._unary(self._stub.GetConversation, request, timeout)
        return response.conversation

    async def delete_conversation(self, name: str, *, timeout: timedelta | None = None) -> None:
        """Deletes a conversation with its turns and messages. Not retried automatically.

        Args:
            name: `conversations/{conversation}`.
            timeout: Deadline of the call; None uses the client's `timeout`.

        Raises:
            ChatClientError: NOT_FOUND if it does not exist (also when a retry follows a
                delete that did succeed), or another failure.
        """
        request = chat_service_pb2.DeleteConversationRequest(name=name)
        await self._unary(self._stub.DeleteConversation, request, timeout)

    async def list_conversations(
        self, *, page_size: int = 0, timeout: timedelta | None = None
    ) -> AsyncIterator[chat_service_pb2.Conversation]:
        """Yields all the caller's conversations, most recently created first, page by page.

        Args:
            page_size: Conversations per page; 0 lets the server choose (50).
            timeout: Deadline of each page; None uses the client's `timeout`.

        Raises:
            ChatClientError: A page could not be read.
        """
        page_token = ""
        while True:
            page = await self.list_conversations_page(
                page_size=page_size, page_token=page_token, timeout=timeout
            )
            for conversation in page.conversations:
                yield conversation
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def list_conversations_page(
        self, *, page_size: int = 0, page_token: str = "", timeout: timedelta | None = None
    ) -> chat_service_pb2.ListConversationsResponse:
        """Returns one page of the caller's conversations.

        Args:
            page_size: At most this many; 0 means 50, above 1000 means 1000.
            page_token: `next_page_token` of the previous page; "" for the first.
            timeout: Deadline of the call, gRPC retries included; None uses the client's `timeout`.

        Raises:
            ChatClientError: INVALID_ARGUMENT for a bad page size or token, or another failure.
        """
        request = chat_service_pb2.ListConversationsRequest(page_size=page_size, page_token=page_token)
        return await self._unary(self._stub.ListConversations, request, timeout)

    async def list_messages(
        self, parent: str, *, page_size: int = 0, timeout: timedelta | None = None
    ) -> AsyncIterator[Message]:
        """Yields all the messages of a conversation, in order, page by page.

        Each is a `Message`: the generated message's fields, with `role` a `Role` and
        `turn_status` a `TurnStatus`; the generated message itself is `message.proto`.

        Eventually consistent: the messages of a turn appear shortly after it completes.

        Args:
            parent: `conversations/{conversation}`.
            page_size: Messages per page; 0 lets the server choose (50).
            timeout: Deadline of each page; None uses the client's `timeout`.

        Raises:
            ChatClientError: NOT_FOUND for an unknown conversation, or a page could not be read.
        """
        page_token = ""
        while True:
            page = await self.list_messages_page(
                parent, page_size=page_size, page_token=page_token, timeout=timeout
            )
            for message in page.messages:
                yield message
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def list_messages_page(
        self, parent: str, *, page_size: int = 0, page_token: str = "", timeout: timedelta | None = None
    ) -> ListMessagesResponse:
        """Returns one page of a conversation's messages, each a `Message` as in `list_messages`.

        Args:
            parent: `conversations/{conversation}`.
            page_size: At most this many; 0 means 50, above 1000 means 1000.
            page_token: `next_page_token` of the previous page; "" for the first.
            timeout: Deadline of the call, gRPC retries included; None uses the client's `timeout`.

        Raises:
            ChatClientError: NOT_FOUND for an unknown conversation, INVALID_ARGUMENT for a bad
                page size or token, or another failure.
        """
        request = chat_service_pb2.ListMessagesRequest(
            parent=parent, page_size=page_size, page_token=page_token
        )
        return ListMessagesResponse(await self._unary(self._stub.ListMessages, request, timeout))

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: timedelta | None,
    ) -> _Response:
        # The one place a unary AioRpcError becomes a ChatClientError; cancellation (a
        # BaseException) passes through.
        check_open(self._state)
        try:
            return await method(request, timeout=seconds(timeout, self._timeout), metadata=self._metadata)
        except grpc.aio.AioRpcError as rpc_error:
            raise ChatClientError.from_rpc_error(rpc_error) from rpc_error
