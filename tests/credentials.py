"""Test credentials: API keys, JWTs, and a throwaway PKI made with `cryptography`.

Everything here is generated per test run; nothing is a fixture file that could leak
into a deployment.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.auth import hash_api_key, new_api_key
from server.config import ApiKeyEntry

HS256_SECRET = "test-only-hs256-secret-0123456789-abcdefghijklmnopqrstuvwxyz-0123456789"
"""Long enough for RFC 7518 even as an HS512 key (PyJWT warns below that)."""

Metadata = tuple[tuple[str, str], ...]


def api_key(subject: str, *, act_for_users: bool = False) -> tuple[str, ApiKeyEntry]:
    """A new key and the configuration entry that accepts it."""
    key = new_api_key()
    return key, ApiKeyEntry(subject=subject, sha256=hash_api_key(key), act_for_users=act_for_users)


def bearer(token: str, *, user: str | None = None) -> Metadata:
    """Call metadata carrying ``token``, optionally acting for ``user``."""
    metadata: list[tuple[str, str]] = [("authorization", f"Bearer {token}")]
    if user is not None:
        metadata.append(("x-chatstream-user", user))
    return tuple(metadata)


def jwt_token(
    subject: str | None,
    *,
    key: str | bytes = HS256_SECRET,
    algorithm: str = "HS256",
    expires_in_s: float | None = 300,
    headers: dict[str, str] | None = None,
    claims: Mapping[str, object] | None = None,
) -> str:
    """A signed JWT; ``subject``/``expires_in_s`` None leave ``sub``/``exp`` out."""
    payload: dict[str, object] = {"iat": int(time.time()), **(claims or {})}
    if subject is not None:
        payload["sub"] = subject
    if expires_in_s is not None:
        payload["exp"] = int(time.time() + expires_in_s)
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An asymmetric signing key in PEM form."""

    private_pem: bytes
    public_pem: bytes

    def jwk(self, *, kid: str, algorithm: str) -> dict[str, object]:
        """The public key as a JWK, as an identity provider publishes it."""
        algo = jwt.get_algorithm_by_name(algorithm)
        public: dict[str, object] = json.loads(algo.to_jwk(algo.prepare_key(self.public_pem)))
        return {**public, "kid": kid, "alg": algorithm, "use": "sig"}


def rsa_keys() -> KeyPair:
    """A 2048-bit RSA key pair for RS256."""
    return _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_keys() -> KeyPair:
    """A P-256 key pair for ES256."""
    return _pem_pair(ec.generate_private_key(ec.SECP256R1()))


def _pem_pair(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> KeyPair:
    return KeyPair(
        private_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        public_pem=key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def write_jwks(path: Path, keys: Sequence[dict[str, object]]) -> Path:
    """Writes a JWKS document and returns its path."""
    path.write_text(json.dumps({"keys": list(keys)}))
    return path


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Writes ``name.crt`` and ``name.key``; returns (cert, key) paths."""
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates (EC P-256, one day)."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate: what peers trust."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, name: str) -> Path:
        """Writes the CA certificate as ``name.crt``."""
        path = directory / f"{name}.crt"
        path.write_bytes(self.cert_pem)
        return path

    def issue_server(
        self, *, dns: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",)
    ) -> Issued:
        """A server certificate for loopback."""
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        return self._issue(dns[0], names, ExtendedKeyUsageOID.SERVER_AUTH)

    def issue_client(self, common_name: str, *, uris: Sequence[str] = ()) -> Issued:
        """A client certificate; its identity is the first URI SAN, else the common name."""
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        return self._issue(common_name, names, ExtendedKeyUsageOID.CLIENT_AUTH)

    def _issue(self, common_name: str, names: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
