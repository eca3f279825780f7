# Rights records (layout in rules.py): soundness as rules.decode_record judges it, and the
# reference's matching of the rows against a request (step 6 of a decision).

cdef struct Right:
    unsigned int rate_percent
    long long end
    const unsigned char* convention
    Py_ssize_t convention_size


cdef inline long long _u32le(const unsigned char* p) noexcept nogil:
    return <long long>(<uint32_t>p[0] | (<uint32_t>p[1] << 8)
                       | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24))


cdef inline void _put_u32le(unsigned char* out, uint32_t v) noexcept nogil:
    out[0] = <unsigned char>(v & 0xFF)
    out[1] = <unsigned char>((v >> 8) & 0xFF)
    out[2] = <unsigned char>((v >> 16) & 0xFF)
    out[3] = <unsigned char>(v >> 24)


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
