"""Who is calling: bearer tokens (hashed at rest, compared in constant time) and mTLS client
certificates, resolved to the practitioner or claims system they belong to, cached per worker until
the store changes.

A token reads `cg1.<token id>.<secret>`; the store keeps the id and SHA-256 of the secret only.
A certificate names its subject in a SAN URI `urn:covergate:practitioner:<id>` (or
`urn:covergate:claims:<id>`), else in its CN; its SHA-256 fingerprint can be pinned.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from fastpath import Practitioner, rules
from service.config import AuthSettings
from service.store import CredentialRecord, PractitionerRecord, Store

TOKEN_PREFIX = "cg1"
ROLES = ("practitioner", "claims")
_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class AuthFailure:
    """A refusal ready to send: gRPC code and google.rpc.Status bytes; and, when the credential
    was good but its holder may not look anything up (suspended, wrong role), who it was, so that
    the attempt is still traced."""

    code: int
    status: bytes
    practitioner: Practitioner | None = None


MISSING = AuthFailure(
    rules.UNAUTHENTICATED,
    rules.error_info_status(
        rules.UNAUTHENTICATED,
        "CREDENTIAL_MISSING",
        "a credential is required: authorization: Bearer <token>",
    ),
)
INVALID = AuthFailure(
    rules.UNAUTHENTICATED,
    rules.error_info_status(
        rules.UNAUTHENTICATED, "CREDENTIAL_INVALID", "the credential is unknown or revoked"
    ),
)
MISMATCH = AuthFailure(
    rules.UNAUTHENTICATED,
    rules.error_info_status(
        rules.UNAUTHENTICATED,
        "CREDENTIAL_MISMATCH",
        "the token and the client certificate name different callers",
    ),
)
METHOD_NOT_ACCEPTED = AuthFailure(
    rules.UNAUTHENTICATED,
    rules.error_info_status(
        rules.UNAUTHENTICATED,
        "CREDENTIAL_METHOD_NOT_ACCEPTED",
        "this server does not accept that kind of credential",
    ),
)
CERTIFICATE_NOT_REGISTERED = AuthFailure(
    rules.UNAUTHENTICATED,
    rules.error_info_status(
        rules.UNAUTHENTICATED,
        "CERTIFICATE_NOT_REGISTERED",
        "this client certificate is not registered for its practitioner",
    ),
)
SUSPENDED = AuthFailure(
    rules.PERMISSION_DENIED,
    rules.error_info_status(
        rules.PERMISSION_DENIED, "PRACTITIONER_SUSPENDED", "the practitioner is suspended"
    ),
)


def wrong_role(needed: str) -> AuthFailure:
    return AuthFailure(
        rules.PERMISSION_DENIED,
        rules.error_info_status(
            rules.PERMISSION_DENIED,
            "ROLE_NOT_ALLOWED",
            f"this method needs a credential with role {needed}",
        ),
    )


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(store: Store, subject_id: str, role: str = "practitioner") -> str:
    """Create and store a new token; the returned string is the only copy there will be."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if role == "practitioner" and store.practitioner(subject_id) is None:
        raise KeyError(subject_id)
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    store.add_credential(
        CredentialRecord(
            token_id=token_id,
            practitioner_id=subject_id,
            role=role,
            secret_sha256=_secret_hash(secret),
            created_at=time.time(),
        )
    )
    return f"{TOKEN_PREFIX}.{token_id}.{secret}"


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


@dataclass(frozen=True)
class CertificateSubject:
    subject_id: str
    role: str
    fingerprint: str  # SHA-256 of the DER certificate, hex


_SAN_PREFIXES = {"urn:covergate:practitioner:": "practitioner", "urn:covergate:claims:": "claims"}


@lru_cache(maxsize=4096)
def certificate_subject(pem: bytes) -> CertificateSubject | None:
    """Who a (CA-verified) client certificate names, or None if it names nobody usable."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        for prefix, role in _SAN_PREFIXES.items():
            if uri.startswith(prefix) and uri[len(prefix) :]:
                return CertificateSubject(uri[len(prefix) :], role, fingerprint)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names and isinstance(names[0].value, str) and names[0].value:
        return CertificateSubject(names[0].value, "practitioner", fingerprint)
    return None


def peer_certificate(auth_context: dict[str, Any] | None) -> bytes | None:
    """The verified client certificate (PEM) from a gRPC auth context, if the peer sent one."""
    if not auth_context:
        return None
    pems = auth_context.get("x509_pem_cert")
    return pems[0] if pems else None


class Authenticator:
    """Resolves tokens to callers. Cached answers are dropped as soon as the store's generation
    moves (any token, practitioner or suspension change), so revocations apply on the next call."""

    def __init__(
        self,
        store: Store,
        settings: AuthSettings | None = None,
        practitioner_factory: Any = None,
    ) -> None:
        self._store = store
        settings = settings or AuthSettings()
        self._accept_tokens = "token" in settings.methods
        self._accept_certificates = "certificate" in settings.methods
        self._pin = settings.pin_certificates
        # Builds the fast path's view of a practitioner (scope, quota profile) from its record.
        self._practitioner = practitioner_factory or _plain_practitioner
        self._cache: OrderedDict[tuple[str | None, bytes | None], Practitioner] = OrderedDict()
        self._generation = -1

    def authenticate(
        self,
        metadata: Sequence[tuple[str, str | bytes]] | None,
        role: str,
        certificate: bytes | None = None,
    ) -> Practitioner | AuthFailure:
        token = bearer_token(metadata)
        if not self._accept_certificates:
            certificate = None
        if token is None and certificate is None:
            return MISSING
        generation = self._store.generation()
        if generation != self._generation:
            self._cache.clear()
            self._generation = generation
        key = (token, certificate)
        caller = self._cache.get(key)
        if caller is None:
            caller_or_failure = self._resolve_credentials(token, certificate)
            if isinstance(caller_or_failure, AuthFailure):
                return caller_or_failure
            caller = caller_or_failure
            self._cache[key] = caller
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        if caller.role != role:
            # Known, but not for this method: still an attempt to trace, as the caller's.
            return replace(wrong_role(role), practitioner=caller)
        if caller.status == "suspended":
            return replace(SUSPENDED, practitioner=caller)
        return caller

    def _resolve_credentials(
        self, token: str | None, certificate: bytes | None
    ) -> Practitioner | AuthFailure:
        by_token = None
        if token is not None:
            if not self._accept_tokens:
                return METHOD_NOT_ACCEPTED
            by_token = self._resolve(token)
            if isinstance(by_token, AuthFailure):
                return by_token
        if certificate is None:
            assert by_token is not None
            return by_token
        subject = certificate_subject(certificate)
        if subject is None:
            return INVALID
        if isinstance(by_token, Practitioner) and (
            by_token.practitioner_id != subject.subject_id or by_token.role != subject.role
        ):
            return MISMATCH
        if subject.role == "claims":
            return by_token or Practitioner(practitioner_id=subject.subject_id, role="claims")
        record = self._store.practitioner(subject.subject_id)
        if record is None or record.status == "revoked":
            return INVALID
        if (self._pin or record.cert_fingerprints) and not any(
            hmac.compare_digest(subject.fingerprint, f) for f in record.cert_fingerprints
        ):
            return CERTIFICATE_NOT_REGISTERED
        return by_token or self._practitioner(record)

    def _resolve(self, token: str) -> Practitioner | AuthFailure:
        prefix, _, rest = token.partition(".")
        token_id, _, secret = rest.partition(".")
        if prefix != TOKEN_PREFIX or not token_id or not secret or len(token) > 256:
            return INVALID
        credential = self._store.credential(token_id)
        if credential is None:
            # Same work as a known id, so timing does not tell which ids exist.
            hmac.compare_digest(_secret_hash(secret), "0" * 64)
            return INVALID
        if not hmac.compare_digest(_secret_hash(secret), credential.secret_sha256):
            return INVALID
        if credential.role == "claims":
            return Practitioner(practitioner_id=credential.practitioner_id, role="claims")
        record = self._store.practitioner(credential.practitioner_id)
        if record is None or record.status == "revoked":
            return INVALID
        return self._practitioner(record)


def _plain_practitioner(record: PractitionerRecord) -> Practitioner:
    return Practitioner(
        practitioner_id=record.practitioner_id,
        profession=record.profession,
        role="practitioner",
        amc_numbers=frozenset(record.amc_numbers),
        status=record.status,
    )
