"""``<dev data folder>/env``: what a running `chatstream dev` started, for shells and for the CLI.

`chatstream dev` writes the file once everything is up and removes it when it stops. It is
a shell script of ``export NAME=value`` lines, so ``source .chatstream/env`` sets a shell up;
the operator and client commands (`lag`, `dlq`, `conversations`, `chat`) read it themselves
when the variables it holds are not set, so that they work against dev with no setup when
run from the project folder.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from server import constants

DEFAULT_DEV_DIR: Final = ".chatstream"
"""The dev data folder, relative to the working directory, unless CHATSTREAM_DEV_DIR names one."""
ENV_FILE_NAME: Final = "env"

# What the file may set; anything else in it is ignored.
_NAMES: Final = frozenset(
    {constants.ENV_DATABASE_URL, constants.ENV_REDIS_URL, constants.ENV_LISTEN, constants.ENV_TOKEN}
)


def dev_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The dev data folder: CHATSTREAM_DEV_DIR, else ``.chatstream`` in the working directory."""
    env = os.environ if environ is None else environ
    return Path(env.get(constants.ENV_DEV_DIR) or DEFAULT_DEV_DIR)


@dataclass(frozen=True, slots=True, kw_only=True)
class DevEnv:
    """The variables a running `chatstream dev` wrote, and where."""

    path: Path
    """The env file they were read from."""
    values: Mapping[str, str] = field(repr=False)
    """CHATSTREAM_* names to values; the token makes the whole mapping a secret."""

    def get(self, name: str) -> str | None:
        """The value of ``name``, or None when the file does not set it."""
        return self.values.get(name) or None


def write_env_file(data_dir: Path, values: Mapping[str, str], *, notes: Sequence[str] = ()) -> Path:
    """Writes ``values`` as ``export`` lines (after ``notes`` as comments) to ``data_dir/env``.

    The file holds the dev API key, so it is readable by its owner only; it replaces any
    earlier one in one rename, so a reader never sees half of it.

    Returns:
        The file's path.
    """
    unknown = set(values) - _NAMES
    if unknown:
        raise ValueError(f"not a variable of the dev env file: {sorted(unknown)}")
    lines = [f"# {note}" for note in notes]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in values.items()]
    path = data_dir / ENV_FILE_NAME
    partial = path.with_name(f".{ENV_FILE_NAME}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("\n".join(lines) + "\n")
    partial.replace(path)
    return path


def read_dev_env(environ: Mapping[str, str] | None = None) -> DevEnv | None:
    """What the dev server of this folder (or of CHATSTREAM_DEV_DIR) wrote; None if nothing is there.

    Lines other than ``[export] NAME=value`` for the names `chatstream dev` writes are ignored.
    """
    path = dev_dir(environ) / ENV_FILE_NAME
    try:
        text = path.read_text()
    except OSError:  # none there, or not ours to read: as if no dev server ran here
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        try:
            # shlex undoes the quoting write_env_file applied with shlex.quote.
            words = shlex.split(line, comments=True)
        except ValueError:  # unbalanced quotes: not a line we wrote
            continue
        if words[:1] == ["export"]:
            words = words[1:]
        if len(words) != 1:
            continue
        name, sep, value = words[0].partition("=")
        if sep and name in _NAMES:
            values[name] = value
    return DevEnv(path=path, values=values)
