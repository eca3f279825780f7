# The protobuf wire format, both ways: the output buffer and its field writers, and the parser of
# CheckCoverageRequest and of batches (the twin of upb, and of rules.count_batch_items).

# Looked up once: these run for every request.
_Request = pb.CheckCoverageRequest
_BatchRequest = pb.CheckCoverageBatchRequest


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


cdef tuple _load_batch(object request, Py_ssize_t limit, Py_ssize_t* count, bint* canonical):
    """Read a CheckCoverageBatchRequest as the reference does: (the bytes whose items to read,
    None), or (None, the google.rpc.Status refusing the batch whole); `count` items either way,
    counted as far as they were. `canonical` is set when the bytes are upb's re-serialization.
    An oversize batch is refused after counting at most limit + 1 items, whatever follows."""
    cdef const unsigned char* p
    cdef Py_ssize_t n
    whole = None
    owner = request
    count[0] = -1
    if type(request) is bytes:
        p = <const unsigned char*>PyBytes_AS_STRING(request)
        n = PyBytes_GET_SIZE(request)
        with nogil:
            count[0] = _count_items(p, n, limit)
    if count[0] > limit:
        whole = rules.batch_too_large_status(limit)
    elif type(request) is not bytes or not _scan_batch(
        <const unsigned char*>PyBytes_AS_STRING(request),
        PyBytes_GET_SIZE(request), False, count,
    ):
        try:
            message = _BatchRequest.FromString(request)
        except DecodeError:
            whole = rules.malformed_message_status("CheckCoverageBatchRequest")
            count[0] = 0
        else:
            message.DiscardUnknownFields()
            owner = message.SerializeToString()
            canonical[0] = True
            if not _scan_batch(<const unsigned char*>PyBytes_AS_STRING(owner),
                               PyBytes_GET_SIZE(owner), True, count):
                raise AssertionError(
                    "upb's serialization of a batch was not understood"
                )
    if whole is None and count[0] > limit:
        whole = rules.batch_too_large_status(limit)
    if whole is not None:
        return None, whole
    return owner, None
