# The C headers of the fast path, declared once (cimported by _gate_c and _hashes_for_tests).
# Each header is self-contained C: BLAKE2b, HMAC-SHA256 (SHA-NI when the CPU has it), SipHash-2-4
# and the quota slot layout with its process-shared mutexes.

from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from "cg_blake2b.h" nogil:
    ctypedef struct cg_blake2b_state:
        pass
    void cg_blake2b_init(cg_blake2b_state* s, size_t outlen, const unsigned char* key,
                         size_t keylen, const unsigned char* salt,
                         const unsigned char* personal)
    void cg_blake2b_update(cg_blake2b_state* s, const unsigned char* data, size_t n)
    void cg_blake2b_final(cg_blake2b_state* s, unsigned char* out)
    void cg_blake2b_absorb_key(cg_blake2b_state* s)
    void cg_blake2b_short(const cg_blake2b_state* keyed, const unsigned char* data, size_t n,
                          unsigned char* out)

cdef extern from "cg_sha256.h" nogil:
    ctypedef struct cg_hmac_sha256_key:
        pass
    void cg_hmac_sha256_setkey(cg_hmac_sha256_key* k, const unsigned char* key,
                               size_t keylen)
    void cg_hmac_sha256(const cg_hmac_sha256_key* k, const unsigned char* msg, size_t n,
                        unsigned char* out)
    int cg_sha256_use_ni(int on)

cdef extern from "cg_siphash.h" nogil:
    void cg_siphash24(const unsigned char* k, const unsigned char* data, size_t n,
                      unsigned char* out)

cdef extern from "cg_quota.h" nogil:
    ctypedef struct cg_slot:
        uint32_t flags
        uint32_t guard_fired
        int64_t tat_ms
        uint32_t day
        uint32_t daily_count
        uint32_t distinct_count
        uint32_t window_len
        uint64_t window_bits
        int64_t suspended_at_ms
    int cg_slot_trylock(unsigned char* locks, long long slot)
    int cg_slot_lock(unsigned char* locks, long long slot)
    int EBUSY
    int cg_slot_unlock(unsigned char* locks, long long slot)
    int CG_LOCK_ENTRY
    void cg_roll_day(cg_slot* s, uint32_t today)
    int cg_seen_or_add(cg_slot* s, uint64_t fp, int may_add, int* added)
    unsigned int CG_FLAG_SUSPENDED
    ctypedef struct cg_credit:
        uint32_t day
        uint32_t daily
        uint32_t distinct
        uint32_t rate_tokens
        int64_t rate_expiry_ms
        int64_t lease_expiry_ms
        uint32_t used
        uint32_t outcomes_len
        uint64_t outcomes_bits
        uint32_t ring_len
        uint32_t reserved
        uint64_t epoch
        uint64_t ring[1]
    int CG_CREDIT_RING
    void cg_credit_roll_day(cg_credit* c, uint32_t today)

# Not headers of ours, but C all the same: a CPython macro Cython does not declare, and the
# compiler's popcount (one instruction where the CPU has it).
cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)

cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil
