"""`python -m bench.baselines`: how well per-practitioner baselines see a stolen credential, on 60
simulated days with a controllable clock. Prints the table the README quotes; not a timed test.

1,000 legitimate practitioners of every profession work their usual hours with regular patients
(a few new ones each day), weekly rhythms, a seasonal wave, holidays, a new practitioner and a
pharmacy beside a station that mostly sees travellers. Then each learned credential is stolen on
one of its last days and walks a leaked list (people it never saw) at 10%, 50% and 90% of its
profession's distinct cap, during its usual hours or at night, on top of the owner's own work.
Every lookup goes through the gate's own baseline code (fastpath.observe_baseline: the C gate's
when built) with the profession's defaults from service.config.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import random
import sys
import time
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path

import fastpath
from fastpath import baselines, rules
from fastpath.baselines import RECORD_SIZE, SIGNALS
from service.config import DEFAULT_PROFESSION_QUOTAS, Config

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
START = datetime.date(2025, 9, 1)  # a Monday; summer time ends on day 55 (October 26th)
DAYS = 60
# A practitioner-day is flagged when any signal is raised (each runs in shadow by default).
FLAGGING = (1 << len(SIGNALS)) - 1
RATES = (10, 50, 90)


@dataclass(frozen=True)
class Kind:
    """A kind of practice: its share of the 1,000, visits on a usual day, patient pool, share of
    new people among its visits, working days a week, opening hours (Paris) and care domain."""

    profession: str
    share: float
    visits: float
    pool: int
    new_share: float
    days_a_week: int
    hours: tuple[float, float]
    domain: str
    label: str = ""


KINDS = (
    Kind("pharmacist", 0.24, 110, 3000, 0.08, 6, (8.5, 19.5), "PHAR"),
    Kind("pharmacist", 0.01, 170, 2000, 0.60, 7, (6.5, 22.0), "PHAR", "station pharmacy"),
    Kind("physician", 0.25, 25, 1500, 0.06, 5, (8.0, 19.0), "MEDE"),
    Kind("dentist", 0.08, 14, 900, 0.05, 5, (9.0, 18.0), "DENT"),
    Kind("optician", 0.05, 10, 1200, 0.30, 6, (9.5, 19.0), "OPTI"),
    Kind("audiologist", 0.03, 6, 500, 0.15, 5, (9.0, 18.0), "AUDI"),
    Kind("laboratory", 0.06, 180, 15000, 0.45, 6, (7.0, 18.0), "LABO"),
    Kind("radiology", 0.05, 80, 8000, 0.50, 5, (8.0, 19.0), "RADI"),
    Kind("paramedical", 0.14, 15, 300, 0.04, 5, (8.0, 20.0), "AUXM"),
    Kind("hospital", 0.04, 350, 30000, 0.55, 7, (0.0, 24.0), "HOSP"),
    Kind("transport", 0.05, 18, 600, 0.25, 6, (6.0, 21.0), "TRAN"),
)


@dataclass
class Practice:
    index: int
    kind: Kind
    profile: baselines.BaselineProfile
    first_day: int  # a new practitioner starts later
    holidays: set[int]
    record: bytearray = field(default_factory=lambda: bytearray(RECORD_SIZE))
    last_seen: dict[int, int] = field(default_factory=dict)  # person -> last day (ground truth)
    weights: list[float] = field(default_factory=list)  # cumulative, Zipf-like: regulars first


class Clock:
    """Paris wall-clock minutes to the gate's (today, now_ms), DST included."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[int, int]] = {}

    def at(self, day: int, minute: int) -> tuple[int, int]:
        key = (day, minute)
        hit = self._cache.get(key)
        if hit is None:
            date = START + datetime.timedelta(days=day)
            local = datetime.datetime(date.year, date.month, date.day, tzinfo=PARIS)
            local += datetime.timedelta(minutes=minute)
            hit = (int(local.strftime("%Y%m%d")), int(local.timestamp() * 1000))
            self._cache[key] = hit
        return hit


def storage_key(person: int) -> bytes:
    return hashlib.blake2b(person.to_bytes(8, "little"), digest_size=16).digest()


def _u32(record: bytearray, offset: int) -> int:
    return int.from_bytes(record[offset : offset + 4], "little")


def wave(p: Practice, day: int) -> float:
    """The autumn wave (0 to 1): physicians, pharmacies and laboratories see more people, and more
    new ones, for two weeks from day 30; it builds up over its first week and ebbs over the last."""
    if p.kind.profession not in ("physician", "pharmacist", "laboratory") or not 30 <= day < 48:
        return 0.0
    return min(1.0, (day - 29) / 7, (48 - day) / 5)


def visits_on(p: Practice, day: int, rng: random.Random) -> int:
    """How many lookups the practice makes that day: weekly rhythm, a seasonal wave, noise."""
    weekday = (START + datetime.timedelta(days=day)).weekday()
    if day < p.first_day or day in p.holidays or weekday >= p.kind.days_a_week:
        return 0
    mean = p.kind.visits * (1.25 if weekday == 0 else 0.6 if weekday == 5 else 1.0)
    mean *= 1 + 0.4 * wave(p, day)
    if p.kind.profession == "optician" and day < 12:
        mean *= 1.3  # back to school
    return max(0, round(rng.gauss(mean, mean**0.5 * 1.3)))


def day_events(p: Practice, day: int, rng: random.Random, next_new: list[int]
               ) -> list[tuple[int, int, bool]]:  # fmt: skip
    """The practice's own lookups that day: (minute, person, a repeat within the window)."""
    n = visits_on(p, day, rng)
    start, end = p.kind.hours
    more_new = 1 + 0.5 * wave(p, day)
    if start == 0.0 and end == 24.0:
        minutes = sorted(rng.randrange(24 * 60) for _ in range(n))
    else:
        minutes = sorted(int(rng.uniform(start, end) * 60) for _ in range(n))
    events = []
    pool_base = p.index * 1_000_000
    for minute in minutes:
        if rng.random() < min(0.95, p.kind.new_share * more_new):
            person = next_new[0]
            next_new[0] += 1
        else:
            person = pool_base + rng.choices(range(p.kind.pool), cum_weights=p.weights)[0]
        last = p.last_seen.get(person)
        events.append((minute, person, last is not None and day - last < 60))
        p.last_seen[person] = day
    return events


@dataclass
class Tally:
    legit_days: int = 0
    flagged_days: int = 0
    flagged_by_kind: dict[str, int] = field(default_factory=dict)
    signal_days: list[int] = field(default_factory=lambda: [0] * len(SIGNALS))
    repeats: int = 0
    repeats_counted_new: int = 0
    new_people: int = 0
    new_counted_repeat: int = 0


def build(seed: int, count: int) -> tuple[list[Practice], random.Random]:
    rng = random.Random(seed)
    config = Config()
    practices: list[Practice] = []
    for kind in KINDS:
        for _ in range(max(1, round(kind.share * count))):
            index = len(practices)
            first = 25 if rng.random() < 0.02 else 0
            holidays: set[int] = set()
            if rng.random() < 0.3:
                h = rng.randrange(14, 46)
                holidays = set(range(h, h + rng.choice((7, 14))))
            profile = config.baseline_profile(kind.profession)
            assert profile is not None
            p = Practice(index, kind, profile, first, holidays)
            p.weights = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in range(kind.pool)))
            practices.append(p)
    return practices, rng


def simulate(seed: int = 1, count: int = 1000) -> dict[str, object]:
    practices, rng = build(seed, count)
    clock = Clock()
    observe = fastpath.observe_baseline
    tally = Tally()
    next_new = [10**12]
    # Each learned practice is stolen on one working day of the last fortnight: the record as it
    # was that morning, and the owner's own lookups of that day, are kept for the walks.
    stolen: dict[int, tuple[int, bytes, list[tuple[int, int, bool]]]] = {}
    stolen_day = {p.index: rng.randrange(DAYS - 14, DAYS) for p in practices}
    started = time.perf_counter()
    for day in range(DAYS):
        for p in practices:
            events = day_events(p, day, rng, next_new)
            learned = _u32(p.record, 4) >= p.profile.learn_days
            if day == stolen_day[p.index]:
                stolen[p.index] = (day, bytes(p.record), events)
            domain = rules.DOMAIN_CODES[p.kind.domain]
            for minute, person, repeat in events:
                today, now_ms = clock.at(day, minute)
                before = _u32(p.record, 12) if _u32(p.record, 0) == today else 0
                observe(p.record, 0, p.profile, today, now_ms, domain, storage_key(person))
                counted_new = _u32(p.record, 12) > before
                if repeat:
                    tally.repeats += 1
                    tally.repeats_counted_new += counted_new
                else:
                    tally.new_people += 1
                    tally.new_counted_repeat += not counted_new
            if events and learned:
                fired = _u32(p.record, 24)
                tally.legit_days += 1
                tally.flagged_days += bool(fired & FLAGGING)
                if fired & FLAGGING:
                    label = p.kind.label or p.kind.profession
                    tally.flagged_by_kind[label] = tally.flagged_by_kind.get(label, 0) + 1
                for i in range(len(SIGNALS)):
                    tally.signal_days[i] += fired >> i & 1
    legit_seconds = time.perf_counter() - started

    walks = []
    for rate in RATES:
        for when in ("usual hours", "night"):
            walks.append(walk(practices, stolen, rate, when, clock, rng))
    return {
        "practitioners": len(practices),
        "days": DAYS,
        "implementation": fastpath.IMPLEMENTATION,
        "legit": {
            "practitioner_days_learned": tally.legit_days,
            "flagged": tally.flagged_days,
            "flagged_percent": 100 * tally.flagged_days / max(tally.legit_days, 1),
            "signal_days": dict(zip(SIGNALS, tally.signal_days, strict=True)),
            "flagged_by_profession": dict(sorted(tally.flagged_by_kind.items())),
            "repeats": tally.repeats,
            "repeats_counted_new": tally.repeats_counted_new,
            "new_people": tally.new_people,
            "new_counted_repeat": tally.new_counted_repeat,
        },
        "walks": walks,
        "seconds": {
            "legit": round(legit_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }


def walk(
    practices: list[Practice],
    stolen: dict[int, tuple[int, bytes, list[tuple[int, int, bool]]]],
    rate: int,
    when: str,
    clock: Clock,
    rng: random.Random,
) -> dict[str, object]:
    """Every learned credential walks a leaked list on its stolen day, from that morning's record,
    mixed with its owner's own lookups: flagged (FLAGGING) within the day, and after how many."""
    observe = fastpath.observe_baseline
    walkers = flagged = learning = 0
    signals = [0] * len(SIGNALS)
    to_flag: list[int] = []
    by_profession: dict[str, list[int]] = {}
    person = 2 * 10**12 + rate * 10**9 + (0 if when == "night" else 10**8)
    for p in practices:
        day, record_bytes, own = stolen[p.index]
        record = bytearray(record_bytes)
        if _u32(record, 4) < p.profile.learn_days:
            learning += 1  # still learning: no signal counts, by design (the caps still do)
            continue
        walkers += 1
        quota = DEFAULT_PROFESSION_QUOTAS[p.kind.profession]
        n = max(1, round(min(quota["distinct_limit"], quota["daily_limit"]) * rate / 100))
        start, end = (0.0, 6.0) if when == "night" else p.kind.hours
        walked = []
        for _ in range(n):
            walked.append((int(rng.uniform(start, end) * 60), person))
            person += 1
        events = sorted([(m, who, False) for m, who in walked] + own)
        domain = rules.DOMAIN_CODES[p.kind.domain]
        fired = steps = 0
        for minute, who, _repeat in events:
            today, now_ms = clock.at(day, minute)
            fresh = observe(record, 0, p.profile, today, now_ms, domain, storage_key(who))[0]
            steps += who >= 2 * 10**12
            fired |= fresh
            if fired & FLAGGING:
                break
        stats = by_profession.setdefault(p.kind.label or p.kind.profession, [0, 0])
        stats[0] += 1
        if fired & FLAGGING:
            flagged += 1
            stats[1] += 1
            to_flag.append(steps)
        for i in range(len(SIGNALS)):
            signals[i] += fired >> i & 1
    to_flag.sort()
    return {
        "rate_percent": rate,
        "when": when,
        "walkers": walkers,
        "still_learning": learning,
        "flagged": flagged,
        "flagged_percent": 100 * flagged / max(walkers, 1),
        "median_walked_before_flag": to_flag[len(to_flag) // 2] if to_flag else None,
        "by_profession": {k: f"{v[1]}/{v[0]}" for k, v in sorted(by_profession.items())},
        "signals": dict(zip(SIGNALS, signals, strict=True)),
    }


def table(result: dict[str, object]) -> str:
    legit = result["legit"]
    assert isinstance(legit, dict)
    lines = [
        f"{result['practitioners']} practitioners, {result['days']} days, gate "
        f"{result['implementation']}",
        "",
        "| stolen credential walks | at | walkers | flagged within the day | median walked first |",
        "|---|---|---:|---:|---:|",
    ]
    walks = result["walks"]
    assert isinstance(walks, list)
    for w in walks:
        lines.append(
            f"| {w['rate_percent']}% of the distinct cap | {w['when']} | {w['walkers']} | "
            f"{w['flagged_percent']:.1f}% | {w['median_walked_before_flag']} |"
        )
    lines += [
        "",
        "| legitimate practice | value |",
        "|---|---:|",
        f"| practitioner-days after learning | {legit['practitioner_days_learned']} |",
        f"| flagged (any signal) | {legit['flagged']} ({legit['flagged_percent']:.3f}%) |",
    ]
    for name, n in legit["signal_days"].items():
        lines.append(f"| days raising {name} (shadow) | {n} |")
    lines += [
        f"| repeat lookups (patient seen in the last 60 days) | {legit['repeats']} |",
        f"| of which counted as new | {legit['repeats_counted_new']} |",
        f"| new people counted as repeats (filter false positives) | "
        f"{legit['new_counted_repeat']} of {legit['new_people']} |",
    ]
    misses = {
        f"{w['rate_percent']}%/{w['when']}": {
            k: v for k, v in w["by_profession"].items() if v.split("/")[0] != v.split("/")[1]
        }
        for w in walks
    }
    misses = {k: v for k, v in misses.items() if v}
    if legit["flagged_by_profession"]:
        lines += ["", f"legitimate days flagged, by profession: {legit['flagged_by_profession']}"]
    if misses:
        lines += ["", "walkers not flagged, by profession (flagged/walkers):"]
        lines += [f"  {k}: {v}" for k, v in misses.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--practitioners", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = simulate(args.seed, args.practitioners)
    print(table(result))
    print(f"\n({result['seconds']})", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
