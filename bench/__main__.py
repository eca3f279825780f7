"""`python -m bench` (`make bench BENCH_ARGS=...`): run the benchmark and print its tables.

`--quick` is a smoke run (100,000 beneficiaries, short cells, one round); the default full run takes
about a quarter of an hour on two cores, most of it under load.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

try:
    from bench import audit, plan, run
    from bench.scenarios import SCENARIOS
    from bench.variants import VARIANTS
except ModuleNotFoundError as missing:  # a Python without covergate's dependencies
    print(
        f"python -m bench: {missing.name} is not installed for {sys.executable}; run it with "
        ".venv/bin/python -m bench (after make install), or make bench BENCH_ARGS=...",
        file=sys.stderr,
    )
    sys.exit(2)


def _names(value: str, known: Mapping[str, object], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})"
        )
    return names


def _audit_phases(value: str) -> list[str]:
    if value.strip() == "none":
        return []
    return _names(value, dict.fromkeys(audit.PHASES), "audit phase")


def describe() -> str:
    lines = ["Scenarios:"]
    lines += [f"  {s.name:<14} {s.description}" for s in SCENARIOS.values()]
    lines.append("Variants:")
    lines += [f"  {v.name:<14} {v.description}" for v in VARIANTS.values()]
    lines.append("Comparisons (subject / baseline on scenarios):")
    lines += [
        f"  {c.name:<14} {c.subject} / {c.baseline}: {', '.join(c.scenarios)}"
        for c in plan.COMPARISONS
    ]
    lines.append("Audit phases (with covergate-tracing, or --audit):")
    lines += [f"  {p}" for p in audit.PHASES]
    lines.append("Goals:")
    lines += [f"  {g.text}" for g in plan.GOALS]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> run.Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="covergate against the gRPC ceiling, its reference and a conventional stack.",
        epilog="Writes bench/results/<timestamp>.json and PNG plots; datasets are cached in "
        "bench/.cache/.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 100k beneficiaries, 2 s cells, 1 round"
    )
    parser.add_argument("--list", action="store_true", help="list scenarios, variants, goals")
    parser.add_argument(
        "--scenarios",
        type=lambda v: _names(v, SCENARIOS, "scenario"),
        help="comma-separated scenario names (default: all)",
    )
    parser.add_argument(
        "--variants",
        type=lambda v: _names(v, VARIANTS, "variant"),
        help="comma-separated variant names (default: all)",
    )
    parser.add_argument(
        "--audit",
        type=_audit_phases,
        help="audit phases: comma-separated, of "
        + ", ".join(audit.PHASES)
        + ", or none (default: all when covergate-tracing is among the variants)",
    )
    parser.add_argument(
        "--outage",
        type=float,
        help="seconds the receiver is down in the receiver-outage phase (default 30)",
    )
    parser.add_argument("--beneficiaries", type=int, help="dataset size (default 1,000,000)")
    parser.add_argument("--duration", type=float, help="seconds of load per cell (default 5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per cell (default 1)")
    parser.add_argument("--rounds", type=int, help="rounds, variants alternated (default 3)")
    parser.add_argument(
        "--workers", type=int, default=0, help="N of the N-worker variant (default: one per core)"
    )
    parser.add_argument("--clients", type=int, default=16, help="h2load connections (default 16)")
    parser.add_argument(
        "--open-fraction",
        type=float,
        default=0.7,
        help="open-loop rate as a fraction of the closed-loop maximum",
    )
    parser.add_argument(
        "--open-clients",
        type=int,
        default=0,
        help="h2load connections in open loop (default: one per server worker)",
    )
    parser.add_argument("--no-open-loop", action="store_true")
    parser.add_argument("--no-micro", action="store_true", help="skip in-process micro-benchmarks")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--redis", help="use this Redis (redis://HOST:PORT/DB) instead of a private redis-server"
    )
    parser.add_argument("--cache", type=Path, default=run.BENCH_DIR / ".cache")
    parser.add_argument("--results", type=Path, default=run.BENCH_DIR / "results")
    args = parser.parse_args(argv)
    if args.list:
        print(describe())
        sys.exit(0)
    base = run.QUICK if args.quick else run.FULL
    opts = run.Options(
        quick=args.quick,
        beneficiaries=args.beneficiaries or int(base["beneficiaries"]),
        duration=args.duration or float(base["duration"]),
        warmup=args.warmup if args.warmup is not None else float(base["warmup"]),
        rounds=args.rounds or int(base["rounds"]),
        micro_seconds=float(base["micro_seconds"]),
        micro_rounds=int(base["micro_rounds"]),
        probe_calls=int(base["probe_calls"]),
        workers=args.workers,
        clients=args.clients,
        open_fraction=args.open_fraction,
        open_clients=args.open_clients,
        open_loop=not args.no_open_loop,
        micro=not args.no_micro,
        plots=not args.no_plots,
        scenarios=args.scenarios,
        variants=args.variants,
        redis=args.redis,
        audit=args.audit,
        audit_outage=args.outage or float(base["audit_outage"]),
        audit_full_outage=float(base["audit_full_outage"]),
        audit_edge=float(base["audit_edge"]),
        audit_fill=float(base["audit_fill"]),
        cache=args.cache,
        results=args.results,
    )
    if not 0 < opts.open_fraction <= 1:
        parser.error("--open-fraction must be within (0, 1]")
    return opts


def main(argv: list[str] | None = None) -> int:
    return run.main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
