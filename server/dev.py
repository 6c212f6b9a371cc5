"""``chatstream dev``: the whole system in one process on a fresh machine."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from pathlib import Path

from server import constants
from server.app import ChatServer
from server.auth import hash_api_key, new_api_key
from server.config import ApiKeyEntry, AuthMode, Settings, variable_of
from server.consumer.process import ConsumerProcess
from server.db.migrate import upgrade_async
from server.demo_model import DEMO_MODEL, DemoModelServer
from server.devenv import write_env_file
from server.embedded import embedded_services

_DEMO_BANNER = """
************************************************************************
*  DEMO MODEL: ANTHROPIC_API_KEY is not set, so replies come from an   *
*  offline demo model that speaks the Anthropic streaming protocol.    *
*  They are NOT Claude's. Set ANTHROPIC_API_KEY to talk to Claude.     *
************************************************************************"""


DEV_SUBJECT = "dev"
"""The owner of what the dev API key creates."""


def dev_api_key(data_dir: Path) -> str:
    """The dev server's API key, made once and kept in the data folder (mode 0600).

    Dev mode authenticates like production, so what works against it works against a
    real deployment; keeping the key across restarts keeps the data reachable.
    """
    path = data_dir / "dev-api-key"
    if path.exists():
        return path.read_text().strip()
    key = new_api_key()
    data_dir.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


class DevServer:
    """Embedded PostgreSQL and Redis, migrations, the demo model, the server and the consumer.

    A `server.runtime.Component`: ``start()`` brings everything up in order and writes
    ``<data dir>/env`` (`server.devenv`); ``stop()`` (idempotent) stops the server, then the
    consumer, then the embedded services, and removes the env file. A consumer that dies
    ends the whole: ``wait_stopped()`` returns and ``stop()`` raises its error.
    """

    def __init__(self, *, data_dir: Path, listen: str) -> None:
        """Args:
        data_dir: Holds the databases' data and sockets, the dev API key and the env file.
        listen: The gRPC address; port 0 picks a free one.
        """
        self._data_dir = data_dir
        self._listen = listen
        self._stack = contextlib.AsyncExitStack()
        self._consumer: ConsumerProcess | None = None

    async def start(self) -> None:
        """Starts (or joins) the embedded services, migrates, and starts serving."""
        data_dir = self._data_dir
        services = self._stack.enter_context(embedded_services(data_dir))
        await upgrade_async(services.database_url)
        api_key = os.environ.get("ANTHROPIC_API_KEY") or None
        base_url = os.environ.get("ANTHROPIC_BASE_URL") or None
        demo = api_key is None
        if demo:
            demo_server = DemoModelServer()
            base_url = await demo_server.start()
            self._stack.push_async_callback(demo_server.close)
            api_key = "demo"
        dev_key = dev_api_key(data_dir)
        settings = Settings.from_fields(
            auth_mode=AuthMode.REQUIRED,
            # The dev key may act for users, so x-chatstream-user can be tried out.
            api_keys=(ApiKeyEntry(subject=DEV_SUBJECT, sha256=hash_api_key(dev_key), act_for_users=True),),
            database_url=services.database_url,
            redis_url=services.redis_url,
            listen=self._listen,
            anthropic_api_key=api_key,
            anthropic_base_url=base_url,
            shutdown_grace_s=2.0,
            consumer_name="dev-consumer",
            metrics_listen=os.environ.get(variable_of("metrics_listen"), "127.0.0.1:0"),
        )
        if demo:
            # Asked for by its own name, so that every turn (its row, completed.model) names
            # the model that answered rather than a Claude model that did not.
            settings = settings.with_overrides(model=DEMO_MODEL)
        server = ChatServer(settings)
        # The consumer starts first so that it stops last: turns the server records while
        # it stops are still read.
        self._consumer = ConsumerProcess(settings, metrics=server.metrics)
        self._stack.push_async_callback(self._consumer.stop)
        await self._consumer.start()
        self._stack.push_async_callback(server.stop)
        await server.start()
        env = {
            constants.ENV_DATABASE_URL: services.database_url,
            constants.ENV_REDIS_URL: services.redis_url,
            constants.ENV_LISTEN: server.address,
            constants.ENV_TOKEN: dev_key,
        }
        key_file = data_dir / "dev-api-key"
        metrics = f"http://127.0.0.1:{server.metrics_port}/metrics" if server.metrics_port else "off"
        env_file = write_env_file(
            data_dir,
            env,
            notes=(
                f"What `chatstream dev` (pid {os.getpid()}) started; removed when it stops.",
                "`source` it to reach them from a shell; chatstream chat, conversations, lag and dlq",
                "read it by themselves when run from this project folder.",
                f"Dev API key file: {key_file}; Prometheus metrics: {metrics}",
            ),
        )
        self._stack.callback(env_file.unlink, missing_ok=True)
        _print_banner(server.address, data_dir, demo, dev_key, metrics, env, env_file)

    async def stop(self) -> None:
        """Stops everything, the last started first; idempotent. Raises the consumer's error, if it died."""
        await self._stack.aclose()

    async def wait_stopped(self) -> None:
        """Returns once the consumer has stopped: by ``stop()``, or by dying."""
        if self._consumer is not None:
            await self._consumer.wait_stopped()


def _print_banner(
    address: str,
    data_dir: Path,
    demo: bool,
    api_key: str,
    metrics: str,
    env: dict[str, str],
    env_file: Path,
) -> None:
    auth = f"-H 'authorization: Bearer {api_key}'"
    grpcurl, chatstream = _command("grpcurl"), _command("chatstream")
    lines = [
        "",
        f"chatstream dev server on {address} (data in {data_dir}); Ctrl-C stops it.",
        f"Prometheus metrics: {metrics}",
        f"Dev API key (owner {DEV_SUBJECT!r}, kept in {data_dir / 'dev-api-key'}): {api_key}",
        f"What it started, also in {env_file} (`source` it; chatstream chat, conversations, lag and dlq",
        "read it by themselves from this folder):",
        *(f"  {name}={value}" for name, value in env.items() if name != constants.ENV_TOKEN),
        "Try it with grpcurl (health and reflection need no key):",
        f"  {grpcurl} -plaintext {address} list",
        f"  {grpcurl} -plaintext {address} describe chatstream.v1.ChatService",
        f'  {grpcurl} -plaintext {auth} -d \'{{"text":"hello"}}\' {address} chatstream.v1.ChatService/Chat',
        f"  {grpcurl} -plaintext {auth} -d '{{}}' {address} chatstream.v1.ChatService/ListConversations",
        f"Or from the terminal: {chatstream} chat; {chatstream} conversations list; {chatstream} lag",
    ]
    if demo:
        lines.insert(0, _DEMO_BANNER)
    print("\n".join(lines), flush=True)


def _command(name: str) -> str:
    """How to run the tool ``name`` from a shell: its name when the PATH finds it, else its path.

    `python3 run.py dev` runs from .venv/bin, which a new user's shell does not have on its
    PATH: the banner's commands must work pasted as they are.
    """
    sibling = Path(sys.executable).parent / name
    if shutil.which(name) is not None or not os.access(sibling, os.X_OK):
        return name
    return shlex.quote(str(sibling))
