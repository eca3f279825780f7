"""Per-practitioner quota state shared by every worker process of a host: the file layout, the
profiles, and the reference operations the pure-Python gate uses (the Cython gate does the same
in C on the same bytes).

One memory-mapped file holds one fixed-size slot per practitioner. A call locks its practitioner's
slot for the whole call, so check-and-count is exact across processes. The lock is a robust,
process-shared pthread mutex (about 25 ns uncontended, no system call; an fcntl byte-range lock
cost 0.6 us a call) kept in a second mapped file beside the state, `locks`, one LOCK_ENTRY per
slot. Robust means that a process dying with a slot locked does not block the others: the next
locker is told (EOWNERDEAD) and carries on. The locks file is not state: whoever opens it while
no other process has it open (a flock probe) initialises every mutex afresh, which also clears a
mutex left locked by a machine crash. Python (the reference gate, the CLI) takes the same mutexes
through ctypes, the Cython gate directly, so both kinds of process can share one host.
The state file is the state: counters and automatic suspensions survive restarts.

Slot layout (little-endian), SLOT_SIZE bytes:
  0  u32 flags            bit 0: suspended by the harvest guard
  4  u32 guard_fired      how many times the guard has fired for this practitioner (ever)
  8  i64 tat_ms           GCRA theoretical arrival time, unix ms
  16 u32 day              YYYYMMDD (Europe/Paris) the daily counters belong to
  20 u32 daily_count      lookups today
  24 u32 distinct_count   distinct beneficiaries today
  28 u32 window_len       outcomes in the guard window (<= 64)
  32 u64 window_bits      guard window, newest outcome in bit 0; 1 = NO_MATCH or invalid
  40 i64 suspended_at_ms
  48 ... reserved
  64 u64[DISTINCT_CAPACITY] today's beneficiary fingerprints, open addressing, 0 = empty
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

MAGIC = b"CGQUOTA1"
HEADER_SIZE = 4096
DISTINCT_CAPACITY = 4096  # power of two; limits above 3/4 of it are refused by config
SLOT_HEAD = 64
SLOT_SIZE = SLOT_HEAD + 8 * DISTINCT_CAPACITY
MAX_DISTINCT_LIMIT = DISTINCT_CAPACITY * 3 // 4
GUARD_WINDOW_MAX = 64

FLAG_SUSPENDED = 1

# The locks file: per slot, a u32 "initialised" marker, then a pthread_mutex_t (40 bytes on
# x86-64 and aarch64 glibc) at LOCK_MUTEX_OFFSET.
LOCK_ENTRY = 64
LOCK_MUTEX_OFFSET = 8
LOCK_READY = 0x4B4C4743  # "CGLK"
_LOCK_READY = struct.Struct("<I")

_HEAD = struct.Struct("<IIqIIIIQq")
# QuotaProfile.packed: interval_ms, tolerance_ms, daily_limit, distinct_limit, guard_window,
# guard_min_lookups, guard_bad_percent, shadow (fastpath/_gate_c.pyx: struct Profile).
PROFILE_VIEW = struct.Struct("<8q")
_I64_MAX = (1 << 63) - 1
_FILE_HEAD = struct.Struct("<8sII")
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
_FLOCK = struct.Struct("hhqqi4x")

# Shadow-mode bits: the rule is evaluated and traced as "would deny", but allows.
SHADOW_RATE = 1
SHADOW_DAILY = 2
SHADOW_DISTINCT = 4
SHADOW_GUARD = 8
SHADOW_RULES = {"rate": SHADOW_RATE, "daily": SHADOW_DAILY, "distinct": SHADOW_DISTINCT,
                "guard": SHADOW_GUARD}  # fmt: skip


@dataclass(frozen=True)
class QuotaProfile:
    """Limits for one practitioner: profession defaults with per-practitioner overrides."""

    rate_per_minute: int = 60
    burst: int = 30
    daily_limit: int = 2000
    distinct_limit: int = 600
    guard_window: int = 40
    guard_min_lookups: int = 20
    guard_bad_percent: int = 50
    shadow: int = 0  # SHADOW_* bits
    # The limits as the Cython gate reads them in one go (see PROFILE_VIEW), packed once.
    packed: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rate_per_minute < 1 or self.burst < 1:
            raise ValueError("rate_per_minute and burst must be at least 1")
        if not 1 <= self.distinct_limit <= MAX_DISTINCT_LIMIT:
            raise ValueError(f"distinct_limit must be 1..{MAX_DISTINCT_LIMIT}")
        if self.daily_limit < 1:
            raise ValueError("daily_limit must be at least 1")
        if not 1 <= self.guard_window <= GUARD_WINDOW_MAX:
            raise ValueError(f"guard_window must be 1..{GUARD_WINDOW_MAX}")
        if not 1 <= self.guard_min_lookups <= self.guard_window:
            raise ValueError("guard_min_lookups must be 1..guard_window")
        if not 1 <= self.guard_bad_percent <= 100:
            raise ValueError("guard_bad_percent must be 1..100")
        values = (
            self.interval_ms,
            self.tolerance_ms,
            self.daily_limit,
            self.distinct_limit,
            self.guard_window,
            self.guard_min_lookups,
            self.guard_bad_percent,
            self.shadow,
        )
        # Limits beyond int64 behave as int64's maximum would: no counter gets near either.
        object.__setattr__(self, "packed", PROFILE_VIEW.pack(*(min(v, _I64_MAX) for v in values)))

    @property
    def interval_ms(self) -> int:
        """GCRA emission interval."""
        return max(1, 60_000 // self.rate_per_minute)

    @property
    def tolerance_ms(self) -> int:
        """How far ahead of now the theoretical arrival time may run: burst - 1 intervals."""
        return self.interval_ms * (self.burst - 1)


@dataclass
class SlotState:
    flags: int
    guard_fired: int
    tat_ms: int
    day: int
    daily_count: int
    distinct_count: int
    window_len: int
    window_bits: int
    suspended_at_ms: int


def fingerprint(storage_key: bytes) -> int:
    """A beneficiary's storage key (keyed hash) cut to a non-zero 8-byte table entry. The file
    holds nothing the store does not already key by."""
    return int.from_bytes(storage_key[:8], "little") or 1


class QuotaState(Protocol):
    """What a gate needs from quota state, slot by slot: lock for the call, read, change, write.

    `QuotaFile` implements it for the processes of one host (exact, durable, ~25 ns a lock).
    A multi-host backend (Redis) implements the same operations: `lock`/`unlock` around a call
    map to a per-practitioner lease, `read`/`write` to the slot's fields, `seen_or_add` to a
    per-day set. The Cython gate works on the QuotaFile layout directly for speed; a backend of
    another kind is used through this interface by the reference gate, or mirrored into the
    host's file (each host granted a share of every limit).
    """

    slots: int

    def lock(self, slot: int) -> None: ...
    def unlock(self, slot: int) -> None: ...
    def read(self, slot: int) -> SlotState: ...
    def write(self, slot: int, state: SlotState) -> None: ...
    def roll_day(self, slot: int, state: SlotState, today: int) -> None: ...
    def seen_or_add(self, slot: int, fp: int, may_add: bool) -> tuple[bool, bool]: ...
    def reinstate(self, slot: int) -> None: ...


class _Pthread:
    """The few glibc calls a robust process-shared mutex needs, through ctypes (the standard
    library), so that pure-Python processes lock the same mutexes as the Cython gate."""

    PTHREAD_PROCESS_SHARED = 1  # glibc's values, the same on every Linux architecture
    PTHREAD_MUTEX_ROBUST = 1

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's namespace: libc (and libpthread)
        self.lock = libc.pthread_mutex_lock
        self.unlock = libc.pthread_mutex_unlock
        self.consistent = libc.pthread_mutex_consistent
        self.init = libc.pthread_mutex_init
        self.attr_init = libc.pthread_mutexattr_init
        self.attr_setpshared = libc.pthread_mutexattr_setpshared
        self.attr_setrobust = libc.pthread_mutexattr_setrobust
        for f in (self.lock, self.unlock, self.consistent, self.init):
            f.argtypes = [ctypes.c_void_p] if f is not self.init else [ctypes.c_void_p] * 2
            f.restype = ctypes.c_int
        self.attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 or 8 bytes
        for rc in (
            self.attr_init(self.attr),
            self.attr_setpshared(self.attr, self.PTHREAD_PROCESS_SHARED),
            self.attr_setrobust(self.attr, self.PTHREAD_MUTEX_ROBUST),
        ):
            if rc:
                raise OSError(rc, "cannot set up a robust process-shared mutex")


_pthread: _Pthread | None = None


def _libpthread() -> _Pthread:
    global _pthread
    if _pthread is None:
        _pthread = _Pthread()
    return _pthread


class SlotLocks:
    """One robust process-shared mutex per slot, in the locks file beside the state file.

    Every process that opens it holds a shared flock on it for as long as it is open. An opener
    that finds no such holder (its exclusive probe succeeds) is alone: it initialises every
    mutex, so a mutex left locked by a crashed machine (no process alive to release it) never
    blocks. Slots added later are initialised by whoever adds them. Call with the state file's
    header lock held, so that openers take turns.
    """

    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.map: mmap.mmap | None = None
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
            size = slots * LOCK_ENTRY
            if alone:
                os.ftruncate(self.fd, 0)  # nothing in it is in use: no stale entry survives
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            anchor = (ctypes.c_char * size).from_buffer(self.map)
            self.address = ctypes.addressof(anchor)
            del anchor  # an address, not a buffer export: close() may unmap
            self._pthread = _libpthread()
            for slot in range(slots):
                if alone or _LOCK_READY.unpack_from(self.map, slot * LOCK_ENTRY)[0] != LOCK_READY:
                    self._initialise(slot)
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # from exclusive when alone
        except BaseException:
            self.close()
            raise
        self.slots = slots

    def _initialise(self, slot: int) -> None:
        start = slot * LOCK_ENTRY
        assert self.map is not None
        self.map[start : start + LOCK_ENTRY] = bytes(LOCK_ENTRY)
        rc = self._pthread.init(self.address + start + LOCK_MUTEX_OFFSET, self._pthread.attr)
        if rc:
            raise OSError(rc, "pthread_mutex_init failed")
        _LOCK_READY.pack_into(self.map, start, LOCK_READY)

    def _mutex(self, slot: int) -> int:
        if self.map is None:
            raise ValueError("the quota locks file is closed")
        return self.address + slot * LOCK_ENTRY + LOCK_MUTEX_OFFSET

    def lock(self, slot: int) -> None:
        mutex = self._mutex(slot)
        rc = self._pthread.lock(mutex)
        if rc == errno.EOWNERDEAD:
            # Its holder died mid-call: the slot holds whatever it had written. Carry on.
            rc = self._pthread.consistent(mutex)
        if rc:
            raise OSError(rc, "cannot lock the quota slot")

    def unlock(self, slot: int) -> None:
        rc = self._pthread.unlock(self._mutex(slot))
        if rc:
            raise OSError(rc, "cannot unlock the quota slot")

    def close(self) -> None:
        if self.map is not None:
            self.map.close()  # BufferError while a gate still maps it
            self.map = None
            self.address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class QuotaFile:
    """The shared state file, memory-mapped, and its slot locks. Open it after fork, once per
    process."""

    def __init__(self, path: Path, slots: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        size = HEADER_SIZE + slots * SLOT_SIZE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Holding the header lock while sizing means two first openers cannot race.
            self._lock_range(fd, 0, HEADER_SIZE)
            try:
                current = os.fstat(fd).st_size
                if current == 0:
                    os.ftruncate(fd, size)  # sparse: untouched slots cost no disk
                    os.pwrite(fd, _FILE_HEAD.pack(MAGIC, SLOT_SIZE, slots), 0)
                else:
                    magic, slot_size, have = _FILE_HEAD.unpack(os.pread(fd, _FILE_HEAD.size, 0))
                    if magic != MAGIC or slot_size != SLOT_SIZE:
                        raise ValueError(
                            f"{self.path} is not a covergate quota file of this version"
                        )
                    if have < slots:
                        os.ftruncate(fd, size)
                        os.pwrite(fd, _FILE_HEAD.pack(MAGIC, SLOT_SIZE, slots), 0)
                    else:
                        self.slots = have
                        size = HEADER_SIZE + have * SLOT_SIZE
                self.locks = SlotLocks(self.path.with_name(self.path.name + ".locks"), self.slots)
            finally:
                self._unlock_range(fd, 0, HEADER_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @property
    def locks_map(self) -> mmap.mmap:
        """The locks file's mapping (the Cython gate keeps a view of it while it runs)."""
        assert self.locks.map is not None
        return self.locks.map

    def close(self) -> None:
        try:
            self.map.close()
            self.locks.close()
        except BufferError:
            return  # a gate still maps it (Gate.close() releases it); it goes with the gate
        os.close(self.fd)

    def flush(self) -> None:
        self.map.flush()

    # -- locking -----------------------------------------------------------------------------------

    @staticmethod
    def _lock_range(fd: int, start: int, length: int) -> None:
        fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))

    @staticmethod
    def _unlock_range(fd: int, start: int, length: int) -> None:
        fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))

    def offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError("quota slot out of range")
        return HEADER_SIZE + slot * SLOT_SIZE

    def lock(self, slot: int) -> None:
        self.offset(slot)  # range check
        self.locks.lock(slot)

    def unlock(self, slot: int) -> None:
        self.offset(slot)
        self.locks.unlock(slot)

    # -- slot state --------------------------------------------------------------------------------

    def read(self, slot: int) -> SlotState:
        return SlotState(*_HEAD.unpack_from(self.map, self.offset(slot)))

    def write(self, slot: int, state: SlotState) -> None:
        _HEAD.pack_into(
            self.map,
            self.offset(slot),
            state.flags,
            state.guard_fired,
            state.tat_ms,
            state.day,
            state.daily_count,
            state.distinct_count,
            state.window_len,
            state.window_bits,
            state.suspended_at_ms,
        )

    def roll_day(self, slot: int, state: SlotState, today: int) -> None:
        """A new Paris day: daily counters and the distinct set start again."""
        if state.day != today:
            state.day = today
            state.daily_count = 0
            state.distinct_count = 0
            start = self.offset(slot) + SLOT_HEAD
            self.map[start : start + 8 * DISTINCT_CAPACITY] = bytes(8 * DISTINCT_CAPACITY)

    def seen_or_add(self, slot: int, fp: int, may_add: bool) -> tuple[bool, bool]:
        """(already seen today, added now). Linear probing in the slot's table, bounded: a full
        table (only a corrupted slot has one) answers (False, False), as cg_quota.h does."""
        base = self.offset(slot) + SLOT_HEAD
        mask = DISTINCT_CAPACITY - 1
        i = fp & mask
        for _ in range(DISTINCT_CAPACITY):
            pos = base + 8 * i
            entry = int.from_bytes(self.map[pos : pos + 8], "little")
            if entry == fp:
                return True, False
            if entry == 0:
                if may_add:
                    self.map[pos : pos + 8] = fp.to_bytes(8, "little")
                    return False, True
                return False, False
            i = (i + 1) & mask
        return False, False

    # -- administration ----------------------------------------------------------------------------

    def reinstate(self, slot: int) -> None:
        """Lift an automatic suspension and forget the guard window (a human decided)."""
        self.lock(slot)
        try:
            state = self.read(slot)
            state.flags &= ~FLAG_SUSPENDED
            state.window_len = 0
            state.window_bits = 0
            state.suspended_at_ms = 0
            self.write(slot, state)
        finally:
            self.unlock(slot)

    def reset(self, slot: int) -> None:
        """Zero a slot (a slot handed to a new practitioner)."""
        self.lock(slot)
        try:
            start = self.offset(slot)
            self.map[start : start + SLOT_SIZE] = bytes(SLOT_SIZE)
        finally:
            self.unlock(slot)


# -- several hosts: this host's credit, per slot ---------------------------------------------------
#
# With [cluster] (service.cluster), limits are global: Redis grants this host blocks of credit per
# practitioner, and the gates spend them here, under the same slot mutex, at no extra cost per
# lookup. A separate file beside the state (DIR/quota/credit) keeps the state file's layout as it
# is. Entry layout (little-endian), CREDIT_ENTRY bytes per slot:
#   0  u32 day              the Paris day the credit belongs to (credit of another day is void)
#   4  u32 daily            lookups this host may still admit today
#   8  u32 distinct         new beneficiaries it may still admit today
#   12 u32 rate_tokens      rate tokens (Redis's GCRA) it holds
#   16 i64 rate_expiry_ms   tokens are void from then (unix ms, the gate's clock)
#   24 i64 lease_expiry_ms  daily and distinct credit are void from then
#   32 u32 used             lookups admitted and not yet reported to Redis
#   36 u32 outcomes_len     guard outcomes not yet reported (<= 64)
#   40 u64 outcomes_bits    newest in bit 0; 1 = NO_MATCH or invalid
#   48 u32 ring_len         new beneficiaries (fingerprints) not yet reported
#   52 u32 reserved
#   56 u64 epoch            the Redis day state this credit came from (a change within the day:
#                           Redis lost it, and this host reports its whole day again)
#   64 u64[CREDIT_RING] ring
#   1008 u32 totals_day     the day of the two totals below (the gates never touch them):
#   1012 u32 granted        daily credit Redis granted this host that day, in all, and
#   1016 u32 distinct_granted  distinct slots; a host reports its own totals too, so a retried
#   1020 u32 reserved          or repeated report changes nothing

CREDIT_MAGIC = b"CGCREDT1"
CREDIT_RING = 118
CREDIT_ENTRY = 64 + 8 * CREDIT_RING + 16
_CREDIT_TOTALS = struct.Struct("<III")
_CREDIT_HEAD = struct.Struct("<IIIIqqIIQIIQ")


@dataclass
class CreditState:
    day: int = 0
    daily: int = 0
    distinct: int = 0
    rate_tokens: int = 0
    rate_expiry_ms: int = 0
    lease_expiry_ms: int = 0
    used: int = 0
    outcomes_len: int = 0
    outcomes_bits: int = 0
    ring_len: int = 0
    reserved: int = 0
    epoch: int = 0


class SlotFile:
    """A file of fixed-size entries, one per quota slot (the header: magic, entry size, slots),
    memory-mapped and locked with the QuotaFile's slot mutexes: open it with, and use it under,
    the same QuotaFile. Grown, never shrunk, to the slots asked for."""

    MAGIC: bytes
    ENTRY: int
    WHAT: str

    def __init__(self, path: Path, slots: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            QuotaFile._lock_range(fd, 0, HEADER_SIZE)
            try:
                have = 0
                if os.fstat(fd).st_size:
                    magic, entry, have = _FILE_HEAD.unpack(os.pread(fd, _FILE_HEAD.size, 0))
                    if magic != self.MAGIC or entry != self.ENTRY:
                        raise ValueError(f"{self.path} is not a covergate {self.WHAT} file")
                self.slots = max(slots, have)
                if self.slots > have or not have:
                    os.ftruncate(fd, HEADER_SIZE + self.slots * self.ENTRY)
                    os.pwrite(fd, _FILE_HEAD.pack(self.MAGIC, self.ENTRY, self.slots), 0)
            finally:
                QuotaFile._unlock_range(fd, 0, HEADER_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.map = mmap.mmap(fd, HEADER_SIZE + self.slots * self.ENTRY, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            return  # a gate still maps it
        os.close(self.fd)

    def offset(self, slot: int) -> int:
        if not 0 <= slot < self.slots:
            raise IndexError(f"{self.WHAT} slot out of range")
        return HEADER_SIZE + slot * self.ENTRY


class CreditFile(SlotFile):
    """This host's credit per slot (DIR/quota/credit)."""

    MAGIC = CREDIT_MAGIC
    ENTRY = CREDIT_ENTRY
    WHAT = "credit"

    def read(self, slot: int) -> CreditState:
        return CreditState(*_CREDIT_HEAD.unpack_from(self.map, self.offset(slot)))

    def write(self, slot: int, state: CreditState) -> None:
        _CREDIT_HEAD.pack_into(
            self.map, self.offset(slot), state.day, state.daily, state.distinct,
            state.rate_tokens, state.rate_expiry_ms, state.lease_expiry_ms, state.used,
            state.outcomes_len, state.outcomes_bits, state.ring_len, state.reserved, state.epoch,
        )  # fmt: skip

    def roll_day(self, state: CreditState, today: int) -> None:
        """Credit of another day is void (Redis keys credit by day too), and so is the epoch of
        the Redis state it came from."""
        if state.day != today:
            for name in CreditState.__dataclass_fields__:
                setattr(state, name, 0)
            state.day = today

    def ring(self, slot: int, state: CreditState) -> list[int]:
        start = self.offset(slot) + 64
        return [
            int.from_bytes(self.map[start + 8 * i : start + 8 * i + 8], "little")
            for i in range(min(state.ring_len, CREDIT_RING))
        ]

    def totals(self, slot: int, today: int) -> tuple[int, int]:
        """(granted, distinct granted) today, as this host last heard from Redis."""
        day, granted, distinct = _CREDIT_TOTALS.unpack_from(
            self.map, self.offset(slot) + 64 + 8 * CREDIT_RING
        )
        return (granted, distinct) if day == today else (0, 0)

    def set_totals(self, slot: int, today: int, granted: int, distinct_granted: int) -> None:
        at = self.offset(slot) + 64 + 8 * CREDIT_RING
        cap = 0xFFFFFFFF
        _CREDIT_TOTALS.pack_into(self.map, at, today, min(granted, cap), min(distinct_granted, cap))

    def push(self, slot: int, state: CreditState, fp: int) -> None:
        """A new beneficiary to report (the gate never admits more than the ring holds)."""
        start = self.offset(slot) + 64 + 8 * state.ring_len
        self.map[start : start + 8] = fp.to_bytes(8, "little")
        state.ring_len += 1
