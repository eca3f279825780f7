"""The domain rules both fast-path implementations share: field formats, keyed hashes, the rights
record layout, attestation format and the google.rpc error payloads.

Everything here is pure Python and deterministic; the Cython gate re-implements the per-item parts
in C and is differential-tested against the reference gate that calls these functions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import operator
import struct
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from fastpath.baselines import BaselineProfile
from fastpath.quota import PROFILE_VIEW, QuotaProfile

PARIS = ZoneInfo("Europe/Paris")

# -- care domains -------------------------------------------------------------------------------

DOMAIN_CODES: dict[str, int] = {
    "PHAR": 1,
    "MEDE": 2,
    "HOSP": 3,
    "DENT": 4,
    "OPTI": 5,
    "AUDI": 6,
    "LABO": 7,
    "AUXM": 8,
    "RADI": 9,
    "TRAN": 10,
}
DOMAIN_NAMES: dict[int, str] = {v: k for k, v in DOMAIN_CODES.items()}
MAX_DOMAIN = 10
ALL_DOMAINS = sum(1 << d for d in DOMAIN_NAMES)

# -- decisions (covergate.v1.Decision) ------------------------------------------------------------

DECISION_UNSPECIFIED = 0
DECISION_COVERED = 1
DECISION_NOT_COVERED = 2
DECISION_NO_MATCH = 3

# -- request fields, by protobuf field number ------------------------------------------------------

F_REQUEST_ID = 1
F_NIR = 2
F_NIR_KEY = 3
F_BIRTH_DATE = 4
F_BIRTH_RANK = 5
F_AMC_NUMBER = 6
F_MEMBER_NUMBER = 7
F_DOMAIN = 8
F_CARE_DATE = 9

FIELD_NAMES: dict[int, str] = {
    F_REQUEST_ID: "request_id",
    F_NIR: "nir",
    F_NIR_KEY: "nir_key",
    F_BIRTH_DATE: "birth_date",
    F_BIRTH_RANK: "birth_rank",
    F_AMC_NUMBER: "amc_number",
    F_MEMBER_NUMBER: "member_number",
    F_DOMAIN: "domain",
    F_CARE_DATE: "care_date",
}

# What a valid value looks like. Never the value that was sent: these go back to the caller.
FIELD_RULES: dict[int, str] = {
    F_REQUEST_ID: "at most 64 printable ASCII characters",
    F_NIR: "13 characters: digits, with 2A or 2B allowed at positions 6-7",
    F_NIR_KEY: "2 digits equal to 97 - (nir mod 97), 2A counting as 19 and 2B as 18",
    F_BIRTH_DATE: "YYYYMMDD from 1850 on; day and/or month may be 00",
    F_BIRTH_RANK: "an integer from 1 to 9",
    F_AMC_NUMBER: "1 to 10 digits",
    F_MEMBER_NUMBER: "empty, or 1 to 20 letters and digits",
    F_DOMAIN: "a CareDomain other than CARE_DOMAIN_UNSPECIFIED",
    F_CARE_DATE: "empty (today), or a calendar date YYYYMMDD between 1900 and 2199",
}

MAX_REQUEST_ID = 64
MAX_MEMBER_NUMBER = 20
MAX_AMC_NUMBER = 10
MAX_CONVENTION_TYPE = 16

ERROR_DOMAIN = "covergate.v1"

# -- field checks ----------------------------------------------------------------------------------

_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def days_in_month(year: int, month: int) -> int:
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29
    return _DAYS_IN_MONTH[month - 1]


def _digits(s: str) -> bool:
    # str.isdigit() accepts non-ASCII digits; the contract is ASCII.
    return s.isascii() and s.isdigit()


def valid_request_id(s: str) -> bool:
    return len(s) <= MAX_REQUEST_ID and all(" " <= c <= "~" for c in s)


def normalise_nir(s: str) -> str:
    """Corsican department letters are accepted in either case; everything else is as printed."""
    return s.upper() if len(s) == 13 else s


def valid_nir(nir: str) -> bool:
    """`nir` already normalised."""
    if len(nir) != 13 or not nir.isascii():
        return False
    if nir[0] not in "123478":
        return False
    middle = nir[5:7]
    if not (_digits(middle) or middle in ("2A", "2B")):
        return False
    return _digits(nir[:5]) and _digits(nir[7:])


def nir_number(nir: str) -> int:
    """The integer the key is computed on: 2A counts as 19, 2B as 18."""
    middle = nir[5:7]
    if middle == "2A":
        middle = "19"
    elif middle == "2B":
        middle = "18"
    return int(nir[:5] + middle + nir[7:])


def nir_key_for(nir: str) -> int:
    return 97 - nir_number(nir) % 97


def valid_nir_key_format(key: str) -> bool:
    return len(key) == 2 and _digits(key)


def valid_birth_date(s: str) -> bool:
    """Lunar dates (unknown day and/or month, printed 00) are legitimate birth dates."""
    if len(s) != 8 or not _digits(s):
        return False
    year, month, day = int(s[:4]), int(s[4:6]), int(s[6:])
    if year < 1850 or month > 12 or day > 31:
        return False
    return not (month and day and day > days_in_month(year, month))


def valid_calendar_date(s: str, min_year: int = 1900, max_year: int = 2199) -> bool:
    if len(s) != 8 or not _digits(s):
        return False
    year, month, day = int(s[:4]), int(s[4:6]), int(s[6:])
    if not (min_year <= year <= max_year) or not 1 <= month <= 12:
        return False
    return 1 <= day <= days_in_month(year, month)


def valid_amc_number(s: str) -> bool:
    return 1 <= len(s) <= MAX_AMC_NUMBER and _digits(s)


def valid_member_number(s: str) -> bool:
    return len(s) <= MAX_MEMBER_NUMBER and s.isascii() and (s == "" or s.isalnum())


def valid_convention_type(s: str) -> bool:
    return 1 <= len(s) <= MAX_CONVENTION_TYPE and s.isascii() and s.isalnum()


def valid_practitioner_id(s: str) -> bool:
    """RPPS (11 digits), ADELI or FINESS (9 digits): 9 to 14 digits."""
    return 9 <= len(s) <= 14 and _digits(s)


def identity_bytes(nir: str, birth_date: str, birth_rank: int) -> bytes:
    """The normalised identity every keyed hash is computed on (22 ASCII bytes)."""
    return f"{nir}{birth_date}{birth_rank}".encode("ascii")


# -- keyed hashes ----------------------------------------------------------------------------------

# BLAKE2b personalisation strings keep each use of the pepper independent of the others.
PERSON_STORE = b"cg.store.v1"
PERSON_MEMBER = b"cg.member.v1"
PERSON_PSEUDONYM = b"cg.pseudo.v1"
PERSON_ATTEST = b"cg.attest.v1"
PERSON_ATTEST_KEY = b"cg.attkey.v1"
PERSON_FINGERPRINT = b"cg.fprint.v1"

STORAGE_KEY_SIZE = 16
MEMBER_HASH_SIZE = 16
PSEUDONYM_SIZE = 8
BENEFICIARY_TAG_SIZE = 8


_M64 = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def siphash24(key: bytes, data: bytes) -> bytes:
    """SipHash-2-4 (the reference algorithm; fastpath/cg_siphash.h is its C twin): 8 bytes."""
    k0, k1 = struct.unpack("<QQ", key)
    v0 = 0x736F6D6570736575 ^ k0
    v1 = 0x646F72616E646F6D ^ k1
    v2 = 0x6C7967656E657261 ^ k0
    v3 = 0x7465646279746573 ^ k1

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & _M64
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _M64
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _M64
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _M64
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)

    whole = len(data) - len(data) % 8
    for (m,) in struct.iter_unpack("<Q", data[:whole]):
        v3 ^= m
        rounds(2)
        v0 ^= m
    b = (len(data) & 0xFF) << 56 | int.from_bytes(data[whole:], "little")
    v3 ^= b
    rounds(2)
    v0 ^= b
    v2 ^= 0xFF
    rounds(4)
    return struct.pack("<Q", v0 ^ v1 ^ v2 ^ v3)


@dataclass(frozen=True)
class Keys:
    """Everything derived from the pepper. The pepper never leaves this object."""

    pepper: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 16 <= len(self.pepper) <= 64:
            raise ValueError("the pepper must be 16 to 64 bytes")

    def storage_key(self, identity: bytes) -> bytes:
        return hashlib.blake2b(
            identity, digest_size=STORAGE_KEY_SIZE, key=self.pepper, person=PERSON_STORE
        ).digest()

    def member_hash(self, storage_key: bytes, member_number: str) -> bytes:
        return hashlib.blake2b(
            member_number.encode("ascii"),
            digest_size=MEMBER_HASH_SIZE,
            key=self.pepper,
            salt=storage_key,
            person=PERSON_MEMBER,
        ).digest()

    def pseudonym(self, identity: bytes) -> bytes:
        """Beneficiary pseudonym for traces: distinct from, and not linkable to, the storage key
        without the pepper. SipHash-2-4 of the storage key under a key of its own: a lookup
        computes the storage key anyway, and SipHash costs 20 ns where a third BLAKE2b cost
        ~400 ns a traced lookup."""
        return siphash24(self.pseudonym_key, self.storage_key(identity))

    @property
    def pseudonym_key(self) -> bytes:
        return hashlib.blake2b(
            b"siphash-2-4", digest_size=16, key=self.pepper, person=PERSON_PSEUDONYM
        ).digest()

    def beneficiary_tag(self, identity: bytes) -> bytes:
        return hashlib.blake2b(
            identity, digest_size=BENEFICIARY_TAG_SIZE, key=self.pepper, person=PERSON_ATTEST
        ).digest()

    @property
    def attestation_key(self) -> bytes:
        return hashlib.blake2b(
            b"", digest_size=32, key=self.pepper, person=PERSON_ATTEST_KEY
        ).digest()

    @property
    def fingerprint(self) -> str:
        """Recorded with the data so a server started with the wrong pepper refuses to serve."""
        return hashlib.blake2b(
            b"", digest_size=16, key=self.pepper, person=PERSON_FINGERPRINT
        ).hexdigest()


# -- rights records --------------------------------------------------------------------------------
#
# One LMDB value per beneficiary (storage key), holding every right row of that beneficiary:
#   u8 version=1, u16 row count, then per row:
#   u8 domain, u8 rate_percent, u32 start YYYYMMDD, u32 end YYYYMMDD, u8 flags (bit 0: member hash),
#   u8 amc length, amc bytes, u8 convention length, convention bytes, [16-byte member hash]
# All integers little-endian. No NIR, birth date or member number appears in it.

RECORD_VERSION = 1
_ROW_HEAD = struct.Struct("<BBIIBB")
_REC_HEAD = struct.Struct("<BH")
FLAG_MEMBER = 1


@dataclass(frozen=True)
class RightRow:
    domain: int
    rate_percent: int
    start: int
    end: int
    amc_number: str
    convention_type: str
    member_hash: bytes | None


def encode_record(rows: list[RightRow]) -> bytes:
    out = [_REC_HEAD.pack(RECORD_VERSION, len(rows))]
    for r in rows:
        amc = r.amc_number.encode("ascii")
        conv = r.convention_type.encode("ascii")
        flags = FLAG_MEMBER if r.member_hash is not None else 0
        out.append(_ROW_HEAD.pack(r.domain, r.rate_percent, r.start, r.end, flags, len(amc)))
        out.append(amc)
        out.append(bytes((len(conv),)))
        out.append(conv)
        if r.member_hash is not None:
            out.append(r.member_hash)
    return b"".join(out)


def decode_record(value: bytes) -> list[RightRow]:
    version, count = _REC_HEAD.unpack_from(value, 0)
    if version != RECORD_VERSION:
        raise ValueError("unknown rights record version")
    pos = _REC_HEAD.size
    rows = []
    for _ in range(count):
        domain, rate, start, end, flags, amc_len = _ROW_HEAD.unpack_from(value, pos)
        pos += _ROW_HEAD.size
        amc = value[pos : pos + amc_len].decode("ascii")
        pos += amc_len
        conv_len = value[pos]
        pos += 1
        conv = value[pos : pos + conv_len].decode("ascii")
        pos += conv_len
        member = None
        if flags & FLAG_MEMBER:
            member = bytes(value[pos : pos + MEMBER_HASH_SIZE])
            pos += MEMBER_HASH_SIZE
        rows.append(RightRow(domain, rate, start, end, amc, conv, member))
    return rows


# -- practitioners as the gate sees them -----------------------------------------------------------


@dataclass(frozen=True)
class Practitioner:
    """The authenticated caller, resolved from its credential before the gate is called."""

    practitioner_id: str
    profession: str = ""
    role: str = "practitioner"
    # Insurers (AMC numbers) the practitioner has an agreement with; None: no agreement check,
    # for exercising the decision alone in tests. Production callers always carry a set.
    amc_numbers: frozenset[str] | None = None
    status: str = "active"
    slot: int = -1  # quota slot in the shared state; -1: no quotas (decision-only tests)
    domains: int = ALL_DOMAINS  # bit (1 << CareDomain) per domain the profession may check
    quota: QuotaProfile | None = None
    # When its own past makes a lookup stand out (fastpath.baselines); None: no baseline kept.
    baseline: BaselineProfile | None = None
    # What the Cython gate reads of all this on every call, packed once (PRACTITIONER_VIEW:
    # slot, domains, whether there is a profile, then QuotaProfile.packed or zeros).
    gate_view: bytes = field(init=False, repr=False, compare=False)
    # amc_numbers for the Cython gate's scope check, packed once: AMC_VIEW_ENTRY bytes per insurer
    # (its length, then its digits, zero-padded); None when amc_numbers is. Only well-formed AMC
    # numbers are kept: a request's AMC is validated before scope, so no other could match it.
    amc_view: bytes | None = field(init=False, repr=False, compare=False)
    # baseline's limits as the Cython gate reads them (BaselineProfile.packed), or None.
    baseline_view: bytes | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "baseline_view", self.baseline.packed if self.baseline is not None else None
        )
        slot = self.slot if self.slot >= 0 else -1
        object.__setattr__(
            self,
            "gate_view",
            PRACTITIONER_VIEW.pack(
                min(slot, (1 << 63) - 1), self.domains & _U64, self.quota is not None
            )
            + (self.quota.packed if self.quota is not None else _NO_PROFILE),
        )
        amc_view = None
        if self.amc_numbers is not None:
            amc_view = b"".join(
                bytes((len(a),)) + a.encode("ascii").ljust(MAX_AMC_NUMBER, b"\0")
                for a in sorted(a for a in self.amc_numbers if isinstance(a, str))
                if valid_amc_number(a)
            )
        object.__setattr__(self, "amc_view", amc_view)


PRACTITIONER_VIEW = struct.Struct("<qQq")
AMC_VIEW_ENTRY = 1 + MAX_AMC_NUMBER
_U64 = (1 << 64) - 1
_NO_PROFILE = bytes(PROFILE_VIEW.size)


# -- attestations ----------------------------------------------------------------------------------
#
# base64url(payload || HMAC-SHA256(attestation_key, payload)[:16]) where payload is
#   u8 version=1, u32 expires (unix seconds), u8 domain, u32 care date YYYYMMDD,
#   u8 amc length, amc, u8 practitioner id length, practitioner id, 8-byte beneficiary tag.
# The beneficiary tag is a keyed hash of the identity: the attestation names nobody.

ATTESTATION_VERSION = 1
ATTESTATION_MAC_SIZE = 16
_ATT_HEAD = struct.Struct(">BIBIB")


def encode_attestation(
    attestation_key: bytes,
    *,
    expires: int,
    domain: int,
    care_date: int,
    amc_number: str,
    practitioner_id: str,
    beneficiary_tag: bytes,
) -> str:
    amc = amc_number.encode("ascii")
    pid = practitioner_id.encode("utf-8")
    payload = b"".join(
        (
            _ATT_HEAD.pack(ATTESTATION_VERSION, expires, domain, care_date, len(amc)),
            amc,
            bytes((len(pid),)),
            pid,
            beneficiary_tag,
        )
    )
    mac = hmac.digest(attestation_key, payload, "sha256")[:ATTESTATION_MAC_SIZE]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class AttestationClaims:
    expires: int
    domain: int
    care_date: int
    amc_number: str
    practitioner_id: str
    beneficiary_tag: bytes


def decode_attestation(attestation_key: bytes, token: str) -> AttestationClaims | str:
    """The verified claims, or the reason (MALFORMED, TAMPERED) they can't be trusted."""
    if not token.isascii() or len(token) > 512:
        return "MALFORMED"
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        return "MALFORMED"
    if len(raw) < _ATT_HEAD.size + 1 + BENEFICIARY_TAG_SIZE + ATTESTATION_MAC_SIZE:
        return "MALFORMED"
    payload, mac = raw[:-ATTESTATION_MAC_SIZE], raw[-ATTESTATION_MAC_SIZE:]
    expected = hmac.digest(attestation_key, payload, "sha256")[:ATTESTATION_MAC_SIZE]
    if not hmac.compare_digest(mac, expected):
        return "TAMPERED"
    version, expires, domain, care_date, amc_len = _ATT_HEAD.unpack_from(payload, 0)
    if version != ATTESTATION_VERSION:
        return "MALFORMED"
    pos = _ATT_HEAD.size
    amc = payload[pos : pos + amc_len].decode("ascii")
    pos += amc_len
    pid_len = payload[pos]
    pos += 1
    pid = payload[pos : pos + pid_len].decode("utf-8")
    pos += pid_len
    tag = payload[pos:]
    if len(tag) != BENEFICIARY_TAG_SIZE:
        return "MALFORMED"
    return AttestationClaims(expires, domain, care_date, amc, pid, tag)


# -- google.rpc error payloads ---------------------------------------------------------------------
#
# Built once per distinct error and cached: the set is small (a bit mask of invalid fields, a few
# reasons) and both gates return these exact bytes, so their errors cannot drift apart.

OK = code_pb2.OK
INVALID_ARGUMENT = code_pb2.INVALID_ARGUMENT
PERMISSION_DENIED = code_pb2.PERMISSION_DENIED
UNAUTHENTICATED = code_pb2.UNAUTHENTICATED
RESOURCE_EXHAUSTED = code_pb2.RESOURCE_EXHAUSTED
UNAVAILABLE = code_pb2.UNAVAILABLE
DEADLINE_EXCEEDED = code_pb2.DEADLINE_EXCEEDED


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def status_bytes(code: int, message: str, *details: object) -> bytes:
    return status_pb2.Status(
        code=code, message=message, details=[_pack(d) for d in details]
    ).SerializeToString()


@lru_cache(maxsize=1024)
def invalid_fields_status(mask: int) -> bytes:
    """INVALID_ARGUMENT for the fields whose bit (1 << field number) is set in `mask`."""
    names = [n for f, n in FIELD_NAMES.items() if mask & (1 << f)]
    violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=FIELD_NAMES[f], description=FIELD_RULES[f]
        )
        for f in FIELD_NAMES
        if mask & (1 << f)
    ]
    return status_bytes(
        INVALID_ARGUMENT,
        "invalid field(s): " + ", ".join(names),
        error_details_pb2.BadRequest(field_violations=violations),
    )


@lru_cache(maxsize=8)
def malformed_message_status(what: str) -> bytes:
    return status_bytes(
        INVALID_ARGUMENT,
        f"the request is not a valid {what} message",
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="", description=f"a serialized covergate.v1.{what}"
                )
            ]
        ),
    )


@lru_cache(maxsize=8)
def batch_too_large_status(max_items: int) -> bytes:
    return status_bytes(
        INVALID_ARGUMENT,
        f"a batch holds at most {max_items} items",
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="items", description=f"at most {max_items} items"
                )
            ]
        ),
    )


@lru_cache(maxsize=64)
def error_info_status(code: int, reason: str, message: str) -> bytes:
    return status_bytes(
        code, message, error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    )


# Refusals by reason. Scope and suspension never depend on the request's values.
REASON_DOMAIN = "DOMAIN_OUT_OF_SCOPE"
REASON_AMC = "AMC_OUT_OF_SCOPE"
REASON_SUSPENDED = "PRACTITIONER_SUSPENDED"
REASON_RATE = "RATE_LIMITED"
REASON_DAILY = "DAILY_LIMIT"
REASON_DISTINCT = "DISTINCT_LIMIT"
# Refusals that are the service's, not the caller's (traced and counted all the same).
REASON_QUOTA_STATE = "QUOTA_STATE_UNAVAILABLE"
REASON_NOT_LOADED = "DATA_NOT_LOADED"
REASON_ROLE = "ROLE_NOT_ALLOWED"
REASON_DEADLINE = "DEADLINE_EXCEEDED"
REASON_BACKLOG = "AUDIT_BACKLOG"
REASON_CANCELLED = "CANCELLED"
REASON_BACKEND = "QUOTA_BACKEND_UNAVAILABLE"

# With [cluster]: how a gate treats a lookup its host holds no credit for (fastpath.quota's credit
# file). SPEND: set it aside (code SHORT, nothing counted) so that the server fetches credit and
# asks again; LIMIT: Redis granted what it could, refuse as the limit refuses; BACKEND: Redis is
# unreachable, refuse QUOTA_BACKEND_UNAVAILABLE; OPEN: fail-open (an explicit opt-in): admit.
CREDIT_SPEND, CREDIT_LIMIT, CREDIT_BACKEND, CREDIT_OPEN = 0, 1, 2, 3
SHORT = -1  # the code of a lookup set aside for want of credit (never sent to a client)

DOMAIN_OUT_OF_SCOPE = error_info_status(
    PERMISSION_DENIED, REASON_DOMAIN, "this care domain is outside the practitioner's profession"
)
AMC_OUT_OF_SCOPE = error_info_status(
    PERMISSION_DENIED, REASON_AMC, "the practitioner has no agreement with this insurer"
)
PRACTITIONER_SUSPENDED = error_info_status(
    PERMISSION_DENIED, REASON_SUSPENDED, "the practitioner is suspended"
)
# A gate with quotas on that cannot reach the caller's quota state (no slot, no profile, a slot
# beyond the mapped file, or a gate closed because it was replaced) refuses: missing state never
# means "unlimited".
QUOTA_STATE_UNAVAILABLE = error_info_status(
    UNAVAILABLE, REASON_QUOTA_STATE, "the quota state is not available; retry shortly"
)

# The audit spool is full (service.spool, when_full = "refuse"): no answer without its record.
AUDIT_BACKLOG = status_bytes(
    UNAVAILABLE,
    "the audit trail is behind; retry shortly",
    error_details_pb2.ErrorInfo(reason=REASON_BACKLOG, domain=ERROR_DOMAIN),
    error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=5)),
)
QUOTA_BACKEND_UNAVAILABLE = status_bytes(
    UNAVAILABLE,
    "the shared quota backend is unreachable and this host's credit is spent; retry shortly",
    error_details_pb2.ErrorInfo(reason=REASON_BACKEND, domain=ERROR_DOMAIN),
    error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2)),
)
DEADLINE_PASSED = error_info_status(
    DEADLINE_EXCEEDED, REASON_DEADLINE, "the call's deadline had passed before it was decided"
)
DATA_NOT_LOADED = error_info_status(
    UNAVAILABLE, REASON_NOT_LOADED, "coverage data is not loaded yet; retry later"
)

_QUOTA_TEXT = {
    REASON_RATE: ("lookups per minute", "too many lookups in a short time"),
    REASON_DAILY: ("lookups per day", "the daily lookup limit is reached"),
    REASON_DISTINCT: ("distinct beneficiaries per day", "the daily beneficiary limit is reached"),
}


@lru_cache(maxsize=256)
def quota_status(reason: str, retry_seconds: int) -> bytes:
    """RESOURCE_EXHAUSTED with QuotaFailure, a coarse RetryInfo and ErrorInfo."""
    what, message = _QUOTA_TEXT[reason]
    return status_bytes(
        RESOURCE_EXHAUSTED,
        message,
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject="practitioner", description=what)
            ]
        ),
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_seconds)),
        error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN),
    )


def rate_retry_seconds(wait_ms: int) -> int:
    """Coarse: whole seconds, at least one."""
    return max(1, -(-wait_ms // 1000))


def day_retry_seconds(today: int, now: float) -> int:
    """Until the next Paris midnight, rounded up to the hour: coarse on purpose."""
    day = date(today // 10000, today // 100 % 100, today % 100)
    midnight = datetime.combine(day + timedelta(days=1), datetime.min.time(), PARIS)
    seconds = max(1, int(midnight.timestamp() - now))
    return -(-seconds // 3600) * 3600


def require_upb() -> None:
    """The gates rely on protobuf's upb backend: its DecodeError for every malformed message
    (the pure-Python backend raises UnicodeDecodeError for bad UTF-8) and, in the Cython gate, its
    canonical re-serialisation. Any other backend is refused at start, loudly."""
    from google.protobuf.internal import api_implementation

    if api_implementation.Type() != "upb":
        raise RuntimeError(
            "covergate needs protobuf's upb backend, not "
            f"{api_implementation.Type()!r} (unset PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION)"
        )


def batch_limit(value: object) -> int:
    """A gate's max_batch_items: an int from 0 to 1,000,000."""
    limit = operator.index(value)  # type: ignore[arg-type]
    if not 0 <= limit <= 1_000_000:
        raise ValueError("max_batch_items must be from 0 to 1000000")
    return limit


def count_batch_items(data: bytes, limit: int) -> int | None:
    """The `items` entries (field 1, length-delimited) at the top level of a serialized
    CheckCoverageBatchRequest, counted from its framing alone and only up to `limit` + 1: an
    oversize batch is refused without reading what follows. Unknown fields of the varint, fixed
    and length-delimited wire types are stepped over; None when the framing is anything else
    (a group, a bad wire type, a truncation): then the protobuf parser decides."""
    n = len(data)
    pos = count = 0
    while pos < n:
        tag, pos = _wire_varint(data, pos, 5)
        if tag < 0 or tag >> 3 == 0:
            return None
        wire = tag & 7
        if wire == 0:
            _, pos = _wire_varint(data, pos, 10)
            if pos < 0:
                return None
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > n:
                return None
        elif wire == 2:
            size, pos = _wire_varint(data, pos, 5)
            if size < 0 or size > n - pos:
                return None
            pos += size
            if tag == 0x0A:
                count += 1
                if count > limit:
                    return count
        else:
            return None
    return count


def _wire_varint(data: bytes, pos: int, max_bytes: int) -> tuple[int, int]:
    """(value, next position), or (-1, -1) when truncated or longer than max_bytes."""
    value = shift = 0
    for i in range(pos, min(len(data), pos + max_bytes)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return -1, -1
