"""The C headers' hashes (cg_*.h), exposed for tests against hashlib, hmac and the SipHash
reference (tests/test_fastpath_blake2b.py). A separate extension the service never imports: the
shipped gate has no test hooks, and switching SHA-NI off here changes nothing in the gate (each
extension has its own copy of the header's switch). Every argument is bounds-checked.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy, memset

from fastpath._cheaders cimport (
    cg_blake2b_absorb_key,
    cg_blake2b_final,
    cg_blake2b_init,
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
