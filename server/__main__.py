"""``chatstream`` / ``python -m server``: run the service (migrate, serve, consume, dev) and operate it.

The operator and client commands (chat, conversations, watch, lag, dlq, new-key) live in `server.cli`;
the client ones need only a server address, the Redis ones only CHATSTREAM_REDIS_URL, and both
find a `chatstream dev` running for the working directory by themselves.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
from pathlib import Path
from typing import Final

import click

from server import constants, runtime
from server.config import Settings, SettingsError
from server.devenv import dev_dir
from server.supervisor import ENV_WORKER_INDEX, ENV_WORKERS, serve_workers

logger = logging.getLogger("server")


def _configure_logging() -> None:
    from server.logs import configure_logging_from_env

    # JSON lines for the services (log shippers); text for a person running `dev`.
    default = "text" if click.get_current_context().invoked_subcommand == "dev" else "json"
    try:
        configure_logging_from_env(default_format=default)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


# Commands whose module is imported only when they run (or when help lists them): `chat` should
# not wait for Redis's client to import, nor `lag` for gRPC's.
_LAZY_COMMANDS: Final = {
    "chat": "server.cli.chat:chat",
    "conversations": "server.cli.conversations:conversations",
    "dlq": "server.cli.dlq:dlq",
    "lag": "server.cli.lag:lag",
    "new-key": "server.cli.keys:new_key",
    "watch": "server.cli.watch:watch",
}


class _Commands(click.Group):
    """The command group, with the `_LAZY_COMMANDS` loaded on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_Commands)
def cli() -> None:
    """chatstream: streams LLM chat replies over gRPC and keeps every conversation."""
    _configure_logging()


@cli.command()
def migrate() -> None:
    """Migrate the database schema to the latest version."""
    from server.db.migrate import upgrade

    upgrade(_settings().database.database_url)
    click.echo("database is up to date")


@cli.command()
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar=ENV_WORKERS,
    show_envvar=True,
    help="Serving processes sharing the port through SO_REUSEPORT, under a supervisor; "
    "1 serves in this process.",
)
def serve(workers: int) -> None:
    """Run the gRPC server until SIGTERM/SIGINT."""
    if workers > 1:
        _serve_workers(workers)
        return
    from server.app import ChatServer

    worker_index = os.environ.get(ENV_WORKER_INDEX)
    if worker_index is not None:
        from server.logs import bind_log_fields

        # Workers of one supervisor write to the same stream; the index tells their lines
        # apart. Bound before the loop starts, so every task of the loop inherits it.
        bind_log_fields(worker=worker_index)
    try:
        runtime.run(runtime.serve_until_signal(ChatServer(_settings())))
    except SettingsError as exc:
        # Refusing to start without authentication (or with half a TLS setup) is a
        # configuration message for the operator, not a crash.
        raise click.ClickException(str(exc)) from exc


def _serve_workers(workers: int) -> None:
    try:
        status = serve_workers(_settings(), workers=workers)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc
    click.get_current_context().exit(status)


@cli.command()
@click.option("--burst", is_flag=True, help="Drain what is in the streams, then exit.")
@click.option("--relay/--no-relay", default=True, help="Also run the outbox relay and lease sweeper.")
def consume(burst: bool, relay: bool) -> None:
    """Run the persistence consumer (group chat-persistence) and the relay until SIGTERM/SIGINT."""
    from server.consumer.process import ConsumerProcess

    consumer = ConsumerProcess(_settings(), relay=relay)
    runtime.run(consumer.drain() if burst else runtime.serve_until_signal(consumer))


@cli.command()
@click.option("--listen", default=None, help="gRPC address (default: $CHATSTREAM_LISTEN or 127.0.0.1:50051).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Data folder of embedded PostgreSQL and Redis (default: $CHATSTREAM_DEV_DIR or .chatstream/).",
)
def dev(listen: str | None, data_dir: Path | None) -> None:
    """Run everything locally: embedded PostgreSQL and Redis, migrations, server and consumer.

    What it started (database, Redis, gRPC address, API key) is printed and written to
    DATA_DIR/env, which the other commands read when run from this folder.
    """
    from server.dev import DevServer
    from server.embedded import EmbeddedServicesError

    listen = listen or os.environ.get(constants.ENV_LISTEN, "127.0.0.1:50051")
    dev_server = DevServer(data_dir=(data_dir or dev_dir()).resolve(), listen=listen)
    try:
        runtime.run(runtime.serve_until_signal(dev_server))
    except EmbeddedServicesError as exc:
        # Typically the embedded extra is not installed: one line that says what to do.
        raise click.ClickException(str(exc)) from exc


def main() -> None:
    """Console-script entry point."""
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: Ctrl-C in `chat` or `lag --watch` (and SIGINT sent by
    # a supervisor) would do nothing. Every command here means Ctrl-C to stop it.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    cli()


if __name__ == "__main__":
    main()
