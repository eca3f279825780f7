"""Cython gate: the decisions, errors and response bytes of the pure-Python reference
`_gate_py`, byte for byte, with requests parsed and responses encoded in C.

How it stays identical to the reference:

* The hand-written protobuf parser accepts only what it fully understands: one-byte
  tags of known fields with their proto3 wire types, ASCII strings, varints of at most
  5 bytes and in range. Anything else is parsed by the generated class (upb), exactly
  as the reference does; upb's re-serialization of it (unknown fields dropped) is then
  read by the same parser in "canonical" mode, so what is accepted, and every field
  value, is upb's by construction.
* Field rules mirror rules.py one for one; refusals are the cached google.rpc.Status
  bytes from rules.py. Rights records are read with the reference decoder's tolerance
  (short slices in the last row); a record that decoder rejects is handed to it so
  that it raises its own exception.
* Keyed hashes are hashlib's, with the reference's parameters (pre-keyed copies).
"""

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport (
    PyUnicode_AsUTF8AndSize,
    PyUnicode_DecodeASCII,
    PyUnicode_GET_LENGTH,
)
from libc.limits cimport LLONG_MAX, LLONG_MIN
from libc.stdint cimport INT32_MAX, UINT32_MAX, int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset, strerror
from libc.errno cimport EINTR, errno
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport write

import os

from google.protobuf.message import DecodeError

from covergate.v1 import covergate_pb2 as pb
from fastpath import quota, rules
from fastpath import trace as _trace

from fastpath._cheaders cimport (
    CG_FLAG_SUSPENDED,
    CG_LOCK_ENTRY,
    EBUSY,
    cg_blake2b_absorb_key,
    cg_blake2b_final,
    cg_blake2b_init,
    cg_blake2b_state,
    cg_blake2b_update,
    cg_hmac_sha256,
    cg_hmac_sha256_key,
    cg_hmac_sha256_setkey,
    cg_roll_day,
    cg_seen_or_add,
    cg_siphash24,
    cg_slot,
    cg_slot_lock,
    cg_slot_trylock,
    cg_slot_unlock,
)

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)

IMPLEMENTATION = "cython"


# -- constants (checked against rules.py at import, below)

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
    "ATTESTATION_VERSION": ATTESTATION_VERSION,
    "ATTESTATION_MAC_SIZE": ATTESTATION_MAC_SIZE,
    "BENEFICIARY_TAG_SIZE": BENEFICIARY_TAG_SIZE,
}
# A change to rules.py that this file does not follow must fail loudly, not drift.
for _name, _value in _SHARED_CONSTANTS.items():
    if getattr(rules, _name) != _value:
        raise ImportError(f"fastpath._gate_c is out of date with rules.{_name}")
if rules._ROW_HEAD.size != ROW_HEAD_SIZE:
    raise ImportError("fastpath._gate_c is out of date with the rights record layout")

# Looked up once: these run for every request.
_Request = pb.CheckCoverageRequest
_BatchRequest = pb.CheckCoverageBatchRequest
_invalid_fields_status = rules.invalid_fields_status
_OK = rules.OK
_INVALID_ARGUMENT = rules.INVALID_ARGUMENT

cdef const char* _B64URL = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)


# -- output buffer
#
# One per call, never shared: py-lmdb and hashlib release the GIL, so two threads may be
# inside one Gate at once.

cdef struct Buf:
    unsigned char* data
    Py_ssize_t size
    Py_ssize_t capacity


cdef int _grow(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t capacity = max(b.size + extra, 2 * b.capacity, 256)
    cdef void* data = PyMem_Realloc(b.data, capacity)
    if data == NULL:
        raise MemoryError()
    b.data = <unsigned char*>data
    b.capacity = capacity
    return 0


cdef inline int _reserve(Buf* b, Py_ssize_t extra) except -1:
    if b.size + extra > b.capacity:
        _grow(b, extra)
    return 0


cdef inline void _put_varint_unchecked(Buf* b, unsigned long long value) noexcept:
    while value >= 0x80:
        b.data[b.size] = <unsigned char>(value | 0x80)
        b.size += 1
        value >>= 7
    b.data[b.size] = <unsigned char>value
    b.size += 1


cdef int _put_varint_field(Buf* b, unsigned char tag,
                           unsigned long long value) except -1:
    _reserve(b, 11)
    b.data[b.size] = tag
    b.size += 1
    _put_varint_unchecked(b, value)
    return 0


cdef int _put_len_field(Buf* b, unsigned char tag, const void* src,
                        Py_ssize_t size) except -1:
    """Written even when empty (batch items): callers omit empty proto3 strings."""
    _reserve(b, 11 + size)
    b.data[b.size] = tag
    b.size += 1
    _put_varint_unchecked(b, <unsigned long long>size)
    if size:
        memcpy(b.data + b.size, src, size)
        b.size += size
    return 0


cdef inline object _buf_bytes(const Buf* b):
    if b.size == 0:
        return b""
    return PyBytes_FromStringAndSize(<const char*>b.data, b.size)


# -- request parsing

cdef struct Request:
    # String fields by field number, pointing into the bytes they were parsed from.
    const unsigned char* text[N_FIELDS]
    Py_ssize_t size[N_FIELDS]
    # Only set in canonical mode (upb checked the UTF-8). No rule accepts a non-ASCII
    # value, not even the NIR's: no non-ASCII character upper-cases into 0-9, A or B.
    unsigned char non_ascii[N_FIELDS]
    unsigned long long birth_rank       # uint32
    long long domain                    # int32 (an open enum)


cdef inline bint _read_varint(const unsigned char* p, Py_ssize_t n,
                              Py_ssize_t* pos, int max_bytes,
                              unsigned long long* value) noexcept nogil:
    """False when truncated or longer than max_bytes (then upb says what it means)."""
    cdef unsigned long long v = 0
    cdef int shift = 0
    cdef Py_ssize_t i = pos[0]
    cdef unsigned char byte
    while True:
        if i >= n or shift >= 7 * max_bytes:
            return False
        byte = p[i]
        i += 1
        v |= <unsigned long long>(byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    pos[0] = i
    value[0] = v
    return True


cdef bint _parse_request(const unsigned char* p, Py_ssize_t n, Request* r,
                         bint canonical) noexcept nogil:
    """Fill `r` from a serialized CheckCoverageRequest; False when the bytes hold
    anything this parser does not read exactly as upb does.

    Strict mode (client bytes) also refuses non-ASCII strings, and varints over 5 bytes
    or out of their field's range. Canonical mode reads upb's own serialization: there
    non-ASCII strings are flagged, and the 10-byte varints of negative enums are
    truncated to 32 bits as upb truncates them.
    """
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t size, i
    cdef unsigned long long value
    cdef unsigned char tag, high
    cdef int field
    cdef int max_varint = 10 if canonical else 5
    memset(r, 0, sizeof(Request))
    while pos < n:
        tag = p[pos]
        pos += 1
        if tag & 0x80:
            # A multi-byte tag: a field number beyond ours, or an over-long encoding.
            return False
        field = tag >> 3
        if (tag & 7) == WIRE_LEN and (STRING_FIELDS >> field) & 1:
            if not _read_varint(p, n, &pos, 5, &value):
                return False
            if value > <unsigned long long>(n - pos):
                return False
            size = <Py_ssize_t>value
            high = 0
            for i in range(pos, pos + size):
                high |= p[i]
            r.non_ascii[field] = 0
            if high & 0x80:
                if not canonical:
                    return False
                r.non_ascii[field] = 1
            # A field seen twice: the last one wins, as in upb.
            r.text[field] = p + pos
            r.size[field] = size
            pos += size
        elif tag == ((F_BIRTH_RANK << 3) | WIRE_VARINT):
            if not _read_varint(p, n, &pos, max_varint, &value):
                return False
            if canonical:
                value = <uint32_t>value
            elif value > UINT32_MAX:
                return False
            r.birth_rank = value
        elif tag == ((F_DOMAIN << 3) | WIRE_VARINT):
            if not _read_varint(p, n, &pos, max_varint, &value):
                return False
            if canonical:
                r.domain = <int32_t><uint32_t>value
            elif value > INT32_MAX:
                return False
            else:
                r.domain = <long long>value
        else:
            # Unknown field, wire-type mismatch, group, field 0: upb knows best.
            return False
    return True


cdef bint _next_item(const unsigned char* p, Py_ssize_t n, Py_ssize_t* pos,
                     const unsigned char** item, Py_ssize_t* size) noexcept nogil:
    """Step over one `items` entry of a batch (pos < n); False for anything else."""
    cdef unsigned long long value
    cdef Py_ssize_t i = pos[0]
    if p[i] != TAG_ITEMS:
        return False
    i += 1
    if not _read_varint(p, n, &i, 5, &value):
        return False
    if value > <unsigned long long>(n - i):
        return False
    item[0] = p + i
    size[0] = <Py_ssize_t>value
    pos[0] = i + <Py_ssize_t>value
    return True


cdef bint _scan_batch(const unsigned char* p, Py_ssize_t n, bint canonical,
                      Py_ssize_t* count) noexcept nogil:
    """Count the items, checking that every one parses: upb accepts or refuses a
    batch whole, so a single item it must judge sends the whole batch to it."""
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t size
    cdef const unsigned char* item
    cdef Request r
    count[0] = 0
    while pos < n:
        if not _next_item(p, n, &pos, &item, &size):
            return False
        if not _parse_request(item, size, &r, canonical):
            return False
        count[0] += 1
    return True


cdef Py_ssize_t _count_items(const unsigned char* p, Py_ssize_t n,
                             Py_ssize_t limit) noexcept nogil:
    """rules.count_batch_items: the top-level `items` entries, counted from the framing alone
    up to limit + 1; -1 where the reference answers None (the framing is not simple)."""
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t count = 0
    cdef unsigned long long tag, value
    cdef unsigned int wire
    while pos < n:
        if not _read_varint(p, n, &pos, 5, &tag) or (tag >> 3) == 0:
            return -1
        wire = <unsigned int>(tag & 7)
        if wire == 0:
            if not _read_varint(p, n, &pos, 10, &value):
                return -1
        elif wire == 1 or wire == 5:
            value = 8 if wire == 1 else 4
            if value > <unsigned long long>(n - pos):
                return -1
            pos += <Py_ssize_t>value
        elif wire == 2:
            if not _read_varint(p, n, &pos, 5, &value):
                return -1
            if value > <unsigned long long>(n - pos):
                return -1
            pos += <Py_ssize_t>value
            if tag == TAG_ITEMS:
                count += 1
                if count > limit:
                    return count
        else:
            return -1
    return count


cdef object _load_request(object request, Request* r):
    """Parse `request` into `r`. Returns the object whose bytes `r` points into (keep
    it alive while `r` is used), or None when upb rejects the message."""
    if type(request) is bytes and _parse_request(
        <const unsigned char*>PyBytes_AS_STRING(request),
        PyBytes_GET_SIZE(request), r, False,
    ):
        return request
    try:
        message = _Request.FromString(request)
    except DecodeError:
        return None
    message.DiscardUnknownFields()
    canonical = message.SerializeToString()
    if not _parse_request(<const unsigned char*>PyBytes_AS_STRING(canonical),
                          PyBytes_GET_SIZE(canonical), r, True):
        raise AssertionError("upb's serialization of a request was not understood")
    return canonical


# -- field rules (rules.py, field for field)

cdef inline bint _all_digits(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if s[i] < 48 or s[i] > 57:
            return False
    return True


cdef inline int _number(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """The value of n <= 9 ASCII digits, already checked."""
    cdef int v = 0
    cdef Py_ssize_t i
    for i in range(n):
        v = v * 10 + (s[i] - 48)
    return v


cdef inline int _days_in_month(int year, int month) noexcept nogil:
    if month == 2:
        if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
            return 29
        return 28
    if month == 4 or month == 6 or month == 9 or month == 11:
        return 30
    return 31


cdef bint _valid_birth_date(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Lunar dates (day and/or month 00) are legitimate birth dates."""
    cdef int year, month, day
    if n != 8 or not _all_digits(s, 8):
        return False
    year = _number(s, 4)
    month = _number(s + 4, 2)
    day = _number(s + 6, 2)
    if year < 1850 or month > 12 or day > 31:
        return False
    return not (month and day and day > _days_in_month(year, month))


cdef bint _valid_calendar_date(const unsigned char* s,
                               Py_ssize_t n) noexcept nogil:
    cdef int year, month, day
    if n != 8 or not _all_digits(s, 8):
        return False
    year = _number(s, 4)
    month = _number(s + 4, 2)
    day = _number(s + 6, 2)
    if year < 1900 or year > 2199 or month < 1 or month > 12:
        return False
    return 1 <= day <= _days_in_month(year, month)


cdef bint _valid_nir(const unsigned char* nir) noexcept nogil:
    """`nir`: 13 bytes, already upper-cased (rules.normalise_nir)."""
    cdef unsigned char first = nir[0]
    if not (first == 49 or first == 50 or first == 51 or first == 52
            or first == 55 or first == 56):                         # "123478"
        return False
    if not (_all_digits(nir + 5, 2)
            or (nir[5] == 50 and (nir[6] == 65 or nir[6] == 66))):  # 2A, 2B
        return False
    return _all_digits(nir, 5) and _all_digits(nir + 7, 6)


cdef int _nir_key_for(const unsigned char* nir) noexcept nogil:
    """97 - (nir mod 97), with 2A counting as 19 and 2B as 18."""
    cdef unsigned long long number = _number(nir, 5)
    if nir[6] == 65:
        number = number * 100 + 19
    elif nir[6] == 66:
        number = number * 100 + 18
    else:
        number = number * 100 + <unsigned long long>_number(nir + 5, 2)
    number = number * 1000000 + <unsigned long long>_number(nir + 7, 6)
    return <int>(97 - number % 97)


cdef bint _valid_request_id(const Request* r) noexcept nogil:
    cdef const unsigned char* s = r.text[F_REQUEST_ID]
    cdef Py_ssize_t n = r.size[F_REQUEST_ID]
    cdef Py_ssize_t i
    if r.non_ascii[F_REQUEST_ID] or n > MAX_REQUEST_ID:
        return False
    for i in range(n):
        if s[i] < 0x20 or s[i] > 0x7E:
            return False
    return True


cdef unsigned int _invalid_fields(const Request* r, unsigned char* nir,
                                  long long* care_date) noexcept nogil:
    """The mask (1 << field number) of the fields breaking rules.FIELD_RULES. Also
    writes the normalised NIR to `nir`, and the care date asked for to `care_date`
    (-1 when none was)."""
    cdef unsigned int bad = 0
    cdef const unsigned char* s
    cdef Py_ssize_t n, i
    cdef bint nir_ok
    cdef unsigned char c

    if not _valid_request_id(r):
        bad |= 1 << F_REQUEST_ID

    s = r.text[F_NIR]
    n = r.size[F_NIR]
    nir_ok = not r.non_ascii[F_NIR] and n == NIR_SIZE
    if nir_ok:
        # Corsican letters in either case: rules.normalise_nir upper-cases 13-character
        # values (for ASCII, str.upper changes a-z only).
        for i in range(NIR_SIZE):
            c = s[i]
            if 97 <= c <= 122:
                c -= 32
            nir[i] = c
        nir_ok = _valid_nir(nir)
    if not nir_ok:
        bad |= 1 << F_NIR

    s = r.text[F_NIR_KEY]
    n = r.size[F_NIR_KEY]
    if r.non_ascii[F_NIR_KEY] or n != 2 or not _all_digits(s, 2):
        bad |= 1 << F_NIR_KEY
    elif nir_ok and _number(s, 2) != _nir_key_for(nir):
        bad |= 1 << F_NIR_KEY

    if r.non_ascii[F_BIRTH_DATE] or not _valid_birth_date(
        r.text[F_BIRTH_DATE], r.size[F_BIRTH_DATE]
    ):
        bad |= 1 << F_BIRTH_DATE

    if not 1 <= r.birth_rank <= 9:
        bad |= 1 << F_BIRTH_RANK

    n = r.size[F_AMC_NUMBER]
    if (r.non_ascii[F_AMC_NUMBER] or not 1 <= n <= MAX_AMC_NUMBER
            or not _all_digits(r.text[F_AMC_NUMBER], n)):
        bad |= 1 << F_AMC_NUMBER

    s = r.text[F_MEMBER_NUMBER]
    n = r.size[F_MEMBER_NUMBER]
    if r.non_ascii[F_MEMBER_NUMBER] or n > MAX_MEMBER_NUMBER:
        bad |= 1 << F_MEMBER_NUMBER
    else:
        for i in range(n):
            c = s[i]
            if not (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122):
                bad |= 1 << F_MEMBER_NUMBER
                break

    if not 1 <= r.domain <= MAX_DOMAIN:
        bad |= 1 << F_DOMAIN

    care_date[0] = -1
    n = r.size[F_CARE_DATE]
    if n:
        s = r.text[F_CARE_DATE]
        if r.non_ascii[F_CARE_DATE] or not _valid_calendar_date(s, n):
            bad |= 1 << F_CARE_DATE
        else:
            care_date[0] = _number(s, 8)
    return bad


# -- rights records (layout in rules.py)

cdef struct Right:
    unsigned int rate_percent
    long long end
    const unsigned char* convention
    Py_ssize_t convention_size


cdef inline long long _u32le(const unsigned char* p) noexcept nogil:
    return <long long>(<uint32_t>p[0] | (<uint32_t>p[1] << 8)
                       | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24))


cdef inline Py_ssize_t _available(Py_ssize_t pos, Py_ssize_t want,
                                  Py_ssize_t n) noexcept nogil:
    """How many bytes the Python slice value[pos:pos + want] really holds."""
    if pos >= n:
        return 0
    return want if want <= n - pos else n - pos


cdef inline bint _ascii(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if s[i] & 0x80:
            return False
    return True


cdef bint _record_is_sound(const unsigned char* v, Py_ssize_t n) noexcept nogil:
    """False exactly when rules.decode_record raises on this value. Like it, this
    tolerates a short convention or member hash in the last row, and trailing bytes."""
    cdef Py_ssize_t pos = 3
    cdef unsigned int rows, _
    cdef unsigned char flags, amc_size, convention_size
    if n < 3 or v[0] != RECORD_VERSION:
        return False
    rows = v[1] | (<unsigned int>v[2] << 8)
    for _ in range(rows):
        if pos + ROW_HEAD_SIZE > n:
            return False                        # struct.error
        flags = v[pos + 10]
        amc_size = v[pos + 11]
        pos += ROW_HEAD_SIZE
        if not _ascii(v + pos, _available(pos, amc_size, n)):
            return False                        # UnicodeDecodeError
        pos += amc_size
        if pos >= n:
            return False                        # IndexError on the convention length
        convention_size = v[pos]
        pos += 1
        if not _ascii(v + pos, _available(pos, convention_size, n)):
            return False
        pos += convention_size
        if flags & FLAG_MEMBER:
            pos += MEMBER_HASH_SIZE
    return True


cdef int _match_rights(const unsigned char* v, Py_ssize_t n, const Request* r,
                       const unsigned char* member_hash, long long care_date,
                       bint care_exact, object care_object, Right* best) except -1:
    """Rows matching every factor (the AMC, and the member hash when one was sent);
    among them, the row open for the domain on the care date that runs longest (the
    first on a tie), in `best`.

    `v` is a sound record. When the caller's `today` is not an exact int (care_exact
    false) the date test is made on Python objects, exactly as the reference makes it.
    """
    cdef Py_ssize_t pos = 3
    cdef unsigned int rows = v[1] | (<unsigned int>v[2] << 8)
    cdef unsigned int _
    cdef const unsigned char* amc = r.text[F_AMC_NUMBER]
    cdef Py_ssize_t amc_size = r.size[F_AMC_NUMBER]
    cdef const unsigned char* row_amc
    cdef const unsigned char* row_member
    cdef const unsigned char* convention
    cdef Py_ssize_t member_size, convention_size
    cdef unsigned char domain, rate, flags, row_amc_size, row_convention_size
    cdef long long start, end
    cdef int found = MATCH_NONE
    for _ in range(rows):
        domain = v[pos]
        rate = v[pos + 1]
        start = _u32le(v + pos + 2)
        end = _u32le(v + pos + 6)
        flags = v[pos + 10]
        row_amc_size = v[pos + 11]
        pos += ROW_HEAD_SIZE
        row_amc = v + pos                   # never short in a sound record
        pos += row_amc_size
        row_convention_size = v[pos]
        pos += 1
        convention = v + pos                # the last row's may be: sliced as Python
        convention_size = _available(pos, row_convention_size, n)
        pos += row_convention_size
        row_member = NULL
        member_size = 0
        if flags & FLAG_MEMBER:
            row_member = v + pos
            member_size = _available(pos, MEMBER_HASH_SIZE, n)
            pos += MEMBER_HASH_SIZE

        if row_amc_size != amc_size or memcmp(row_amc, amc, amc_size) != 0:
            continue
        if member_hash != NULL and (
            member_size != MEMBER_HASH_SIZE
            or memcmp(row_member, member_hash, MEMBER_HASH_SIZE) != 0
        ):
            continue
        if found == MATCH_NONE:
            found = MATCH_CLOSED
        if domain != r.domain:
            continue
        if care_exact:
            if not start <= care_date <= end:
                continue
        elif not start <= care_object <= end:
            continue
        if found == MATCH_OPEN and end <= best.end:
            continue
        found = MATCH_OPEN
        best.rate_percent = rate
        best.end = end
        best.convention = convention
        best.convention_size = convention_size
    return found


# -- response pieces

cdef int _put_rights_end_date(Buf* out, long long end) except -1:
    """f"{end:08d}" of a u32."""
    cdef unsigned char digits[20]
    cdef int i = 20
    while end or i > 12:
        i -= 1
        digits[i] = <unsigned char>(48 + end % 10)
        end //= 10
    return _put_len_field(out, TAG_RIGHTS_END_DATE, digits + i, 20 - i)


cdef Py_ssize_t _b64url(const unsigned char* src, Py_ssize_t n,
                        unsigned char* dst) noexcept nogil:
    """base64url without padding: urlsafe_b64encode(src).rstrip(b"=")."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t j = 0
    cdef unsigned int v
    while i + 3 <= n:
        v = (<unsigned int>src[i] << 16) | (<unsigned int>src[i + 1] << 8) | src[i + 2]
        dst[j] = _B64URL[v >> 18]
        dst[j + 1] = _B64URL[(v >> 12) & 63]
        dst[j + 2] = _B64URL[(v >> 6) & 63]
        dst[j + 3] = _B64URL[v & 63]
        i += 3
        j += 4
    if n - i == 1:
        v = <unsigned int>src[i] << 16
        dst[j] = _B64URL[v >> 18]
        dst[j + 1] = _B64URL[(v >> 12) & 63]
        j += 2
    elif n - i == 2:
        v = (<unsigned int>src[i] << 16) | (<unsigned int>src[i + 1] << 8)
        dst[j] = _B64URL[v >> 18]
        dst[j + 1] = _B64URL[(v >> 12) & 63]
        dst[j + 2] = _B64URL[(v >> 6) & 63]
        j += 3
    return j


cdef inline void _put_u32be(unsigned char* p, long long v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef long long _clamped(object value) except? -1:
    """An exact int as a C long long, saturated: its order against any u32 date (all
    that the gate does with it) is unchanged."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        return LLONG_MAX
    if overflow < 0:
        return LLONG_MIN
    return v


cdef int _put_refusal(Buf* out, const Request* r, bytes status) except -1:
    """A CheckCoverageResponse with `status` in `error`. As in the reference, the
    request_id is echoed when the request was read and its request_id is valid."""
    if r != NULL and r.size[F_REQUEST_ID] and _valid_request_id(r):
        _put_len_field(out, TAG_REQUEST_ID, r.text[F_REQUEST_ID],
                       r.size[F_REQUEST_ID])
    return _put_len_field(out, TAG_ERROR, PyBytes_AS_STRING(status),
                          PyBytes_GET_SIZE(status))


# -- the gate

cdef enum:
    SHADOW_RATE = 1
    SHADOW_DAILY = 2
    SHADOW_DISTINCT = 4
    SHADOW_GUARD = 8
    PSEUDONYM_SIZE = 8
    STORAGE_KEY_SIZE = 16

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

cdef enum:
    QUOTA_HEADER_SIZE = 4096
    AMC_VIEW_ENTRY = 1 + MAX_AMC_NUMBER

if (quota.SHADOW_RATE, quota.SHADOW_DAILY, quota.SHADOW_DISTINCT, quota.SHADOW_GUARD) != (
    SHADOW_RATE, SHADOW_DAILY, SHADOW_DISTINCT, SHADOW_GUARD
) or quota.SLOT_SIZE != sizeof(cg_slot) or quota.SLOT_HEAD != 64 or (
    quota.HEADER_SIZE != QUOTA_HEADER_SIZE or quota.LOCK_ENTRY != CG_LOCK_ENTRY
) or rules.PRACTITIONER_VIEW.size + quota.PROFILE_VIEW.size != sizeof(View) or (
    rules.AMC_VIEW_ENTRY != AMC_VIEW_ENTRY
):
    raise ImportError("fastpath._gate_c is out of date with fastpath.quota")

_PERMISSION_DENIED = rules.PERMISSION_DENIED
_UNAVAILABLE = rules.UNAVAILABLE
_RESOURCE_EXHAUSTED = rules.RESOURCE_EXHAUSTED
_MAX_DISTINCT_LIMIT = quota.MAX_DISTINCT_LIMIT


# -- tracing (fastpath.trace defines the spans; the constant pieces are its bytes)

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
    N_OUTCOMES = 16
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
     _trace.O_DISTINCT, _trace.O_QUOTA_STATE, _trace.N_OUTCOMES, _trace.N_PROFESSIONS)
    != (O_COVERED, O_NOT_COVERED, O_NO_MATCH, O_INVALID, O_DOMAIN, O_AMC, O_SUSPENDED,
        O_RATE, O_DAILY, O_DISTINCT, O_QUOTA_STATE, N_OUTCOMES, N_PROFESSIONS)
    or (_trace.WD_RATE, _trace.WD_DAILY, _trace.WD_DISTINCT, _trace.WD_GUARD)
    != (WD_RATE, WD_DAILY, WD_DISTINCT, WD_GUARD)
    or (_trace.METHOD_UNARY, _trace.METHOD_BATCH, _trace.METHOD_STREAM)
    != (METHOD_UNARY, METHOD_BATCH, METHOD_STREAM)
    or (_trace.KIND_INTERNAL, _trace.KIND_SERVER) != (KIND_INTERNAL, KIND_SERVER)
    or len(_trace.NAMES) != NAME_LOOKUP + 1
):
    raise ImportError("fastpath._gate_c is out of date with fastpath.trace")

cdef tuple _DOMAIN_ATTRS = _trace.DOMAIN_ATTRS
cdef tuple _OUTCOME_ATTRS = _trace.OUTCOME_ATTRS
cdef tuple _WOULD_DENY_ATTRS = _trace.WOULD_DENY_ATTRS
cdef tuple _GUARD_ATTRS = _trace.GUARD_ATTRS
cdef tuple _RPC_ATTRS = _trace.RPC_ATTRS
cdef tuple _NAMES = _trace.NAMES
cdef tuple _GUARD_EVENTS_TAIL = _trace.GUARD_EVENTS_TAIL
cdef bytes _AMC_KEY = _trace.AMC_KEY
cdef bytes _BENEFICIARY_KEY = _trace.BENEFICIARY_KEY
cdef bytes _DAILY_REMAINING_KEY = _trace.DAILY_REMAINING_KEY
cdef bytes _DISTINCT_TODAY_KEY = _trace.DISTINCT_TODAY_KEY
cdef bytes _STATUS_CODE_KEY = _trace.STATUS_CODE_KEY
cdef bytes _BATCH_ITEMS_KEY = _trace.BATCH_ITEMS_KEY
cdef Py_ssize_t _MAX_SPAN_BUFFER = _trace.MAX_BUFFER
_now_ns = _trace.now_ns
_practitioner_attributes = _trace.practitioner_attributes
_check_context = _trace.check_context
cdef const char* _HEX = b"0123456789abcdef"


cdef struct TraceCall:
    # One traced call: its trace, its caller's parent span (if any), its clock.
    unsigned char trace_id[TRACE_ID_SIZE]
    unsigned char parent[SPAN_ID_SIZE]
    bint has_parent
    uint64_t start_ns           # the call's `now`, in unix ns
    long long t0                # monotonic ns when the call began
    const char* who             # the practitioner's encoded attributes
    Py_ssize_t who_size
    int profession


cdef inline long long _monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int _varint_size(unsigned long long v) noexcept nogil:
    cdef int n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline int _put_raw(Buf* b, const void* src, Py_ssize_t size) except -1:
    _reserve(b, size)
    memcpy(b.data + b.size, src, size)
    b.size += size
    return 0


cdef inline int _put_bytes(Buf* b, bytes data) except -1:
    return _put_raw(b, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef inline void _put_fixed64_unchecked(Buf* b, uint64_t v) noexcept:
    cdef int i
    for i in range(8):
        b.data[b.size + i] = <unsigned char>(v >> (8 * i))
    b.size += 8


cdef inline void _put_attr_head(Buf* b, bytes key, Py_ssize_t any_size) noexcept:
    """A Span.attributes entry up to its AnyValue's content: 0x4A, the KeyValue's length, the key
    (already a field), 0x12 and the AnyValue's length. The caller reserved 11 + kv size."""
    b.data[b.size] = 0x4A
    b.size += 1
    _put_varint_unchecked(b, PyBytes_GET_SIZE(key) + 1 + _varint_size(any_size) + any_size)
    memcpy(b.data + b.size, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
    b.size += PyBytes_GET_SIZE(key)
    b.data[b.size] = 0x12
    b.size += 1
    _put_varint_unchecked(b, any_size)


cdef int _put_attr_str(Buf* b, bytes key, const void* value,
                       Py_ssize_t size) except -1:
    """A Span.attributes entry: KeyValue{key (already a field), AnyValue{string_value}}."""
    cdef Py_ssize_t any_size = 1 + _varint_size(size) + size
    _reserve(b, 11 + PyBytes_GET_SIZE(key) + 1 + _varint_size(any_size) + any_size)
    _put_attr_head(b, key, any_size)
    b.data[b.size] = 0x0A
    b.size += 1
    _put_varint_unchecked(b, size)
    memcpy(b.data + b.size, value, size)
    b.size += size
    return 0


cdef int _put_attr_int(Buf* b, bytes key, unsigned long long value) except -1:
    """KeyValue{key, AnyValue{int_value}}."""
    cdef Py_ssize_t any_size = 1 + _varint_size(value)
    _reserve(b, 11 + PyBytes_GET_SIZE(key) + 1 + _varint_size(any_size) + any_size)
    _put_attr_head(b, key, any_size)
    b.data[b.size] = 0x18
    b.size += 1
    _put_varint_unchecked(b, value)
    return 0


cdef int _put_span_head(Buf* b, const unsigned char* trace_id,
                        const unsigned char* span_id, const unsigned char* parent,
                        int name, int kind, uint64_t start,
                        uint64_t end) except -1:
    """Span fields 1-8 (trace_state omitted); `parent` NULL for a root span."""
    cdef bytes name_bytes = <bytes>_NAMES[name]
    _reserve(b, 2 + TRACE_ID_SIZE + 2 + SPAN_ID_SIZE + 2 + SPAN_ID_SIZE + 11
             + PyBytes_GET_SIZE(name_bytes) + 2 + 18)
    b.data[b.size] = 0x0A
    b.data[b.size + 1] = TRACE_ID_SIZE
    memcpy(b.data + b.size + 2, trace_id, TRACE_ID_SIZE)
    b.size += 2 + TRACE_ID_SIZE
    b.data[b.size] = 0x12
    b.data[b.size + 1] = SPAN_ID_SIZE
    memcpy(b.data + b.size + 2, span_id, SPAN_ID_SIZE)
    b.size += 2 + SPAN_ID_SIZE
    if parent != NULL:
        b.data[b.size] = 0x22
        b.data[b.size + 1] = SPAN_ID_SIZE
        memcpy(b.data + b.size + 2, parent, SPAN_ID_SIZE)
        b.size += 2 + SPAN_ID_SIZE
    b.data[b.size] = 0x2A
    b.size += 1
    _put_varint_unchecked(b, PyBytes_GET_SIZE(name_bytes))
    memcpy(b.data + b.size, PyBytes_AS_STRING(name_bytes), PyBytes_GET_SIZE(name_bytes))
    b.size += PyBytes_GET_SIZE(name_bytes)
    b.data[b.size] = 0x30
    b.data[b.size + 1] = <unsigned char>kind
    b.size += 2
    b.data[b.size] = 0x39
    b.size += 1
    _put_fixed64_unchecked(b, start)
    b.data[b.size] = 0x41
    b.size += 1
    _put_fixed64_unchecked(b, end)
    return 0


# The span buffer keeps its memory between takes up to this size: a buffer freed and grown again
# every flush costs a page fault per 4 KiB written.
cdef Py_ssize_t _KEEP_SPAN_BUFFER = 16 << 20


cdef object _chunk(const unsigned char* spans, Py_ssize_t n, bytes resource, bytes scope):
    """Framed spans as bytes, or (with a resource) as a whole ExportTraceServiceRequest:
    {1: ResourceSpans{1: resource, 2: ScopeSpans{1: scope, spans}}}, the spans copied once."""
    cdef Py_ssize_t scope_spans, resource_spans
    cdef Buf head
    if resource is None:
        return PyBytes_FromStringAndSize(<const char*>spans, n)
    scope_spans = 1 + _varint_size(PyBytes_GET_SIZE(scope)) + PyBytes_GET_SIZE(scope) + n
    resource_spans = (1 + _varint_size(PyBytes_GET_SIZE(resource)) + PyBytes_GET_SIZE(resource)
                      + 1 + _varint_size(scope_spans) + scope_spans)
    head.data = NULL
    head.size = head.capacity = 0
    try:
        # A length prefix is a varint: tag + varint(length), then the nested message.
        _put_varint_field(&head, 0x0A, resource_spans)
        _put_len_field(&head, 0x0A, PyBytes_AS_STRING(resource), PyBytes_GET_SIZE(resource))
        _put_varint_field(&head, 0x12, scope_spans)
        _put_len_field(&head, 0x0A, PyBytes_AS_STRING(scope), PyBytes_GET_SIZE(scope))
        out = PyBytes_FromStringAndSize(NULL, head.size + n)
        memcpy(PyBytes_AS_STRING(out), head.data, head.size)
        memcpy(PyBytes_AS_STRING(out) + head.size, spans, n)
        return out
    finally:
        PyMem_Free(head.data)


cdef uint64_t _start_ns(object now) except? 0:
    """fastpath.trace.now_ns(now), in C for the clock's own types."""
    cdef double value
    cdef long long seconds
    cdef int overflow = 0
    if PyFloat_CheckExact(now):
        value = PyFloat_AS_DOUBLE(now)
        if value != value:
            return 0
        value = value * 1e9
        if value >= 9.2e18:
            return 0x7FFFFFFFFFFFFFFF
        if value <= 0:
            return 0
        return <uint64_t>value
    if PyLong_CheckExact(now):
        seconds = PyLong_AsLongLongAndOverflow(now, &overflow)
        if overflow > 0 or (not overflow and seconds > 9223372036):
            seconds = 9223372036
        elif overflow < 0 or seconds < 0:
            seconds = 0
        return <uint64_t>seconds * 1000000000
    return <uint64_t>(<long long>_now_ns(now))


cdef bint _amc_in(bytes view, const unsigned char* amc, Py_ssize_t n) except -1:
    """Whether the validated request AMC `amc` is among the practitioner's insurers, read from
    rules.Practitioner.amc_view (no Python string, no set lookup per item)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(view)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(view)
    cdef Py_ssize_t pos = 0
    while pos + AMC_VIEW_ENTRY <= size:
        if p[pos] == n and memcmp(p + pos + 1, amc, n) == 0:
            return True
        pos += AMC_VIEW_ENTRY
    return False


cdef struct Caller:
    # One call's view of the practitioner: its quota slot (NULL: no quotas) and limits.
    cg_slot* slot
    unsigned char* locks
    long long slot_index        # -1: no quota state to take (quotas off)
    long long now_ms
    long long interval_ms
    long long tolerance_ms
    long long daily_limit
    long long distinct_limit
    long long guard_window
    long long guard_min
    long long guard_percent
    long long shadow
    unsigned long long domains
    # Set by _decide: the gRPC code of a refusal (0 when answered) and what matched.
    int code
    int found
    # For the lookup's span (fastpath.trace): its outcome index, the first shadow rule that
    # would have refused it, whether the guard fired, whether the request passed validation
    # (then `pseudonym` holds the beneficiary's keyed pseudonym, when tracing).
    int outcome
    int would_deny
    int guard_fired
    int validated
    unsigned char pseudonym[PSEUDONYM_SIZE]


cdef inline void _hash(const cg_blake2b_state* keyed, const unsigned char* data,
                       size_t n, unsigned char* out) noexcept nogil:
    cdef cg_blake2b_state s = keyed[0]
    cg_blake2b_update(&s, data, n)
    cg_blake2b_final(&s, out)


cdef inline int _popcount64(uint64_t v) noexcept nogil:
    return __builtin_popcountll(v)


cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil


cdef class Gate:
    """Decides coverage requests against one LMDB rights database, exactly as
    fastpath._gate_py.Gate does (see there).

    `today` (YYYYMMDD as an int, Europe/Paris) and `now` (unix seconds) come from the
    caller so that one clock, controlled by tests, drives every decision.
    """

    cdef object _env
    cdef object _rights_db
    cdef object _keys
    cdef object _attestation_key
    # Keyed BLAKE2b states and the HMAC key schedule, computed once (C, no Python call).
    cdef cg_blake2b_state _storage_state
    cdef unsigned char _pseudonym_key[16]
    cdef cg_blake2b_state _tag_state
    cdef cg_hmac_sha256_key _mac_key
    cdef unsigned char _pepper[64]
    cdef size_t _pepper_size
    # The shared quota file (fastpath.quota.QuotaFile) and its mapping.
    cdef object _quota
    # Closed (replaced): every call refuses. A closed gate never means "no quotas".
    cdef bint _closed
    cdef unsigned char[::1] _quota_map
    cdef unsigned char[::1] _quota_locks
    cdef long long _quota_slots
    cdef readonly Py_ssize_t max_batch_items
    cdef public object attestation_ttl
    # Store reads performed, for tests proving which refusals never touch the store.
    cdef public unsigned long long store_reads
    # Practitioner ids the harvest guard suspended since the caller last emptied this.
    cdef public list suspensions
    # Tracing: spans of every lookup (framed, ready to export), the id generator, and
    # lookups counted per [profession][outcome] for metrics. Off: none of it runs.
    cdef readonly bint trace
    cdef uint64_t _trace_state
    cdef Buf _spans
    cdef Py_ssize_t _span_count
    cdef public unsigned long long spans_dropped
    cdef unsigned long long _counts[N_PROFESSIONS * N_OUTCOMES]

    def __init__(self, env, rights_db, keys, *, max_batch_items=500,
                 attestation_ttl=7 * 86400, quota=None,  # no-cython-lint
                 trace=False, trace_seed=None):  # (`quota` is the keyword callers use)
        rules.require_upb()
        self._env = env
        self._rights_db = rights_db
        self._keys = keys
        self._attestation_key = keys.attestation_key
        self.max_batch_items = rules.batch_limit(max_batch_items)
        self._closed = False
        self.attestation_ttl = attestation_ttl
        self.store_reads = 0
        self.suspensions = []
        self.trace = bool(trace)
        if trace_seed is None:
            trace_seed = int.from_bytes(os.urandom(8), "little")
        self._trace_state = trace_seed & 0xFFFFFFFFFFFFFFFF
        self.spans_dropped = 0
        memset(self._counts, 0, sizeof(self._counts))
        cdef bytes pepper = keys.pepper
        self._pepper_size = len(pepper)
        memcpy(self._pepper, PyBytes_AS_STRING(pepper), self._pepper_size)
        self._init_state(&self._storage_state, STORAGE_KEY_SIZE, rules.PERSON_STORE)
        cdef bytes pseudonym_key = keys.pseudonym_key
        memcpy(self._pseudonym_key, PyBytes_AS_STRING(pseudonym_key), 16)
        self._init_state(&self._tag_state, BENEFICIARY_TAG_SIZE, rules.PERSON_ATTEST)
        cdef bytes attestation_key = self._attestation_key
        cg_hmac_sha256_setkey(
            &self._mac_key,
            <const unsigned char*>PyBytes_AS_STRING(attestation_key),
            PyBytes_GET_SIZE(attestation_key),
        )
        self._quota = quota
        self._quota_slots = 0
        if quota is not None:
            self._quota_map = quota.map
            self._quota_locks = quota.locks_map
            self._quota_slots = quota.slots

    def __dealloc__(self):
        PyMem_Free(self._spans.data)

    def close(self):
        """Let go of the quota file's mapping (so QuotaFile.close() can unmap it). From now
        on every call is refused QUOTA_STATE_UNAVAILABLE."""
        self._quota = None
        self._quota_map = None
        self._quota_locks = None
        self._quota_slots = 0
        self._closed = True

    @property
    def closed(self):
        return self._closed

    cdef void _init_state(self, cg_blake2b_state* s, size_t size, bytes person):
        cdef unsigned char personal[16]
        memset(personal, 0, 16)
        memcpy(personal, PyBytes_AS_STRING(person), PyBytes_GET_SIZE(person))
        cg_blake2b_init(s, size, self._pepper, self._pepper_size, NULL, personal)
        # Every hash of these states has data after the key: pre-compress the key block.
        cg_blake2b_absorb_key(s)

    # -- the practitioner's quota slot, locked for the whole call

    cdef bint _view(self, object practitioner, Caller* c) except -1:
        """Fill `c` from the practitioner's packed view. True when quotas are on (or the gate
        is closed) and the caller's state cannot be reached: the call must then be refused."""
        cdef View v
        memset(c, 0, sizeof(Caller))
        c.slot_index = -1
        view = practitioner.gate_view
        if type(view) is not bytes or PyBytes_GET_SIZE(view) != sizeof(View):
            raise TypeError("practitioner.gate_view is not a rules.Practitioner's")
        memcpy(&v, PyBytes_AS_STRING(view), sizeof(View))
        c.domains = v.domains
        if self._closed:
            return True
        if self._quota is None:
            return False
        if v.slot < 0 or not v.has_profile or v.slot >= self._quota_slots:
            return True
        c.interval_ms = v.interval_ms
        c.tolerance_ms = v.tolerance_ms
        c.daily_limit = v.daily_limit
        c.distinct_limit = v.distinct_limit
        c.guard_window = v.guard_window
        c.guard_min = v.guard_min
        c.guard_percent = v.guard_percent
        c.shadow = v.shadow
        c.slot_index = v.slot
        return False

    cdef int _lock(self, object today, object now, Caller* c) except -1:
        """Take the caller's quota slot (if it has one) for the whole call, rolled to `today`."""
        cdef int rc
        cdef unsigned char* locks
        cdef uint32_t day
        cdef int overflow = 0
        cdef long long now_c
        cdef double now_d
        if c.slot_index < 0:
            return 0
        # int(now * 1000), in C for the clock's own types (same truncation toward zero).
        if PyFloat_CheckExact(now) and -9e15 < PyFloat_AS_DOUBLE(now) < 9e15:
            now_d = PyFloat_AS_DOUBLE(now) * 1000.0
            c.now_ms = <long long>now_d
        else:
            now_c = PyLong_AsLongLongAndOverflow(now, &overflow) if PyLong_CheckExact(now) else 0
            if PyLong_CheckExact(now) and not overflow and -9e15 < now_c < 9e15:
                c.now_ms = now_c * 1000
            else:
                c.now_ms = int(now * 1000)
        # Converted before the mutex is taken: nothing may raise while it is held outside the
        # callers' try/finally.
        day = <uint32_t>today
        locks = &self._quota_locks[0]
        rc = cg_slot_trylock(locks, c.slot_index)
        if rc == EBUSY:
            with nogil:  # another process (or thread) holds the slot: let this one's run
                rc = cg_slot_lock(locks, c.slot_index)
        if rc != 0:
            raise OSError(rc, "cannot lock the quota slot")
        c.locks = locks
        c.slot = <cg_slot*>(&self._quota_map[0] + QUOTA_HEADER_SIZE
                            + c.slot_index * sizeof(cg_slot))
        cg_roll_day(c.slot, day)
        return 0

    cdef void _end(self, Caller* c) noexcept:
        if c.slot != NULL:
            cg_slot_unlock(c.locks, c.slot_index)
            c.slot = NULL

    # -- entry points
    #
    # With tracing on (self.trace), each also writes its spans (fastpath.trace) to
    # self._spans; the decisions and the bytes returned are the same either way.

    def check(self, practitioner, request, today, now, *, trace=None):
        """A unary call: (OK, CheckCoverageResponse) or (code, google.rpc.Status)."""
        return self._single(practitioner, request, today, now, trace, METHOD_UNARY)

    def check_item(self, practitioner, request, today, now, *, trace=None):
        """A stream message: always a CheckCoverageResponse, refusals in `error`."""
        return self._single(practitioner, request, today, now, trace, METHOD_STREAM)

    cdef object _single(self, object practitioner, object request, object today, object now,
                        object trace, int method):
        """One request: check()'s (code, bytes) for METHOD_UNARY; check_item()'s response,
        refusal included, for METHOD_STREAM. A request that does not parse is still an
        attempt: it spends the caller's rate and counts as bad for the guard."""
        cdef Request r
        cdef const Request* read = NULL
        cdef Buf out, scratch
        cdef Caller c
        cdef TraceCall t
        cdef unsigned char span_id[SPAN_ID_SIZE]
        cdef bint traced = self.trace
        cdef bint unary = method == METHOD_UNARY
        out.data = scratch.data = NULL
        out.size = out.capacity = scratch.size = scratch.capacity = 0
        try:
            if traced:
                # Held for the call: t.who points into these bytes.
                _who = self._begin_trace(&t, trace, now, practitioner)
                self._new_span_id(span_id)
            amcs = practitioner.amc_view
            if self._view(practitioner, &c):
                status = self._no_state(&c)
                if traced:
                    self._lookup_span(&scratch, &t, NULL, &c, method, c.code, span_id, False,
                                      t.t0)
            else:
                owner = _load_request(request, &r)
                if owner is not None:
                    read = &r
                with self._env.begin(db=self._rights_db, buffers=False) as txn:
                    try:
                        self._lock(today, now, &c)
                        if read == NULL:
                            status = self._decide(
                                NULL, None, today, practitioner, now, &out, &c, amcs,
                                rules.malformed_message_status("CheckCoverageRequest"),
                            )
                        else:
                            status = self._decide(read, txn.get, today, practitioner, now, &out,
                                                  &c, amcs, None)
                        if traced:
                            self._lookup_span(&scratch, &t, read, &c, method, c.code, span_id,
                                              False, t.t0)
                    finally:
                        self._end(&c)
            if unary:
                if status is not None:
                    return c.code, status
                return _OK, _buf_bytes(&out)
            if status is not None:
                _put_refusal(&out, read, status)
            return _buf_bytes(&out)
        finally:
            PyMem_Free(out.data)
            PyMem_Free(scratch.data)

    cdef object _no_state(self, Caller* c):
        c.code = _UNAVAILABLE
        c.outcome = O_QUOTA_STATE
        return rules.QUOTA_STATE_UNAVAILABLE

    def check_batch(self, practitioner, request, today, now, *, trace=None):
        """A batch: (OK, CheckCoverageBatchResponse), or (code, google.rpc.Status)
        for the whole batch. A batch refused whole (malformed, oversize) is one attempt,
        metered like a lookup; an oversize one is refused after counting at most
        max_batch_items + 1 items, whatever follows."""
        cdef Request r
        cdef Buf out, item, scratch
        cdef Caller c
        cdef TraceCall t
        cdef unsigned char rpc_span[SPAN_ID_SIZE]
        cdef Py_ssize_t count = -1
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t n
        cdef Py_ssize_t size = 0
        cdef const unsigned char* p
        cdef const unsigned char* item_bytes = NULL
        cdef bint canonical = False
        cdef bint traced = self.trace
        cdef long long item_t0 = 0
        cdef Py_ssize_t limit = self.max_batch_items

        out.data = item.data = scratch.data = NULL
        out.size = out.capacity = item.size = item.capacity = 0
        scratch.size = scratch.capacity = 0
        try:
            if traced:
                # Held for the call: t.who points into these bytes.
                _who = self._begin_trace(&t, trace, now, practitioner)
                self._new_span_id(rpc_span)
            amcs = practitioner.amc_view
            if self._view(practitioner, &c):
                status = self._no_state(&c)
                if traced:
                    self._lookup_span(&scratch, &t, NULL, &c, METHOD_BATCH, c.code, rpc_span,
                                      True, t.t0)
                    self._rpc_span(&scratch, &t, METHOD_BATCH, rpc_span, c.code, 0)
                return c.code, status

            whole = None
            owner = request
            if type(request) is bytes:
                p = <const unsigned char*>PyBytes_AS_STRING(request)
                n = PyBytes_GET_SIZE(request)
                with nogil:
                    count = _count_items(p, n, limit)
            if count > limit:
                whole = rules.batch_too_large_status(limit)
            elif type(request) is not bytes or not _scan_batch(
                <const unsigned char*>PyBytes_AS_STRING(request),
                PyBytes_GET_SIZE(request), False, &count,
            ):
                try:
                    message = _BatchRequest.FromString(request)
                except DecodeError:
                    whole = rules.malformed_message_status("CheckCoverageBatchRequest")
                    count = 0
                else:
                    message.DiscardUnknownFields()
                    owner = message.SerializeToString()
                    canonical = True
                    if not _scan_batch(<const unsigned char*>PyBytes_AS_STRING(owner),
                                       PyBytes_GET_SIZE(owner), True, &count):
                        raise AssertionError(
                            "upb's serialization of a batch was not understood"
                        )
            if whole is None and count > limit:
                whole = rules.batch_too_large_status(limit)

            with self._env.begin(db=self._rights_db, buffers=False) as txn:
                get = txn.get
                try:
                    self._lock(today, now, &c)
                    if whole is not None:
                        status = self._decide(NULL, None, today, practitioner, now, &item,
                                              &c, amcs, whole)
                        if traced:
                            self._lookup_span(&scratch, &t, NULL, &c, METHOD_BATCH, c.code,
                                              rpc_span, True, t.t0)
                    else:
                        p = <const unsigned char*>PyBytes_AS_STRING(owner)
                        n = PyBytes_GET_SIZE(owner)
                        while pos < n:
                            if traced:
                                item_t0 = _monotonic_ns()
                            # Both succeed: _scan_batch read these same bytes.
                            _next_item(p, n, &pos, &item_bytes, &size)
                            _parse_request(item_bytes, size, &r, canonical)
                            item.size = 0
                            status = self._decide(&r, get, today, practitioner, now, &item,
                                                  &c, amcs, None)
                            if traced:
                                self._lookup_span(&scratch, &t, &r, &c, METHOD_BATCH, c.code,
                                                  rpc_span, True, item_t0)
                            if status is not None:
                                _put_refusal(&item, &r, status)
                            _put_len_field(&out, TAG_ITEMS, item.data, item.size)
                finally:
                    self._end(&c)
            if whole is not None:
                if traced:
                    self._rpc_span(&scratch, &t, METHOD_BATCH, rpc_span, c.code, count)
                return c.code, status
            if traced:
                self._rpc_span(&scratch, &t, METHOD_BATCH, rpc_span, _OK, count)
            return _OK, _buf_bytes(&out)
        finally:
            PyMem_Free(out.data)
            PyMem_Free(item.data)
            PyMem_Free(scratch.data)

    # -- tracing

    def take_spans(self):
        """The spans recorded since the last call (framed ScopeSpans.spans entries);
        empties them. Not thread-safe: call it where the gate is called."""
        data = _buf_bytes(&self._spans)
        self._spans.size = 0
        self._span_count = 0
        if self._spans.capacity > _KEEP_SPAN_BUFFER:
            PyMem_Free(self._spans.data)
            self._spans.data = NULL
            self._spans.capacity = 0
        return data

    def take_span_chunks(self, Py_ssize_t max_bytes):
        """take_spans() cut at span boundaries into [(chunk, spans in it)], each chunk at most
        `max_bytes` (or one span, if a span is larger): one export request each."""
        return self._take_chunks(max_bytes, None, None)

    def take_export_requests(self, bytes resource not None, bytes scope not None,
                             Py_ssize_t max_bytes):
        """take_span_chunks(max_bytes), each chunk written straight into the OTLP
        ExportTraceServiceRequest for this encoded Resource and InstrumentationScope
        (fastpath.trace.export_trace_request): one copy of the spans, no intermediate chunk."""
        return self._take_chunks(max_bytes, resource, scope)

    cdef list _take_chunks(self, Py_ssize_t max_bytes, bytes resource, bytes scope):
        cdef const unsigned char* p = self._spans.data
        cdef Py_ssize_t n = self._spans.size
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t start = 0
        cdef Py_ssize_t next_pos
        cdef unsigned long long size
        cdef long long count = 0
        chunks = []
        while pos < n:
            next_pos = pos + 1
            if p[pos] != 0x12 or not _read_varint(p, n, &next_pos, 10, &size):
                raise AssertionError("the span buffer is not framed spans")
            next_pos += <Py_ssize_t>size
            if next_pos - start > max_bytes and count:
                chunks.append((_chunk(p + start, pos - start, resource, scope), count))
                start = pos
                count = 0
            count += 1
            pos = next_pos
        if count:
            chunks.append((_chunk(p + start, n - start, resource, scope), count))
        self._spans.size = 0
        self._span_count = 0
        if self._spans.capacity > _KEEP_SPAN_BUFFER:
            PyMem_Free(self._spans.data)
            self._spans.data = NULL
            self._spans.capacity = 0
        return chunks

    def write_spans(self, int fd):
        """Write the recorded spans to the file `fd` (the worker's audit spool) with write(2)
        and empty the buffer: (bytes written, spans). On an error nothing is kept and OSError
        is raised; the caller undoes a partial write (its file's size is its own)."""
        cdef Py_ssize_t done = 0
        cdef Py_ssize_t n = self._spans.size
        cdef Py_ssize_t count = self._span_count
        cdef ssize_t wrote
        cdef int error
        self._spans.size = 0
        self._span_count = 0
        while done < n:
            wrote = write(fd, self._spans.data + done, n - done)
            if wrote < 0:
                error = errno
                if error == EINTR:
                    continue
                raise OSError(error, strerror(error))
            done += wrote
        if self._spans.capacity > _KEEP_SPAN_BUFFER:
            PyMem_Free(self._spans.data)
            self._spans.data = NULL
            self._spans.capacity = 0
        return done, count

    @property
    def span_bytes(self):
        """Bytes of spans waiting for take_spans()."""
        return self._spans.size

    def lookup_counts(self):
        """Cumulative lookups per [profession][outcome] (fastpath.trace), flattened."""
        return tuple([self._counts[i] for i in range(N_PROFESSIONS * N_OUTCOMES)])

    cdef inline uint64_t _next_id(self) noexcept:
        cdef uint64_t z
        self._trace_state += <uint64_t>0x9E3779B97F4A7C15
        z = self._trace_state
        z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
        return z ^ (z >> 31)

    cdef inline void _put_id(self, unsigned char* out, uint64_t v) noexcept:
        cdef int i
        for i in range(8):
            out[i] = <unsigned char>(v >> (8 * i))

    cdef void _new_trace_id(self, unsigned char* out) noexcept:
        self._put_id(out, self._next_id())
        self._put_id(out + 8, self._next_id())

    cdef void _new_span_id(self, unsigned char* out) noexcept:
        cdef uint64_t v = self._next_id()
        self._put_id(out, v if v else 1)

    def new_trace_id(self):
        cdef unsigned char out[TRACE_ID_SIZE]
        self._new_trace_id(out)
        return PyBytes_FromStringAndSize(<const char*>out, TRACE_ID_SIZE)

    def new_span_id(self):
        cdef unsigned char out[SPAN_ID_SIZE]
        self._new_span_id(out)
        return PyBytes_FromStringAndSize(<const char*>out, SPAN_ID_SIZE)

    def add_span(self, bytes span not None):
        """Append a span the server encoded (fastpath.trace.encode_span), e.g. a stream's."""
        if self._spans.size + PyBytes_GET_SIZE(span) > _MAX_SPAN_BUFFER:
            self.spans_dropped += 1
            return
        _put_bytes(&self._spans, span)
        self._span_count += 1

    cdef int _emit(self, const Buf* span) except -1:
        """`span` framed as a ScopeSpans.spans entry, onto the gate's buffer."""
        cdef Py_ssize_t framed = 1 + _varint_size(span.size) + span.size
        if self._spans.size + framed > _MAX_SPAN_BUFFER:
            self.spans_dropped += 1
            return 0
        _reserve(&self._spans, framed)
        self._spans.data[self._spans.size] = 0x12
        self._spans.size += 1
        _put_varint_unchecked(&self._spans, span.size)
        memcpy(self._spans.data + self._spans.size, span.data, span.size)
        self._spans.size += span.size
        self._span_count += 1
        return 0

    cdef object _begin_trace(self, TraceCall* t, object context, object now,
                             object practitioner):
        """Fill `t`; returns the practitioner's encoded attributes (keep them alive)."""
        t.t0 = _monotonic_ns()
        t.has_parent = False
        if context is None:
            self._new_trace_id(t.trace_id)
        else:
            trace_id, parent = _check_context(context)
            memcpy(t.trace_id, PyBytes_AS_STRING(trace_id), TRACE_ID_SIZE)
            if PyBytes_GET_SIZE(parent) == SPAN_ID_SIZE:
                memcpy(t.parent, PyBytes_AS_STRING(parent), SPAN_ID_SIZE)
                t.has_parent = True
        t.start_ns = _start_ns(now)
        who, profession = _practitioner_attributes(practitioner.practitioner_id,
                                                   practitioner.profession)
        t.who = PyBytes_AS_STRING(who)
        t.who_size = PyBytes_GET_SIZE(who)
        t.profession = profession
        return who

    cdef int _rpc_span(self, Buf* s, TraceCall* t, int method,
                       const unsigned char* span_id, int code,
                       long long items) except -1:
        cdef uint64_t end = t.start_ns + <uint64_t>(_monotonic_ns() - t.t0)
        s.size = 0
        _put_span_head(s, t.trace_id, span_id, t.parent if t.has_parent else NULL,
                       method, KIND_SERVER, t.start_ns, end)
        _put_bytes(s, <bytes>_RPC_ATTRS[method])
        _put_attr_int(s, _STATUS_CODE_KEY, <unsigned long long>code)
        _put_raw(s, t.who, t.who_size)
        _put_attr_int(s, _BATCH_ITEMS_KEY, <unsigned long long>items)
        return self._emit(s)

    cdef int _lookup_span(self, Buf* s, TraceCall* t, const Request* r, Caller* c,
                          int method, int code, const unsigned char* span_id,
                          bint child, long long item_t0) except -1:
        """One lookup's span. In a batch (`child`) an INTERNAL child of the RPC span
        `span_id`, with an id of its own; a unary call's is the SERVER span itself."""
        cdef unsigned char own_id[SPAN_ID_SIZE]
        cdef unsigned char hex[2 * PSEUDONYM_SIZE]
        cdef const unsigned char* parent = t.parent if t.has_parent else NULL
        cdef uint64_t end = t.start_ns + <uint64_t>(_monotonic_ns() - t.t0)
        cdef uint64_t start = t.start_ns + <uint64_t>(item_t0 - t.t0)
        cdef long long remaining
        cdef int kind = KIND_INTERNAL
        cdef int name = NAME_LOOKUP
        cdef int i
        cdef bytes tail
        self._counts[t.profession * N_OUTCOMES + c.outcome] += 1
        if child:
            parent = span_id
            self._new_span_id(own_id)
            span_id = own_id
        elif method == METHOD_UNARY:
            kind = KIND_SERVER
            name = METHOD_UNARY
        s.size = 0
        _put_span_head(s, t.trace_id, span_id, parent, name, kind, start, end)
        if method == METHOD_UNARY:
            _put_bytes(s, <bytes>_RPC_ATTRS[METHOD_UNARY])
            _put_attr_int(s, _STATUS_CODE_KEY, <unsigned long long>code)
        _put_raw(s, t.who, t.who_size)
        if c.validated:
            _put_bytes(s, <bytes>_DOMAIN_ATTRS[r.domain])
            _put_attr_str(s, _AMC_KEY, r.text[F_AMC_NUMBER], r.size[F_AMC_NUMBER])
        _put_bytes(s, <bytes>_OUTCOME_ATTRS[c.outcome])
        if c.validated:
            for i in range(PSEUDONYM_SIZE):
                hex[2 * i] = _HEX[c.pseudonym[i] >> 4]
                hex[2 * i + 1] = _HEX[c.pseudonym[i] & 15]
            _put_attr_str(s, _BENEFICIARY_KEY, hex, 2 * PSEUDONYM_SIZE)
        if c.slot != NULL:
            remaining = c.daily_limit - <long long>c.slot.daily_count
            _put_attr_int(s, _DAILY_REMAINING_KEY,
                          <unsigned long long>(remaining if remaining > 0 else 0))
            _put_attr_int(s, _DISTINCT_TODAY_KEY, c.slot.distinct_count)
        _put_bytes(s, <bytes>_GUARD_ATTRS[1 if c.guard_fired else 0])
        if c.would_deny:
            _put_bytes(s, <bytes>_WOULD_DENY_ATTRS[c.would_deny])
        if c.guard_fired:
            for i in range(2):
                tail = <bytes>_GUARD_EVENTS_TAIL[i]
                _reserve(s, 11 + 9 + PyBytes_GET_SIZE(tail))
                s.data[s.size] = 0x5A
                s.size += 1
                _put_varint_unchecked(s, 9 + PyBytes_GET_SIZE(tail))
                s.data[s.size] = 0x09
                s.size += 1
                _put_fixed64_unchecked(s, end)
                _put_bytes(s, tail)
        return self._emit(s)

    # -- one decision

    cdef object _decide(self, const Request* r, object txn_get, object today,
                        object practitioner, object now, Buf* out, Caller* c,
                        object amcs, object whole):
        """Write the CheckCoverageResponse for `r` to `out` and return None; or write
        nothing, set c.code and return the google.rpc.Status bytes refusing it. `whole`:
        the status refusing a message that could not be read (`r` NULL), which is metered
        like an invalid lookup.
        """
        cdef cg_slot* slot = c.slot
        cdef long long tat
        cdef bint bad
        c.code = 0
        c.found = MATCH_NONE
        c.would_deny = WD_NONE
        c.guard_fired = 0
        c.validated = 0
        # 0. A suspended practitioner gets nothing, and its refusals count nowhere.
        if slot != NULL and slot.flags & CG_FLAG_SUSPENDED:
            c.code = _PERMISSION_DENIED
            c.outcome = O_SUSPENDED
            return rules.PRACTITIONER_SUSPENDED

        # 1. Rate (GCRA) counts every attempt, valid or not.
        if slot != NULL:
            tat = slot.tat_ms if slot.tat_ms > c.now_ms else c.now_ms
            if tat - c.now_ms > c.tolerance_ms:
                if not c.shadow & SHADOW_RATE:
                    c.code = _RESOURCE_EXHAUSTED
                    c.outcome = O_RATE
                    return rules.quota_status(
                        rules.REASON_RATE,
                        rules.rate_retry_seconds(tat - c.tolerance_ms - c.now_ms),
                    )
                c.would_deny = WD_RATE
            else:
                slot.tat_ms = tat + c.interval_ms

        if whole is not None:
            c.code = _INVALID_ARGUMENT
            c.outcome = O_INVALID
            status = whole
        else:
            status = self._evaluate(r, txn_get, today, practitioner, now, out, c, amcs)
        if c.code == 0:
            c.outcome = (O_NO_MATCH if c.found == MATCH_NONE else
                         O_NOT_COVERED if c.found == MATCH_CLOSED else O_COVERED)

        # 7. The harvest guard watches the share of NO_MATCH and invalid answers.
        if slot != NULL and (c.code == 0 or c.code == _INVALID_ARGUMENT):
            bad = c.code == _INVALID_ARGUMENT or c.found == MATCH_NONE
            self._guard(c, practitioner, bad)
        return status

    cdef int _guard(self, Caller* c, object practitioner, bint bad) except -1:
        cdef cg_slot* slot = c.slot
        cdef long long n, count
        cdef uint64_t window
        slot.window_bits = (slot.window_bits << 1) | (1 if bad else 0)
        # min(len + 1, 64), as the reference: also mends a corrupted length.
        slot.window_len = slot.window_len + 1 if slot.window_len < 64 else 64
        n = slot.window_len if slot.window_len < c.guard_window else c.guard_window
        if n < c.guard_min:
            return 0
        window = slot.window_bits if n >= 64 else (
            slot.window_bits & ((<uint64_t>1 << n) - 1))
        count = _popcount64(window)
        if count * 100 >= c.guard_percent * n:
            if not c.shadow & SHADOW_GUARD:
                slot.flags |= CG_FLAG_SUSPENDED
                slot.suspended_at_ms = c.now_ms
                if slot.guard_fired < 0xFFFFFFFF:  # saturated, as the reference
                    slot.guard_fired += 1
                self.suspensions.append(practitioner.practitioner_id)
                c.guard_fired = 1
            elif c.would_deny == WD_NONE:
                c.would_deny = WD_GUARD
        return 0

    cdef object _evaluate(self, const Request* r, object txn_get, object today,
                          object practitioner, object now, Buf* out, Caller* c,
                          object amcs):
        cdef unsigned char identity[IDENTITY_SIZE]
        cdef unsigned char digest[STORAGE_KEY_SIZE]
        cdef unsigned char member_digest[MEMBER_HASH_SIZE]
        cdef unsigned char personal[16]
        cdef cg_blake2b_state member_state
        cdef long long care_date
        cdef bint care_exact = True
        cdef unsigned int bad
        cdef const unsigned char* member_hash = NULL
        cdef const unsigned char* v
        cdef Py_ssize_t n
        cdef int found = MATCH_NONE
        cdef int added = 0
        cdef bint seen, full, may_add
        cdef uint64_t fp = 0
        cdef cg_slot* slot = c.slot
        cdef Right best
        cdef bytes record
        memset(&best, 0, sizeof(Right))

        # 2. Validate every field; report all bad fields at once, by name only.
        bad = _invalid_fields(r, identity, &care_date)
        if bad:
            c.code = _INVALID_ARGUMENT
            c.outcome = O_INVALID
            return _invalid_fields_status(bad)
        memcpy(identity + NIR_SIZE, r.text[F_BIRTH_DATE], BIRTH_DATE_SIZE)
        identity[IDENTITY_SIZE - 1] = <unsigned char>(48 + r.birth_rank)
        c.validated = 1
        if self.trace:
            # The pseudonym is SipHash of the storage key (rules.Keys.pseudonym): hash it now.
            _hash(&self._storage_state, identity, IDENTITY_SIZE, digest)
            cg_siphash24(self._pseudonym_key, digest, STORAGE_KEY_SIZE, c.pseudonym)
        if care_date < 0:
            # No care date: the caller's today, compared in C when it is an exact int.
            if PyLong_CheckExact(today):
                care_date = _clamped(today)
            else:
                care_exact = False

        # 3. Scope, before anything is counted or read.
        if not c.domains & (<unsigned long long>1 << r.domain):
            c.code = _PERMISSION_DENIED
            c.outcome = O_DOMAIN
            return rules.DOMAIN_OUT_OF_SCOPE
        if amcs is not None and not _amc_in(
            amcs, r.text[F_AMC_NUMBER], r.size[F_AMC_NUMBER]
        ):
            c.code = _PERMISSION_DENIED
            c.outcome = O_AMC
            return rules.AMC_OUT_OF_SCOPE

        # The storage key (no store read yet; traced lookups have it already): it also
        # fingerprints the beneficiary for the distinct count, which saves a second keyed hash.
        if not self.trace:
            _hash(&self._storage_state, identity, IDENTITY_SIZE, digest)

        # 4. Daily lookups and distinct beneficiaries: check both, then count both.
        if slot != NULL:
            if slot.daily_count >= c.daily_limit:
                if not c.shadow & SHADOW_DAILY:
                    c.code = _RESOURCE_EXHAUSTED
                    c.outcome = O_DAILY
                    return rules.quota_status(
                        rules.REASON_DAILY, rules.day_retry_seconds(today, now)
                    )
                if c.would_deny == WD_NONE:
                    c.would_deny = WD_DAILY
            memcpy(&fp, digest, 8)
            if fp == 0:
                fp = 1
            full = slot.distinct_count >= c.distinct_limit
            may_add = ((not full) or (c.shadow & SHADOW_DISTINCT) != 0) and (
                slot.distinct_count < _MAX_DISTINCT_LIMIT)
            seen = cg_seen_or_add(slot, fp, may_add, &added)
            if not seen and full:
                if c.shadow & SHADOW_DISTINCT:
                    if c.would_deny == WD_NONE:
                        c.would_deny = WD_DISTINCT
                else:
                    c.code = _RESOURCE_EXHAUSTED
                    c.outcome = O_DISTINCT
                    return rules.quota_status(
                        rules.REASON_DISTINCT, rules.day_retry_seconds(today, now)
                    )
            if slot.daily_count < 0xFFFFFFFF:
                slot.daily_count += 1
            if added:
                slot.distinct_count += 1

        # 5. Read the store: one LMDB get.
        storage_key = PyBytes_FromStringAndSize(<const char*>digest, STORAGE_KEY_SIZE)
        self.store_reads += 1
        value = txn_get(storage_key)

        # 6. Every factor must match; any miss is the same NO_MATCH.
        if value is not None:
            if r.size[F_MEMBER_NUMBER]:
                memset(personal, 0, 16)
                memcpy(personal, PyBytes_AS_STRING(rules.PERSON_MEMBER),
                       PyBytes_GET_SIZE(rules.PERSON_MEMBER))
                cg_blake2b_init(&member_state, MEMBER_HASH_SIZE, self._pepper,
                                self._pepper_size, digest, personal)
                cg_blake2b_update(&member_state, r.text[F_MEMBER_NUMBER],
                                  r.size[F_MEMBER_NUMBER])
                cg_blake2b_final(&member_state, member_digest)
                member_hash = member_digest
            record = value
            v = <const unsigned char*>PyBytes_AS_STRING(record)
            n = PyBytes_GET_SIZE(record)
            if not _record_is_sound(v, n):
                # The reference decoder raises on this value: let it raise its own.
                rules.decode_record(record)
                raise AssertionError("a rights record judged unsound was decoded")
            # Rights open for the domain on the care date; the longest running wins.
            found = _match_rights(v, n, r, member_hash, care_date, care_exact, today,
                                  &best)
        c.found = found

        if r.size[F_REQUEST_ID]:
            _put_len_field(out, TAG_REQUEST_ID, r.text[F_REQUEST_ID],
                           r.size[F_REQUEST_ID])
        if found == MATCH_NONE:
            _put_varint_field(out, TAG_DECISION, DECISION_NO_MATCH)
            return None
        if found == MATCH_CLOSED:
            _put_varint_field(out, TAG_DECISION, DECISION_NOT_COVERED)
            return None
        _put_varint_field(out, TAG_DECISION, DECISION_COVERED)
        if best.rate_percent:
            _put_varint_field(out, TAG_RATE_PERCENT, best.rate_percent)
        if best.convention_size:
            _put_len_field(out, TAG_CONVENTION_TYPE, best.convention,
                           best.convention_size)
        _put_rights_end_date(out, best.end)
        self._put_attestation(out, r, care_date if care_exact else today,
                              identity, practitioner, now)
        return None

    cdef int _put_attestation(self, Buf* out, const Request* r, object care_date,
                              const unsigned char* identity, object practitioner,
                              object now) except -1:
        """rules.encode_attestation's token, built here when every value fits its
        field; otherwise rules.encode_attestation itself runs (and raises as it does).
        """
        cdef unsigned char payload[MAX_ATTESTATION_PAYLOAD + ATTESTATION_MAC_SIZE]
        cdef unsigned char tag[BENEFICIARY_TAG_SIZE]
        cdef unsigned char mac[32]
        cdef Py_ssize_t size, pid_size, amc_size, token_size
        cdef const char* pid
        cdef const char* token
        cdef long long expires_c = -1
        cdef long long care_c = -1
        # In the order the reference evaluates its arguments.
        expires = int(now) + self.attestation_ttl
        practitioner_id = practitioner.practitioner_id
        _hash(&self._tag_state, identity, IDENTITY_SIZE, tag)

        if PyLong_CheckExact(expires):
            expires_c = _clamped(expires)
        if PyLong_CheckExact(care_date):
            care_c = _clamped(care_date)
        if not (
            0 <= expires_c <= UINT32_MAX
            and 0 <= care_c <= UINT32_MAX
            and type(practitioner_id) is str
            and PyUnicode_IS_ASCII(practitioner_id)
            and PyUnicode_GET_LENGTH(practitioner_id) <= 255
        ):
            token_str = rules.encode_attestation(
                self._attestation_key,
                expires=expires,
                domain=r.domain,
                care_date=care_date,
                amc_number=PyUnicode_DecodeASCII(
                    <const char*>r.text[F_AMC_NUMBER], r.size[F_AMC_NUMBER], NULL
                ),
                practitioner_id=practitioner_id,
                beneficiary_tag=PyBytes_FromStringAndSize(<const char*>tag,
                                                          BENEFICIARY_TAG_SIZE),
            )
            token = PyUnicode_AsUTF8AndSize(token_str, &token_size)
            return _put_len_field(out, TAG_ATTESTATION, token, token_size)

        # u8 version, u32 expires, u8 domain, u32 care date, u8 + amc, u8 + practitioner
        # id, beneficiary tag; all big-endian (rules._ATT_HEAD).
        pid = PyUnicode_AsUTF8AndSize(practitioner_id, &pid_size)
        amc_size = r.size[F_AMC_NUMBER]
        payload[0] = ATTESTATION_VERSION
        _put_u32be(payload + 1, expires_c)
        payload[5] = <unsigned char>r.domain
        _put_u32be(payload + 6, care_c)
        payload[10] = <unsigned char>amc_size
        memcpy(payload + 11, r.text[F_AMC_NUMBER], amc_size)
        size = 11 + amc_size
        payload[size] = <unsigned char>pid_size
        memcpy(payload + size + 1, pid, pid_size)
        size += 1 + pid_size
        memcpy(payload + size, tag, BENEFICIARY_TAG_SIZE)
        size += BENEFICIARY_TAG_SIZE

        cg_hmac_sha256(&self._mac_key, payload, size, mac)
        memcpy(payload + size, mac, ATTESTATION_MAC_SIZE)
        size += ATTESTATION_MAC_SIZE

        token_size = (size * 4 + 2) // 3
        _reserve(out, 11 + token_size)
        out.data[out.size] = TAG_ATTESTATION
        out.size += 1
        _put_varint_unchecked(out, <unsigned long long>token_size)
        out.size += _b64url(payload, size, out.data + out.size)
        return 0


def complete_spans(data, Py_ssize_t max_bytes):
    """fastpath.trace.complete_spans in C: (end, count) of the complete framed spans at the
    start of `data` (a bytes-like object), as many as fit in `max_bytes` and at least one."""
    cdef const unsigned char[::1] view = data
    cdef Py_ssize_t n = view.shape[0]
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t count = 0
    cdef Py_ssize_t next_pos
    cdef unsigned long long size
    if n == 0:
        return 0, 0
    with nogil:
        while pos < n:
            next_pos = pos + 1
            if view[pos] != 0x12:
                count = -1
                break
            if not _read_varint(&view[0], n, &next_pos, 10, &size):
                break
            if size > <unsigned long long>(n - next_pos):
                break
            next_pos += <Py_ssize_t>size
            if next_pos > max_bytes and count:
                break
            pos = next_pos
            count += 1
    if count < 0:
        raise ValueError("not a framed span")
    return pos, count
