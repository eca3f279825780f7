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

One extension module, split by concern into the include files of `_c/`, each named after
its Python twin (the C headers they call are declared in `_cheaders.pxd`). This file keeps
the Gate: its state, its entry points and the steps of one decision, in the reference's
order.
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
from fastpath import baselines as _baselines
from fastpath import quota, rules
from fastpath import trace as _trace

from fastpath._cheaders cimport (
    CG_CREDIT_RING,
    CG_FLAG_SUSPENDED,
    CG_LOCK_ENTRY,
    EBUSY,
    PyUnicode_IS_ASCII,
    __builtin_popcountll,
    cg_blake2b_absorb_key,
    cg_blake2b_final,
    cg_blake2b_init,
    cg_blake2b_short,
    cg_blake2b_state,
    cg_blake2b_update,
    cg_credit,
    cg_credit_roll_day,
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

IMPLEMENTATION = "cython"

# The rooms, each named after its Python twin and using only those included before it.
# Numbers and layouts shared with rules, quota and trace, checked against them at import:
include "_c/consts.pxi"
# The output buffer; request and batch parsing (upb's twin, and rules.count_batch_items'):
include "_c/wire.pxi"
# The field rules (rules.py's field checks):
include "_c/fields.pxi"
# The keyed hashes (rules.Keys):
include "_c/keys.pxi"
# Rights records, their soundness and matching (rules.decode_record):
include "_c/records.pxi"
# CheckCoverageResponse fields: answers and refusals:
include "_c/responses.pxi"
# The attestation token (rules.encode_attestation):
include "_c/attestation.pxi"
# Each practitioner's own past, and the signals a lookup raises against it (fastpath.baselines):
include "_c/baselines.pxi"
# The caller's view and quota slot, and the quota steps of a decision (fastpath.quota):
include "_c/quota.pxi"
# Spans, ids, and the gate's span buffer (fastpath.trace):
include "_c/trace.pxi"
# The rights file of an import, read into records (service.importer.read_rights, then
# rules.encode_record):
include "_c/importer.pxi"


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
    cdef KeyStates _hashes
    # The shared quota file (fastpath.quota.QuotaFile) and its mapping.
    cdef object _quota
    # Closed (replaced): every call refuses. A closed gate never means "no quotas".
    cdef bint _closed
    cdef unsigned char[::1] _quota_map
    cdef unsigned char[::1] _quota_locks
    cdef long long _quota_slots
    # With [cluster]: this host's credit per slot (fastpath.quota.CreditFile), its mapping.
    cdef object _credit
    cdef unsigned char[::1] _credit_map
    cdef long long _credit_slots
    # Per-practitioner baselines (fastpath.baselines.BaselineFile), under the slot's mutex too.
    cdef object _baseline
    cdef unsigned char[::1] _base_map
    cdef long long _base_slots
    cdef unsigned long long _anomaly_counts[N_PROFESSIONS * N_SIGNALS]
    # The last call's lookups set aside for want of credit (their indexes), and how many of its
    # outcomes were bad for the guard (the server reports those to the global guard).
    cdef public list short
    cdef public long long last_bad
    # Set by the server while its host cannot reach the cluster's Redis: lookup spans say so.
    cdef public bint cluster_degraded
    # The rights generation this gate reads (service.snapshots), on every span.
    cdef readonly object generation
    cdef bytes _generation_attr
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
    cdef SpanBuffer _spans
    cdef public unsigned long long spans_dropped
    cdef unsigned long long _counts[N_PROFESSIONS * N_OUTCOMES]

    def __init__(self, env, rights_db, keys, *, max_batch_items=500,
                 attestation_ttl=7 * 86400, quota=None,  # no-cython-lint
                 trace=False, trace_seed=None, credit=None,  # (`quota`: callers' keyword)
                 generation=0, baseline=None):
        rules.require_upb()
        if (credit is not None or baseline is not None) and quota is None:
            raise ValueError(
                "cluster credit and baselines need the quota file they are locked with")
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
        memset(self._anomaly_counts, 0, sizeof(self._anomaly_counts))
        self._baseline = baseline
        self._base_slots = 0
        if baseline is not None:
            self._base_map = baseline.map
            self._base_slots = baseline.slots
        _init_keys(&self._hashes, keys, self._attestation_key)
        self._quota = quota
        self._quota_slots = 0
        if quota is not None:
            self._quota_map = quota.map
            self._quota_locks = quota.locks_map
            self._quota_slots = quota.slots
        self._credit = credit
        self._credit_slots = -1
        if credit is not None:
            self._credit_map = credit.map
            self._credit_slots = credit.slots
        self.short = []
        self.last_bad = 0
        self.cluster_degraded = False
        self.generation = generation
        self._generation_attr = _trace.generation_attr(generation)

    def __dealloc__(self):
        PyMem_Free(self._spans.framed.data)

    def close(self):
        """Let go of the quota file's mapping (so QuotaFile.close() can unmap it). From now
        on every call is refused QUOTA_STATE_UNAVAILABLE."""
        self._quota = None
        self._quota_map = None
        self._quota_locks = None
        self._quota_slots = 0
        self._credit = None
        self._credit_map = None
        self._credit_slots = -1
        self._baseline = None
        self._base_map = None
        self._base_slots = 0
        self._closed = True

    @property
    def closed(self):
        return self._closed

    # -- the practitioner's quota slot, locked for the whole call

    cdef bint _view(self, object practitioner, Caller* c) except -1:
        """Fill `c` (quota.pxi); True when the caller's quota state cannot be reached."""
        if _caller_view(practitioner, c, self._closed, self._quota is not None,
                        self._quota_slots, self._credit_slots):
            return True
        if self._baseline is not None and c.slot_index >= 0:
            _baseline_view(practitioner, &c.base, &self._base_map[0], c.slot_index,
                           self._base_slots)
        return False

    cdef int _lock(self, object today, object now, Caller* c) except -1:
        """Take the caller's quota slot (if it has one) for the whole call, rolled to `today`."""
        if c.slot_index < 0:
            return 0
        c.base.today = <uint32_t>today
        return _lock_slot(c, today, now, &self._quota_map[0], &self._quota_locks[0],
                          &self._credit_map[0] if self._credit is not None else NULL)

    # -- entry points
    #
    # With tracing on (self.trace), each also writes its spans (fastpath.trace) to
    # self._spans; the decisions and the bytes returned are the same either way.

    def check(self, practitioner, request, today, now, *, trace=None,
              int credit_mode=CREDIT_SPEND):
        """A unary call: (OK, CheckCoverageResponse) or (code, google.rpc.Status); with cluster
        credit, (SHORT, b"") when the lookup was set aside for want of it."""
        return self._single(practitioner, request, today, now, trace, METHOD_UNARY,
                            credit_mode)

    def check_item(self, practitioner, request, today, now, *, trace=None,
                   int credit_mode=CREDIT_SPEND):
        """A stream message: always a CheckCoverageResponse, refusals in `error`; with
        cluster credit, b"" when the lookup was set aside for want of it."""
        return self._single(practitioner, request, today, now, trace, METHOD_STREAM,
                            credit_mode)

    cdef object _single(self, object practitioner, object request, object today, object now,
                        object trace, int method, int credit_mode):
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
        self.short = []
        self.last_bad = 0
        try:
            if traced:
                # Held for the call: t.who points into these bytes.
                _who = _begin_trace(&t, trace, now, practitioner, &self._trace_state)
                _who = _who + self._generation_attr
                t.who = PyBytes_AS_STRING(_who)
                t.who_size = PyBytes_GET_SIZE(_who)
                t.degraded = self.cluster_degraded
                _new_span_id(&self._trace_state, span_id)
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
                c.mode = credit_mode
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
                        if c.code == _SHORT:
                            self.short = [0]
                            return (_SHORT, b"") if unary else b""
                        if traced:
                            self._lookup_span(&scratch, &t, read, &c, method, c.code, span_id,
                                              False, t.t0)
                    finally:
                        _unlock_slot(&c)
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

    def check_batch(self, practitioner, request, today, now, *, trace=None,
                    int credit_mode=CREDIT_SPEND):
        """A batch: (OK, CheckCoverageBatchResponse), or (code, google.rpc.Status)
        for the whole batch. A batch refused whole (malformed, oversize) is one attempt,
        metered like a lookup; an oversize one is refused after counting at most
        max_batch_items + 1 items, whatever follows. With cluster credit, an item set aside
        for want of it is an empty item, its index in self.short (a batch refused whole is set
        aside whole: code SHORT)."""
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
        cdef Py_ssize_t index = 0

        self.short = []
        self.last_bad = 0
        out.data = item.data = scratch.data = NULL
        out.size = out.capacity = item.size = item.capacity = 0
        scratch.size = scratch.capacity = 0
        try:
            if traced:
                # Held for the call: t.who points into these bytes.
                _who = _begin_trace(&t, trace, now, practitioner, &self._trace_state)
                _who = _who + self._generation_attr
                t.who = PyBytes_AS_STRING(_who)
                t.who_size = PyBytes_GET_SIZE(_who)
                t.degraded = self.cluster_degraded
                _new_span_id(&self._trace_state, rpc_span)
            amcs = practitioner.amc_view
            if self._view(practitioner, &c):
                status = self._no_state(&c)
                if traced:
                    self._lookup_span(&scratch, &t, NULL, &c, METHOD_BATCH, c.code, rpc_span,
                                      True, t.t0)
                    self._rpc_span(&scratch, &t, METHOD_BATCH, rpc_span, c.code, 0)
                return c.code, status

            owner, whole = _load_batch(request, self.max_batch_items, &count, &canonical)
            c.mode = credit_mode
            with self._env.begin(db=self._rights_db, buffers=False) as txn:
                get = txn.get
                try:
                    self._lock(today, now, &c)
                    if whole is not None:
                        status = self._decide(NULL, None, today, practitioner, now, &item,
                                              &c, amcs, whole)
                        if c.code == _SHORT:
                            self.short = [0]
                            return _SHORT, b""
                        if traced:
                            self._lookup_span(&scratch, &t, NULL, &c, METHOD_BATCH, c.code,
                                              rpc_span, True, t.t0)
                    else:
                        p = <const unsigned char*>PyBytes_AS_STRING(owner)
                        n = PyBytes_GET_SIZE(owner)
                        while pos < n:
                            if traced:
                                item_t0 = _monotonic_ns()
                            # Both succeed: _load_batch read these same bytes.
                            _next_item(p, n, &pos, &item_bytes, &size)
                            _parse_request(item_bytes, size, &r, canonical)
                            item.size = 0
                            status = self._decide(&r, get, today, practitioner, now, &item,
                                                  &c, amcs, None)
                            if c.code == _SHORT:
                                self.short.append(index)
                                index += 1
                                _put_len_field(&out, TAG_ITEMS, NULL, 0)
                                continue
                            index += 1
                            if traced:
                                self._lookup_span(&scratch, &t, &r, &c, METHOD_BATCH, c.code,
                                                  rpc_span, True, item_t0)
                            if status is not None:
                                _put_refusal(&item, &r, status)
                            _put_len_field(&out, TAG_ITEMS, item.data, item.size)
                finally:
                    _unlock_slot(&c)
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

    # -- tracing (trace.pxi)

    def take_spans(self):
        """The spans recorded since the last call (framed ScopeSpans.spans entries);
        empties them. Not thread-safe: call it where the gate is called."""
        return _take_spans(&self._spans)

    def take_span_chunks(self, Py_ssize_t max_bytes):
        """take_spans() cut at span boundaries into [(chunk, spans in it)], each chunk at most
        `max_bytes` (or one span, if a span is larger): one export request each."""
        return _take_chunks(&self._spans, max_bytes, None, None)

    def take_export_requests(self, bytes resource not None, bytes scope not None,
                             Py_ssize_t max_bytes):
        """take_span_chunks(max_bytes), each chunk written straight into the OTLP
        ExportTraceServiceRequest for this encoded Resource and InstrumentationScope
        (fastpath.trace.export_trace_request): one copy of the spans, no intermediate chunk."""
        return _take_chunks(&self._spans, max_bytes, resource, scope)

    def write_spans(self, int fd):
        """Write the recorded spans to the file `fd` (the worker's audit spool) with write(2)
        and empty the buffer: (bytes written, spans). On an error nothing is kept and OSError
        is raised; the caller undoes a partial write (its file's size is its own)."""
        return _write_spans(&self._spans, fd)

    @property
    def span_bytes(self):
        """Bytes of spans waiting for take_spans()."""
        return self._spans.framed.size

    def lookup_counts(self):
        """Cumulative lookups per [profession][outcome] (fastpath.trace), flattened."""
        return tuple([self._counts[i] for i in range(N_PROFESSIONS * N_OUTCOMES)])

    def anomaly_counts(self):
        """Cumulative baseline signals raised per [profession][signal], flattened."""
        return tuple([self._anomaly_counts[i] for i in range(N_PROFESSIONS * N_SIGNALS)])

    def new_trace_id(self):
        cdef unsigned char out[TRACE_ID_SIZE]
        _new_trace_id(&self._trace_state, out)
        return PyBytes_FromStringAndSize(<const char*>out, TRACE_ID_SIZE)

    def new_span_id(self):
        cdef unsigned char out[SPAN_ID_SIZE]
        _new_span_id(&self._trace_state, out)
        return PyBytes_FromStringAndSize(<const char*>out, SPAN_ID_SIZE)

    def add_span(self, bytes span not None):
        """Append a span the server encoded (fastpath.trace.encode_span), e.g. a stream's."""
        if not _buffer_framed(&self._spans, span):
            self.spans_dropped += 1

    cdef int _emit(self, const Buf* span) except -1:
        """`span` framed as a ScopeSpans.spans entry, onto the gate's buffer."""
        if not _buffer_span(&self._spans, span):
            self.spans_dropped += 1
        return 0

    cdef int _rpc_span(self, Buf* s, TraceCall* t, int method,
                       const unsigned char* span_id, int code,
                       long long items) except -1:
        _put_rpc_span(s, t, method, span_id, code, items)
        return self._emit(s)

    cdef int _lookup_span(self, Buf* s, TraceCall* t, const Request* r, Caller* c,
                          int method, int code, const unsigned char* span_id,
                          bint child, long long item_t0) except -1:
        """One lookup's span, counted. In a batch (`child`) an INTERNAL child of the RPC span
        `span_id`, with an id of its own; a unary call's is the SERVER span itself."""
        cdef unsigned char own_id[SPAN_ID_SIZE]
        self._counts[t.profession * N_OUTCOMES + c.outcome] += 1
        if child:
            _new_span_id(&self._trace_state, own_id)
            _put_lookup_span(s, t, r, c, method, code, own_id, span_id, item_t0)
        else:
            _put_lookup_span(s, t, r, c, method, code, span_id, NULL, item_t0)
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
        cdef long long wait_ms
        cdef int lacking
        cdef bint bad
        c.code = 0
        c.found = MATCH_NONE
        c.would_deny = WD_NONE
        c.guard_fired = 0
        c.validated = 0
        c.base.fresh = 0
        c.base.suspend = False
        # 0. A suspended practitioner gets nothing, and its refusals count nowhere.
        if _suspended(c):
            c.code = _PERMISSION_DENIED
            c.outcome = O_SUSPENDED
            return rules.PRACTITIONER_SUSPENDED

        # 0'. With cluster credit: a rate token and daily credit this host holds, or the lookup
        # is set aside (or refused) before anything is spent.
        if c.credit != NULL:
            lacking = _credit_short(c)
            if lacking and c.mode != CREDIT_OPEN:
                return self._without_credit(c, lacking, today, now)

        # 1. Rate (GCRA) counts every attempt, valid or not.
        wait_ms = _spend_rate(c)
        if wait_ms:
            c.code = _RESOURCE_EXHAUSTED
            c.outcome = O_RATE
            return rules.quota_status(rules.REASON_RATE, rules.rate_retry_seconds(wait_ms))

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
        if c.slot != NULL and (c.code == 0 or c.code == _INVALID_ARGUMENT):
            bad = c.code == _INVALID_ARGUMENT or c.found == MATCH_NONE
            if _guard(c, bad):
                self.suspensions.append(practitioner.practitioner_id)
            if c.credit != NULL:
                _credit_outcome(c, bad)
                self.last_bad += bad
        return status

    cdef int _anomalies(self, Caller* c, object practitioner) except -1:
        """Signals a lookup raised: counted by profession and signal; a policy they meet
        suspends the practitioner, as the guard does (the reference's Gate._observe)."""
        cdef int i
        index = _trace.practitioner_attributes(practitioner.practitioner_id,
                                               practitioner.profession)[1]
        for i in range(N_SIGNALS):
            if c.base.fresh >> i & 1:
                self._anomaly_counts[<int>index * N_SIGNALS + i] += 1
        if c.base.suspend:
            c.slot.flags |= CG_FLAG_SUSPENDED
            c.slot.suspended_at_ms = c.now_ms
            self.suspensions.append(practitioner.practitioner_id)
        return 0

    cdef object _without_credit(self, Caller* c, int outcome, object today, object now):
        """A lookup this host holds no credit for, as c.mode says: set aside (c.code SHORT),
        refused as the limit refuses, or refused for want of the shared quota backend."""
        if c.mode == CREDIT_SPEND:
            c.code = _SHORT
            return b""
        c.code = _UNAVAILABLE if c.mode == CREDIT_BACKEND else _RESOURCE_EXHAUSTED
        if c.mode == CREDIT_BACKEND:
            c.outcome = O_BACKEND
            return rules.QUOTA_BACKEND_UNAVAILABLE
        c.outcome = outcome
        if outcome == O_RATE:
            return rules.quota_status(rules.REASON_RATE, 1)
        return rules.quota_status(
            rules.REASON_DAILY if outcome == O_DAILY else rules.REASON_DISTINCT,
            rules.day_retry_seconds(today, now),
        )

    cdef object _evaluate(self, const Request* r, object txn_get, object today,
                          object practitioner, object now, Buf* out, Caller* c,
                          object amcs):
        cdef unsigned char identity[IDENTITY_SIZE]
        cdef unsigned char digest[STORAGE_KEY_SIZE]
        cdef unsigned char member_digest[MEMBER_HASH_SIZE]
        cdef unsigned char tag[BENEFICIARY_TAG_SIZE]
        cdef long long care_date
        cdef bint care_exact = True
        cdef unsigned int bad
        cdef const unsigned char* member_hash = NULL
        cdef const unsigned char* v
        cdef Py_ssize_t n
        cdef int found = MATCH_NONE
        cdef int refused
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
            _storage_key(&self._hashes, identity, digest)
            _pseudonym(&self._hashes, digest, c.pseudonym)
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
            _storage_key(&self._hashes, identity, digest)

        # 4. Daily lookups and distinct beneficiaries: check both, then count both.
        refused = _count_lookup(c, digest)
        if refused == CREDIT_SHORT:
            return self._without_credit(c, O_DISTINCT, today, now)
        if refused:
            c.code = _RESOURCE_EXHAUSTED
            c.outcome = refused
            return rules.quota_status(
                rules.REASON_DAILY if refused == O_DAILY else rules.REASON_DISTINCT,
                rules.day_retry_seconds(today, now),
            )
        # 4'. The lookup against the practitioner's own past (baselines.pxi).
        if c.base.rec != NULL:
            _observe(&c.base, c.base.today, c.now_ms, r.domain, digest)
            if c.base.fresh:
                self._anomalies(c, practitioner)

        # 5. Read the store: one LMDB get.
        storage_key = PyBytes_FromStringAndSize(<const char*>digest, STORAGE_KEY_SIZE)
        self.store_reads += 1
        value = txn_get(storage_key)

        # 6. Every factor must match; any miss is the same NO_MATCH.
        if value is not None:
            if r.size[F_MEMBER_NUMBER]:
                _member_hash(&self._hashes, digest, r.text[F_MEMBER_NUMBER],
                             r.size[F_MEMBER_NUMBER], member_digest)
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

        _put_answer(out, r, found, &best)
        if found == MATCH_OPEN:
            # The attestation, its arguments computed in the order the reference computes them.
            care = care_date if care_exact else today
            expires = int(now) + self.attestation_ttl
            practitioner_id = practitioner.practitioner_id
            _beneficiary_tag(&self._hashes, identity, tag)
            _put_attestation(out, &self._hashes.mac, self._attestation_key, expires, r, care,
                             practitioner_id, tag)
        return None


def batch_items(request, Py_ssize_t limit):
    """rules.count_batch_items in C: the items of a serialized batch counted from its framing
    (up to limit + 1), or -1 where the reference answers None."""
    if type(request) is not bytes:
        return -1
    return _count_items(<const unsigned char*>PyBytes_AS_STRING(request),
                        PyBytes_GET_SIZE(request), limit)


def observe_baseline(buffer, Py_ssize_t offset, profile, today, long long now_ms, int domain,
                     bytes storage_key not None):
    """fastpath.baselines.observe in C, on the record at `offset` of a writable buffer (the
    simulation in bench.baselines, and tests): (signals newly raised, their scores, suspend)."""
    cdef unsigned char[::1] view = buffer
    cdef BaseCall b
    cdef bytes packed = profile.packed
    if offset < 0 or offset + <Py_ssize_t>sizeof(BaseRecord) > view.shape[0]:
        raise IndexError("baseline record out of range")
    if not 0 <= domain <= MAX_DOMAIN or PyBytes_GET_SIZE(storage_key) != STORAGE_KEY_SIZE:
        raise ValueError("a care domain and a storage key are needed")
    if PyBytes_GET_SIZE(packed) != sizeof(BaseProfile):
        raise TypeError("profile is not a BaselineProfile")
    memcpy(&b.profile, PyBytes_AS_STRING(packed), sizeof(BaseProfile))
    b.rec = <BaseRecord*>(&view[0] + offset)
    _observe(&b, <uint32_t>today, now_ms, domain,
             <const unsigned char*>PyBytes_AS_STRING(storage_key))
    return b.fresh, tuple([b.scores[i] for i in range(N_SIGNALS)]), bool(b.suspend)
