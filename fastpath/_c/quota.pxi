# The caller as the gate sees it (rules.Practitioner.gate_view and amc_view), and its quota slot
# in the shared file: the slot layout and operations of fastpath.quota (cg_quota.h), and the
# quota steps of a decision as the reference's Gate._decide and _evaluate take them.

# Read once, as a C number: the distinct count is checked against it with no Python object.
cdef long long _MAX_DISTINCT_LIMIT = quota.MAX_DISTINCT_LIMIT


cdef struct Caller:
    # One call's view of the practitioner: its quota slot (NULL: no quotas) and limits.
    cg_slot* slot
    unsigned char* locks
    long long slot_index        # -1: no quota state to take (quotas off)
    # With [cluster]: this host's credit for the slot (NULL: one host), how to treat a lookup
    # it holds none for (rules.CREDIT_*), and the rate as it was before this lookup spent it.
    cg_credit* credit
    int mode
    bint rate_ok
    long long saved_tat
    uint32_t saved_tokens
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
    # Set by Gate._decide: the gRPC code of a refusal (0 when answered) and what matched.
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
    # The caller's baseline (baselines.pxi): record NULL when none is kept.
    BaseCall base


cdef bint _caller_view(object practitioner, Caller* c, bint closed, bint quotas_on,
                       long long slots, long long credit_slots) except -1:
    """Fill `c` from the practitioner's packed view. True when quotas are on (or the gate is
    `closed`) and the caller's state cannot be reached: the call must then be refused."""
    cdef View v
    memset(c, 0, sizeof(Caller))
    c.slot_index = -1
    view = practitioner.gate_view
    if type(view) is not bytes or PyBytes_GET_SIZE(view) != sizeof(View):
        raise TypeError("practitioner.gate_view is not a rules.Practitioner's")
    memcpy(&v, PyBytes_AS_STRING(view), sizeof(View))
    c.domains = v.domains
    if closed:
        return True
    if not quotas_on:
        return False
    if v.slot < 0 or not v.has_profile or v.slot >= slots:
        return True
    if credit_slots >= 0 and v.slot >= credit_slots:
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


# -- the slot, locked for the whole call

cdef int _lock_slot(Caller* c, object today, object now, unsigned char* quota_map,
                    unsigned char* locks, unsigned char* credit_map) except -1:
    """Take the caller's quota slot (c.slot_index >= 0) in the mapped quota file for the whole
    call, rolled to `today`: quota.QuotaFile.lock, read and roll_day; and its cluster credit
    (credit_map not NULL), rolled too: quota.CreditFile.read and roll_day."""
    cdef int rc
    cdef uint32_t day
    cdef int overflow = 0
    cdef long long now_c
    cdef double now_d
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
    rc = cg_slot_trylock(locks, c.slot_index)
    if rc == EBUSY:
        with nogil:  # another process (or thread) holds the slot: let this one's run
            rc = cg_slot_lock(locks, c.slot_index)
    if rc != 0:
        raise OSError(rc, "cannot lock the quota slot")
    c.locks = locks
    c.slot = <cg_slot*>(quota_map + QUOTA_HEADER_SIZE + c.slot_index * sizeof(cg_slot))
    cg_roll_day(c.slot, day)
    if credit_map != NULL:
        c.credit = <cg_credit*>(credit_map + QUOTA_HEADER_SIZE
                                + c.slot_index * sizeof(cg_credit))
        cg_credit_roll_day(c.credit, day)
    return 0


cdef inline void _unlock_slot(Caller* c) noexcept:
    if c.slot != NULL:
        cg_slot_unlock(c.locks, c.slot_index)
        c.slot = NULL
        c.credit = NULL


cdef inline int _credit_short(Caller* c) noexcept nogil:
    """0'. With cluster credit: the outcome (O_RATE, O_DAILY) of a lookup this host holds no
    valid rate token or daily credit for, or 0. Notes the rate as it was, for a set-aside."""
    cdef cg_credit* credit = c.credit
    c.rate_ok = credit.rate_tokens > 0 and c.now_ms < credit.rate_expiry_ms
    c.saved_tat = c.slot.tat_ms
    c.saved_tokens = credit.rate_tokens
    if not c.rate_ok and not c.shadow & SHADOW_RATE:
        return O_RATE
    if not (credit.daily > 0 and c.now_ms < credit.lease_expiry_ms) and (
            not c.shadow & SHADOW_DAILY):
        return O_DAILY
    return 0


# -- the quota steps of a decision (numbered as in Gate._decide)

cdef inline bint _suspended(const Caller* c) noexcept nogil:
    """0. A suspended practitioner gets nothing, and its refusals count nowhere."""
    return c.slot != NULL and (c.slot.flags & CG_FLAG_SUSPENDED) != 0


cdef inline long long _spend_rate(Caller* c) noexcept nogil:
    """1. The rate (GCRA), spent by every attempt. Returns how many milliseconds too early an
    attempt the rate refuses came (> 0), or 0 when it passes (a shadowed refusal passes, noted
    in c.would_deny)."""
    cdef cg_slot* slot = c.slot
    cdef long long tat
    if slot == NULL:
        return 0
    tat = slot.tat_ms if slot.tat_ms > c.now_ms else c.now_ms
    if tat - c.now_ms > c.tolerance_ms:
        if not c.shadow & SHADOW_RATE:
            return tat - c.tolerance_ms - c.now_ms
        c.would_deny = WD_RATE
    else:
        slot.tat_ms = tat + c.interval_ms
    if c.credit != NULL and c.rate_ok:
        c.credit.rate_tokens -= 1
    return 0


cdef int _count_lookup(Caller* c, const unsigned char* storage_key) noexcept nogil:
    """4. Daily lookups and distinct beneficiaries (fingerprinted by their storage key): check
    both, then count both. Returns the outcome of a refusal (O_DAILY, O_DISTINCT), counting
    nothing, or 0 when counted (a shadowed refusal is counted, noted in c.would_deny). With
    cluster credit, CREDIT_SHORT for a beneficiary new to this host that it holds no distinct
    credit for (the rate restored when c.mode sets such a lookup aside)."""
    cdef cg_slot* slot = c.slot
    cdef cg_credit* credit = c.credit
    cdef uint64_t fp = 0
    cdef int added = 0
    cdef int unused = 0
    cdef bint seen, full, may_add
    cdef bint lease_ok = False
    if slot == NULL:
        return 0
    if slot.daily_count >= c.daily_limit:
        if not c.shadow & SHADOW_DAILY:
            return O_DAILY
        if c.would_deny == WD_NONE:
            c.would_deny = WD_DAILY
    # quota.fingerprint: the storage key's first 8 bytes, never 0 (an empty table entry).
    memcpy(&fp, storage_key, 8)
    if fp == 0:
        fp = 1
    full = slot.distinct_count >= c.distinct_limit
    if credit != NULL:
        lease_ok = c.now_ms < credit.lease_expiry_ms
        # A beneficiary new to this host needs a distinct slot of the cluster's.
        if (not (credit.distinct > 0 and lease_ok) and not c.shadow & SHADOW_DISTINCT
                and c.mode != CREDIT_OPEN and not cg_seen_or_add(slot, fp, 0, &unused)):
            if c.mode == CREDIT_SPEND:
                slot.tat_ms = c.saved_tat
                credit.rate_tokens = c.saved_tokens
            return CREDIT_SHORT
    may_add = ((not full) or (c.shadow & SHADOW_DISTINCT) != 0) and (
        slot.distinct_count < _MAX_DISTINCT_LIMIT)
    seen = cg_seen_or_add(slot, fp, may_add, &added)
    if not seen and full:
        if c.shadow & SHADOW_DISTINCT:
            if c.would_deny == WD_NONE:
                c.would_deny = WD_DISTINCT
        else:
            return O_DISTINCT
    if slot.daily_count < UINT32_MAX:
        slot.daily_count += 1
    if added:
        slot.distinct_count += 1
    if credit != NULL:
        if credit.daily > 0 and lease_ok:
            credit.daily -= 1
        if credit.used < UINT32_MAX:
            credit.used += 1
        if added:
            if credit.distinct > 0 and lease_ok:
                credit.distinct -= 1
            if credit.ring_len < CG_CREDIT_RING:
                credit.ring[credit.ring_len] = fp
                credit.ring_len += 1
    return 0


cdef inline void _credit_outcome(Caller* c, bint bad) noexcept nogil:
    """For the global guard: this outcome, reported with the host's next call to Redis."""
    c.credit.outcomes_bits = (c.credit.outcomes_bits << 1) | (1 if bad else 0)
    c.credit.outcomes_len = c.credit.outcomes_len + 1 if c.credit.outcomes_len < 64 else 64


cdef bint _guard(Caller* c, bint bad) noexcept nogil:
    """7. The harvest guard watches the share of bad answers (NO_MATCH and invalid) among the
    last lookups. True when it suspends the practitioner now (c.guard_fired); in shadow mode it
    only notes c.would_deny."""
    cdef cg_slot* slot = c.slot
    cdef long long n, count
    cdef uint64_t window
    slot.window_bits = (slot.window_bits << 1) | (1 if bad else 0)
    # min(len + 1, 64), as the reference: also mends a corrupted length.
    slot.window_len = slot.window_len + 1 if slot.window_len < 64 else 64
    n = slot.window_len if slot.window_len < c.guard_window else c.guard_window
    if n < c.guard_min:
        return False
    window = slot.window_bits if n >= 64 else (
        slot.window_bits & ((<uint64_t>1 << n) - 1))
    count = __builtin_popcountll(window)
    if count * 100 >= c.guard_percent * n:
        if not c.shadow & SHADOW_GUARD:
            slot.flags |= CG_FLAG_SUSPENDED
            slot.suspended_at_ms = c.now_ms
            if slot.guard_fired < UINT32_MAX:  # saturated, as the reference
                slot.guard_fired += 1
            c.guard_fired = 1
            return True
        elif c.would_deny == WD_NONE:
            c.would_deny = WD_GUARD
    return False
