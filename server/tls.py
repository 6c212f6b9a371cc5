"""TLS and mTLS server credentials from the TLS settings group."""

from __future__ import annotations

from pathlib import Path

import grpc

from server.config import SettingsError, TlsSettings


def _read(path: str, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{variable}: cannot read {path}: {exc.strerror}") from None


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """The port's TLS credentials, or None for plaintext.

    With ``tls_client_ca_file`` the handshake requires a client certificate signed by
    that CA and verifies it; a client without one, or with one from another CA, never
    reaches a handler.

    Raises:
        SettingsError: a half-configured or unreadable TLS setup; never silently plaintext.
    """
    cert, key, client_ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert is None and key is None:
        if client_ca is not None:
            raise SettingsError(
                "CHATSTREAM_TLS_CLIENT_CA_FILE needs CHATSTREAM_TLS_CERT_FILE and CHATSTREAM_TLS_KEY_FILE"
            )
        return None
    if cert is None or key is None:
        raise SettingsError("CHATSTREAM_TLS_CERT_FILE and CHATSTREAM_TLS_KEY_FILE must be set together")
    return grpc.ssl_server_credentials(
        [(_read(key, "CHATSTREAM_TLS_KEY_FILE"), _read(cert, "CHATSTREAM_TLS_CERT_FILE"))],
        root_certificates=None if client_ca is None else _read(client_ca, "CHATSTREAM_TLS_CLIENT_CA_FILE"),
        require_client_auth=client_ca is not None,
    )
