"""One fuzz case: which entry point, which caller, which clock, which quota state, which bytes; its
byte encoding (any byte string decodes to a case), and its generation from valid requests.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import struct
import zoneinfo
from dataclasses import dataclass, replace

from conftest import KNOWN_IDENTITIES, NOW, TODAY, UNKNOWN_IDENTITY

from covergate.v1 import covergate_pb2 as pb
from fastpath import baselines, rules
from fastpath.baselines import BaselineProfile
from fastpath.quota import MAX_DISTINCT_LIMIT, SLOT_HEAD, QuotaProfile
from fastpath.rules import Practitioner
from fuzz import wire
from fuzz.wire import Choices, pick

METHODS = ("check", "check_item", "check_batch")
PARIS = zoneinfo.ZoneInfo("Europe/Paris")

# Quotas are always on; the profiles reach every rule within a few calls.
PROFILES = (
    # tight: the rate, the daily and distinct limits and the guard all bite within a batch
    QuotaProfile(rate_per_minute=60, burst=3, daily_limit=5, distinct_limit=2,
                 guard_window=4, guard_min_lookups=2, guard_bad_percent=50),
    # roomy: decisions, not refusals
    QuotaProfile(rate_per_minute=100_000, burst=1000, daily_limit=1000, distinct_limit=600,
                 guard_window=40, guard_min_lookups=20, guard_bad_percent=50),
    # tight, every rule in shadow mode: evaluated and traced as "would deny", then allowed
    QuotaProfile(rate_per_minute=60, burst=3, daily_limit=5, distinct_limit=2, guard_window=4,
                 guard_min_lookups=2, guard_bad_percent=50, shadow=15),
    # a hair-trigger guard over the widest window
    QuotaProfile(rate_per_minute=6000, burst=10, daily_limit=50, distinct_limit=20,
                 guard_window=64, guard_min_lookups=1, guard_bad_percent=1),
)  # fmt: skip

# Baselines, by the case's profile: none, every signal on a hair trigger (shadow, then enforcing
# new_excess alone), and the defaults enforcing new_share and new_excess.
_HAIR_TRIGGER = dict(
    learn_days=1,
    min_lookups=1,
    new_share_percent=0,
    share_margin=0,
    new_min=1,
    new_mult_percent=0,
    sigma=1,
    volume_min=1,
    volume_mult_percent=0,
    off_permille=500,
    off_min=1,
    share_sigma=1,
    excess_min=1,
    excess_sigma=1,
    excess_share_sigma=1,
    excess_margin=0,
)
BASELINE_PROFILES = (
    None,
    BaselineProfile(**_HAIR_TRIGGER),
    BaselineProfile(**_HAIR_TRIGGER, enforce=baselines.SIG_NEW_EXCESS),
    BaselineProfile(enforce=baselines.SIG_NEW_SHARE | baselines.SIG_NEW_EXCESS),
)  # fmt: skip

_AMC_A, _AMC_B, _AMC_C = "123456789", "987654321", "1122"
# (agreements, domains): scope is always checked.
SCOPES = (
    (frozenset({_AMC_A, _AMC_B, _AMC_C}), rules.ALL_DOMAINS & ~(1 << 5)),  # no optical
    (frozenset({_AMC_A}), 1 << 1),  # pharmacy only
    (frozenset(), rules.ALL_DOMAINS),  # no agreement at all
    (frozenset({_AMC_A, _AMC_B, _AMC_C, "12a", "", "12345678901"}), rules.ALL_DOMAINS),
)
# (practitioner id, profession): the span's "who" and the lookup counters' row.
CALLERS = (
    ("10001234567", "pharmacist"),
    ("10001234567", "dentist"),
    ("99999999999", "not-a-profession"),
    ("\u00e9t\u00e9-42", "physician"),
)
# (now at the first call, seconds between calls); today follows now.
CLOCKS = (
    (NOW, 0.0),
    (NOW, 0.3),
    (NOW + 0.5, 1.0),
    (NOW + 0.999, 20.0),
    (NOW + 3600.25, 0.001),
    (NOW + 86399.9, 0.2),  # across midnight: the day rolls between calls
    (NOW, 86400.0),
    (NOW - 0.0005, 2.5),
)
TRACE_ID = bytes(range(1, 17))
PARENT_SPAN = bytes(range(101, 109))

# Corrupted quota state: none, the slot's head, the head and a full (or half full) table of
# today's beneficiaries.
SLOT_FRESH, SLOT_HEAD_ONLY, SLOT_TABLE_FULL, SLOT_TABLE_HALF = range(4)
SLOTS = 2
_HEAD = struct.Struct("<IIqIIIIQq")  # fastpath.quota's slot head


@dataclass(frozen=True)
class Case:
    method: int = 0
    profile: int = 0
    scope: int = 0
    caller: int = 0
    parent: bool = False
    small_batches: bool = True  # max_batch_items 4, else 16
    repeats: int = 1  # the same bytes, 1 to 4 times, the clock moving between calls
    clock: int = 0
    slot_mode: int = SLOT_FRESH
    slot_index: int = 0
    slot_head: bytes = b""  # SLOT_HEAD bytes, planted before the first call (slot_mode > 0)
    request: bytes = b""

    def encode(self) -> bytes:
        out = bytes(
            (
                self.method,
                self.profile | self.scope << 2 | self.caller << 4 | self.parent << 6
                | self.small_batches << 7,
                self.repeats - 1 | self.clock << 2 | self.slot_mode << 5 | self.slot_index << 7,
            )
        )  # fmt: skip
        if self.slot_mode:
            out += self.slot_head.ljust(SLOT_HEAD, b"\0")[:SLOT_HEAD]
        return out + self.request

    @classmethod
    def decode(cls, data: bytes) -> Case:
        """Any bytes are a case: short ones are padded, out-of-range numbers wrap."""
        head = data[:3].ljust(3, b"\0")
        slot_mode = head[2] >> 5 & 3
        body = data[3:]
        slot_head = b""
        if slot_mode:
            slot_head, body = body[:SLOT_HEAD].ljust(SLOT_HEAD, b"\0"), body[SLOT_HEAD:]
        return cls(
            method=head[0] % len(METHODS),
            profile=head[1] & 3,
            scope=head[1] >> 2 & 3,
            caller=head[1] >> 4 & 3,
            parent=bool(head[1] & 0x40),
            small_batches=bool(head[1] & 0x80),
            repeats=(head[2] & 3) + 1,
            clock=head[2] >> 2 & 7,
            slot_mode=slot_mode,
            slot_index=head[2] >> 7,
            slot_head=slot_head,
            request=body,
        )

    @property
    def method_name(self) -> str:
        return METHODS[self.method]

    @property
    def is_batch(self) -> bool:
        return self.method_name == "check_batch"

    @property
    def max_batch_items(self) -> int:
        return 4 if self.small_batches else 16

    def practitioner(self) -> Practitioner:
        practitioner_id, profession = CALLERS[self.caller]
        amc_numbers, domains = SCOPES[self.scope]
        return Practitioner(
            practitioner_id=practitioner_id,
            profession=profession,
            amc_numbers=amc_numbers,
            slot=self.slot_index,
            domains=domains,
            quota=PROFILES[self.profile],
            baseline=BASELINE_PROFILES[self.profile],
        )

    def calls(self) -> list[tuple[int, float]]:
        """(today, now) of each call."""
        start, step = CLOCKS[self.clock]
        out = []
        for i in range(self.repeats):
            now = start + i * step
            out.append((TODAY + int((now - NOW) // 86400), now))
        return out

    def trace_context(self) -> tuple[bytes, bytes] | None:
        return (TRACE_ID, PARENT_SPAN) if self.parent else None

    def describe(self) -> str:
        practitioner_id, profession = CALLERS[self.caller]
        lines = [
            f"method={self.method_name} profile={self.profile} scope={self.scope} "
            f"caller={practitioner_id!r}/{profession} parent={self.parent} "
            f"max_batch_items={self.max_batch_items} calls={self.calls()}",
        ]
        if self.slot_mode:
            lines.append(f"slot {self.slot_index} mode={self.slot_mode} head={slot_fields(self)}")
        lines.append(f"request ({len(self.request)} bytes) = {self.request.hex()}")
        return "\n".join(lines)


SLOT_FIELDS = ("flags", "guard_fired", "tat_ms", "day", "daily_count", "distinct_count",
               "window_len", "window_bits", "suspended_at_ms")  # fmt: skip


def head_fields(data: bytes, offset: int = 0) -> dict[str, int]:
    """The fields (fastpath.quota.SlotState) of the slot head at `offset` in `data`."""
    return dict(zip(SLOT_FIELDS, _HEAD.unpack_from(data, offset), strict=True))


def slot_fields(case: Case) -> dict[str, int]:
    """The planted slot head's fields."""
    return head_fields(case.slot_head.ljust(SLOT_HEAD, b"\0"))


def with_slot_fields(case: Case, **changes: int) -> Case:
    fields = slot_fields(case) | changes
    head = case.slot_head.ljust(SLOT_HEAD, b"\0")
    return replace(
        case, slot_head=_HEAD.pack(*(fields[n] for n in SLOT_FIELDS)) + head[_HEAD.size :]
    )


@functools.cache
def baseline_record(caller: int) -> bytes:
    """The baseline record planted in the case's slot, by caller: none yet; 35 learned days (over
    two filter generations) at 5% new people a day; 35 at 50% new; and the latter with today
    half counted. Each is written by the reference's own observe, as the gates would write it."""
    record = bytearray(baselines.RECORD_SIZE)
    if caller == 0:
        return bytes(record)
    new_every = 20 if caller == 1 else 2
    profile = BaselineProfile()
    for d in range(36 if caller == 3 else 35):
        for k in range(40 if d < 35 else 20):
            # regulars 0..99 come back; every new_every-th lookup is someone never seen
            person = 10_000 + d * 100 + k if k % new_every == 0 else (d * 7 + k) % 100
            key = hashlib.blake2b(person.to_bytes(8, "little"), digest_size=8).digest()
            now = NOW - (35 - d) * 86400 + k * 60
            today = int(datetime.datetime.fromtimestamp(now, PARIS).strftime("%Y%m%d"))
            h = int.from_bytes(key, "little")
            baselines.observe(record, 0, profile, today, now * 1000, 1, h)
    return bytes(record)


# -- valid requests, the seeds of every mutation ---------------------------------------------------

IDENTITIES = (*KNOWN_IDENTITIES, UNKNOWN_IDENTITY)
_OVERRIDES = (
    {},
    {},
    {"care_date": "20250301"},
    {"care_date": "20991231"},
    {"domain": 2},
    {"domain": 5},  # optical: out of some scopes
    {"amc_number": "555"},  # no agreement
    {"nir_key": "00"},  # invalid
    {"request_id": ""},
    {"birth_rank": 0},
)


def valid_request(ch: Choices) -> bytes:
    who = pick(ch, IDENTITIES)
    return who.request(**pick(ch, _OVERRIDES)).SerializeToString()


def valid_batch(ch: Choices) -> bytes:
    items = [pb.CheckCoverageRequest.FromString(valid_request(ch)) for _ in range(ch.integer(0, 5))]
    return pb.CheckCoverageBatchRequest(items=items).SerializeToString()


def slot_head(ch: Choices, profile: QuotaProfile) -> bytes:
    """A corrupted slot head: plausible values at and beyond every limit, or random bytes."""
    if ch.integer(0, 4) == 0:
        return ch.raw(SLOT_HEAD).ljust(SLOT_HEAD, b"\0")
    now_ms = NOW * 1000
    i64 = (1 << 63) - 1
    values = (
        pick(ch, (0, 0, 1, 2, 3, 0xFFFFFFFF, ch.integer(0, 0xFFFFFFFF))),  # flags
        pick(ch, (0, 1, 0xFFFFFFFF)),  # guard_fired
        pick(ch, (0, now_ms, now_ms + profile.tolerance_ms, now_ms + profile.tolerance_ms + 1,
                  now_ms + 10**9, i64, i64 - 1000, -i64 - 1, -1, ch.integer(-i64 - 1, i64))),
        pick(ch, (TODAY, TODAY, TODAY, TODAY - 1, TODAY + 1, 0, 0xFFFFFFFF)),  # day
        pick(ch, (0, profile.daily_limit - 1, profile.daily_limit, 0xFFFFFFFF,
                  ch.integer(0, 0xFFFFFFFF))),
        pick(ch, (0, profile.distinct_limit - 1, profile.distinct_limit, MAX_DISTINCT_LIMIT,
                  MAX_DISTINCT_LIMIT + 1, 0xFFFFFFFF)),
        pick(ch, (0, 1, profile.guard_window - 1, profile.guard_window, 63, 64, 65, 100,
                  0xFFFFFFFF, ch.integer(0, 0xFFFFFFFF))),  # window_len
        pick(ch, (0, (1 << 64) - 1, 0x5555555555555555, ch.integer(0, (1 << 64) - 1))),
        pick(ch, (0, now_ms, i64, -i64 - 1)),  # suspended_at_ms
    )  # fmt: skip
    return _HEAD.pack(*values) + ch.raw(SLOT_HEAD - _HEAD.size).ljust(SLOT_HEAD - _HEAD.size, b"\0")


def random_case(ch: Choices, request: bytes | None = None) -> Case:
    """A case with every setting drawn, the request mutated from a valid one (or raw bytes)."""
    method = ch.integer(0, 2)
    profile = ch.integer(0, 3)
    slot_mode = pick(ch, (SLOT_FRESH, SLOT_FRESH, SLOT_FRESH, SLOT_HEAD_ONLY, SLOT_HEAD_ONLY,
                          SLOT_TABLE_FULL, SLOT_TABLE_HALF))  # fmt: skip
    case = Case(
        method=method,
        profile=profile,
        scope=ch.integer(0, 3),
        caller=ch.integer(0, 3),
        parent=bool(ch.integer(0, 1)),
        small_batches=bool(ch.integer(0, 1)),
        repeats=pick(ch, (1, 1, 2, 4)),
        clock=ch.integer(0, len(CLOCKS) - 1),
        slot_mode=slot_mode,
        slot_index=ch.integer(0, SLOTS - 1),
        slot_head=slot_head(ch, PROFILES[profile]) if slot_mode else b"",
    )
    return replace(case, request=request if request is not None else random_request(ch, case))


def random_request(ch: Choices, case: Case) -> bytes:
    shape = ch.integer(0, 9)
    if shape == 0:
        return ch.raw(64)
    batch = case.is_batch
    base = valid_batch(ch) if batch else valid_request(ch)
    if shape == 1:
        return base  # valid, unmutated: the decisions and quotas themselves
    return wire.mutate(base, ch, batch=batch)
