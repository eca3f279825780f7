/* BLAKE2b (RFC 7693) with key, salt and personalisation, for covergate's keyed hashes.
 *
 * Written from RFC 7693 and the BLAKE2 paper's parameter block; checked against hashlib.blake2b
 * by tests/test_fastpath_blake2b.py. Header-only so the Cython gate needs no extra library.
 * Hashing inside the gate avoids a Python call (~1 us) per keyed hash on the hot path.
 */
#ifndef CG_BLAKE2B_H
#define CG_BLAKE2B_H

#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t h[8];
    uint64_t t[2];
    uint8_t buf[128];
    size_t buflen;
    size_t outlen;
} cg_blake2b_state;

static const uint64_t cg_blake2b_iv[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
    0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL,
};

static inline uint64_t cg_load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian hosts only (x86_64, aarch64) */
    return v;
}

static inline uint64_t cg_rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

/* One G mixing step on the state words held in locals v0..v15, with message words x and y; the
 * rotations are by constants, which compilers emit as single rotate instructions. */
#define CG_G(a, b, c, d, x, y)                 \
    do {                                       \
        v##a = v##a + v##b + (x);              \
        v##d = cg_rotr64(v##d ^ v##a, 32);     \
        v##c = v##c + v##d;                    \
        v##b = cg_rotr64(v##b ^ v##c, 24);     \
        v##a = v##a + v##b + (y);              \
        v##d = cg_rotr64(v##d ^ v##a, 16);     \
        v##c = v##c + v##d;                    \
        v##b = cg_rotr64(v##b ^ v##c, 63);     \
    } while (0)

/* One round, its row of the message schedule (RFC 7693 2.7, SIGMA) spelled out as constants: each
 * message word is a local (m0..m15) the round names directly, no table lookup, no array in
 * memory the compiler must keep in sync. */
#define CG_ROUND(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15) \
    do {                                                                                \
        CG_G(0, 4, 8, 12, m##s0, m##s1);                                                \
        CG_G(1, 5, 9, 13, m##s2, m##s3);                                                \
        CG_G(2, 6, 10, 14, m##s4, m##s5);                                               \
        CG_G(3, 7, 11, 15, m##s6, m##s7);                                               \
        CG_G(0, 5, 10, 15, m##s8, m##s9);                                               \
        CG_G(1, 6, 11, 12, m##s10, m##s11);                                             \
        CG_G(2, 7, 8, 13, m##s12, m##s13);                                              \
        CG_G(3, 4, 9, 14, m##s14, m##s15);                                              \
    } while (0)

/* The compression function F (RFC 7693 3.2), its 12 rounds unrolled with the schedule of
 * RFC 7693's SIGMA written into each (tests/test_fastpath_blake2b.py checks the result against
 * hashlib at every length around the block boundaries, and RFC 7693's own vector). */
static void cg_blake2b_compress(cg_blake2b_state *s, const uint8_t *block, int last) {
    const uint64_t m0 = cg_load64(block), m1 = cg_load64(block + 8), m2 = cg_load64(block + 16),
                   m3 = cg_load64(block + 24), m4 = cg_load64(block + 32),
                   m5 = cg_load64(block + 40), m6 = cg_load64(block + 48),
                   m7 = cg_load64(block + 56), m8 = cg_load64(block + 64),
                   m9 = cg_load64(block + 72), m10 = cg_load64(block + 80),
                   m11 = cg_load64(block + 88), m12 = cg_load64(block + 96),
                   m13 = cg_load64(block + 104), m14 = cg_load64(block + 112),
                   m15 = cg_load64(block + 120);
    uint64_t v0 = s->h[0], v1 = s->h[1], v2 = s->h[2], v3 = s->h[3];
    uint64_t v4 = s->h[4], v5 = s->h[5], v6 = s->h[6], v7 = s->h[7];
    uint64_t v8 = cg_blake2b_iv[0], v9 = cg_blake2b_iv[1], v10 = cg_blake2b_iv[2];
    uint64_t v11 = cg_blake2b_iv[3];
    uint64_t v12 = cg_blake2b_iv[4] ^ s->t[0], v13 = cg_blake2b_iv[5] ^ s->t[1];
    uint64_t v14 = last ? ~cg_blake2b_iv[6] : cg_blake2b_iv[6], v15 = cg_blake2b_iv[7];
    CG_ROUND(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    CG_ROUND(14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3);
    CG_ROUND(11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4);
    CG_ROUND(7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8);
    CG_ROUND(9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13);
    CG_ROUND(2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9);
    CG_ROUND(12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11);
    CG_ROUND(13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10);
    CG_ROUND(6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5);
    CG_ROUND(10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0);
    CG_ROUND(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); /* rounds 10 and 11 repeat 0 and 1 */
    CG_ROUND(14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3);
    s->h[0] ^= v0 ^ v8;
    s->h[1] ^= v1 ^ v9;
    s->h[2] ^= v2 ^ v10;
    s->h[3] ^= v3 ^ v11;
    s->h[4] ^= v4 ^ v12;
    s->h[5] ^= v5 ^ v13;
    s->h[6] ^= v6 ^ v14;
    s->h[7] ^= v7 ^ v15;
}

static void cg_blake2b_update(cg_blake2b_state *s, const uint8_t *in, size_t inlen) {
    while (inlen > 0) {
        if (s->buflen == 128) { /* keep the last block for final: it gets the last-block flag */
            s->t[0] += 128;
            if (s->t[0] < 128) s->t[1]++;
            cg_blake2b_compress(s, s->buf, 0);
            s->buflen = 0;
        }
        size_t take = 128 - s->buflen;
        if (take > inlen) take = inlen;
        memcpy(s->buf + s->buflen, in, take);
        s->buflen += take;
        in += take;
        inlen -= take;
    }
}

/* outlen 1..64, keylen 0..64, salt and personal NULL or 16 bytes. */
static void cg_blake2b_init(cg_blake2b_state *s, size_t outlen, const uint8_t *key, size_t keylen,
                            const uint8_t *salt, const uint8_t *personal) {
    uint8_t p[64];
    int i;
    memset(p, 0, sizeof(p));
    p[0] = (uint8_t)outlen;
    p[1] = (uint8_t)keylen;
    p[2] = 1; /* fanout */
    p[3] = 1; /* depth */
    if (salt) memcpy(p + 32, salt, 16);
    if (personal) memcpy(p + 48, personal, 16);
    for (i = 0; i < 8; i++) s->h[i] = cg_blake2b_iv[i] ^ cg_load64(p + 8 * i);
    s->t[0] = s->t[1] = 0;
    s->buflen = 0;
    s->outlen = outlen;
    if (keylen > 0) {
        uint8_t block[128];
        memset(block, 0, sizeof(block));
        memcpy(block, key, keylen);
        cg_blake2b_update(s, block, 128);
    }
}

/* Compress a buffered key block now, so that copies of this keyed state skip that compression.
 * Valid only when at least one byte of data will follow (always, for covergate's hashes). */
static void cg_blake2b_absorb_key(cg_blake2b_state *s) {
    if (s->buflen == 128) {
        s->t[0] += 128;
        if (s->t[0] < 128) s->t[1]++;
        cg_blake2b_compress(s, s->buf, 0);
        s->buflen = 0;
    }
}

static void cg_blake2b_final(cg_blake2b_state *s, uint8_t *out) {
    uint8_t full[64];
    int i;
    s->t[0] += s->buflen;
    if (s->t[0] < s->buflen) s->t[1]++;
    memset(s->buf + s->buflen, 0, 128 - s->buflen);
    cg_blake2b_compress(s, s->buf, 1);
    for (i = 0; i < 8; i++) memcpy(full + 8 * i, &s->h[i], 8);
    memcpy(out, full, s->outlen);
}

/* BLAKE2b of 1 to 128 bytes from a keyed state whose key block is compressed already
 * (cg_blake2b_absorb_key, nothing buffered): the one compression, without copying the state's
 * buffer or going through update and final. Gives what copying `keyed`, cg_blake2b_update and
 * cg_blake2b_final give. */
static void cg_blake2b_short(const cg_blake2b_state *keyed, const uint8_t *in, size_t inlen,
                             uint8_t *out) {
    cg_blake2b_state s;
    uint8_t block[128];
    memcpy(s.h, keyed->h, sizeof(s.h));
    s.t[0] = keyed->t[0] + inlen;
    s.t[1] = keyed->t[1] + (s.t[0] < inlen);
    memset(block, 0, sizeof(block));
    memcpy(block, in, inlen);
    cg_blake2b_compress(&s, block, 1);
    memcpy(out, s.h, keyed->outlen);
}

#endif
