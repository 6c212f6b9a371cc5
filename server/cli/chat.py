"""`chatstream chat`: a terminal chat that prints each reply token by token as it streams in.

Interactive when stdin is a terminal: a prompt with line editing; Ctrl-C during a reply cancels
that reply (the server stores the turn as CANCELLED) and returns to the prompt; Ctrl-D or
``/quit`` exits 0. Otherwise it reads one message per line, prints each reply, and stops with
exit status 1 at the first failed turn, so that a script notices.
"""

from __future__ import annotations

import contextlib
import enum
import sys
import time
from collections.abc import Iterable
from typing import Final, TextIO

import click
import grpc
from chatstream import ChatClient, ChatClientError, TurnCompleted, TurnStatus

from server.cli.remote import ConversationName, Remote, describe, remote_options

PROMPT: Final = "> "
QUIT_COMMANDS: Final = frozenset({"/quit", "/exit"})

BUSY_WAIT_S: Final = 5.0
"""How long a message waits for the conversation's previous turn to end (ABORTED TURN_IN_PROGRESS).

After Ctrl-C the server records the cancelled turn a moment after the call is cancelled; a
message typed at once would otherwise be refused for that moment.
"""
_BUSY_POLL_S: Final = 0.1


class Outcome(enum.Enum):
    """How one reply ended, from the terminal's point of view."""

    COMPLETED = enum.auto()
    FAILED = enum.auto()


class ChatSession:
    """One conversation in a terminal: sends messages and writes the replies as they stream."""

    def __init__(self, client: ChatClient, conversation: str, *, out: TextIO, err: TextIO) -> None:
        """Continues ``conversation`` (``conversations/{id}``) through ``client``."""
        self._client = client
        self._conversation = conversation
        self._out = out
        self._err = err

    def reply(self, text: str) -> Outcome:
        """Sends ``text`` and writes the reply's deltas as they arrive, then a newline.

        A KeyboardInterrupt (Ctrl-C) propagates after the call has been cancelled: closing
        the SDK's generator cancels the gRPC call, and the server stores the turn as CANCELLED.
        """
        busy_until = time.monotonic() + BUSY_WAIT_S
        while True:
            written = False
            completed: TurnCompleted | None = None
            events = self._client.chat(text, conversation=self._conversation)
            try:
                for event in events:
                    match event.WhichOneof("kind"):
                        case "started" if written:
                            # The SDK started the turn again after its server died: what is
                            # printed was the interrupted turn's, and the reply starts over.
                            click.echo(file=self._out)
                            click.echo("[the server died mid-reply; starting it again]", file=self._err)
                        case "text_delta":
                            click.echo(event.text_delta.text, nl=False, file=self._out)  # flushes
                            written = True
                        case "completed":
                            completed = event.completed
                        case _:
                            pass
            except ChatClientError as err:
                if not written and _busy(err) and time.monotonic() < busy_until:
                    time.sleep(_BUSY_POLL_S)
                    continue
                if written:
                    click.echo(file=self._out)
                click.echo(f"error: {describe(err)}", file=self._err)
                return Outcome.FAILED
            finally:
                events.close()
            if written:
                click.echo(file=self._out)
            return self._report(completed)

    def _report(self, completed: TurnCompleted | None) -> Outcome:
        if completed is None:
            click.echo("error: the reply ended without a completed event", file=self._err)
            return Outcome.FAILED
        if completed.status != TurnStatus.TURN_STATUS_COMPLETED:
            status = TurnStatus.Name(completed.status).removeprefix("TURN_STATUS_")
            click.echo(f"[turn {status}]", file=self._err)
            return Outcome.FAILED
        if completed.stop_reason not in ("", "end_turn"):
            # The reply is whole as far as the server goes, but e.g. max_tokens cut it short.
            click.echo(f"[stopped: {completed.stop_reason}]", file=self._err)
        return Outcome.COMPLETED

    def interact(self) -> None:
        """The prompt loop, until Ctrl-D or /quit."""
        _enable_line_editing()
        click.echo(
            f"conversation {self._conversation}\n"
            "Ctrl-C stops a reply; Ctrl-D or /quit exits. "
            f"Resume later with --conversation {self._conversation}",
            file=self._err,
        )
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                click.echo(file=self._out)  # end the prompt's line
                return
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-D or /quit exits)", file=self._err)
                continue
            text = line.strip()
            if not text:
                continue
            if text in QUIT_COMMANDS:
                return
            try:
                self.reply(text)
            except KeyboardInterrupt:
                click.echo("\n[reply cancelled]", file=self._err)

    def run_lines(self, lines: Iterable[str]) -> bool:
        """Sends each non-empty line as a message; False at the first turn that failed."""
        click.echo(f"conversation {self._conversation}", file=self._err)
        for line in lines:
            text = line.strip()
            if not text:
                continue
            if text in QUIT_COMMANDS:
                break
            if self.reply(text) is Outcome.FAILED:
                return False
        return True


def _busy(err: ChatClientError) -> bool:
    return err.code is grpc.StatusCode.ABORTED and err.reason == "TURN_IN_PROGRESS"


def _enable_line_editing() -> None:
    # Importing readline is what gives input() editing and history; it exists on Linux and
    # macOS builds of CPython, not on Windows, where input() still works without it.
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401


def _open_conversation(client: ChatClient, name: str | None) -> str:
    if name is None:
        # Created up front, so the name can be printed before the first message.
        return client.create_conversation().name
    client.get_conversation(name)  # an unknown name fails now, not after the first message
    return name


@click.command()
@remote_options
@click.option(
    "--conversation",
    type=ConversationName(),
    metavar="NAME",
    default=None,
    help="Continue this conversation (conversations/ID, or just ID); default: a new one.",
)
def chat(*, remote: Remote, conversation: str | None) -> None:
    """Chat with the model in the terminal; replies stream in as they are written.

    With a terminal: Ctrl-C stops a reply, Ctrl-D or /quit exits. Without one (a pipe or a
    file), each line of stdin is one message; replies go to stdout, everything else to
    stderr, and the exit status is 1 if a turn failed.
    """
    interactive = sys.stdin.isatty()
    ok = True
    try:
        with remote.connect() as client:
            session = ChatSession(
                client, _open_conversation(client, conversation), out=sys.stdout, err=sys.stderr
            )
            if interactive:
                session.interact()
            else:
                ok = session.run_lines(sys.stdin)
    except ChatClientError as err:
        raise click.ClickException(describe(err)) from err
    except KeyboardInterrupt:
        # Outside a reply (connecting, or a non-interactive run): leave quietly, as shells expect.
        sys.exit(130)
    if not ok:
        sys.exit(1)
