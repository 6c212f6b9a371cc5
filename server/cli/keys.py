"""`chatstream new-key SUBJECT`: a new API key for a service, and its CHATSTREAM_API_KEYS entry."""

from __future__ import annotations

import re
from typing import Final

import click

from server.auth import hash_api_key, new_api_key

# The subject part of a CHATSTREAM_API_KEYS entry, as server/config.py parses it.
_SUBJECT: Final = re.compile(r"[A-Za-z0-9._@-]{1,128}")


@click.command("new-key")
@click.argument("subject")
@click.option(
    "--act-for-users",
    is_flag=True,
    help="Let calls with this key act for end users (the x-chatstream-user header).",
)
def new_key(subject: str, act_for_users: bool) -> None:
    """Print a new API key for SUBJECT and the CHATSTREAM_API_KEYS entry that accepts it.

    SUBJECT owns what calls with the key create: 1 to 128 of A-Z a-z 0-9 . _ @ -. The key
    itself is stored nowhere: give it to the service; configure the server with the entry,
    which holds only the key's SHA-256.
    """
    if not _SUBJECT.fullmatch(subject):
        raise click.BadParameter("must be 1 to 128 of A-Z a-z 0-9 . _ @ -", param_hint="SUBJECT")
    key = new_api_key()
    flag = ":act_for_users" if act_for_users else ""
    click.echo(f"API key (give it to the service; it is not stored anywhere): {key}")
    click.echo(f"CHATSTREAM_API_KEYS entry: {subject}:{hash_api_key(key)}{flag}")
