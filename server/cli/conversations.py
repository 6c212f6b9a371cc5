"""`chatstream conversations list|show`: read conversations from a running server through the SDK."""

from __future__ import annotations

import itertools
import json

import click
from chatstream import ChatClientError, Conversation, Message, Role, TurnStatus

from server.cli.remote import ConversationName, Remote, describe, remote_options, timestamp


def conversation_json(conversation: Conversation) -> dict[str, object]:
    """A conversation as JSON-ready data, with the proto's field names."""
    return {
        "name": conversation.name,
        "create_time": timestamp(conversation.create_time),
        "update_time": timestamp(conversation.update_time),
        "turn_count": conversation.turn_count,
        "message_count": conversation.message_count,
    }


def message_json(message: Message) -> dict[str, object]:
    """A message as JSON-ready data; enums as short lower-case names (``user``, ``completed``)."""
    return {
        "name": message.name,
        "role": _role(message.role),
        "text": message.text,
        "turn": message.turn,
        "turn_status": _status(message.turn_status),
        "create_time": timestamp(message.create_time),
    }


def _role(role: int) -> str:
    return Role.Name(role).removeprefix("ROLE_").lower()


def _status(status: int) -> str:
    return TurnStatus.Name(status).removeprefix("TURN_STATUS_").lower()


def _when(value: str | None) -> str:
    """The table's time format: to the second, still unambiguous (UTC)."""
    return "-" if value is None else value[:19].replace("T", " ") + "Z"


@click.group()
def conversations() -> None:
    """Read conversations from a running server (as the caller the token identifies)."""


@conversations.command("list")
@remote_options
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Show at most this many; 0 for all.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_conversations(*, remote: Remote, limit: int, as_json: bool) -> None:
    """List conversations, most recently created first."""
    try:
        with remote.connect() as client:
            found = list(itertools.islice(client.list_conversations(), limit or None))
    except ChatClientError as err:
        raise click.ClickException(describe(err)) from err
    if as_json:
        click.echo(json.dumps([conversation_json(conversation) for conversation in found], indent=2))
        return
    if not found:
        click.echo("no conversations")
        return
    width = max(len(conversation.name) for conversation in found)
    click.echo(f"{'name':<{width}}  {'created':<20}  {'updated':<20}  {'turns':>5}  {'messages':>8}")
    for c in found:
        created, updated = _when(timestamp(c.create_time)), _when(timestamp(c.update_time))
        click.echo(
            f"{c.name:<{width}}  {created:<20}  {updated:<20}  {c.turn_count:>5}  {c.message_count:>8}"
        )


@conversations.command("show")
@remote_options
@click.argument("name", type=ConversationName())
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object: the conversation and its messages."
)
def show_conversation(*, remote: Remote, name: str, as_json: bool) -> None:
    """Show conversation NAME (conversations/ID, or just ID) and its messages in order.

    Messages are written by the persistence consumer, usually well under a second after a
    turn ends, so the latest turn may be missing for a moment.
    """
    try:
        with remote.connect() as client:
            conversation = client.get_conversation(name)
            messages = list(client.list_messages(name))
    except ChatClientError as err:
        raise click.ClickException(describe(err)) from err
    if as_json:
        document = {
            "conversation": conversation_json(conversation),
            "messages": [message_json(m) for m in messages],
        }
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(
        f"{conversation.name}  created {_when(timestamp(conversation.create_time))}  "
        f"{conversation.turn_count} turn(s), {conversation.message_count} message(s)"
    )
    for message in messages:
        status = _status(message.turn_status)
        # Only the unusual is worth a label: a reply cut short says so.
        note = "" if status == "completed" else f"  [{status}]"
        click.echo(f"\n--- {_role(message.role)}  {_when(timestamp(message.create_time))}{note}")
        click.echo(message.text)
