"""`python -m server.preflight`: the checks a server makes before it opens anything, alone in a process.

The supervisor of ``serve --workers N`` runs it once before it starts any worker: failing
there once, with the server's own message, beats N workers failing until the supervisor
gives up on them. It runs in a process of its own because the checks need what a serving
process needs (gRPC for the TLS credentials, PyJWT and cryptography for the credentials,
the Anthropic SDK for its credential lookup), and the supervisor, which lives as long as
its workers, imports none of that (tests/test_supervisor.py checks it).

Exit status 0 when the settings pass; 2, with the reason as the only line on stderr, when
the server would refuse them.
"""

from __future__ import annotations

import sys
from typing import Final

from server.config import Settings, SettingsError

REFUSED: Final = 2
"""The exit status of a refusal (1 is Python's own, for a crash)."""


def check_server_settings(settings: Settings) -> None:
    """Raises SettingsError where a serving process would refuse ``settings`` at its start."""
    from server import tls
    from server.auth import CredentialVerifier
    from server.llm import check_model_reachable

    CredentialVerifier(settings)
    tls.server_credentials(settings.tls)
    check_model_reachable(settings.llm)


def main() -> int:
    """Checks the settings of this process's environment; returns the exit status."""
    try:
        check_server_settings(Settings.from_env())
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
