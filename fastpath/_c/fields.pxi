# The field rules of a CheckCoverageRequest, field for field as rules.py's field checks
# (rules.FIELD_RULES), read from a parsed Request without a Python string.

_invalid_fields_status = rules.invalid_fields_status


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
