/* SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104) with precomputed pad states, for signing
 * attestations inside the gate without a Python call per COVERED answer.
 *
 * Checked against hashlib/hmac by tests/test_fastpath_blake2b.py. Header-only.
 */
#ifndef CG_SHA256_H
#define CG_SHA256_H

#include <stdint.h>
#include <string.h>

typedef struct {
    uint32_t h[8];
    uint64_t len; /* bytes hashed so far */
    uint8_t buf[64];
    size_t buflen;
} cg_sha256_state;

static const uint32_t cg_sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static inline uint32_t cg_ror32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void cg_sha256_compress_portable(cg_sha256_state *s, const uint8_t *p) {
    uint32_t w[64], a, b, c, d, e, f, g, h;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) |
               ((uint32_t)p[4 * i + 2] << 8) | (uint32_t)p[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = cg_ror32(w[i - 15], 7) ^ cg_ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = cg_ror32(w[i - 2], 17) ^ cg_ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3];
    e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
    for (i = 0; i < 64; i++) {
        uint32_t t1 = h + (cg_ror32(e, 6) ^ cg_ror32(e, 11) ^ cg_ror32(e, 25)) +
                      ((e & f) ^ (~e & g)) + cg_sha256_k[i] + w[i];
        uint32_t t2 = (cg_ror32(a, 2) ^ cg_ror32(a, 13) ^ cg_ror32(a, 22)) +
                      ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1;
        d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
    s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

/* The SHA extensions (SHA-NI: sha256rnds2, sha256msg1/2), when the CPU has them: the same
 * compression in about a fifth of the time. Chosen once at run time (CPUID leaf 7, EBX bit 29);
 * tests run both paths against hashlib (cg_sha256_use_ni). */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define CG_HAVE_SHA_NI_CODE 1

__attribute__((target("sha,sse4.1"))) static void cg_sha256_compress_ni(cg_sha256_state *s,
                                                                         const uint8_t *p) {
    const __m128i mask = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i state0, state1, msg, tmp, abef, cdgh, w[4];
    int i;
    /* h[0..7] = A..H, into the ABEF / CDGH lane order the instructions use. */
    tmp = _mm_loadu_si128((const __m128i *)&s->h[0]);
    state1 = _mm_loadu_si128((const __m128i *)&s->h[4]);
    tmp = _mm_shuffle_epi32(tmp, 0xB1);          /* CDAB */
    state1 = _mm_shuffle_epi32(state1, 0x1B);    /* EFGH */
    state0 = _mm_alignr_epi8(tmp, state1, 8);    /* ABEF */
    state1 = _mm_blend_epi16(state1, tmp, 0xF0); /* CDGH */
    abef = state0;
    cdgh = state1;
    for (i = 0; i < 16; i++) {
        /* w[i % 4] holds the message words 4i..4i+3 once this group's schedule is done. */
        if (i < 4) {
            w[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * i)), mask);
        } else {
            /* W[t] = W[t-16] + s0(W[t-15]) + W[t-7] + s1(W[t-2]), four words at a time, from the
             * groups i-4 (w[i%4]), i-3, i-2 and i-1. */
            __m128i x = _mm_sha256msg1_epu32(w[i % 4], w[(i + 1) % 4]);
            x = _mm_add_epi32(x, _mm_alignr_epi8(w[(i + 3) % 4], w[(i + 2) % 4], 4));
            w[i % 4] = _mm_sha256msg2_epu32(x, w[(i + 3) % 4]);
        }
        msg = _mm_add_epi32(w[i % 4], _mm_loadu_si128((const __m128i *)&cg_sha256_k[4 * i]));
        state1 = _mm_sha256rnds2_epu32(state1, state0, msg);
        msg = _mm_shuffle_epi32(msg, 0x0E);
        state0 = _mm_sha256rnds2_epu32(state0, state1, msg);
    }
    state0 = _mm_add_epi32(state0, abef);
    state1 = _mm_add_epi32(state1, cdgh);
    tmp = _mm_shuffle_epi32(state0, 0x1B);       /* FEBA */
    state1 = _mm_shuffle_epi32(state1, 0xB1);    /* DCHG */
    state0 = _mm_blend_epi16(tmp, state1, 0xF0); /* DCBA */
    state1 = _mm_alignr_epi8(state1, tmp, 8);    /* ABEF */
    _mm_storeu_si128((__m128i *)&s->h[0], state0);
    _mm_storeu_si128((__m128i *)&s->h[4], state1);
}

static int cg_cpu_has_sha_ni(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(b & (1u << 29))) return 0; /* SHA */
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c & (1u << 19)) != 0; /* SSE4.1, for the blend */
}
#else
#define CG_HAVE_SHA_NI_CODE 0
static int cg_cpu_has_sha_ni(void) { return 0; }
#endif

/* -1: not chosen yet; 0: portable; 1: SHA-NI. */
static int cg_sha256_ni = -1;

/* Use SHA-NI (when `on` and the CPU has it) or the portable code; returns what is now used. */
static int cg_sha256_use_ni(int on) {
    cg_sha256_ni = on && CG_HAVE_SHA_NI_CODE && cg_cpu_has_sha_ni();
    return cg_sha256_ni;
}

static void cg_sha256_compress(cg_sha256_state *s, const uint8_t *p) {
    if (cg_sha256_ni < 0) cg_sha256_use_ni(1);
#if CG_HAVE_SHA_NI_CODE
    if (cg_sha256_ni) {
        cg_sha256_compress_ni(s, p);
        return;
    }
#endif
    cg_sha256_compress_portable(s, p);
}

static void cg_sha256_init(cg_sha256_state *s) {
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof(iv));
    s->len = 0;
    s->buflen = 0;
}

static void cg_sha256_update(cg_sha256_state *s, const uint8_t *in, size_t n) {
    s->len += n;
    while (n > 0) {
        size_t take = 64 - s->buflen;
        if (take > n) take = n;
        memcpy(s->buf + s->buflen, in, take);
        s->buflen += take;
        in += take;
        n -= take;
        if (s->buflen == 64) {
            cg_sha256_compress(s, s->buf);
            s->buflen = 0;
        }
    }
}

static void cg_sha256_final(cg_sha256_state *s, uint8_t out[32]) {
    uint64_t bits = s->len * 8;
    int i;
    /* Padding written in place: 0x80, zeros, then the bit length in the last 8 bytes. */
    s->buf[s->buflen++] = 0x80;
    if (s->buflen > 56) {
        memset(s->buf + s->buflen, 0, 64 - s->buflen);
        cg_sha256_compress(s, s->buf);
        s->buflen = 0;
    }
    memset(s->buf + s->buflen, 0, 56 - s->buflen);
    for (i = 0; i < 8; i++) s->buf[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    cg_sha256_compress(s, s->buf);
    for (i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)s->h[i];
    }
}

/* HMAC key schedule: the states after absorbing key^ipad and key^opad, computed once. */
typedef struct {
    cg_sha256_state inner;
    cg_sha256_state outer;
} cg_hmac_sha256_key;

static void cg_hmac_sha256_setkey(cg_hmac_sha256_key *k, const uint8_t *key, size_t keylen) {
    uint8_t block[64], digest[32];
    int i;
    memset(block, 0, 64);
    if (keylen > 64) {
        cg_sha256_state s;
        cg_sha256_init(&s);
        cg_sha256_update(&s, key, keylen);
        cg_sha256_final(&s, digest);
        memcpy(block, digest, 32);
    } else {
        memcpy(block, key, keylen);
    }
    for (i = 0; i < 64; i++) block[i] ^= 0x36;
    cg_sha256_init(&k->inner);
    cg_sha256_update(&k->inner, block, 64);
    for (i = 0; i < 64; i++) block[i] ^= 0x36 ^ 0x5c;
    cg_sha256_init(&k->outer);
    cg_sha256_update(&k->outer, block, 64);
}

static void cg_hmac_sha256(const cg_hmac_sha256_key *k, const uint8_t *msg, size_t n,
                           uint8_t out[32]) {
    cg_sha256_state s = k->inner;
    uint8_t inner[32];
    cg_sha256_update(&s, msg, n);
    cg_sha256_final(&s, inner);
    s = k->outer;
    cg_sha256_update(&s, inner, 32);
    cg_sha256_final(&s, out);
}

#endif
