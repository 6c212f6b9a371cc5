"""The SDK as run.py installs it for development: editable, and never shadowed by a folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDK_INIT = ROOT / "clients" / "python" / "chatstream" / "__init__.py"

IMPORT = "import chatstream; from chatstream import AsyncChatClient, ChatClient; print(chatstream.__file__)"


def test_a_chatstream_folder_in_the_working_directory_does_not_shadow_the_sdk(tmp_path: Path) -> None:
    # What a clone named `chatstream` in ~ does when Python runs from ~: `python -c` puts the
    # working directory first on sys.path, where the folder would be an empty namespace package.
    (tmp_path / "chatstream" / "clients").mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    result = subprocess.run(
        [sys.executable, "-c", IMPORT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    # Still the repository's own sources, so that an edit shows without a reinstall.
    assert Path(result.stdout.strip()).resolve() == SDK_INIT
