"""Who is calling: credentials verified at the edge, and the owner every RPC is scoped to.

A call is authenticated once, by ``server.edge.EdgeInterceptor``, before its handler runs.
The interceptor turns the call's credential into a ``Principal`` and publishes it in a
context variable for the duration of the handler; ``CurrentPrincipal.owner()`` reads it
back inside the servicer. Credentials, in the order they are tried:

1. ``authorization: Bearer <token>`` where the token's SHA-256 matches a configured API key;
2. ``authorization: Bearer <jwt>`` verified with the configured HS256 secret, public key or
   JWKS (the accepted algorithm is pinned by the key, never taken from the token alone);
3. a client certificate verified by the configured client CA (mTLS), when no bearer
   token is sent.

A principal acts for itself (owner = its subject) unless it sends ``x-chatstream-user``
and its credential is explicitly allowed to act for users; then the owner is
``user:<id>``. The prefix keeps end users and services in separate namespaces, so a
service acting for users can never reach a service's own data, and no credential of
any kind (API key, JWT, certificate) may have a subject of that form: it would own a
user's data without any delegation.

``chatstream new-key SUBJECT`` (`server.cli.keys`) prints a new API key and the
configuration entry (its hash) for ``CHATSTREAM_API_KEYS``.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.config import ApiKeyEntry, AuthMode, Settings, SettingsError
from server.errors import ErrorReason, InvalidArgumentError, PermissionDeniedError, UnauthenticatedError

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

AUTHORIZATION_HEADER: Final = "authorization"
USER_HEADER: Final = "x-chatstream-user"
"""Metadata key naming the end user a service acts for."""
API_KEY_PREFIX: Final = "csk_"
"""Prefix of keys made by ``new_api_key``; the log redactor recognises it."""
SINGLE_OWNER: Final = "default"
"""The owner of every call when authentication is off (``CHATSTREAM_AUTH_MODE=none``)."""
USER_OWNER_PREFIX: Final = "user:"

_MAX_TOKEN_CHARS: Final = 8192
_MAX_SUBJECT_CHARS: Final = 256
_USER_ID: Final = re.compile(r"[A-Za-z0-9._@+-]{1,128}")
_JWT_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_ASYMMETRIC_ALGORITHMS: Final = frozenset({"RS256", "ES256"})


class Method(enum.StrEnum):
    """How a principal proved who it is."""

    NONE = "none"
    API_KEY = "api_key"
    JWT = "jwt"
    MTLS = "mtls"


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """A verified caller and the owner its call is scoped to."""

    subject: str
    """Who presented the credential: an API key's subject, a JWT ``sub``, a certificate identity."""
    method: Method
    """Which credential proved it."""
    owner: str
    """Whose data the call may touch: ``subject``, or ``user:<id>`` when acting for a user."""
    acting_for_user: bool = False
    """True when the owner came from ``x-chatstream-user``."""


_current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "chatstream_principal", default=None
)


def current_principal() -> Principal | None:
    """The principal the edge verified for the running call, if any."""
    return _current_principal.get()


def bind_principal(principal: Principal) -> contextvars.Token[Principal | None]:
    """Publishes ``principal`` to the running task; the edge calls this, then the handler."""
    return _current_principal.set(principal)


def unbind_principal(token: contextvars.Token[Principal | None]) -> None:
    """Undoes ``bind_principal``."""
    _current_principal.reset(token)


class Authenticator(Protocol):
    """Maps a call to the owner of the data it may touch."""

    def owner(self, context: grpc.aio.ServicerContext[RequestT, ResponseT]) -> str:
        """The verified owner; raises UnauthenticatedError when there is none."""
        ...


class CurrentPrincipal:
    """The owner the edge interceptor verified for this call.

    Fails closed: a handler reached without the interceptor (a wiring bug) gets
    UNAUTHENTICATED rather than someone's data.
    """

    def owner(self, context: grpc.aio.ServicerContext[RequestT, ResponseT]) -> str:
        """The verified owner of the running call."""
        principal = _current_principal.get()
        if principal is None:
            raise UnauthenticatedError(
                "missing credentials", reason=ErrorReason.ERROR_REASON_CREDENTIALS_MISSING
            )
        return principal.owner


def hash_api_key(key: str) -> str:
    """The hex SHA-256 of an API key, as stored in ``CHATSTREAM_API_KEYS``.

    A fast hash is enough: keys are 256-bit random strings, so there is nothing to
    brute-force, and every call pays for one hash.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh random API key (256 bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class _JwtKeys:
    """The keys JWTs may be signed with, each pinned to exactly one algorithm."""

    def __init__(self, settings: Settings) -> None:
        self.hs256: bytes | None = None
        if settings.auth.jwt_hs256_secret is not None:
            secret = settings.auth.jwt_hs256_secret.encode()
            if len(secret) < 32:
                # RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
                raise SettingsError("CHATSTREAM_JWT_HS256_SECRET must be at least 32 bytes")
            self.hs256 = secret
        self.public_key: tuple[str, bytes] | None = None
        if settings.auth.jwt_public_key_file is not None:
            self.public_key = _load_public_key(Path(settings.auth.jwt_public_key_file))
        self.jwks: dict[str, jwt.PyJWK] = {}
        if settings.auth.jwt_jwks_file is not None:
            self.jwks = _load_jwks(Path(settings.auth.jwt_jwks_file))

    @property
    def configured(self) -> bool:
        return self.hs256 is not None or self.public_key is not None or bool(self.jwks)

    def key_for(self, header: Mapping[str, object]) -> tuple[str, bytes | jwt.PyJWK] | None:
        """The (algorithm, key) a token with this header must verify against, or None."""
        algorithm = header.get("alg")
        if algorithm == "HS256" and self.hs256 is not None:
            return "HS256", self.hs256
        if algorithm not in _ASYMMETRIC_ALGORITHMS:
            return None
        kid = header.get("kid")
        if isinstance(kid, str) and kid in self.jwks:
            jwk: jwt.PyJWK | None = self.jwks[kid]
        elif kid is None and len(self.jwks) == 1:
            jwk = next(iter(self.jwks.values()))
        else:
            jwk = None
        if jwk is not None:
            return (jwk.algorithm_name, jwk) if jwk.algorithm_name == algorithm else None
        if self.public_key is not None and self.public_key[0] == algorithm:
            return self.public_key
        return None


def _load_public_key(path: Path) -> tuple[str, bytes]:
    try:
        loaded = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"CHATSTREAM_JWT_PUBLIC_KEY_FILE: cannot load {path}: {exc}") from None
    if isinstance(loaded, rsa.RSAPublicKey):
        if loaded.key_size < 2048:
            raise SettingsError("CHATSTREAM_JWT_PUBLIC_KEY_FILE: RSA keys must have at least 2048 bits")
        algorithm = "RS256"
    elif isinstance(loaded, ec.EllipticCurvePublicKey) and isinstance(loaded.curve, ec.SECP256R1):
        algorithm = "ES256"
    else:
        raise SettingsError("CHATSTREAM_JWT_PUBLIC_KEY_FILE must hold an RSA or P-256 public key")
    pem = loaded.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return algorithm, pem


def _load_jwks(path: Path) -> dict[str, jwt.PyJWK]:
    try:
        keys = jwt.PyJWKSet.from_json(path.read_text()).keys
    except (OSError, ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
        raise SettingsError(f"CHATSTREAM_JWT_JWKS_FILE: cannot load {path}: {exc}") from None
    loaded: dict[str, jwt.PyJWK] = {}
    for key in keys:
        if key.algorithm_name not in _ASYMMETRIC_ALGORITHMS:
            raise SettingsError(
                f"CHATSTREAM_JWT_JWKS_FILE: key {key.key_id!r} must declare alg RS256 or ES256, "
                f"not {key.algorithm_name!r}"
            )
        if key.key_id is None and len(keys) > 1:
            raise SettingsError("CHATSTREAM_JWT_JWKS_FILE: every key needs a kid when there are several")
        loaded[key.key_id or ""] = key
    if not loaded:
        raise SettingsError("CHATSTREAM_JWT_JWKS_FILE holds no keys")
    return loaded


class CredentialVerifier:
    """Turns a call's metadata and peer certificate into a Principal, or refuses it.

    Pure: no I/O per call, so a rejected call has no side effect at all.
    """

    def __init__(self, settings: Settings) -> None:
        """Validates the authentication settings; raises SettingsError if they are unusable."""
        self._mode = settings.auth.auth_mode
        self._api_keys: tuple[ApiKeyEntry, ...] = settings.auth.api_keys
        for entry in self._api_keys:
            if in_user_namespace(entry.subject):
                raise SettingsError(f"CHATSTREAM_API_KEYS: subject {entry.subject!r} uses a reserved prefix")
        self._jwt = _JwtKeys(settings)
        self._jwt_issuer = settings.auth.jwt_issuer
        self._jwt_audience = settings.auth.jwt_audience
        self._jwt_leeway_s = settings.auth.jwt_leeway_s
        self._jwt_act_for_users = frozenset(settings.auth.jwt_act_for_users)
        self._mtls = settings.tls.tls_client_ca_file is not None
        self._mtls_act_for_users = frozenset(settings.tls.tls_act_for_users)
        if self._mode is AuthMode.REQUIRED and not (self._api_keys or self._jwt.configured or self._mtls):
            raise SettingsError(
                "CHATSTREAM_AUTH_MODE is 'required' but no credential is configured: set "
                "CHATSTREAM_API_KEYS, a CHATSTREAM_JWT_* key or CHATSTREAM_TLS_CLIENT_CA_FILE "
                "(see docs/security.md), or CHATSTREAM_AUTH_MODE=none to run without authentication"
            )

    @property
    def mode(self) -> AuthMode:
        """Whether credentials are required at all."""
        return self._mode

    def verify(
        self, metadata: Sequence[tuple[str, str | bytes]], peer_identities: Sequence[str]
    ) -> Principal:
        """The principal a call with this metadata and these verified certificate identities is.

        Raises:
            UnauthenticatedError: the credential is missing, malformed, expired or unknown.
            PermissionDeniedError: ``x-chatstream-user`` from a credential not allowed to send it.
            InvalidArgumentError: ``x-chatstream-user`` is malformed.
        """
        if self._mode is AuthMode.NONE:
            return Principal(subject=SINGLE_OWNER, method=Method.NONE, owner=SINGLE_OWNER)
        authorization = _single_value(metadata, AUTHORIZATION_HEADER)
        if authorization is not None:
            principal, may_act_for_users = self._verify_bearer(authorization)
        elif self._mtls and peer_identities:
            subject = peer_identities[0]
            principal = Principal(subject=subject, method=Method.MTLS, owner=subject)
            may_act_for_users = any(i in self._mtls_act_for_users for i in peer_identities)
        else:
            raise UnauthenticatedError(
                "missing credentials", reason=ErrorReason.ERROR_REASON_CREDENTIALS_MISSING
            )
        if in_user_namespace(principal.subject):
            # Checked for every kind of credential, not only API keys at start-up: a JWT
            # ``sub`` or a certificate's URI SAN of ``user:alice`` would otherwise read
            # what a gateway stored while acting for end user alice.
            raise UnauthenticatedError(
                "the credential's subject is in the reserved user: namespace",
                reason=ErrorReason.ERROR_REASON_SUBJECT_RESERVED,
            )
        user = _single_value(metadata, USER_HEADER)
        if user is None:
            return principal
        if not may_act_for_users:
            raise PermissionDeniedError(
                "this credential may not act for users",
                reason=ErrorReason.ERROR_REASON_DELEGATION_NOT_ALLOWED,
            )
        if _USER_ID.fullmatch(user) is None:
            raise InvalidArgumentError.for_field(USER_HEADER, "must be 1-128 characters of [A-Za-z0-9._@+-]")
        return Principal(
            subject=principal.subject,
            method=principal.method,
            owner=USER_OWNER_PREFIX + user,
            acting_for_user=True,
        )

    def _verify_bearer(self, authorization: str) -> tuple[Principal, bool]:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_CHARS:
            raise UnauthenticatedError(
                "malformed credentials", reason=ErrorReason.ERROR_REASON_CREDENTIALS_INVALID
            )
        entry = self._match_api_key(token)
        if entry is not None:
            principal = Principal(subject=entry.subject, method=Method.API_KEY, owner=entry.subject)
            return principal, entry.act_for_users
        if self._jwt.configured and _JWT_SHAPE.fullmatch(token):
            subject = self._verify_jwt(token)
            principal = Principal(subject=subject, method=Method.JWT, owner=subject)
            return principal, subject in self._jwt_act_for_users
        raise UnauthenticatedError("invalid credentials", reason=ErrorReason.ERROR_REASON_CREDENTIALS_INVALID)

    def _match_api_key(self, token: str) -> ApiKeyEntry | None:
        digest = hash_api_key(token)
        found: ApiKeyEntry | None = None
        # Compare against every entry, without stopping early, so timing says nothing
        # about which or how many keys exist.
        for entry in self._api_keys:
            if hmac.compare_digest(digest, entry.sha256) and found is None:
                found = entry
        return found

    def _verify_jwt(self, token: str) -> str:
        invalid = UnauthenticatedError(
            "invalid credentials", reason=ErrorReason.ERROR_REASON_CREDENTIALS_INVALID
        )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise invalid from None
        chosen = self._jwt.key_for(header)
        if chosen is None:
            raise invalid
        algorithm, key = chosen
        required = ["exp", "sub"]
        if self._jwt_issuer is not None:
            required.append("iss")
        if self._jwt_audience is not None:
            required.append("aud")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self._jwt_issuer,
                audience=self._jwt_audience,
                leeway=self._jwt_leeway_s,
                options={"require": required, "verify_aud": self._jwt_audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise UnauthenticatedError(
                "credentials expired", reason=ErrorReason.ERROR_REASON_CREDENTIALS_EXPIRED
            ) from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            # Malformed base64, JSON or key material surfaces as ValueError/TypeError in
            # places; all of it is just an invalid credential to the caller.
            raise invalid from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not _printable(subject, _MAX_SUBJECT_CHARS):
            raise invalid
        return subject


def in_user_namespace(subject: str) -> bool:
    """Whether ``subject`` has the form of an owner made by acting for a user.

    Case-insensitive, so no later normalisation of subjects can make one collide.
    """
    return subject[: len(USER_OWNER_PREFIX)].lower() == USER_OWNER_PREFIX


def _printable(value: str, max_chars: int) -> bool:
    return 0 < len(value) <= max_chars and value.isprintable()


def _single_value(metadata: Iterable[tuple[str, str | bytes]], key: str) -> str | None:
    """The one value of ``key``; a repeated or binary value is a malformed credential."""
    values = [v for k, v in metadata if k == key]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        if key == USER_HEADER:
            raise InvalidArgumentError.for_field(USER_HEADER, "must be sent once, as text")
        raise UnauthenticatedError(
            "malformed credentials", reason=ErrorReason.ERROR_REASON_CREDENTIALS_INVALID
        )
    return values[0]
