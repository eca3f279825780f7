"""Per-practitioner baselines: each practitioner's own past (whom it checks, at what hours, how many
a day) kept beside the quota state, and the signals a lookup raises against it.

A stolen credential that walks a leaked list stays under every absolute cap; what changes is its
behaviour against its own past. The file `DIR/quota/baseline` holds one fixed-size record per quota
slot (same index), changed only under that slot's mutex, by the gates (the Cython gate does in C
what `observe` does here, on the same bytes). Nothing in it names anybody: beneficiaries are only
bits of Bloom filters set from the storage key (a keyed hash), never a pseudonym in clear.

Record layout (little-endian), RECORD_SIZE bytes:
  0   u32 day              YYYYMMDD (Europe/Paris) of today's counts
  4   u32 days_active      days with lookups folded into the baseline (learning ends at learn_days)
  8   u32 lookups          today
  12  u32 new              today: beneficiaries not in the window's filters
  16  u32 off_hours        today: lookups at an hour it rarely works
  20  u32 domains          today: bit per care domain asked
  24  u32 fired            today: signals already raised (each is raised once a day)
  28  u32 usual_domains    domains asked on past days
  32  u32 hours_total      sum of hours[]
  36  u32 suspended_by     the signals of the policy that last suspended it (0: never)
  40  u32 generation[3]    the filter generation each segment holds (days // GENERATION_DAYS + 1)
  52  u32 reserved
  56  u64 mean_lookups     EWMA of daily lookups, x FIXED
  64  u64 square_lookups   EWMA of daily lookups squared, x FIXED
  72  u64 mean_new         EWMA of daily new beneficiaries, x FIXED
  80  u64 square_new
  88  u64 mean_share       EWMA of the daily new share in percent, x FIXED
  96  u32 hours[24]        lookups per Paris hour on past days (halved past HOURS_TOTAL_CAP)
  192 u32 today_hours[24]
  288 FILTER_GENERATIONS Bloom filters of FILTER_BITS bits each

The rolling window is FILTER_GENERATIONS segments of GENERATION_DAYS days: a lookup probes every
live segment and sets its bits in the current one; a segment is cleared when its generation comes
round again, so a beneficiary is remembered between 60 and 90 days. Integers only (fixed point):
the C gate and this reference give the same bytes on every machine.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field

from fastpath.quota import HEADER_SIZE as HEADER_SIZE  # the C twin checks it here
from fastpath.quota import SlotFile

MAGIC = b"CGBASE01"
FILTER_GENERATIONS = 3
GENERATION_DAYS = 30
FILTER_BITS = 1 << 16
FILTER_BYTES = FILTER_BITS // 8
FILTER_PROBES = 4
HOURS = 24
RECORD_HEAD = 288
RECORD_SIZE = RECORD_HEAD + FILTER_GENERATIONS * FILTER_BYTES

# Fixed point for the smoothed baselines; daily counts are capped before any arithmetic so every
# product fits an unsigned 64-bit integer in C (see _above).
FIXED = 256
COUNT_CAP = 1 << 20
HOURS_TOTAL_CAP = 1 << 24
MAX_SIGMA = 8
MAX_PERCENT = 1_000_000
_U32 = 0xFFFFFFFF

SIGNALS = ("new_share", "new_today", "off_hours", "volume", "new_excess")
SIG_NEW_SHARE, SIG_NEW_TODAY, SIG_OFF_HOURS, SIG_VOLUME, SIG_NEW_EXCESS = 1, 2, 4, 8, 16
SIGNAL_BITS = {name: 1 << i for i, name in enumerate(SIGNALS)}
N_SIGNALS = len(SIGNALS)

_HEAD = struct.Struct("<14I5Q24I24I")
# BaselineProfile.packed, as the Cython gate reads it (fastpath/_c/baselines.pxi: BaseProfile).
PROFILE_VIEW = struct.Struct("<17q")


@dataclass(frozen=True)
class BaselineProfile:
    """When a practitioner's own past makes a lookup stand out: profession defaults, overridable.

    A signal counts only after `learn_days` active days. `new_share`: at least `min_lookups`
    today, `new_share_percent` of them new, `share_margin` points above its usual share and
    `share_sigma` binomial standard deviations above it (a share of many lookups varies less).
    `new_today` and `volume`: at least `new_min` (`volume_min`), `*_mult_percent` of the
    baseline, and `sigma` standard deviations above it. `off_hours`: `off_min` lookups today at
    hours that hold less than `off_permille` of its past lookups. `new_excess`: at least
    `excess_min` new people today, `excess_sigma` standard deviations above the usual count
    and, at once, a new share `excess_margin` points and `excess_share_sigma` binomial
    deviations above the usual share: two moderate excesses together, where `new_today` and
    `new_share` each want a large one. `enforce`: the signals
    (SIGNAL_BITS) that, all raised the same day, suspend the practitioner; 0: shadow only.
    """

    learn_days: int = 14
    min_lookups: int = 15
    new_share_percent: int = 50
    share_margin: int = 15
    new_min: int = 10
    new_mult_percent: int = 200
    sigma: int = 4
    volume_min: int = 60
    volume_mult_percent: int = 300
    off_permille: int = 5
    off_min: int = 15
    share_sigma: int = 4
    excess_min: int = 10
    excess_sigma: int = 3
    excess_share_sigma: int = 2
    excess_margin: int = 15
    enforce: int = 0
    packed: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("sigma", "share_sigma", "excess_sigma", "excess_share_sigma"):
            if not 1 <= getattr(self, name) <= MAX_SIGMA:
                raise ValueError(f"{name} must be 1..{MAX_SIGMA}")
        for name in (
            "new_mult_percent",
            "volume_mult_percent",
            "new_share_percent",
            "share_margin",
            "off_permille",
            "excess_margin",
        ):
            if not 0 <= getattr(self, name) <= MAX_PERCENT:
                raise ValueError(f"{name} must be 0..{MAX_PERCENT}")
        for name in ("learn_days", "min_lookups", "new_min", "volume_min", "off_min", "excess_min"):
            if not 1 <= getattr(self, name) <= _U32:
                raise ValueError(f"{name} must be 1..{_U32}")
        if not 0 <= self.enforce < 1 << N_SIGNALS:
            raise ValueError("enforce must be a set of signals")
        values = (
            self.learn_days,
            self.min_lookups,
            self.new_share_percent,
            self.share_margin,
            self.new_min,
            self.new_mult_percent,
            self.sigma,
            self.volume_min,
            self.volume_mult_percent,
            self.off_permille,
            self.off_min,
            self.share_sigma,
            self.excess_min,
            self.excess_sigma,
            self.excess_share_sigma,
            self.excess_margin,
            self.enforce,
        )
        object.__setattr__(self, "packed", PROFILE_VIEW.pack(*values))


@dataclass
class BaselineState:
    day: int
    days_active: int
    lookups: int
    new: int
    off_hours: int
    domains: int
    fired: int
    usual_domains: int
    hours_total: int
    suspended_by: int
    generation: list[int]
    reserved: int
    mean_lookups: int
    square_lookups: int
    mean_new: int
    square_new: int
    mean_share: int
    hours: list[int]
    today_hours: list[int]

    @classmethod
    def unpack(cls, buffer: bytes | bytearray | mmap.mmap, offset: int) -> BaselineState:
        v = _HEAD.unpack_from(buffer, offset)
        generation, hours, today_hours = list(v[10:13]), list(v[19:43]), list(v[43:67])
        return cls(*v[:10], generation, *v[13:19], hours, today_hours)  # type: ignore[arg-type, call-arg]

    def pack_into(self, buffer: bytearray | mmap.mmap, offset: int) -> None:
        _HEAD.pack_into(
            buffer,
            offset,
            self.day,
            self.days_active,
            self.lookups,
            self.new,
            self.off_hours,
            self.domains,
            self.fired,
            self.usual_domains,
            self.hours_total,
            self.suspended_by,
            *self.generation,
            self.reserved,
            self.mean_lookups,
            self.square_lookups,
            self.mean_new,
            self.square_new,
            self.mean_share,
            *self.hours,
            *self.today_hours,
        )


# -- the Paris clock in integers (the C gate has the same, fastpath/_c/baselines.pxi) --------------


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm); any month
    and day numbers give a number, the same in C."""
    year -= month <= 2
    era = (year if year >= 0 else year - 399) // 400
    yoe = year - era * 400
    doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def day_number(today: int) -> int:
    """The days-since-epoch of a YYYYMMDD day."""
    return days_from_civil(today // 10000, today // 100 % 100, today % 100)


def generation_of(today: int) -> int:
    """The filter generation a YYYYMMDD day belongs to (never 0: 0 marks an unused segment)."""
    return (day_number(today) // GENERATION_DAYS + 1) & _U32


def _last_sunday(year: int, month: int) -> int:
    d = days_from_civil(year, month, 31)
    return d - (d + 4) % 7


def paris_hour(today: int, now_ms: int) -> int:
    """The hour (0..23) in Europe/Paris of the instant now_ms: summer time (UTC+2) from 01:00 UTC
    on March's last Sunday to 01:00 UTC on October's, UTC+1 otherwise, of `today`'s year."""
    seconds = now_ms // 1000
    year = today // 10000
    start = _last_sunday(year, 3) * 86400 + 3600
    end = _last_sunday(year, 10) * 86400 + 3600
    offset = 7200 if start <= seconds < end else 3600
    return (seconds + offset) % 86400 // 3600


# -- one lookup ------------------------------------------------------------------------------------


def filter_bits(h: int) -> tuple[int, ...]:
    """The FILTER_PROBES bit positions of a beneficiary, from 8 bytes of its storage key (double
    hashing: h1 + i * h2)."""
    h1, h2 = h & _U32, (h >> 32) | 1
    return tuple((h1 + i * h2) & (FILTER_BITS - 1) for i in range(FILTER_PROBES))


def _above(x: int, mean: int, square: int, sigma: int) -> bool:
    """Whether x lies more than `sigma` standard deviations above the smoothed mean (all x FIXED):
    (x - m)^2 > sigma^2 var, with var = E[x^2] - m^2, never below the mean: daily counts vary at
    least as a Poisson count does, however steady a few days looked."""
    d = x * FIXED - mean
    if d <= 0:
        return False
    var = square * FIXED - mean * mean
    return d * d > sigma * sigma * max(var, mean * FIXED)


def _share_above(n: int, x: int, usual: int, sigma: int) -> bool:
    """Whether n new of x lookups lie more than `sigma` binomial standard deviations above the
    usual share (`usual` percent): (100 n - usual x)^2 > sigma^2 usual (100 - usual) x."""
    d = n * 100 - usual * x
    return d > 0 and d * d > sigma * sigma * usual * (100 - usual) * x


def _roll(buffer: bytearray | mmap.mmap, offset: int, s: BaselineState, today: int) -> None:
    """A new Paris day: yesterday (if it had lookups) goes into the baseline, today starts, and
    the current filter segment is cleared when its generation comes round."""
    if s.lookups:
        x, n = min(s.lookups, COUNT_CAP), min(s.new, COUNT_CAP)
        share = n * 100 * FIXED // x
        if s.days_active == 0:
            s.mean_lookups, s.square_lookups = x * FIXED, x * x * FIXED
            s.mean_new, s.square_new, s.mean_share = n * FIXED, n * n * FIXED, share
        else:
            s.mean_lookups = (7 * s.mean_lookups + x * FIXED) // 8
            s.square_lookups = (7 * s.square_lookups + x * x * FIXED) // 8
            s.mean_new = (7 * s.mean_new + n * FIXED) // 8
            s.square_new = (7 * s.square_new + n * n * FIXED) // 8
            s.mean_share = (7 * s.mean_share + share) // 8
        s.days_active = min(s.days_active + 1, _U32)
        s.usual_domains |= s.domains
        for h in range(HOURS):
            s.hours[h] += min(s.today_hours[h], COUNT_CAP)
        s.hours_total = sum(s.hours)
        while s.hours_total > HOURS_TOTAL_CAP:
            s.hours = [v // 2 for v in s.hours]
            s.hours_total = sum(s.hours)
    s.lookups = s.new = s.off_hours = s.domains = s.fired = 0
    s.today_hours = [0] * HOURS
    s.day = today
    generation = generation_of(today)
    segment = generation % FILTER_GENERATIONS
    if s.generation[segment] != generation:
        start = offset + RECORD_HEAD + segment * FILTER_BYTES
        buffer[start : start + FILTER_BYTES] = bytes(FILTER_BYTES)
        s.generation[segment] = generation


@dataclass
class Observation:
    """What one lookup raised: signals newly raised today (bits), their scores (by signal index),
    and whether the policy suspends the practitioner now."""

    fired: int
    scores: list[int]
    suspend: bool


def observe(
    buffer: bytearray | mmap.mmap,
    offset: int,
    profile: BaselineProfile,
    today: int,
    now_ms: int,
    domain: int,
    h: int,
) -> Observation:
    """One counted lookup of beneficiary `h` (storage key bytes 8..16, little-endian) in care
    `domain`, into the record at `offset`: the reference of the C gate's _observe."""
    s = BaselineState.unpack(buffer, offset)
    if s.day != today:
        _roll(buffer, offset, s, today)
    generation = generation_of(today)
    segment = generation % FILTER_GENERATIONS
    bits = filter_bits(h)
    seen = False
    for g in range(FILTER_GENERATIONS):
        if s.generation[g] == 0 or not 0 <= (generation - s.generation[g]) & _U32 < 3:
            continue
        base = offset + RECORD_HEAD + g * FILTER_BYTES
        if all(buffer[base + (b >> 3)] & (1 << (b & 7)) for b in bits):
            seen = True
            break
    base = offset + RECORD_HEAD + segment * FILTER_BYTES
    for b in bits:
        buffer[base + (b >> 3)] |= 1 << (b & 7)
    hour = paris_hour(today, now_ms)
    s.lookups = min(s.lookups + 1, _U32)
    if not seen:
        s.new = min(s.new + 1, _U32)
    s.today_hours[hour] = min(s.today_hours[hour] + 1, _U32)
    s.domains |= 1 << domain
    learned = s.days_active >= profile.learn_days
    if learned and s.hours[hour] * 1000 < s.hours_total * profile.off_permille:
        s.off_hours = min(s.off_hours + 1, _U32)
    scores = [0] * N_SIGNALS
    fire = 0
    if learned:
        x, n = min(s.lookups, COUNT_CAP), min(s.new, COUNT_CAP)
        scores = signal_scores(s)
        usual = min(s.mean_share // FIXED, 100)
        if (
            x >= profile.min_lookups
            and n * 100 >= profile.new_share_percent * x
            and n * 100 * FIXED >= (s.mean_share + profile.share_margin * FIXED) * x
            and _share_above(n, x, usual, profile.share_sigma)
        ):
            fire |= SIG_NEW_SHARE
        if (
            n >= profile.new_min
            and n * 100 * FIXED >= profile.new_mult_percent * s.mean_new
            and _above(n, s.mean_new, s.square_new, profile.sigma)
        ):
            fire |= SIG_NEW_TODAY
        if s.off_hours >= profile.off_min:
            fire |= SIG_OFF_HOURS
        if (
            x >= profile.volume_min
            and x * 100 * FIXED >= profile.volume_mult_percent * s.mean_lookups
            and _above(x, s.mean_lookups, s.square_lookups, profile.sigma)
        ):
            fire |= SIG_VOLUME
        if (
            n >= profile.excess_min
            and n * 100 * FIXED >= (s.mean_share + profile.excess_margin * FIXED) * x
            and _above(n, s.mean_new, s.square_new, profile.excess_sigma)
            and _share_above(n, x, usual, profile.excess_share_sigma)
        ):
            fire |= SIG_NEW_EXCESS
    fresh = fire & ~s.fired
    s.fired |= fire
    enforce = profile.enforce
    suspend = bool(fresh) and enforce != 0 and s.fired & enforce == enforce
    if suspend:
        s.suspended_by = enforce
    s.pack_into(buffer, offset)
    return Observation(fresh, scores, suspend)


def signal_scores(s: BaselineState) -> list[int]:
    """Today's score of each signal (SIGNALS order): new share in percent, new beneficiaries and
    lookups in percent of their baseline, lookups at unusual hours, and the points by which
    today's new share exceeds the usual one (0 when it does not)."""
    x, n = min(s.lookups, COUNT_CAP), min(s.new, COUNT_CAP)
    share = n * 100 // x if x else 0
    return [
        share,
        n * 100 * FIXED // max(s.mean_new, 1),
        min(s.off_hours, COUNT_CAP),
        x * 100 * FIXED // max(s.mean_lookups, 1),
        max(share - min(s.mean_share // FIXED, 100), 0),
    ]


def deviation(mean: int, square: int) -> float:
    """The standard deviation of a smoothed baseline (for display only)."""
    return float(max(square * FIXED - mean * mean, 0)) ** 0.5 / FIXED


# -- the file --------------------------------------------------------------------------------------


class BaselineFile(SlotFile):
    """The baselines of one host (DIR/quota/baseline), one record per quota slot. Sparse: a
    slot costs disk only once its practitioner works."""

    MAGIC = MAGIC
    ENTRY = RECORD_SIZE
    WHAT = "baseline"

    def read(self, slot: int) -> BaselineState:
        return BaselineState.unpack(self.map, self.offset(slot))

    def reset(self, slot: int) -> None:
        """Forget a slot (handed to a new practitioner); call under the slot's mutex."""
        start = self.offset(slot)
        self.map[start : start + RECORD_SIZE] = bytes(RECORD_SIZE)
