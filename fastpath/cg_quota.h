/* The shared quota slot (layout in fastpath/quota.py) and its cross-process lock, for the Cython
 * gate. The pure-Python reference reads and writes the same bytes with struct and mmap.
 */
#ifndef CG_QUOTA_H
#define CG_QUOTA_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define CG_DISTINCT_CAPACITY 4096
#define CG_FLAG_SUSPENDED 1u

typedef struct {
    uint32_t flags;
    uint32_t guard_fired;
    int64_t tat_ms;
    uint32_t day;
    uint32_t daily_count;
    uint32_t distinct_count;
    uint32_t window_len;
    uint64_t window_bits;
    int64_t suspended_at_ms;
    uint8_t reserved[16];
    uint64_t table[CG_DISTINCT_CAPACITY];
} cg_slot;

_Static_assert(sizeof(cg_slot) == 64 + 8 * CG_DISTINCT_CAPACITY, "quota slot layout");

/* The slot's robust process-shared mutex in the locks file (fastpath.quota.SlotLocks, which
 * initialises it): a u32 marker, then the pthread_mutex_t at CG_LOCK_MUTEX_OFFSET. A holder that
 * died leaves it EOWNERDEAD: the slot keeps what it wrote, and the next caller goes on.
 * Returns 0 or an errno value. */
#define CG_LOCK_ENTRY 64
#define CG_LOCK_MUTEX_OFFSET 8

_Static_assert(CG_LOCK_MUTEX_OFFSET + sizeof(pthread_mutex_t) <= CG_LOCK_ENTRY, "lock entry");

static inline pthread_mutex_t *cg_slot_mutex(unsigned char *locks, long long slot) {
    return (pthread_mutex_t *)(locks + slot * CG_LOCK_ENTRY + CG_LOCK_MUTEX_OFFSET);
}

/* Without waiting: 0, or EBUSY when another holds it (then wait with cg_slot_lock, GIL released). */
static int cg_slot_trylock(unsigned char *locks, long long slot) {
    pthread_mutex_t *m = cg_slot_mutex(locks, slot);
    int rc = pthread_mutex_trylock(m);
    if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(m);
    return rc;
}

static int cg_slot_lock(unsigned char *locks, long long slot) {
    pthread_mutex_t *m = cg_slot_mutex(locks, slot);
    int rc = pthread_mutex_lock(m);
    if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(m);
    return rc;
}

static int cg_slot_unlock(unsigned char *locks, long long slot) {
    return pthread_mutex_unlock(cg_slot_mutex(locks, slot));
}

/* The day is written last: a holder killed mid-roll leaves the old day, so the next caller rolls
 * again rather than count on a half-cleared table. */
static void cg_roll_day(cg_slot *s, uint32_t today) {
    if (s->day != today) {
        memset(s->table, 0, sizeof(s->table));
        s->daily_count = 0;
        s->distinct_count = 0;
        s->day = today;
    }
}

/* Whether fp was already seen today; adds it (and sets *added) when unseen and may_add. The probe
 * is bounded: a full table (which only a corrupted slot can have) answers "unseen, not added". */
static int cg_seen_or_add(cg_slot *s, uint64_t fp, int may_add, int *added) {
    uint64_t mask = CG_DISTINCT_CAPACITY - 1;
    uint64_t i = fp & mask;
    int probes;
    *added = 0;
    for (probes = 0; probes < CG_DISTINCT_CAPACITY; probes++) {
        uint64_t entry = s->table[i];
        if (entry == fp) return 1;
        if (entry == 0) {
            if (may_add) {
                s->table[i] = fp;
                *added = 1;
            }
            return 0;
        }
        i = (i + 1) & mask;
    }
    return 0;
}

/* This host's credit per slot, with [cluster] (fastpath.quota.CreditFile): spent by the gate
 * under the slot's mutex. */
#define CG_CREDIT_RING 118

typedef struct {
    uint32_t day;
    uint32_t daily;
    uint32_t distinct;
    uint32_t rate_tokens;
    int64_t rate_expiry_ms;
    int64_t lease_expiry_ms;
    uint32_t used;
    uint32_t outcomes_len;
    uint64_t outcomes_bits;
    uint32_t ring_len;
    uint32_t reserved;
    uint64_t epoch;
    uint64_t ring[CG_CREDIT_RING];
    uint32_t totals[4]; /* the host's totals as Redis granted them: the gates never touch them */
} cg_credit;

_Static_assert(sizeof(cg_credit) == 64 + 8 * CG_CREDIT_RING + 16, "credit entry layout");

/* Credit of another day is void, and so is its epoch (fastpath.quota.CreditFile.roll_day). */
static void cg_credit_roll_day(cg_credit *c, uint32_t today) {
    if (c->day != today) {
        memset(c, 0, 64);
        c->day = today;
    }
}

#endif
