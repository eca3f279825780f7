"""The C headers' hashes (cg_*.h), exposed for tests against hashlib, hmac and the SipHash
reference (tests/test_fastpath_blake2b.py). A separate extension the service never imports: the
shipped gate has no test hooks, and switching SHA-NI off here changes nothing in the gate (each
extension has its own copy of the header's switch). Every argument is bounds-checked.

The time_* functions give bench.micro the floor of each keyed hash a decision computes, timed
in C as the gate calls them (no Python call per hash).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from fastpath._cheaders cimport (
    cg_blake2b_absorb_key,
    cg_blake2b_final,
    cg_blake2b_init,
    cg_blake2b_short,
    cg_blake2b_state,
    cg_blake2b_update,
    cg_hmac_sha256,
    cg_hmac_sha256_key,
    cg_hmac_sha256_setkey,
    cg_sha256_use_ni,
    cg_siphash24,
)


def blake2b(bytes data not None, int digest_size, bytes key not None, bytes salt not None,
            bytes person not None):
    """hashlib.blake2b(data, digest_size=, key=, salt=, person=).digest(), and its limits."""
    cdef cg_blake2b_state s
    cdef unsigned char out[64]
    cdef unsigned char salt16[16]
    cdef unsigned char person16[16]
    if not 1 <= digest_size <= 64:
        raise ValueError("digest_size must be from 1 to 64")
    if len(key) > 64 or len(salt) > 16 or len(person) > 16:
        raise ValueError("key at most 64 bytes, salt and person at most 16")
    memset(salt16, 0, 16)
    memset(person16, 0, 16)
    memcpy(salt16, PyBytes_AS_STRING(salt), len(salt))
    memcpy(person16, PyBytes_AS_STRING(person), len(person))
    cg_blake2b_init(&s, digest_size, <const unsigned char*>PyBytes_AS_STRING(key),
                    len(key), salt16, person16)
    if len(key) and len(data):
        cg_blake2b_absorb_key(&s)
    cg_blake2b_update(&s, <const unsigned char*>PyBytes_AS_STRING(data), len(data))
    cg_blake2b_final(&s, out)
    return PyBytes_FromStringAndSize(<const char*>out, digest_size)


def blake2b_prekeyed(bytes data not None, int digest_size, bytes key not None,
                     bytes person not None):
    """hashlib.blake2b(data, digest_size=, key=, person=).digest() as the gate hashes the storage
    key and the beneficiary tag: cg_blake2b_short from a state keyed once, 1 to 128 bytes."""
    cdef cg_blake2b_state keyed
    cdef unsigned char out[64]
    cdef unsigned char person16[16]
    if not 1 <= digest_size <= 64 or not 1 <= len(key) <= 64:
        raise ValueError("digest_size from 1 to 64, a key of 1 to 64 bytes")
    if not 1 <= len(data) <= 128 or len(person) > 16:
        raise ValueError("data of 1 to 128 bytes, person at most 16")
    memset(person16, 0, 16)
    memcpy(person16, PyBytes_AS_STRING(person), len(person))
    cg_blake2b_init(&keyed, digest_size, <const unsigned char*>PyBytes_AS_STRING(key),
                    len(key), NULL, person16)
    cg_blake2b_absorb_key(&keyed)
    cg_blake2b_short(&keyed, <const unsigned char*>PyBytes_AS_STRING(data), len(data), out)
    return PyBytes_FromStringAndSize(<const char*>out, digest_size)


def sha256_use_ni(bint on):
    """Use the SHA extensions in this module's HMAC when the CPU has them (the default), or the
    portable code; returns whether SHA-NI is now in use here."""
    return bool(cg_sha256_use_ni(on))


def hmac_sha256(bytes key not None, bytes msg not None):
    cdef cg_hmac_sha256_key k
    cdef unsigned char out[32]
    cg_hmac_sha256_setkey(&k, <const unsigned char*>PyBytes_AS_STRING(key), len(key))
    cg_hmac_sha256(&k, <const unsigned char*>PyBytes_AS_STRING(msg), len(msg), out)
    return PyBytes_FromStringAndSize(<const char*>out, 32)


def siphash24(bytes key not None, bytes data not None):
    cdef unsigned char out[8]
    if len(key) != 16:
        raise ValueError("SipHash takes a 16-byte key")
    cg_siphash24(<const unsigned char*>PyBytes_AS_STRING(key),
                 <const unsigned char*>PyBytes_AS_STRING(data), len(data), out)
    return PyBytes_FromStringAndSize(<const char*>out, 8)


# -- timing (bench.micro)
#
# Each hash's input starts with a byte of the previous output, so that no iteration can be
# hoisted out of the loop or overlapped with the next: this is the latency of one hash.

cdef unsigned char _sink


cdef long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int _check_timing(bytes data, long long n) except -1:
    if len(data) < 1 or len(data) > 256 or n < 1:
        raise ValueError("data of 1 to 256 bytes, n >= 1")
    return 0


def time_blake2b(bytes data not None, int digest_size, bytes key not None, bytes salt not None,
                 bytes person not None, bint prekeyed, long long n):
    """Nanoseconds per blake2b(data, ...) over `n` hashes. `prekeyed`: as the gate hashes the
    storage key and the beneficiary tag, from a state keyed once (its key block compressed), one
    compression per hash (cg_blake2b_short, data of at most 128 bytes); otherwise keyed afresh
    every time, as the member hash (salted per beneficiary) is."""
    global _sink
    cdef cg_blake2b_state keyed, s
    cdef unsigned char out[64]
    cdef unsigned char buf[256]
    cdef unsigned char salt16[16]
    cdef unsigned char person16[16]
    cdef size_t size = len(data)
    cdef size_t keylen = len(key)
    cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
    cdef long long _, t0, t1
    _check_timing(data, n)
    if not 1 <= digest_size <= 64 or not 1 <= keylen <= 64:
        raise ValueError("digest_size from 1 to 64, a key of 1 to 64 bytes")
    if len(salt) > 16 or len(person) > 16:
        raise ValueError("salt and person at most 16 bytes")
    if prekeyed and (size > 128 or len(salt)):
        raise ValueError("pre-keyed: data of at most 128 bytes, no salt")
    memset(salt16, 0, 16)
    memset(person16, 0, 16)
    memset(out, 0, 64)
    memcpy(salt16, PyBytes_AS_STRING(salt), len(salt))
    memcpy(person16, PyBytes_AS_STRING(person), len(person))
    memcpy(buf, PyBytes_AS_STRING(data), size)
    cg_blake2b_init(&keyed, digest_size, k, keylen, salt16, person16)
    cg_blake2b_absorb_key(&keyed)
    with nogil:
        t0 = _now_ns()
        for _ in range(n):
            buf[0] ^= out[0]
            if prekeyed:
                cg_blake2b_short(&keyed, buf, size, out)
            else:
                cg_blake2b_init(&s, digest_size, k, keylen, salt16, person16)
                cg_blake2b_update(&s, buf, size)
                cg_blake2b_final(&s, out)
        t1 = _now_ns()
    _sink ^= out[0]
    return (t1 - t0) / <double>n


def time_hmac_sha256(bytes key not None, bytes msg not None, long long n):
    """Nanoseconds per HMAC-SHA256 of `msg` over `n` MACs, the key schedule computed once (as
    the gate's attestation MAC)."""
    global _sink
    cdef cg_hmac_sha256_key k
    cdef unsigned char out[32]
    cdef unsigned char buf[256]
    cdef size_t size = len(msg)
    cdef long long _, t0, t1
    _check_timing(msg, n)
    memset(out, 0, 32)
    memcpy(buf, PyBytes_AS_STRING(msg), size)
    cg_hmac_sha256_setkey(&k, <const unsigned char*>PyBytes_AS_STRING(key), len(key))
    with nogil:
        t0 = _now_ns()
        for _ in range(n):
            buf[0] ^= out[0]
            cg_hmac_sha256(&k, buf, size, out)
        t1 = _now_ns()
    _sink ^= out[0]
    return (t1 - t0) / <double>n


def time_siphash24(bytes key not None, bytes data not None, long long n):
    """Nanoseconds per SipHash-2-4 of `data` over `n` hashes (the trace pseudonym)."""
    global _sink
    cdef unsigned char out[8]
    cdef unsigned char buf[256]
    cdef size_t size = len(data)
    cdef long long _, t0, t1
    cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
    _check_timing(data, n)
    if len(key) != 16:
        raise ValueError("SipHash takes a 16-byte key")
    memset(out, 0, 8)
    memcpy(buf, PyBytes_AS_STRING(data), size)
    with nogil:
        t0 = _now_ns()
        for _ in range(n):
            buf[0] ^= out[0]
            cg_siphash24(k, buf, size, out)
        t1 = _now_ns()
    _sink ^= out[0]
    return (t1 - t0) / <double>n
