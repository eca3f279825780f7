"""Who is calling: bearer tokens (hashed at rest, compared in constant time) resolved to the
practitioner or claims system they belong to, cached per worker until the store changes.

A token reads `cg1.<token id>.<secret>`; the store keeps the id and SHA-256 of the secret only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from fastpath import Practitioner, rules
from service.store import CredentialRecord, Store

TOKEN_PREFIX = "cg1"
ROLES = ("practitioner", "claims")
_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class AuthFailure:
    """A refusal ready to send: gRPC code and google.rpc.Status bytes."""

    code: int
    status: bytes


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


class Authenticator:
    """Resolves tokens to callers. Cached answers are dropped as soon as the store's generation
    moves (any token, practitioner or suspension change), so revocations apply on the next call."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cache: OrderedDict[str, Practitioner] = OrderedDict()
        self._generation = -1

    def authenticate(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, role: str
    ) -> Practitioner | AuthFailure:
        token = bearer_token(metadata)
        if token is None:
            return MISSING
        generation = self._store.generation()
        if generation != self._generation:
            self._cache.clear()
            self._generation = generation
        caller = self._cache.get(token)
        if caller is None:
            caller_or_failure = self._resolve(token)
            if isinstance(caller_or_failure, AuthFailure):
                return caller_or_failure
            caller = caller_or_failure
            self._cache[token] = caller
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        if caller.role != role:
            return wrong_role(role)
        if caller.status == "suspended":
            return SUSPENDED
        return caller

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
        return Practitioner(
            practitioner_id=record.practitioner_id,
            profession=record.profession,
            role="practitioner",
            amc_numbers=frozenset(record.amc_numbers),
            status=record.status,
        )
