/* SipHash-2-4 (Aumasson and Bernstein, 2012): a keyed 64-bit PRF for short inputs, about 20 ns
 * for 16 bytes. covergate keys it from the pepper to turn a beneficiary's storage key into the
 * pseudonym its traces carry (fastpath.rules.Keys.pseudonym is the Python twin; both are checked
 * against the reference implementation's test vectors in tests/test_fastpath_blake2b.py).
 */
#ifndef CG_SIPHASH_H
#define CG_SIPHASH_H

#include <stddef.h>
#include <stdint.h>

#define CG_ROTL64(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

static inline uint64_t cg_u64le(const unsigned char *p) {
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

#define CG_SIPROUND                                                                            \
    do {                                                                                       \
        v0 += v1; v1 = CG_ROTL64(v1, 13); v1 ^= v0; v0 = CG_ROTL64(v0, 32);                   \
        v2 += v3; v3 = CG_ROTL64(v3, 16); v3 ^= v2;                                            \
        v0 += v3; v3 = CG_ROTL64(v3, 21); v3 ^= v0;                                            \
        v2 += v1; v1 = CG_ROTL64(v1, 17); v1 ^= v2; v2 = CG_ROTL64(v2, 32);                   \
    } while (0)

/* SipHash-2-4 of in[0..n) under the 16-byte key k; the result as the reference's 8 output bytes
 * (little-endian). */
static void cg_siphash24(const unsigned char *k, const unsigned char *in, size_t n,
                         unsigned char *out) {
    uint64_t k0 = cg_u64le(k), k1 = cg_u64le(k + 8);
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0;
    uint64_t v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0;
    uint64_t v3 = 0x7465646279746573ULL ^ k1;
    uint64_t b = ((uint64_t)n) << 56;
    const unsigned char *end = in + (n - (n % 8));
    uint64_t m;
    int i;
    for (; in != end; in += 8) {
        m = cg_u64le(in);
        v3 ^= m;
        CG_SIPROUND;
        CG_SIPROUND;
        v0 ^= m;
    }
    switch (n & 7) {
    case 7: b |= ((uint64_t)in[6]) << 48; /* fall through */
    case 6: b |= ((uint64_t)in[5]) << 40; /* fall through */
    case 5: b |= ((uint64_t)in[4]) << 32; /* fall through */
    case 4: b |= ((uint64_t)in[3]) << 24; /* fall through */
    case 3: b |= ((uint64_t)in[2]) << 16; /* fall through */
    case 2: b |= ((uint64_t)in[1]) << 8;  /* fall through */
    case 1: b |= ((uint64_t)in[0]); break;
    case 0: break;
    }
    v3 ^= b;
    CG_SIPROUND;
    CG_SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    CG_SIPROUND;
    CG_SIPROUND;
    CG_SIPROUND;
    CG_SIPROUND;
    b = v0 ^ v1 ^ v2 ^ v3;
    for (i = 0; i < 8; i++) out[i] = (unsigned char)(b >> (8 * i));
}

#endif
