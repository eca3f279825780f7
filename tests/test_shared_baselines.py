"""Merging one practitioner's baselines across hosts (service.shared_baselines), on records written
by both gates' own baseline code: a beneficiary seen on one host is a repeat on the other, the day's
counts of every host add up in the signals, a merge applied twice changes nothing, and bits of
another generation or counts of another day are never taken in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpath
from fastpath import baselines
from fastpath.baselines import (
    FIXED,
    GENERATION_DAYS,
    RECORD_SIZE,
    SIG_NEW_EXCESS,
    SIG_NEW_SHARE,
    SIG_NEW_TODAY,
    BaselineProfile,
    BaselineState,
)
from service.shared_baselines import Counts, Merged, Publication, merge, own_counts, publications

TODAY = 20250615
NOON_MS = 1_749_981_600_000  # 2025-06-15 12:00 Paris
# min_lookups pinned at 20 (the default is 15): the split-walk arithmetic below counts on it.
PROFILE = BaselineProfile(enforce=SIG_NEW_SHARE | SIG_NEW_TODAY, min_lookups=20)


def _observers() -> list[Any]:
    observers = [pytest.param(fastpath._observe_baseline, id="python")]
    try:
        from fastpath._gate_c import observe_baseline
    except ImportError:
        pass
    else:
        observers.insert(0, pytest.param(observe_baseline, id="cython"))
    return observers


Observe = Callable[..., tuple[int, tuple[int, ...], bool]]


@pytest.fixture(params=_observers())
def observe(request: pytest.FixtureRequest) -> Observe:
    """The C gate's observe_baseline, or the reference's: the merge works on either's bytes."""
    return request.param  # type: ignore[no-any-return]


def key(person: int) -> bytes:
    """A synthetic beneficiary's storage key (a keyed hash in the gates: here any 16 bytes)."""
    return hashlib.sha256(person.to_bytes(8, "little")).digest()[:16]


def learned() -> bytearray:
    """A record that learned a month of ~40 lookups a day, 2 new (5%), at every hour, last
    worked yesterday (as tests/test_baselines_server.py writes it)."""
    record = bytearray(RECORD_SIZE)
    s = BaselineState.unpack(record, 0)
    s.day = TODAY - 1
    s.days_active, s.lookups, s.new = 30, 40, 2
    s.mean_lookups, s.square_lookups = 40 * FIXED, (1600 + 40) * FIXED
    s.mean_new, s.square_new, s.mean_share = 2 * FIXED, 6 * FIXED, 5 * FIXED
    s.hours, s.hours_total = [1000] * 24, 24_000
    s.pack_into(record, 0)
    return record


class Host:
    """One host's record of the practitioner and what it merged of the others'."""

    def __init__(self, observe: Observe, record: bytearray | None = None) -> None:
        self.observe = observe
        self.record = record if record is not None else learned()
        self.merged = Merged()

    def look(self, person: int, today: int = TODAY, now_ms: int = NOON_MS) -> tuple[int, bool]:
        fresh, _scores, suspend = self.observe(self.record, 0, PROFILE, today, now_ms, 3,
                                               key(person))  # fmt: skip
        return fresh, suspend

    def state(self) -> BaselineState:
        return BaselineState.unpack(self.record, 0)

    def published(self) -> list[Publication]:
        """Its day and its past, as the other hosts read them from Redis."""
        parts = [
            Publication.from_bytes(p.to_bytes()) for p in publications(self.record, 0, self.merged)
        ]
        assert None not in parts
        return parts  # type: ignore[return-value]

    def take(self, *others: Host) -> None:
        self.merged = merge(self.record, 0, self.merged, [p for o in others for p in o.published()])


def sync(*hosts: Host) -> None:
    """Every host publishes, then every host merges the others' publications."""
    published = [h.published() for h in hosts]
    for i, h in enumerate(hosts):
        others = [p for j, parts in enumerate(published) if j != i for p in parts]
        h.merged = merge(h.record, 0, h.merged, others)


def test_a_beneficiary_seen_on_one_host_is_a_repeat_on_the_other(observe: Observe) -> None:
    a, b = Host(observe), Host(observe)
    b.look(1000)  # b's record starts its day (and its filter generation)
    a.look(7)
    before = b.state().new
    sync(a, b)
    assert b.state().new == before + 1  # a's new beneficiary counted in b's day ...
    b.look(7)
    assert b.state().new == before + 1  # ... and a repeat on b
    b.look(8)
    assert b.state().new == before + 2
    # Without the merge, 7 is new on a host that never saw it.
    c = Host(observe)
    c.look(1000)
    c.look(7)
    assert c.state().new == 2


def test_the_day_s_counts_add_up_and_each_host_publishes_only_its_own(observe: Observe) -> None:
    a, b = Host(observe), Host(observe)
    for person in range(10):
        a.look(person)
    for person in range(100, 105):
        b.look(person)
    sync(a, b)
    sync(a, b)
    for h in (a, b):
        assert (h.state().lookups, h.state().new) == (15, 15)
    assert a.published()[0].own == Counts(10, 10, 0) and b.published()[0].own == Counts(5, 5, 0)
    b.look(105)
    sync(a, b)
    assert (a.state().lookups, b.state().lookups) == (16, 16)
    assert own_counts(b.state(), b.merged) == Counts(6, 6, 0)


def test_a_merge_applied_twice_changes_nothing(observe: Observe) -> None:
    a, b, c = Host(observe), Host(observe), Host(observe)
    for person in range(30):
        (a, b, c)[person % 3].look(person)
    sync(a, b, c)
    record, merged = bytes(b.record), b.merged
    b.take(a, c)
    b.take(c, a)
    assert bytes(b.record) == record and b.merged == merged
    # Merging the hosts' own publication back into themselves changes nothing either.
    sync(a, b, c)
    assert bytes(b.record) == record


def test_a_walker_split_over_two_hosts_is_flagged_as_on_one(observe: Observe) -> None:
    """new_today is raised at the 10th new person, new_share at 20 lookups (min_lookups): a
    walker on one host is suspended at its 20th; split over two hosts that merge after each
    lookup, at its 20th as well; split over two hosts that never merge, not within 38 (19 a
    host: below min_lookups on each)."""
    single = Host(observe)
    suspended_at = [i for i in range(40) if single.look(5000 + i)[1]]
    assert suspended_at[:1] == [19]

    a, b = Host(observe), Host(observe)
    suspended_at = []
    for i in range(40):
        host = (a, b)[i % 2]
        if host.look(5000 + i)[1]:
            suspended_at.append(i)
        sync(a, b)
    assert suspended_at[:1] == [19]
    # new_excess (two moderate excesses) is raised by the same walk, in shadow.
    assert a.state().fired == b.state().fired == SIG_NEW_SHARE | SIG_NEW_TODAY | SIG_NEW_EXCESS

    a, b = Host(observe), Host(observe)
    assert not any((a, b)[i % 2].look(5000 + i)[1] for i in range(38))
    assert a.state().fired & SIG_NEW_SHARE == 0


def test_the_day_s_end_folds_every_host_s_counts(observe: Observe) -> None:
    a, b = Host(observe), Host(observe)
    for person in range(30):
        (a, b)[person % 2].look(person)
    sync(a, b)
    a.look(999, TODAY + 1)
    b.look(999, TODAY + 1)
    # Both folded a day of 30 lookups, 30 new, into the same smoothed baseline.
    for h in (a, b):
        s = h.state()
        assert s.mean_lookups == (7 * 40 * FIXED + 30 * FIXED) // 8
        assert s.mean_new == (7 * 2 * FIXED + 30 * FIXED) // 8
        assert (s.lookups, s.new) == (1, 1)
    assert a.state().mean_share == b.state().mean_share


def test_counts_of_another_day_and_bits_of_another_generation_stay_out(observe: Observe) -> None:
    a, b = Host(observe), Host(observe)
    a.look(1)
    b.look(2, TODAY + 1)  # b is a day ahead: a's counts of TODAY are not b's day
    sync(a, b)
    assert (b.state().lookups, b.state().new) == (1, 1)
    # A record a generation ahead (30 days later) takes none of a's bits, nor its counts.
    later = TODAY + 100  # 2025-07-15: another 30-day generation
    assert (baselines.day_number(later) // GENERATION_DAYS
            != baselines.day_number(TODAY) // GENERATION_DAYS)  # fmt: skip
    c = Host(observe)
    c.look(3, later, NOON_MS + 30 * 86_400_000)
    before = bytes(c.record)
    c.take(a)
    assert bytes(c.record) == before
    c.look(1, later, NOON_MS + 30 * 86_400_000)
    assert c.state().new == 2  # 1 was seen on a, in a generation c does not hold


def test_a_host_whose_publication_expired_stays_counted(observe: Observe) -> None:
    a, b, c = Host(observe), Host(observe), Host(observe)
    for person in range(12):
        (a, b, c)[person % 3].look(person)
    sync(a, b, c)
    assert c.state().lookups == 12
    c.take(a)  # b's publication gone from Redis (expired, or Redis restarted empty)
    assert c.state().lookups == 12 and c.merged.others == Counts(8, 8, 0)


def test_nothing_recorded_here_takes_nothing() -> None:
    empty = bytearray(RECORD_SIZE)
    a = Host(fastpath._observe_baseline)
    a.look(1)
    assert merge(empty, 0, Merged(), [a.published()]) == Merged()
    assert empty == bytearray(RECORD_SIZE)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_publication_or_none(raw: bytes) -> None:
    a = Host(fastpath._observe_baseline)
    a.look(1)
    head = publications(a.record, 0, Merged())[0].to_bytes()[:36]
    for candidate in (raw, head + raw):
        parsed = Publication.from_bytes(candidate)
        assert parsed is None or len(parsed.filters) == 3 * baselines.FILTER_BYTES


def test_past_generations_travel_apart_and_still_make_repeats(observe: Observe) -> None:
    """A host publishes its day (the current segment, changed by every lookup) apart from its
    past segments (fixed once their generation passed): a person seen on one host a generation
    ago is a repeat on the other, from the past part alone."""
    later, later_ms = TODAY + 100, NOON_MS + 30 * 86_400_000  # 2025-07-15: the next generation
    a, b = Host(observe), Host(observe)
    a.look(7)
    b.look(1000)
    day, past = a.published()
    assert len(day.segments) == 1 and past.segments == ()
    a.look(1001, later, later_ms)
    b.look(1002, later, later_ms)
    day, past = a.published()
    assert [g for g, _ in past.segments] == [
        g for g in a.state().generation if g and g != day.segments[0][0]
    ]
    assert len(past.segments) == 1
    unmerged = Host(observe, bytearray(b.record))
    b.merged = merge(b.record, 0, b.merged, [past])  # a's past alone
    new = b.state().new
    b.look(7, later, later_ms)
    assert b.state().new == new  # seen on a last generation: a repeat on b
    unmerged.look(7, later, later_ms)
    assert unmerged.state().new == new + 1


@pytest.mark.parametrize("value", ["0", "301", "'2'"])
def test_the_merge_interval_is_checked(tmp_path: Path, value: str) -> None:
    from service.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text(
        f'[cluster]\nredis = "redis://127.0.0.1:1/0"\nbaseline_interval_seconds = {value}\n'
    )
    with pytest.raises(ConfigError, match="baseline_interval_seconds"):
        load_config(path)
    path.write_text('[cluster]\nredis = "redis://127.0.0.1:1/0"\nbaseline_interval_seconds = 5\n')
    assert load_config(path).cluster.baseline_interval_seconds == 5
