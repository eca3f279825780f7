"""The arithmetic of a run: medians over rounds, latency percentiles, paired ratios and goals.

Pure functions on plain numbers, so `tests/test_bench_harness.py` checks them without a server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that were measured (None skipped); None when there are none."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) of already sorted values, linearly interpolated between
    closest ranks (numpy's default), so p50 of [1, 2, 3, 4] is 2.5."""
    if not sorted_values:
        raise ValueError("no values")
    if not 0 <= p <= 100:
        raise ValueError("p must be within 0..100")
    pos = (len(sorted_values) - 1) * p / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(sorted_values[lo])
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


LATENCY_PERCENTILES = (50, 90, 99, 99.9)


def latency_summary(durations_us: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max in milliseconds and the sample count, from microsecond durations."""
    xs = sorted(durations_us)
    if not xs:
        return {"count": 0}
    out: dict[str, float] = {"count": len(xs)}
    for p in LATENCY_PERCENTILES:
        out[percentile_key(p)] = percentile(xs, p) / 1000
    out["max_ms"] = xs[-1] / 1000
    out["mean_ms"] = sum(xs) / len(xs) / 1000
    return out


def percentile_key(p: float) -> str:
    """50 -> 'p50_ms', 99.9 -> 'p99.9_ms'."""
    return f"p{p:g}_ms"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def paired_ratios(
    subject: Sequence[float | None], baseline: Sequence[float | None]
) -> dict[str, float | list[float | None] | None]:
    """Ratios of a subject over a baseline measured in the same rounds.

    `per_round` pairs round i with round i (A and B ran back to back, in alternating order);
    `ratio` is the median of those, robust to drift over the run; `ratio_of_medians` is kept too.
    """
    rounds = [ratio(a, b) for a, b in zip(subject, baseline, strict=False)]
    return {
        "per_round": rounds,
        "ratio": median(rounds),
        "ratio_of_medians": ratio(median(subject), median(baseline)),
    }


def goal_met(value: float | None, threshold: float, higher_is_better: bool = True) -> bool | None:
    """True/False against the threshold, None when the value was not measured."""
    if value is None:
        return None
    return value >= threshold if higher_is_better else value <= threshold


def per_cpu(rate: float | None, cpu: float | None) -> float | None:
    """A rate per core busy (items/s over the server's CPU share): None when either is missing."""
    if rate is None or not cpu:
        return None
    return rate / cpu


def cpu_share(cpu_seconds: float | None, wall_seconds: float) -> float | None:
    """CPU time over wall time, in cores (1.0 = one core busy the whole time)."""
    if cpu_seconds is None or wall_seconds <= 0:
        return None
    return cpu_seconds / wall_seconds


def open_loop_rate(max_rate: float | None, fraction: float, clients: int) -> tuple[float, float]:
    """(total offered rate, h2load --rps per client) for `fraction` of a measured maximum."""
    if max_rate is None or max_rate <= 0:
        raise ValueError("no closed-loop maximum to take a fraction of")
    if clients < 1:
        raise ValueError("at least one client")
    total = max_rate * fraction
    return total, total / clients


def split_clients(weights: dict[str, int], total: int) -> dict[str, int]:
    """h2load connections per request kind, in proportion to a mix's weights, at least one each
    (so the total may exceed `total` by a few for a skewed mix)."""
    positive = {k: w for k, w in weights.items() if w > 0}
    if not positive:
        raise ValueError("a mix needs at least one positive weight")
    whole = sum(positive.values())
    return {k: max(1, round(total * w / whole)) for k, w in positive.items()}


def relative_to_best(values: Sequence[float]) -> list[float]:
    """Each value over the largest (1.0 = the fastest the machine was during the run)."""
    best = max(values, default=0.0)
    return [v / best if best else 0.0 for v in values]


def span_audit(
    answered: int, before: dict[str, int], after: dict[str, int], in_flight: int = 0
) -> dict[str, Any]:
    """Lookup spans the receiver got between two of its counts (`before`, `after`: spans and
    lookup_spans) against the lookups answered meanwhile. `in_flight`: lookups of the calls
    h2load had started but not seen answered when it stopped (the server may have answered them:
    their spans are the window's edge, why spans_per_lookup may exceed 1 a little)."""
    lookup_spans = after["lookup_spans"] - before["lookup_spans"]
    return {
        "lookups_answered": answered,
        "lookup_spans": lookup_spans,
        "spans": after["spans"] - before["spans"],
        "spans_per_lookup": lookup_spans / answered if answered else None,
        "lost": max(0, answered - lookup_spans),
        "in_flight_lookups": in_flight,
    }


def redis_per_lookups(
    before: dict[str, int], after: dict[str, int], lookups: int
) -> dict[str, Any]:
    """Redis round trips (read events it processed) and commands (those a script runs included)
    per 1,000 lookups, between two INFO stats readings; the later reading's own INFO counts as a
    read and the earlier one's as a command, so one of each is taken off."""
    round_trips = max(0, after["reads"] - before["reads"] - 1)
    commands = max(0, after["commands"] - before["commands"] - 1)
    return {
        "lookups": lookups,
        "round_trips": round_trips,
        "commands": commands,
        "round_trips_per_1000": 1000 * round_trips / lookups if lookups else None,
        "commands_per_1000": 1000 * commands / lookups if lookups else None,
    }
