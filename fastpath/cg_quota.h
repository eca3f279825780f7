/* The shared quota slot (layout in fastpath/quota.py) and its cross-process lock, for the Cython
 * gate. The pure-Python reference reads and writes the same bytes with struct and mmap.
 */
#ifndef CG_QUOTA_H
#define CG_QUOTA_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#ifndef F_OFD_SETLKW
#define F_OFD_SETLKW 38 /* Linux; older libc headers may not name it */
#endif

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

/* Open-file-description byte-range lock: excludes other processes (and other opens), and the
 * kernel drops it if the holder dies. Returns 0, or -1 with errno. */
static int cg_lock_range(int fd, long long start, long long len, int lock) {
    struct flock fl;
    int rc;
    memset(&fl, 0, sizeof(fl));
    fl.l_type = lock ? F_WRLCK : F_UNLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    do {
        rc = fcntl(fd, F_OFD_SETLKW, &fl);
    } while (rc == -1 && errno == EINTR);
    return rc;
}

static void cg_roll_day(cg_slot *s, uint32_t today) {
    if (s->day != today) {
        s->day = today;
        s->daily_count = 0;
        s->distinct_count = 0;
        memset(s->table, 0, sizeof(s->table));
    }
}

/* Whether fp was already seen today; adds it (and sets *added) when unseen and may_add. */
static int cg_seen_or_add(cg_slot *s, uint64_t fp, int may_add, int *added) {
    uint64_t mask = CG_DISTINCT_CAPACITY - 1;
    uint64_t i = fp & mask;
    *added = 0;
    for (;;) {
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
}

#endif
