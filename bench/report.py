"""What a run leaves behind: the Markdown tables printed at the end, the results JSON, and PNG
plots (throughput per scenario and variant, latency percentiles, fast path).

Everything here reads the results dict built by bench.run; nothing measures.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench import stats
from bench.plan import COMPARISONS, GOALS, Goal

# -- formatting ------------------------------------------------------------------------------------


ABSENT = "n/a"  # a cell or measure this run did not produce
# An open-loop cell that achieved less than this share of its offered rate measured a saturated
# server, not latency at the intended load: it is flagged and left out of verdicts.
OFFERED_SHARE_REQUIRED = 0.9
# A tracing cell's ratio counts only if its receiver got one lookup span per lookup answered, to
# this much (the window's edges: calls in flight when the load stopped): a rate bought by dropping
# records is no rate.
SPANS_PER_LOOKUP_TOLERANCE = 0.01


def number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return ABSENT
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def times(value: float | None) -> str:
    return ABSENT if value is None else f"{value:.2f}x"


def share(value: float | None) -> str:
    return ABSENT if value is None else f"{value:.2f}"


def missed_offered_rate(cell: dict[str, Any]) -> bool:
    """Whether an open-loop cell fell short of the rate it was offered (see above)."""
    m = cell.get("median", {})
    offered, achieved = m.get("offered_per_s"), m.get("achieved_per_s")
    if not offered:
        return False
    return achieved is None or achieved < OFFERED_SHARE_REQUIRED * offered


def _open_cell(results: dict[str, Any], variant: str, scenario: str) -> dict[str, Any] | None:
    for cell in results.get("open_loop", ()):
        if cell["variant"] == variant and cell["scenario"] == scenario:
            return cell  # type: ignore[no-any-return]
    return None


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> str:
    """A Markdown table; `align` holds 'l' or 'r' per column (default: first left, rest right)."""
    rows = [list(r) for r in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.ljust(widths[i]) if align[i] == "l" else cell.rjust(widths[i]))
        return "| " + " | ".join(out) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if align[i] == "r" else (":" + "-" * (w + 1))
            for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def load_bound(cell: dict[str, Any]) -> bool:
    """Whether the load generator, not the server, probably set the pace of a pinned cell."""
    used = cell.get("median_client_cpu")
    cpus = next((r.get("client_cpus") for r in cell.get("rounds", ())), None)
    if used is None or not cpus:
        return False
    return bool(used >= 0.9 * len(str(cpus).split(",")))


def span_audit_problem(cell: dict[str, Any]) -> str:
    """Why a traced cell's rate cannot count ("" when every round received one lookup span per
    lookup answered, within SPANS_PER_LOOKUP_TOLERANCE)."""
    for i, r in enumerate(cell.get("rounds", ()), 1):
        audit = r.get("audit")
        ratio = audit.get("spans_per_lookup") if audit else None
        if ratio is None:
            return f"{cell['variant']}/{cell['scenario']} round {i}: spans not counted"
        if abs(ratio - 1.0) > SPANS_PER_LOOKUP_TOLERANCE:
            return f"{cell['variant']}/{cell['scenario']} round {i}: {ratio:.3f} spans per lookup"
    return ""


def spans_lost(results: dict[str, Any]) -> int | None:
    """Lookups answered in the tracing cells whose span never reached the receiver (None when no
    tracing cell was measured)."""
    audits = [
        r["audit"]
        for c in results.get("closed_loop", ())
        if c.get("traced")
        for r in c["rounds"]
        if r.get("audit")
    ]
    return sum(a["lost"] for a in audits) if audits else None


# -- goals -----------------------------------------------------------------------------------------


def goal_value(goal: Goal, results: dict[str, Any]) -> float | None:
    kind, *key = goal.source
    if kind == "ratio":
        comparison = _comparison(results, *key)
        if comparison is None or comparison.get("not_counted"):
            return None
        return comparison["ratio"]  # type: ignore[no-any-return]
    if kind == "spans_lost":
        return spans_lost(results)
    if kind == "audit":
        phase, measure = key
        return results.get("audit", {}).get(phase, {}).get(measure)  # type: ignore[no-any-return]
    micro = results.get("micro", {}).get("decisions", {})
    if kind == "micro":
        implementation, measure = key
        return micro.get(implementation, {}).get(measure, {}).get("median")  # type: ignore[no-any-return]
    if kind == "micro_ratio":
        (measure,) = key
        return micro.get("ratios", {}).get(measure)  # type: ignore[no-any-return]
    if kind == "micro_pair":
        pair, shape = key
        pairs = results.get("micro", {}).get("pairs", {})
        return pairs.get(pair, {}).get(shape, {}).get("ratio")  # type: ignore[no-any-return]
    if kind == "latency":
        variant, scenario, percentile = key
        cell = _open_cell(results, variant, scenario)
        if cell is None or missed_offered_rate(cell):
            return None  # no verdict from a cell that did not carry its load
        return cell["median"].get(f"{percentile}_ms")  # type: ignore[no-any-return]
    if kind == "latency_ratio":
        subject, baseline, scenario, percentile = key
        cells = [_open_cell(results, v, scenario) for v in (subject, baseline)]
        if any(c is None or missed_offered_rate(c) for c in cells):
            return None
        k = f"{percentile}_ms"
        a, b = ([r.get(k) for r in c["rounds"]] for c in cells if c is not None)
        return stats.paired_ratios(a, b)["ratio"]  # type: ignore[return-value]
    if kind == "import":
        imported = results.get("micro", {}).get("import") or {}
        return imported.get("rows_per_s")  # type: ignore[no-any-return]
    raise ValueError(f"unknown goal source {goal.source}")


def _goal_open_cells(goal: Goal, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The open-loop cells a latency goal reads."""
    kind, *key = goal.source
    if kind == "latency":
        wanted = [(key[0], key[1])]
    elif kind == "latency_ratio":
        wanted = [(key[0], key[2]), (key[1], key[2])]
    else:
        return []
    cells = (_open_cell(results, v, s) for v, s in wanted)
    return [c for c in cells if c is not None]


def _comparison(results: dict[str, Any], name: str, scenario: str) -> dict[str, Any] | None:
    for c in results.get("comparisons", ()):
        if c["name"] == name and c["scenario"] == scenario:
            return c  # type: ignore[no-any-return]
    return None


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for goal in GOALS:
        value = goal_value(goal, results)
        excluded = ""
        if goal.source[0] == "ratio":
            comparison = _comparison(results, goal.source[1], goal.source[2])
            if comparison is not None and comparison.get("not_counted"):
                excluded = f"not counted: {comparison['not_counted']}"
        for cell in _goal_open_cells(goal, results):
            if missed_offered_rate(cell):
                m = cell["median"]
                excluded = (
                    f"excluded: achieved {number(m.get('achieved_per_s'))} of "
                    f"{number(m.get('offered_per_s'))} calls/s offered"
                )
        out.append(
            {
                "name": goal.name,
                "text": goal.text,
                "threshold": goal.threshold,
                "higher_is_better": goal.higher_is_better,
                "unit": goal.unit,
                "value": value,
                "met": stats.goal_met(value, goal.threshold, goal.higher_is_better),
                "excluded": excluded,
            }
        )
    return out


def comparisons(closed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every comparison's paired ratio per scenario, on items/s, from closed-loop cells."""
    by_cell = {(c["variant"], c["scenario"]): c for c in closed}
    out = []
    for comp in COMPARISONS:
        for scenario in comp.scenarios:
            a = by_cell.get((comp.subject, scenario))
            b = by_cell.get((comp.baseline, scenario))
            if a is None or b is None:
                continue
            paired = stats.paired_ratios(
                [r.get("items_per_s") for r in a["rounds"]],
                [r.get("items_per_s") for r in b["rounds"]],
            )
            # The same per server CPU-second: what each would serve on a core of its own, immune
            # to the time a busy host takes away (steal); a cross-check of the ratio above.
            per_cpu = stats.paired_ratios(
                [stats.per_cpu(r.get("items_per_s"), r.get("server_cpu")) for r in a["rounds"]],
                [stats.per_cpu(r.get("items_per_s"), r.get("server_cpu")) for r in b["rounds"]],
            )
            problems = [span_audit_problem(c) for c in (a, b) if c.get("traced")]
            out.append(
                {
                    "name": comp.name,
                    "scenario": scenario,
                    "subject": comp.subject,
                    "baseline": comp.baseline,
                    **paired,
                    "ratio_per_cpu": per_cpu["ratio"],
                    "per_round_per_cpu": per_cpu["per_round"],
                    "not_counted": "; ".join(p for p in problems if p),
                }
            )
    return out


# -- the printed report ----------------------------------------------------------------------------


def _goal_measured(g: dict[str, Any]) -> str:
    v = g["value"]
    if v is None:
        return "not measured"
    if g["unit"] == "x":
        return times(v)
    if g["unit"] == "ms":
        return f"{v:.2f} ms"
    return f"{number(v)}{g['unit']}"


def _goal_target(g: dict[str, Any]) -> str:
    op = ">=" if g["higher_is_better"] else "<="
    t = g["threshold"]
    if g["unit"] == "x":
        return f"{op} {t:g}x"
    if g["unit"] == "ms":
        return f"{op} {t:g} ms"
    return f"{op} {number(t)}{g['unit']}"


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    opts = results["options"]
    ds = results["dataset"]
    lines = [
        f"## covergate bench, {results['started_at']}",
        "",
        f"{ds['beneficiaries']:,} beneficiaries ({ds['rights_rows']:,} rights rows); "
        f"{opts['rounds']} round(s) of {opts['duration']:g} s per cell, variants alternated; "
        f"{env['cpu_model']}, {env['cores']} cores; {results['placement']['summary']}; "
        f"fast path {env['fastpath']}, grpcio {env['grpcio']}, Python {env['python']}.",
    ]
    speed = [s["loops_per_s"] for s in results["noise"].get("speed", [])]
    if speed:
        relative = stats.relative_to_best(speed)
        shown = ", ".join(f"{r:.2f}" for r in relative)
        lines += [
            "",
            "Machine speed (a fixed pure-Python loop on the server core) before each round and at "
            f"the end, relative to the fastest: {shown}; steal "
            f"{results['noise'].get('steal_s', 0):.1f} s.",
        ]
        if min(relative) < 0.85:
            lines.append(
                "**The machine slowed down during the run (other load on the host): compare the "
                "ratios, which pair variants within a round, rather than absolute rates.**"
            )
    if results["noise"].get("busy_before") or results["noise"].get("busy_after"):
        busy = ", ".join(
            results["noise"].get("busy_before", []) + results["noise"].get("busy_after", [])
        )
        lines += ["", f"**Warning: other processes were using the CPU: {busy}.**"]

    closed = results["closed_loop"]
    if closed:
        lines += ["", "### Throughput, closed loop (median over rounds)", ""]
        rows = []
        bound = False
        for c in closed:
            rounds = ", ".join(number(r.get("items_per_s")) for r in c["rounds"])
            mark = ""
            if load_bound(c):
                mark, bound = " *", True
            rows.append(
                [
                    c["scenario"],
                    c["variant"],
                    number(c["median_calls_per_s"]),
                    number(c["median_items_per_s"]) + mark,
                    share(c["median_server_cpu"]),
                    share(c["median_client_cpu"]),
                    rounds,
                ]
            )
        lines.append(
            table(
                [
                    "scenario",
                    "variant",
                    "calls/s",
                    "items/s",
                    "server CPU",
                    "load CPU",
                    "items/s per round",
                ],
                rows,
                "llrrrrl",
            )
        )
        lines.append("")
        lines.append(
            "CPU columns are cores busy (1.00 = one core). "
            + (
                "\\* the load generator kept its own core busy (>= 90%): the rate is a lower "
                "bound for the server."
                if bound
                else "No load generator was saturated."
            )
        )

    comps = results.get("comparisons", [])
    if comps:
        lines += [
            "",
            "### Ratios (items/s, median of per-round ratios; and per server CPU-second)",
            "",
        ]
        rows = [
            [
                c["name"],
                c["scenario"],
                f"{c['subject']} / {c['baseline']}",
                times(c["ratio"]) + (" (not counted)" if c.get("not_counted") else ""),
                ", ".join(times(r) for r in c["per_round"]),
                times(c.get("ratio_per_cpu")),
            ]
            for c in comps
        ]
        lines.append(
            table(
                ["comparison", "scenario", "pair", "ratio", "per round", "per CPU-second"],
                rows,
                "lllrlr",
            )
        )
        uncounted = [c for c in comps if c.get("not_counted")]
        if uncounted:
            lines.append("")
            lines.append(
                "(not counted): the receiver did not get one lookup span per lookup answered "
                f"(within {SPANS_PER_LOOKUP_TOLERANCE:.0%}), so the rate may have been bought by "
                "losing records; it counts in no goal: "
                + "; ".join(c["not_counted"] for c in uncounted)
                + "."
            )
    lines += _audit_section(results)
    lines += _redis_section(results)

    open_loop = results.get("open_loop", [])
    if open_loop:
        lines += [
            "",
            f"### Latency, open loop at {opts['open_fraction']:.0%} of each cell's maximum "
            "(median over rounds)",
            "",
        ]
        rows = []
        missed = 0
        for c in open_loop:
            m = c["median"]
            missed += missed_offered_rate(c)
            rows.append(
                [
                    c["scenario"],
                    c["variant"] + (" (missed rate)" if missed_offered_rate(c) else ""),
                    number(m.get("offered_per_s")),
                    number(m.get("achieved_per_s")),
                    number(m.get("p50_ms"), 2),
                    number(m.get("p90_ms"), 2),
                    number(m.get("p99_ms"), 2),
                    number(m.get("p99.9_ms"), 2),
                    number(m.get("max_ms"), 2),
                ]
            )
        lines.append(
            table(
                [
                    "scenario",
                    "variant",
                    "offered calls/s",
                    "achieved",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "p99.9 ms",
                    "max ms",
                ],
                rows,
                "llrrrrrrr",
            )
        )
        if missed:
            lines += [
                "",
                f"(missed rate): the cell achieved less than {OFFERED_SHARE_REQUIRED:.0%} of the "
                "rate it was offered, so it measured a saturated server, not latency at that "
                "load; it counts in no goal.",
            ]

    micro = results.get("micro", {})
    decisions = micro.get("decisions", {})
    if decisions:
        lines += ["", f"### Fast path in process, one core (cpu {micro.get('cpus')})", ""]
        rows = []
        for measure in decisions.get("cython", {}):
            c = decisions["cython"][measure]["median"]
            p = decisions.get("python", {}).get(measure, {}).get("median")
            rows.append([measure, number(c), number(p), times(decisions["ratios"].get(measure))])
        lines.append(
            table(["measure", "Cython decisions/s", "reference decisions/s", "ratio"], rows)
        )
    pairs = micro.get("pairs", {})
    if pairs:
        lines += [
            "",
            "### On/off pairs in process (Cython gate; alternated 20 ms blocks, thread CPU time)",
            "",
        ]
        rows = []
        for pair, shapes in pairs.items():
            for shape, cell in shapes.items():
                rows.append(
                    [
                        pair,
                        shape,
                        number(cell["on_per_s"]),
                        number(cell["off_per_s"]),
                        times(cell["ratio"]),
                    ]
                )
        lines.append(table(["pair", "shape", "on lookups/s", "off lookups/s", "on/off"], rows))
    if micro.get("import"):
        imp = micro["import"]
        lines += [
            "",
            f"Import: {number(imp['rows_per_s'])} rows/s ({imp['rows']:,} rows in "
            f"{imp['seconds']:.1f} s, `covergate import rights`, one core).",
        ]

    goals = results.get("goals", [])
    if goals:
        lines += ["", "### Goals", ""]
        rows = []
        for g in goals:
            status = {True: "met", False: "**MISSED**", None: "not measured"}[g["met"]]
            if g.get("excluded"):
                status = g["excluded"]
            rows.append([g["text"], _goal_target(g), _goal_measured(g), status])
        lines.append(table(["goal", "target", "measured", ""], rows, "lrrl"))

    checks = results.get("checks", {})
    lines += ["", "### gRPC-level checks", ""]
    lines.append(
        f"{checks.get('probe_calls', 0):,} sampled calls replayed with grpc.aio "
        f"(before and after every run), {checks.get('stream_checked', 0):,} stream answers "
        f"checked, h2load response bodies compared with the probe's: "
        + (
            "no failure."
            if not results.get("failures")
            else f"{len(results['failures'])} kind(s) of failure:"
        )
    )
    for f in results.get("failures", []):
        lines.append(f"- {f['where']}: {f['problem']} (x{f['count']})")
    return "\n".join(lines) + "\n"


def _audit_section(results: dict[str, Any]) -> list[str]:
    """Spans received per lookup answered in the tracing cells, then bench.audit's phases."""
    lines: list[str] = []
    traced = [c for c in results.get("closed_loop", ()) if c.get("traced")]
    if traced:
        lines += [
            "",
            "### Audit trail: lookup spans received per lookup answered (tracing cells, each "
            "round's whole window, after its spool drained)",
            "",
        ]
        rows = []
        for c in traced:
            audits = [r.get("audit") or {} for r in c["rounds"]]
            rows.append(
                [
                    c["scenario"],
                    c["variant"],
                    number(sum(a.get("lookups_answered", 0) for a in audits)),
                    number(sum(a.get("lookup_spans", 0) for a in audits)),
                    number(sum(a.get("lost", 0) for a in audits)),
                    ", ".join(number(a.get("spans_per_lookup"), 3) for a in audits),
                ]
            )
        lines.append(
            table(
                ["scenario", "variant", "lookups answered", "lookup spans", "lost", "per round"],
                rows,
                "llrrrl",
            )
        )
    audit = results.get("audit", {})
    outage = audit.get("receiver-outage")
    if outage:
        lines += [
            "",
            f"### Receiver stopped {outage['outage_s']:g} s mid-run, then restarted "
            f"(batch-100, {outage['duration_s']:g} s of load)",
            "",
            table(
                ["measure", "value"],
                [
                    ["lookups answered", number(outage.get("lookups_answered"))],
                    ["lookup spans received", number(outage.get("lookup_spans"))],
                    ["lost", number(outage.get("lost"))],
                    ["calls refused", number(outage.get("refused"))],
                    ["lookups/s before the outage", number(outage.get("before_per_s"))],
                    ["lookups/s while the receiver was down", number(outage.get("during_per_s"))],
                    ["lookups/s after it came back", number(outage.get("after_per_s"))],
                    ["spool peak (bytes)", number(outage.get("spool_peak_bytes"))],
                    ["drained after the load stopped (s)", number(outage.get("drain_s"), 1)],
                ],
                "lr",
            ),
        ]
    full = audit.get("spool-full")
    if full:
        refusals = ", ".join(f"{k} x{v}" for k, v in full.get("refusals", {}).items()) or "none"
        lines += [
            "",
            f"### Spool full (spool_max_bytes = {number(full.get('spool_max_bytes'))}, receiver "
            f"down {full['outage_s']:g} s, then back)",
            "",
            table(
                ["measure", "value"],
                [
                    ["lookups answered", number(full.get("lookups_answered"))],
                    ["lookup spans received", number(full.get("lookup_spans"))],
                    ["answered without a span (lost)", number(full.get("lost"))],
                    ["calls refused", number(full.get("refused"))],
                    ["refusals", refusals],
                ],
                "lr",
            ),
        ]
    export = audit.get("export-rate")
    if export:
        lines += [
            "",
            "### Export rate: one worker's spool drained to a receiver that keeps up",
            "",
            f"{number(export.get('spans'))} spans exported in "
            f"{number(export.get('seconds'), 2)} s: "
            f"**{number(export.get('spans_per_s'))} spans/s**, against "
            f"{number(export.get('batch_lookups_per_s'))} lookups/s "
            f"({export.get('batch_rate_from', 'n/a')}): "
            f"{times(export.get('vs_batch_rate'))}.",
        ]
    return lines


def audit_line(phase: str, figures: dict[str, Any]) -> str:
    """One phase's outcome in a line (printed as the run goes)."""
    if phase == "export-rate":
        return (
            f"{number(figures.get('spans_per_s'))} spans/s exported, "
            f"{times(figures.get('vs_batch_rate'))} the batch-100 lookup rate"
        )
    line = (
        f"{number(figures.get('lookups_answered'))} lookups answered, "
        f"{number(figures.get('lookup_spans'))} lookup spans received, "
        f"{number(figures.get('lost'))} lost, {number(figures.get('refused'))} calls refused"
    )
    if phase == "receiver-outage":
        line += f", spool peak {number(figures.get('spool_peak_bytes'))} bytes"
    return line


def _redis_section(results: dict[str, Any]) -> list[str]:
    """Redis round trips and commands per 1,000 lookups, for the variants that use Redis."""
    cells = [c for c in results.get("closed_loop", ()) if any(r.get("redis") for r in c["rounds"])]
    if not cells:
        return []
    lines = [
        "",
        "### Redis per 1,000 lookups (round trips: read events Redis processed; commands: "
        "those a script runs included)",
        "",
    ]
    rows = []
    by_cell: dict[tuple[str, str], float | None] = {}
    for c in cells:
        redis = [r["redis"] for r in c["rounds"] if r.get("redis")]
        trips = stats.median(x["round_trips_per_1000"] for x in redis)
        by_cell[(c["variant"], c["scenario"])] = trips
        rows.append(
            [
                c["scenario"],
                c["variant"],
                number(trips, 2),
                number(stats.median(x["commands_per_1000"] for x in redis), 2),
                ", ".join(number(x["round_trips_per_1000"], 2) for x in redis),
            ]
        )
    lines.append(
        table(
            ["scenario", "variant", "round trips", "commands", "round trips per round"],
            rows,
            "llrrl",
        )
    )
    for scenario in dict.fromkeys(s for _, s in by_cell):
        cluster = by_cell.get(("covergate-cluster", scenario))
        conventional = by_cell.get(("conventional", scenario))
        if cluster is not None and conventional:
            lines.append("")
            lines.append(
                f"{scenario}: covergate-cluster makes {cluster / conventional:.4f}x the Redis "
                "round trips of the conventional stack per lookup."
            )
    return lines


# -- files -----------------------------------------------------------------------------------------


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


def latency_series(
    open_loop: list[dict[str, Any]], keys: Sequence[str]
) -> list[tuple[str, list[float], list[float], list[str], list[float]]]:
    """Per percentile key: bar positions and values, hatches (cells that missed their offered
    rate), and the positions of absent values (drawn as "n/a", not as a zero bar)."""
    width = 0.8 / len(keys)
    series = []
    for i, k in enumerate(keys):
        xs: list[float] = []
        ys: list[float] = []
        hatches: list[str] = []
        absent: list[float] = []
        for j, c in enumerate(open_loop):
            x = j + (i - (len(keys) - 1) / 2) * width
            value = c["median"].get(k)
            if not value:
                absent.append(x)
                continue
            xs.append(x)
            ys.append(value)
            hatches.append("//" if missed_offered_rate(c) else "")
        series.append((k, xs, ys, hatches, absent))
    return series


def plot(results: dict[str, Any], prefix: Path) -> list[Path]:
    """PNG plots next to the JSON; empty when matplotlib is missing (said in the output)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    closed = results.get("closed_loop", [])
    if closed:
        scenarios = list(dict.fromkeys(c["scenario"] for c in closed))
        variants = list(dict.fromkeys(c["variant"] for c in closed))
        by = {(c["scenario"], c["variant"]): c for c in closed}
        fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(scenarios)), 5))
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            xs, ys, lo, hi = [], [], [], []
            for j, s in enumerate(scenarios):
                cell = by.get((s, v))
                if cell is None or cell["median_items_per_s"] is None:
                    continue
                rounds = [r["items_per_s"] for r in cell["rounds"] if r.get("items_per_s")]
                med = cell["median_items_per_s"]
                if not rounds or not med:
                    continue  # a cell that served nothing (its failures are reported)
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(med)
                lo.append(max(0.0, med - min(rounds)))
                hi.append(max(0.0, max(rounds) - med))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=v)
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_yscale("log")
        ax.set_ylabel("decisions (items) per second, log scale")
        ax.set_title("Closed-loop throughput per scenario (median, whiskers: min/max of rounds)")
        ax.legend(fontsize="small")
        ax.grid(axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = prefix.with_name(prefix.name + "-throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    open_loop = results.get("open_loop", [])
    if open_loop:
        labels = [
            f"{c['variant']}\n{c['scenario']}"
            + ("\n(missed rate)" if missed_offered_rate(c) else "")
            for c in open_loop
        ]
        keys = [stats.percentile_key(p) for p in stats.LATENCY_PERCENTILES]
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(labels)), 4.5))
        width = 0.8 / len(keys)
        for k, xs, ys, hatches, absent in latency_series(open_loop, keys):
            for x in absent:
                ax.text(x, 0.02, ABSENT, transform=ax.get_xaxis_transform(), ha="center",
                        fontsize="x-small", rotation=90)  # fmt: skip
            bars = ax.bar(xs, ys, width, label=k.replace("_ms", ""))
            for bar, hatch in zip(bars, hatches, strict=True):
                bar.set_hatch(hatch)
        noop = _open_cell(results, "noop", "unary")
        if noop is not None and noop["median"].get("p99_ms"):
            ax.axhline(1.2 * noop["median"]["p99_ms"], color="red", linestyle="--", linewidth=1,
                       label="unary p99 goal: 1.2x the no-op's")  # fmt: skip
        ax.set_xticks(range(len(labels)), labels)
        # Log scale: unary (a few ms) stays readable beside batches (tens of ms).
        ax.set_yscale("log")
        ax.set_ylabel("milliseconds, log scale")
        frac = results["options"]["open_fraction"]
        ax.set_title(
            f"Open-loop latency at {frac:.0%} of each cell's maximum (hatched: missed its rate)"
        )
        ax.legend(fontsize="small")
        ax.grid(axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = prefix.with_name(prefix.name + "-latency.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    decisions = results.get("micro", {}).get("decisions", {})
    if decisions.get("cython"):
        measures = list(decisions["cython"])
        fig, ax = plt.subplots(figsize=(max(7, 1.7 * len(measures)), 4))
        for i, impl in enumerate(("cython", "python")):
            ys = [decisions.get(impl, {}).get(m, {}).get("median") or 0 for m in measures]
            ax.bar(
                [j + (i - 0.5) * 0.4 for j in range(len(measures))],
                ys,
                0.4,
                label="Cython" if impl == "cython" else "reference (Python)",
            )
        ax.axhline(1_000_000, color="red", linestyle="--", linewidth=1, label="1M/s goal")
        ax.set_xticks(range(len(measures)), measures)
        ax.set_yscale("log")
        ax.set_ylabel("decisions per second, one core, log scale")
        ax.set_title("Fast path in process")
        ax.legend(fontsize="small")
        ax.grid(axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = prefix.with_name(prefix.name + "-fastpath.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
