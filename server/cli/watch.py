"""`chatstream watch CONVERSATION`: follow a conversation's new turns live, as a second device would."""

from __future__ import annotations

import click
from chatstream import ChatClientError, TurnStatus

from server.cli.remote import ConversationName, Remote, describe, remote_options


@click.command()
@remote_options
@click.argument("conversation", type=ConversationName())
def watch(*, remote: Remote, conversation: str) -> None:
    """Print each new turn of CONVERSATION (conversations/ID, or just ID) as it streams, until Ctrl-C.

    Works against any replica: the turns may be produced by another server process. Turns
    that started before the command are not shown.
    """
    click.echo(f"watching {conversation}; Ctrl-C to stop", err=True)
    try:
        with remote.connect() as client:
            for event in client.watch_conversation(conversation):
                match event.WhichOneof("kind"):
                    case "started":
                        click.echo(f"--- {event.started.turn}")
                    case "text_delta":
                        click.echo(event.text_delta.text, nl=False)
                    case "completed":
                        status = TurnStatus(event.completed.status)
                        note = "" if status is TurnStatus.COMPLETED else f" [{status}]"
                        click.echo(f"\n--- end{note}")
    except ChatClientError as err:
        raise click.ClickException(describe(err)) from err
    except KeyboardInterrupt:
        click.echo("", err=True)
