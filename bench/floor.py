"""The floor: the least a gRPC relay of model tokens can do in Python.

``python -m bench.floor --port P --upstream http://127.0.0.1:U``

It serves ``chatstream.v1.ChatService/Chat`` (so the same load client drives it), calls the same fake
upstream through the same ``anthropic`` SDK, iterates the raw events of
``messages.create(stream=True)`` (the SDK's cheapest path) and writes one gRPC message per token.
No database, no Redis, no context, no validation, no error mapping: TurnStarted carries made-up names.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from collections.abc import AsyncIterator

import anthropic
import grpc
import httpx2
from chatstream.v1 import chat_service_pb2 as pb
from chatstream.v1 import chat_service_pb2_grpc as pb_grpc


class FloorServicer(pb_grpc.ChatServiceServicer):
    """Chat only; every other RPC is UNIMPLEMENTED (inherited)."""

    def __init__(self, upstream: str) -> None:
        self._client = anthropic.AsyncAnthropic(
            base_url=upstream, api_key="bench", max_retries=0, timeout=httpx2.Timeout(120.0, connect=5.0)
        )

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[pb.ChatRequest, pb.ChatResponse]
    ) -> AsyncIterator[pb.ChatResponse]:
        """TurnStarted, one TextDelta per upstream text delta, TurnCompleted."""
        conversation = request.conversation or f"conversations/{uuid.uuid4()}"
        started = pb.TurnStarted(conversation=conversation, turn=f"{conversation}/turns/{uuid.uuid4()}")
        yield pb.ChatResponse(event=pb.TurnEvent(seq=1, started=started))
        seq = 1
        stop_reason = ""
        output_tokens = 0
        stream = await self._client.messages.create(
            model="bench-floor",
            max_tokens=4096,
            messages=[{"role": "user", "content": request.text}],
            stream=True,
        )
        async with stream:
            async for event in stream:
                if event.type == "content_block_delta":
                    if event.delta.type == "text_delta":
                        seq += 1
                        delta = pb.TextDelta(text=event.delta.text)
                        yield pb.ChatResponse(event=pb.TurnEvent(seq=seq, text_delta=delta))
                elif event.type == "message_delta":
                    stop_reason = event.delta.stop_reason or ""
                    output_tokens = event.usage.output_tokens
        completed = pb.TurnCompleted(
            status=pb.TURN_STATUS_COMPLETED,
            stop_reason=stop_reason,
            usage=pb.Usage(output_tokens=output_tokens),
            model="bench-floor",
        )
        yield pb.ChatResponse(event=pb.TurnEvent(seq=seq + 1, completed=completed))


async def serve(port: int, upstream: str) -> None:
    """Serves until SIGTERM or SIGINT."""
    server = grpc.aio.server()
    # The stubs mark every RPC abstract; the floor serves Chat only (the rest answer UNIMPLEMENTED).
    pb_grpc.add_ChatServiceServicer_to_server(FloorServicer(upstream), server)  # type: ignore[abstract]
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor serving on 127.0.0.1:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the fake upstream")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
