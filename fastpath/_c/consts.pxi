# The numbers and layouts the C rooms share with fastpath.rules, fastpath.quota and
# fastpath.trace, each checked against its Python twin at import: a change there that this file
# does not follow must fail loudly, not drift.

# -- requests, responses, records, attestations (rules.py)

cdef enum:
    # covergate.v1.CheckCoverageRequest field numbers (rules.F_*)
    F_REQUEST_ID = 1
    F_NIR = 2
    F_NIR_KEY = 3
    F_BIRTH_DATE = 4
    F_BIRTH_RANK = 5
    F_AMC_NUMBER = 6
    F_MEMBER_NUMBER = 7
    F_DOMAIN = 8
    F_CARE_DATE = 9
    N_FIELDS = 10
    STRING_FIELDS = (
        (1 << F_REQUEST_ID) | (1 << F_NIR) | (1 << F_NIR_KEY) | (1 << F_BIRTH_DATE)
        | (1 << F_AMC_NUMBER) | (1 << F_MEMBER_NUMBER) | (1 << F_CARE_DATE)
    )

    WIRE_VARINT = 0
    WIRE_LEN = 2

    # CheckCoverageResponse tags (field number << 3 | wire type), in field order
    TAG_REQUEST_ID = 0x0A
    TAG_DECISION = 0x10
    TAG_RATE_PERCENT = 0x18
    TAG_CONVENTION_TYPE = 0x22
    TAG_RIGHTS_END_DATE = 0x2A
    TAG_ATTESTATION = 0x32
    TAG_ERROR = 0x3A
    # CheckCoverageBatchRequest / ...Response: repeated items = 1
    TAG_ITEMS = 0x0A

    DECISION_COVERED = 1
    DECISION_NOT_COVERED = 2
    DECISION_NO_MATCH = 3

    MAX_REQUEST_ID = 64
    MAX_AMC_NUMBER = 10
    MAX_MEMBER_NUMBER = 20
    MAX_DOMAIN = 10
    NIR_SIZE = 13
    BIRTH_DATE_SIZE = 8
    IDENTITY_SIZE = 22      # NIR, birth date, rank digit (rules.identity_bytes)

    RECORD_VERSION = 1
    ROW_HEAD_SIZE = 12      # domain, rate, start, end, flags, amc length
    FLAG_MEMBER = 1
    MEMBER_HASH_SIZE = 16
    STORAGE_KEY_SIZE = 16
    PSEUDONYM_SIZE = 8

    ATTESTATION_VERSION = 1
    ATTESTATION_MAC_SIZE = 16
    BENEFICIARY_TAG_SIZE = 8
    # version, expires, domain, care date, amc (+ length), practitioner id (+ length),
    # beneficiary tag
    MAX_ATTESTATION_PAYLOAD = 1 + 4 + 1 + 4 + 1 + 10 + 1 + 255 + 8

    # what _match_rights found
    MATCH_NONE = 0          # no row for this AMC (and member hash): NO_MATCH
    MATCH_CLOSED = 1        # rows, none open for the domain and date: NOT_COVERED
    MATCH_OPEN = 2          # COVERED by the row returned

_SHARED_CONSTANTS = {
    "F_REQUEST_ID": F_REQUEST_ID,
    "F_NIR": F_NIR,
    "F_NIR_KEY": F_NIR_KEY,
    "F_BIRTH_DATE": F_BIRTH_DATE,
    "F_BIRTH_RANK": F_BIRTH_RANK,
    "F_AMC_NUMBER": F_AMC_NUMBER,
    "F_MEMBER_NUMBER": F_MEMBER_NUMBER,
    "F_DOMAIN": F_DOMAIN,
    "F_CARE_DATE": F_CARE_DATE,
    "DECISION_COVERED": DECISION_COVERED,
    "DECISION_NOT_COVERED": DECISION_NOT_COVERED,
    "DECISION_NO_MATCH": DECISION_NO_MATCH,
    "MAX_REQUEST_ID": MAX_REQUEST_ID,
    "MAX_AMC_NUMBER": MAX_AMC_NUMBER,
    "MAX_MEMBER_NUMBER": MAX_MEMBER_NUMBER,
    "MAX_DOMAIN": MAX_DOMAIN,
    "RECORD_VERSION": RECORD_VERSION,
    "FLAG_MEMBER": FLAG_MEMBER,
    "MEMBER_HASH_SIZE": MEMBER_HASH_SIZE,
    "STORAGE_KEY_SIZE": STORAGE_KEY_SIZE,
    "PSEUDONYM_SIZE": PSEUDONYM_SIZE,
    "ATTESTATION_VERSION": ATTESTATION_VERSION,
    "ATTESTATION_MAC_SIZE": ATTESTATION_MAC_SIZE,
    "BENEFICIARY_TAG_SIZE": BENEFICIARY_TAG_SIZE,
}
for _name, _value in _SHARED_CONSTANTS.items():
    if getattr(rules, _name) != _value:
        raise ImportError(f"fastpath._gate_c is out of date with rules.{_name}")
if rules._ROW_HEAD.size != ROW_HEAD_SIZE:
    raise ImportError("fastpath._gate_c is out of date with the rights record layout")

# The gRPC codes of the refusals, looked up once: these run for every request.
_OK = rules.OK
_INVALID_ARGUMENT = rules.INVALID_ARGUMENT
_PERMISSION_DENIED = rules.PERMISSION_DENIED
_UNAVAILABLE = rules.UNAVAILABLE
_SHORT = rules.SHORT
_RESOURCE_EXHAUSTED = rules.RESOURCE_EXHAUSTED


# -- the practitioner's view and quota slot (rules.Practitioner, quota.py)

cdef enum:
    SHADOW_RATE = 1
    SHADOW_DAILY = 2
    SHADOW_DISTINCT = 4
    SHADOW_GUARD = 8
    QUOTA_HEADER_SIZE = 4096
    AMC_VIEW_ENTRY = 1 + MAX_AMC_NUMBER

cdef struct View:
    # rules.Practitioner.gate_view (rules.PRACTITIONER_VIEW + quota.PROFILE_VIEW): what a call
    # needs of the practitioner, read with one attribute access instead of a dozen.
    int64_t slot
    uint64_t domains
    int64_t has_profile
    int64_t interval_ms
    int64_t tolerance_ms
    int64_t daily_limit
    int64_t distinct_limit
    int64_t guard_window
    int64_t guard_min
    int64_t guard_percent
    int64_t shadow

if (quota.SHADOW_RATE, quota.SHADOW_DAILY, quota.SHADOW_DISTINCT, quota.SHADOW_GUARD) != (
    SHADOW_RATE, SHADOW_DAILY, SHADOW_DISTINCT, SHADOW_GUARD
) or quota.SLOT_SIZE != sizeof(cg_slot) or quota.SLOT_HEAD != 64 or (
    quota.HEADER_SIZE != QUOTA_HEADER_SIZE or quota.LOCK_ENTRY != CG_LOCK_ENTRY
) or rules.PRACTITIONER_VIEW.size + quota.PROFILE_VIEW.size != sizeof(View) or (
    rules.AMC_VIEW_ENTRY != AMC_VIEW_ENTRY
) or quota.CREDIT_ENTRY != sizeof(cg_credit) or quota.CREDIT_RING != CG_CREDIT_RING:
    raise ImportError("fastpath._gate_c is out of date with fastpath.quota")


# -- spans (trace.py)

cdef enum:
    O_COVERED = 0
    O_NOT_COVERED = 1
    O_NO_MATCH = 2
    O_INVALID = 3
    O_DOMAIN = 4
    O_AMC = 5
    O_SUSPENDED = 6
    O_RATE = 7
    O_DAILY = 8
    O_DISTINCT = 9
    O_QUOTA_STATE = 10
    O_BACKEND = 16
    N_OUTCOMES = 17
    # _count_lookup: a new beneficiary this host holds no cluster distinct credit for.
    CREDIT_SHORT = 100
    CREDIT_SPEND = 0
    CREDIT_LIMIT = 1
    CREDIT_BACKEND = 2
    CREDIT_OPEN = 3
    N_PROFESSIONS = 11
    WD_NONE = 0
    WD_RATE = 1
    WD_DAILY = 2
    WD_DISTINCT = 3
    WD_GUARD = 4
    METHOD_UNARY = 0
    METHOD_BATCH = 1
    METHOD_STREAM = 2
    NAME_LOOKUP = 3
    KIND_INTERNAL = 1
    KIND_SERVER = 2
    TRACE_ID_SIZE = 16
    SPAN_ID_SIZE = 8

if (
    (_trace.O_COVERED, _trace.O_NOT_COVERED, _trace.O_NO_MATCH, _trace.O_INVALID,
     _trace.O_DOMAIN, _trace.O_AMC, _trace.O_SUSPENDED, _trace.O_RATE, _trace.O_DAILY,
     _trace.O_DISTINCT, _trace.O_QUOTA_STATE, _trace.O_BACKEND, _trace.N_OUTCOMES,
     _trace.N_PROFESSIONS)
    != (O_COVERED, O_NOT_COVERED, O_NO_MATCH, O_INVALID, O_DOMAIN, O_AMC, O_SUSPENDED,
        O_RATE, O_DAILY, O_DISTINCT, O_QUOTA_STATE, O_BACKEND, N_OUTCOMES, N_PROFESSIONS)
    or (rules.CREDIT_SPEND, rules.CREDIT_LIMIT, rules.CREDIT_BACKEND, rules.CREDIT_OPEN)
    != (CREDIT_SPEND, CREDIT_LIMIT, CREDIT_BACKEND, CREDIT_OPEN)
    or (_trace.WD_RATE, _trace.WD_DAILY, _trace.WD_DISTINCT, _trace.WD_GUARD)
    != (WD_RATE, WD_DAILY, WD_DISTINCT, WD_GUARD)
    or (_trace.METHOD_UNARY, _trace.METHOD_BATCH, _trace.METHOD_STREAM)
    != (METHOD_UNARY, METHOD_BATCH, METHOD_STREAM)
    or (_trace.KIND_INTERNAL, _trace.KIND_SERVER) != (KIND_INTERNAL, KIND_SERVER)
    or len(_trace.NAMES) != NAME_LOOKUP + 1
):
    raise ImportError("fastpath._gate_c is out of date with fastpath.trace")
