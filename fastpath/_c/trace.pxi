# OTLP spans, as fastpath.trace encodes them (the constant pieces are its bytes): trace and
# span ids, a lookup's span and an RPC's, the gate's buffer of framed spans, and its cutting
# into export requests at span boundaries.

cdef tuple _DOMAIN_ATTRS = _trace.DOMAIN_ATTRS
cdef tuple _OUTCOME_ATTRS = _trace.OUTCOME_ATTRS
cdef tuple _WOULD_DENY_ATTRS = _trace.WOULD_DENY_ATTRS
cdef bytes _DEGRADED_ATTR = _trace.DEGRADED_ATTR
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
    bint degraded               # [cluster] without Redis: every lookup span says so


cdef inline long long _monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


# -- ids (fastpath.trace.splitmix64)

cdef inline uint64_t _next_id(uint64_t* state) noexcept nogil:
    cdef uint64_t z
    state[0] += <uint64_t>0x9E3779B97F4A7C15
    z = state[0]
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef inline void _put_id(unsigned char* out, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        out[i] = <unsigned char>(v >> (8 * i))


cdef void _new_trace_id(uint64_t* state, unsigned char* out) noexcept nogil:
    _put_id(out, _next_id(state))
    _put_id(out + 8, _next_id(state))


cdef void _new_span_id(uint64_t* state, unsigned char* out) noexcept nogil:
    cdef uint64_t v = _next_id(state)
    _put_id(out, v if v else 1)


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


cdef object _begin_trace(TraceCall* t, object context, object now, object practitioner,
                         uint64_t* ids):
    """Fill `t` (a new trace id from `ids` unless the caller's `context` has one); returns the
    practitioner's encoded attributes (keep them alive: t.who points into them)."""
    t.t0 = _monotonic_ns()
    t.has_parent = False
    if context is None:
        _new_trace_id(ids, t.trace_id)
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


# -- span encoding (fastpath.trace.encode_span, rpc_span)

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


cdef int _put_rpc_span(Buf* s, TraceCall* t, int method, const unsigned char* span_id,
                       int code, long long items) except -1:
    """An RPC's SERVER span into `s` (emptied first)."""
    cdef uint64_t end = t.start_ns + <uint64_t>(_monotonic_ns() - t.t0)
    s.size = 0
    _put_span_head(s, t.trace_id, span_id, t.parent if t.has_parent else NULL,
                   method, KIND_SERVER, t.start_ns, end)
    _put_bytes(s, <bytes>_RPC_ATTRS[method])
    _put_attr_int(s, _STATUS_CODE_KEY, <unsigned long long>code)
    _put_raw(s, t.who, t.who_size)
    _put_attr_int(s, _BATCH_ITEMS_KEY, <unsigned long long>items)
    return 0


cdef int _put_lookup_span(Buf* s, TraceCall* t, const Request* r, const Caller* c,
                          int method, int code, const unsigned char* span_id,
                          const unsigned char* rpc_span, long long item_t0) except -1:
    """One lookup's span into `s` (emptied first): an INTERNAL child of the batch's RPC span
    `rpc_span`; or, without one, a unary call's SERVER span or a stream message's span. Only
    a request that passed validation (c.validated) gives its domain, AMC and pseudonym."""
    cdef unsigned char hex[2 * PSEUDONYM_SIZE]
    cdef const unsigned char* parent = t.parent if t.has_parent else NULL
    cdef uint64_t end = t.start_ns + <uint64_t>(_monotonic_ns() - t.t0)
    cdef uint64_t start = t.start_ns + <uint64_t>(item_t0 - t.t0)
    cdef long long remaining
    cdef int kind = KIND_INTERNAL
    cdef int name = NAME_LOOKUP
    cdef int i
    cdef bytes tail
    if rpc_span != NULL:
        parent = rpc_span
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
    if t.degraded:
        _put_bytes(s, _DEGRADED_ATTR)
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
    if c.base.fresh:
        # Once a day per signal at most: built by fastpath.trace itself.
        _put_bytes(s, _trace.anomaly_events(
            end, c.base.fresh, [c.base.scores[i] for i in range(N_SIGNALS)], c.base.suspend))
    return 0


# -- the gate's buffer of spans

# A span buffer keeps its memory between takes up to this size: a buffer freed and grown again
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


cdef struct SpanBuffer:
    # Spans framed as ScopeSpans.spans entries, ready to export, and how many.
    Buf framed
    Py_ssize_t count


cdef bint _buffer_span(SpanBuffer* b, const Buf* span) except -1:
    """`span` framed onto `b`; False (nothing kept) when `b` is full."""
    cdef Py_ssize_t framed = 1 + _varint_size(span.size) + span.size
    if b.framed.size + framed > _MAX_SPAN_BUFFER:
        return False
    _reserve(&b.framed, framed)
    b.framed.data[b.framed.size] = 0x12
    b.framed.size += 1
    _put_varint_unchecked(&b.framed, span.size)
    memcpy(b.framed.data + b.framed.size, span.data, span.size)
    b.framed.size += span.size
    b.count += 1
    return True


cdef bint _buffer_framed(SpanBuffer* b, bytes span) except -1:
    """A span already framed (fastpath.trace.encode_span) onto `b`; False when `b` is full."""
    if b.framed.size + PyBytes_GET_SIZE(span) > _MAX_SPAN_BUFFER:
        return False
    _put_bytes(&b.framed, span)
    b.count += 1
    return True


cdef void _emptied(SpanBuffer* b) noexcept:
    b.framed.size = 0
    b.count = 0
    if b.framed.capacity > _KEEP_SPAN_BUFFER:
        PyMem_Free(b.framed.data)
        b.framed.data = NULL
        b.framed.capacity = 0


cdef bytes _take_spans(SpanBuffer* b):
    data = _buf_bytes(&b.framed)
    _emptied(b)
    return data


cdef list _take_chunks(SpanBuffer* b, Py_ssize_t max_bytes, bytes resource, bytes scope):
    """The spans cut at span boundaries into [(chunk, spans in it)], each chunk at most
    `max_bytes` (or one span, if a span is larger), as bytes or (with a resource) as a whole
    export request; `b` emptied."""
    cdef const unsigned char* p = b.framed.data
    cdef Py_ssize_t n = b.framed.size
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
    _emptied(b)
    return chunks


cdef tuple _write_spans(SpanBuffer* b, int fd):
    """Write the spans to the file `fd` with write(2), `b` emptied: (bytes written, spans). On
    an error nothing is kept and OSError is raised."""
    cdef Py_ssize_t done = 0
    cdef Py_ssize_t n = b.framed.size
    cdef Py_ssize_t count = b.count
    cdef ssize_t wrote
    cdef int error
    b.framed.size = 0
    b.count = 0
    while done < n:
        wrote = write(fd, b.framed.data + done, n - done)
        if wrote < 0:
            error = errno
            if error == EINTR:
                continue
            raise OSError(error, strerror(error))
        done += wrote
    _emptied(b)
    return done, count


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
