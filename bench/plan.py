"""What one run measures: the comparisons (variant pairs over scenarios), the open-loop latency
points, and the goals the table marks met or missed.

The cells (variant x scenario) a run drives are derived from these, so a new pair is one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from bench.scenarios import SCENARIOS
from bench.variants import VARIANTS

PRIMARY = "covergate"
T = TypeVar("T")


@dataclass(frozen=True)
class Comparison:
    """subject / baseline on each scenario, from the same run, alternated round by round."""

    name: str
    subject: str
    baseline: str
    scenarios: tuple[str, ...]
    description: str


COMPARISONS: tuple[Comparison, ...] = (
    Comparison(
        "ceiling",
        "covergate",
        "noop",
        ("unary", "batch-10", "batch-100", "batch-500", "stream", "stream-100", "batch-100-p8"),
        "covergate against a no-op server from the same protos (what grpcio alone allows)",
    ),
    Comparison(
        "ceiling-Nw",
        "covergate-Nw",
        "noop-Nw",
        ("unary", "batch-100", "unary-p8", "batch-100-p8"),
        "the same with one worker per core on both sides",
    ),
    Comparison(
        "reference",
        "covergate",
        "reference",
        ("unary", "batch-100", "stream-100"),
        "Cython fast path against the pure-Python reference, same server",
    ),
    Comparison(
        "workers",
        "covergate-Nw",
        "covergate",
        ("unary", "batch-10", "batch-100", "batch-500", "unary-p8", "batch-100-p8"),
        "one worker per core against one worker (-p8: the load spread over 8 practitioners, so "
        "the workers share 8 quota slots instead of one)",
    ),
    Comparison(
        "tracing",
        "covergate-tracing",
        "covergate",
        ("unary", "batch-100", "stream-100"),
        "every lookup traced and exported over OTLP against tracing off",
    ),
    Comparison(
        "quotas",
        "covergate",
        "covergate-noquota",
        ("unary", "batch-100", "stream-100"),
        "quotas and the harvest guard on (every lookup counted in the shared state) against off",
    ),
    Comparison(
        "baselines",
        "covergate",
        "covergate-nobaselines",
        ("unary", "batch-100"),
        "per-practitioner baselines on (each lookup probes and sets the practitioner's filter, "
        "hour profile and day counts) against off",
    ),
    Comparison(
        "conventional",
        "covergate",
        "conventional",
        ("unary", "unary-mix", "batch-100"),
        "covergate against the stack a user would build without it",
    ),
    Comparison(
        "cluster",
        "covergate-cluster",
        "covergate",
        ("unary", "batch-100"),
        "limits shared across hosts on Redis ([cluster]) against one host's shared memory",
    ),
    Comparison(
        "cluster-conventional",
        "covergate-cluster",
        "conventional",
        ("unary", "batch-100"),
        "covergate with [cluster] against the conventional stack (Redis INCR+EXPIRE per lookup), "
        "same Redis",
    ),
)

# Scenarios only the primary variant runs (no baseline needed to read them).
PRIMARY_ONLY: tuple[str, ...] = ("unary-mix", "batch-100-mix")

# (variant, scenario) measured open loop at a fraction of that cell's closed-loop maximum.
OPEN_LOOP: tuple[tuple[str, str], ...] = (
    ("covergate", "unary"),
    ("noop", "unary"),
    ("covergate", "batch-100"),
)


@dataclass(frozen=True)
class Goal:
    """A target from the issue. `source` names the measurement:
    ("ratio", comparison, scenario), ("micro", implementation, measure),
    ("micro_ratio", measure) (Cython / reference), ("micro_pair", pair, shape) (on/off in process,
    bench.micro.pairs), ("latency", variant, scenario, percentile), ("latency_ratio", subject,
    baseline, scenario, percentile) (open loop at the same fraction of each one's maximum, median
    of per-round ratios), ("import",) (`covergate import rights` rows/s, bench.micro),
    ("spans_lost",) (lookups answered in the tracing cells without their span at the receiver),
    ("audit", phase, measure) (bench.audit's receiver-outage, spool-full and export-rate phases).
    """

    name: str
    text: str
    source: tuple[str, ...]
    threshold: float
    higher_is_better: bool = True
    unit: str = "x"


GOALS: tuple[Goal, ...] = (
    Goal("unary vs ceiling", "unary RPC/s >= 0.85x no-op", ("ratio", "ceiling", "unary"), 0.85),
    Goal(
        "batch-100 vs ceiling",
        "batch-100 items/s >= 0.8x no-op",
        ("ratio", "ceiling", "batch-100"),
        0.8,
    ),
    Goal(
        "batch-100 vs ceiling, 8 practitioners",
        "batch-100 items/s >= 0.8x no-op, load spread over 8 practitioners (1 worker)",
        ("ratio", "ceiling", "batch-100-p8"),
        0.8,
    ),
    Goal(
        "batch-100 vs ceiling, N workers",
        "batch-100 items/s >= 0.8x no-op, one worker per core on both sides",
        ("ratio", "ceiling-Nw", "batch-100"),
        0.8,
    ),
    Goal(
        "batch-100 vs ceiling, N workers, 8 practitioners",
        "batch-100 items/s >= 0.8x no-op, one worker per core, 8 practitioners",
        ("ratio", "ceiling-Nw", "batch-100-p8"),
        0.8,
    ),
    Goal(
        "fast path rate",
        ">= 1,000,000 decisions/s on one core (Cython, batch of 100)",
        ("micro", "cython", "batch_100"),
        1_000_000,
        unit="/s",
    ),
    Goal(
        "fast path vs reference",
        "Cython >= 10x the reference (batch of 100)",
        ("micro_ratio", "batch_100"),
        10,
    ),
    Goal(
        "unary p99 at 70%",
        "unary p99 at 70% of maximum load <= 1.2x the no-op's p99 at 70% of its own",
        ("latency_ratio", "covergate", "noop", "unary", "p99"),
        1.2,
        higher_is_better=False,
    ),
    Goal(
        "workers on batches",
        "N workers >= 1.7x one worker (batch-100)",
        ("ratio", "workers", "batch-100"),
        1.7,
    ),
    Goal(
        "workers on batches, 8 practitioners",
        "N workers >= 1.7x one worker (batch-100 from 8 practitioners: 8 quota slots)",
        ("ratio", "workers", "batch-100-p8"),
        1.7,
    ),
    Goal(
        "tracing cost (unary)",
        "tracing on >= 0.9x tracing off (unary RPC/s)",
        ("ratio", "tracing", "unary"),
        0.9,
    ),
    Goal(
        "tracing cost (batch-100)",
        "tracing on >= 0.85x tracing off (batch-100 items/s)",
        ("ratio", "tracing", "batch-100"),
        0.85,
    ),
    Goal(
        "tracing: no span lost",
        "every lookup answered in the tracing cells has its span at the receiver",
        ("spans_lost",),
        0,
        higher_is_better=False,
        unit=" spans",
    ),
    Goal(
        "receiver down: no span lost",
        "receiver stopped mid-run, then back: every answered lookup's span received in the end",
        ("audit", "receiver-outage", "lost"),
        0,
        higher_is_better=False,
        unit=" spans",
    ),
    Goal(
        "receiver down: answers go on",
        "receiver stopped mid-run, then back: no call refused while the spool has room",
        ("audit", "receiver-outage", "refused"),
        0,
        higher_is_better=False,
        unit=" calls",
    ),
    Goal(
        "spool full: no answer without its span",
        "spool full: lookups answered without their span at the receiver",
        ("audit", "spool-full", "lost"),
        0,
        higher_is_better=False,
        unit=" spans",
    ),
    Goal(
        "spool full: refusals are AUDIT_BACKLOG",
        "spool full: share of refused calls that are UNAVAILABLE with ErrorInfo AUDIT_BACKLOG",
        ("audit", "spool-full", "backlog_share"),
        1.0,
    ),
    Goal(
        "export rate vs batch rate",
        "spans/s one worker's spool exports >= 1x covergate's batch-100 lookups/s",
        ("audit", "export-rate", "vs_batch_rate"),
        1.0,
    ),
    Goal(
        "quota cost (unary)",
        "quotas on >= 0.95x quotas off (unary RPC/s)",
        ("ratio", "quotas", "unary"),
        0.95,
    ),
    Goal(
        "quota cost (batch-100)",
        "quotas on >= 0.95x quotas off (batch-100 items/s)",
        ("ratio", "quotas", "batch-100"),
        0.95,
    ),
    Goal(
        "baselines cost (unary)",
        "baselines on >= 0.95x baselines off (unary RPC/s)",
        ("ratio", "baselines", "unary"),
        0.95,
    ),
    Goal(
        "baselines cost (batch-100)",
        "baselines on >= 0.95x baselines off (batch-100 items/s)",
        ("ratio", "baselines", "batch-100"),
        0.95,
    ),
    Goal(
        "quota cost in process (unary)",
        "quotas on >= 0.95x quotas off, in process (Cython gate, unary calls/s)",
        ("micro_pair", "quotas", "unary"),
        0.95,
    ),
    Goal(
        "quota cost in process (batch-100)",
        "quotas on >= 0.95x quotas off, in process (Cython gate, batch-100 items/s)",
        ("micro_pair", "quotas", "batch-100"),
        0.95,
    ),
    Goal(
        "import speed",
        "import of rights >= 300,000 rows/s on one core (`covergate import rights`)",
        ("import",),
        300_000,
        unit=" rows/s",
    ),
    Goal(
        "vs conventional (unary)",
        "covergate >= 3x the conventional stack (unary)",
        ("ratio", "conventional", "unary"),
        3.0,
    ),
    Goal(
        "vs conventional (batch-100)",
        "covergate >= 3x the conventional stack (batch-100 items/s)",
        ("ratio", "conventional", "batch-100"),
        3.0,
    ),
    Goal(
        "cluster cost (unary)",
        "[cluster] on >= 0.95x one host without it (unary RPC/s)",
        ("ratio", "cluster", "unary"),
        0.95,
    ),
    Goal(
        "cluster cost (batch-100)",
        "[cluster] on >= 0.95x one host without it (batch-100 items/s)",
        ("ratio", "cluster", "batch-100"),
        0.95,
    ),
)


def cells(
    scenarios: Iterable[str] | None = None, variants: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """(variant, scenario) pairs to drive closed loop, in a stable order, limited to a selection."""
    want_s = set(scenarios) if scenarios is not None else set(SCENARIOS)
    want_v = set(variants) if variants is not None else set(VARIANTS)
    chosen: set[tuple[str, str]] = set()
    for c in COMPARISONS:
        for s in c.scenarios:
            chosen.add((c.subject, s))
            chosen.add((c.baseline, s))
    for s in PRIMARY_ONLY:
        chosen.add((PRIMARY, s))
    scenario_order = list(SCENARIOS)
    variant_order = list(VARIANTS)
    picked = [(v, s) for v, s in chosen if v in want_v and s in want_s]
    return sorted(picked, key=lambda c: (scenario_order.index(c[1]), variant_order.index(c[0])))


def rotated(items: list[T], round_index: int) -> list[T]:
    """The variants of one scenario in the order of a round: rotated every round, so each pair
    runs A-B in one round and B-A in another and slow drift hits both sides alike."""
    if not items:
        return []
    k = round_index % len(items)
    return items[k:] + items[:k]
