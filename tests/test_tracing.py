"""OpenTelemetry: spans for gRPC, SQL and Redis when OTEL_* asks for them; nothing loaded when it does not."""

from __future__ import annotations

import subprocess
import sys

from chatstream import AsyncChatClient

from server.config import Settings
from tests.fake_anthropic import FakeAnthropic
from tests.processes import serve_process


async def test_otel_env_turns_on_spans_for_grpc_sql_and_redis(
    settings: Settings, fake: FakeAnthropic
) -> None:
    with serve_process(
        settings, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="chatstream-trace-test"
    ) as (process, address):
        async with AsyncChatClient(address) as client:
            await client.chat_reply("trace me")
        assert process.terminate(timeout_s=30) == 0
    output = process.log()
    assert '"service.name": "chatstream-trace-test"' in output
    assert '"name": "chatstream.v1.ChatService/Chat"' in output  # the gRPC server span
    assert '"kind": "SpanKind.SERVER"' in output
    assert '"db.system": "postgresql"' in output
    # Units of work 1 and 2 are single statements on the same engine: they have spans too.
    assert "INSERT INTO chat.turns" in output
    assert "UPDATE chat.turns SET" in output
    assert '"db.system": "redis"' in output  # redis-py spans (XADD of the turn)


def test_without_otel_env_no_provider_or_instrumentation_is_installed() -> None:
    probe = (
        "import sys\n"
        "from server.tracing import configure_tracing\n"
        "import server.app, server.consumer.process\n"
        "assert configure_tracing('x') is False\n"
        "from opentelemetry import trace\n"
        "print(type(trace.get_tracer_provider()).__name__,"
        " sorted(m for m in sys.modules if m.startswith('opentelemetry.instrumentation')))\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ProxyTracerProvider []"
