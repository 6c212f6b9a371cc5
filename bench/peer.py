"""The peer: the SSE stack of the original incident, done right.

``python -m bench.peer --port P --upstream http://127.0.0.1:U --database-url postgresql+asyncpg://...``

Starlette on uvicorn (uvloop + httptools, as ``uvicorn[standard]`` runs it), SQLAlchemy's
``AsyncSession`` over asyncpg against the same PostgreSQL as chatstream. ``POST /chat`` with
``{"text": ..., "session": "<id>" or ""}``:

1. one unit of work, **committed before the response starts**: get or create the chat session, read
   its history, add the user's message (the incident's bug was leaving this commit to the end);
2. stream the reply through ``messages.stream(...).text_stream``, one SSE event per token:
   ``data: {"type":"delta","text":...}``, after ``{"type":"started","session":...}``;
3. a second unit of work stores the assistant's message (partial text too, if the stream broke), then
   ``{"type":"completed",...}``.

Tables live in schema ``bench_peer``, created at start-up if missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import anthropic
import httpx2
import uvicorn
from anthropic.types import MessageParam
from sqlalchemy import DateTime, ForeignKey, MetaData, Text, func, select, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

SCHEMA = "bench_peer"
HISTORY_LIMIT = 100


class Base(DeclarativeBase):
    """Declarative base bound to schema ``bench_peer``."""

    metadata = MetaData(schema=SCHEMA)


class ChatSessionRow(Base):
    """A chat session."""

    __tablename__ = "sessions"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class MessageRow(Base):
    """One message of a session."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    session_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="completed")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


def _sse(obj: dict[str, object]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Peer:
    """The app's resources."""

    def __init__(self, *, engine: AsyncEngine, upstream: str) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.client = anthropic.AsyncAnthropic(
            base_url=upstream, api_key="bench", max_retries=2, timeout=httpx2.Timeout(60.0, connect=5.0)
        )

    async def create_schema(self) -> None:
        """Creates schema and tables if missing."""
        async with self.engine.begin() as conn:
            await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
            await conn.run_sync(Base.metadata.create_all)

    async def health(self, request: Request) -> Response:
        """Liveness for the harness."""
        return JSONResponse({"ok": True})

    async def chat(self, request: Request) -> Response:
        """POST /chat: commit first, then stream, then store the reply."""
        body = await request.json()
        user_text = str(body.get("text") or "")
        if not user_text.strip():
            return JSONResponse({"error": "text is required"}, status_code=400)
        session_id: uuid.UUID | None = uuid.UUID(body["session"]) if body.get("session") else None
        history: list[MessageParam] = []
        async with self.sessions() as db:
            if session_id is None:
                session_id = uuid.uuid4()
                db.add(ChatSessionRow(id=session_id))
            else:
                if await db.get(ChatSessionRow, session_id) is None:
                    return JSONResponse({"error": "no such session"}, status_code=404)
                rows = await db.execute(
                    select(MessageRow.role, MessageRow.text)
                    .where(MessageRow.session_id == session_id)
                    .order_by(MessageRow.id.desc())
                    .limit(HISTORY_LIMIT)
                )
                for role, said in reversed(rows.all()):
                    if role == "assistant":
                        history.append({"role": "assistant", "content": said})
                    else:
                        history.append({"role": "user", "content": said})
            db.add(MessageRow(session_id=session_id, role="user", text=user_text))
            await db.commit()
        history.append({"role": "user", "content": user_text})
        return StreamingResponse(self._events(session_id, history), media_type="text/event-stream")

    async def _events(self, session_id: uuid.UUID, messages: list[MessageParam]) -> AsyncIterator[str]:
        yield _sse({"type": "started", "session": str(session_id)})
        parts: list[str] = []
        status = "failed"
        stop_reason: str | None = None
        output_tokens = 0
        try:
            async with self.client.messages.stream(
                model="bench-peer", max_tokens=4096, messages=messages
            ) as stream:
                async for delta in stream.text_stream:
                    parts.append(delta)
                    yield _sse({"type": "delta", "text": delta})
                final = await stream.get_final_message()
            stop_reason = final.stop_reason
            output_tokens = final.usage.output_tokens
            status = "completed"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 (any upstream failure ends the stream with an error event)
            yield _sse({"type": "error", "error": exc.__class__.__name__})
        finally:
            # Shielded: a client that went away must not cancel storing what was produced.
            await asyncio.shield(self._store(session_id, "".join(parts), status))
        if status == "completed":
            yield _sse({"type": "completed", "stop_reason": stop_reason, "output_tokens": output_tokens})

    async def _store(self, session_id: uuid.UUID, reply: str, status: str) -> None:
        async with self.sessions() as db:
            db.add(MessageRow(session_id=session_id, role="assistant", text=reply, status=status))
            await db.commit()


def build_app(peer: Peer) -> Starlette:
    """The Starlette app."""
    return Starlette(
        routes=[Route("/chat", peer.chat, methods=["POST"]), Route("/health", peer.health)],
    )


async def serve(port: int, upstream: str, database_url: str, pool_size: int) -> None:
    """Serves until SIGTERM or SIGINT (uvicorn's own handlers)."""
    engine = create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=10,
        pool_pre_ping=True,
        connect_args={"server_settings": {"application_name": "bench-peer"}},
    )
    peer = Peer(engine=engine, upstream=upstream)
    await peer.create_schema()
    config = uvicorn.Config(
        build_app(peer),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=120,
    )
    print(f"peer serving on http://127.0.0.1:{port}", flush=True)
    try:
        await uvicorn.Server(config).serve()
    finally:
        await peer.client.close()
        await engine.dispose()


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--pool-size", type=int, default=10, help="like CHATSTREAM_DB_POOL_SIZE")
    args = parser.parse_args()
    # uvicorn.run would pick uvloop itself; running our own coroutine, pick it the same way.
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.upstream, args.database_url, args.pool_size))


if __name__ == "__main__":
    main()
