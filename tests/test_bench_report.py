"""bench honesty: an open-loop cell that missed its offered rate is flagged and decides no goal,
absent cells read "n/a", the import rate is printed once, the latency plot's data skips absent
values instead of drawing zeros."""

from __future__ import annotations

import copy
from typing import Any

from test_bench_harness import closed_cell, synthetic_results

from bench import report


def with_open_loop(cells: list[dict[str, Any]]) -> dict[str, Any]:
    results = copy.deepcopy(synthetic_results())
    results["open_loop"] = cells
    results["goals"] = report.evaluate_goals(results)
    return results


def cell(
    offered: float | None, achieved: float | None, p99: float | None, variant: str = "covergate"
) -> dict[str, Any]:
    return {
        "variant": variant,
        "scenario": "unary",
        "rounds": [{"p99_ms": p99}],
        "median": {
            "offered_per_s": offered,
            "achieved_per_s": achieved,
            "p50_ms": 1.0,
            "p99_ms": p99,
        },
    }


def latency_rows(text: str) -> list[str]:
    section = text.split("Latency, open loop")[1].split("\n\n")[1]
    return [line for line in section.splitlines()[2:] if line.startswith("|")]


def goal(results: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in results["goals"] if g["name"] == name)


def test_a_cell_that_missed_its_offered_rate_decides_no_goal() -> None:
    results = with_open_loop([cell(492, 2, 900.0)])  # 2 calls/s of 492: saturated
    p99 = goal(results, "unary p99 at 70%")
    assert p99["met"] is None and p99["value"] is None
    assert p99["excluded"] == "excluded: achieved 2 of 492 calls/s offered"
    text = report.render(results)
    assert latency_rows(text) == [latency_rows(text)[0]]
    assert latency_rows(text)[0].startswith("| unary    | covergate (missed rate) |")
    assert "counts in no goal" in text
    assert "excluded: achieved 2 of 492 calls/s offered" in text
    assert "900.00" in text  # still shown, flagged


def test_a_cell_that_carried_its_load_decides_its_goal() -> None:
    results = with_open_loop([cell(1000, 995, 4.0), cell(1100, 1095, 3.5, "noop")])
    p99 = goal(results, "unary p99 at 70%")
    assert (p99["met"], p99["value"], p99["excluded"]) == (True, 4.0 / 3.5, "")
    assert "(missed rate)" not in report.render(results)
    p99 = goal(with_open_loop([cell(1000, 995, 4.0), cell(1100, 1095, 2.0, "noop")]), p99["name"])
    assert (p99["met"], p99["value"]) == (False, 2.0)
    assert report.missed_offered_rate(cell(1000, 899, 1.0))
    assert not report.missed_offered_rate(cell(1000, 900, 1.0))
    assert not report.missed_offered_rate(cell(None, None, 1.0))  # nothing to compare with


def test_the_p99_goal_pairs_the_no_ops_rounds_and_needs_both_cells() -> None:
    covergate, noop = cell(1000, 995, 4.0), cell(1100, 1095, 4.0, "noop")
    covergate["rounds"] = [{"p99_ms": v} for v in (4.0, 9.0, 5.0)]
    noop["rounds"] = [{"p99_ms": v} for v in (4.0, 3.0, 5.0)]  # per round: 1.0x, 3.0x, 1.0x
    assert goal(with_open_loop([covergate, noop]), "unary p99 at 70%")["value"] == 1.0
    assert goal(with_open_loop([covergate]), "unary p99 at 70%")["value"] is None
    missed_noop = cell(1000, 10, 4.0, "noop")
    p99 = goal(with_open_loop([covergate, missed_noop]), "unary p99 at 70%")
    assert (
        p99["value"] is None and p99["excluded"] == "excluded: achieved 10 of 1,000 calls/s offered"
    )


def test_the_import_goal_reads_the_import_rate() -> None:
    results = copy.deepcopy(synthetic_results())
    results["micro"]["import"] = {"rows": 400_000, "seconds": 4.2, "rows_per_s": 96_360.0}
    results["goals"] = report.evaluate_goals(results)
    imported = goal(results, "import speed")
    assert (imported["value"], imported["met"]) == (96_360.0, False)
    assert ">= 300,000 rows/s" in report.render(results)
    del results["micro"]["import"]
    assert goal({**results, "goals": report.evaluate_goals(results)}, "import speed")["met"] is None


def test_absent_cells_read_n_a() -> None:
    results = with_open_loop([cell(1000, 995, None)])
    text = report.render(results)
    (row,) = latency_rows(text)
    assert "n/a" in row and " - " not in row
    assert report.number(None) == report.times(None) == report.share(None) == "n/a"


def test_the_import_rate_is_printed_once() -> None:
    results = with_open_loop([])
    results["micro"]["import"] = {"rows": 400_000, "seconds": 4.2, "rows_per_s": 96_360.0}
    text = report.render(results)
    assert text.count("Import: 96,360 rows/s") == 1


def test_latency_plot_data_skips_absent_values_and_hatches_missed_cells() -> None:
    cells = [cell(1000, 995, 4.0), dict(cell(492, 2, 900.0), scenario="batch-100")]
    cells[0]["median"]["p50_ms"] = None
    series = {k: rest for k, *rest in report.latency_series(cells, ["p50_ms", "p99_ms"])}
    _, ys, hatches, absent = series["p50_ms"]
    assert ys == [1.0] and hatches == ["//"] and len(absent) == 1  # no zero bar for the absent
    _, ys, hatches, absent = series["p99_ms"]
    assert ys == [4.0, 900.0] and hatches == ["", "//"] and absent == []


# -- tracing cells: a ratio counts only with one lookup span per lookup answered ------------------


def traced_results(spans_per_lookup: list[float | None]) -> dict[str, Any]:
    """covergate-tracing against covergate on batch-100, one round per figure."""
    results = copy.deepcopy(synthetic_results())
    rates = [90_000.0] * len(spans_per_lookup)
    rounds = []
    for ratio in spans_per_lookup:
        r: dict[str, Any] = {"calls_per_s": 900.0, "items_per_s": 90_000.0, "server_cpu": 1.0}
        if ratio is not None:
            answered = 100_000
            r["audit"] = {
                "lookups_answered": answered,
                "lookup_spans": round(answered * ratio),
                "spans_per_lookup": ratio,
                "lost": max(0, answered - round(answered * ratio)),
            }
        rounds.append(r)
    base = [{"calls_per_s": 1000.0, "items_per_s": 100_000.0, "server_cpu": 1.0} for _ in rates]
    closed = [
        {"variant": "covergate-tracing", "scenario": "batch-100", "traced": True, "rounds": rounds},
        {"variant": "covergate", "scenario": "batch-100", "traced": False, "rounds": base},
    ]
    for c in closed:
        c["median_items_per_s"] = 90_000.0 if c["traced"] else 100_000.0
        c["median_calls_per_s"] = c["median_items_per_s"] / 100
        c["median_server_cpu"] = c["median_client_cpu"] = None
    results["closed_loop"] = closed
    results["comparisons"] = report.comparisons(closed)
    results["goals"] = report.evaluate_goals(results)
    return results


def tracing_ratio(results: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in results["comparisons"] if c["name"] == "tracing")


def test_a_tracing_ratio_counts_when_every_round_received_one_span_per_lookup() -> None:
    results = traced_results([1.0, 1.004, 0.9995])
    assert tracing_ratio(results)["not_counted"] == ""
    g = goal(results, "tracing cost (batch-100)")
    assert g["value"] == 0.9 and g["met"] is True and g["excluded"] == ""
    assert goal(results, "tracing: no span lost")["value"] == 50  # 0.9995 of 100,000
    assert "(not counted)" not in report.render(results)


def test_a_tracing_ratio_off_by_more_than_one_percent_is_not_counted() -> None:
    for figures in ([1.0, 0.98, 1.0], [1.0, 1.02, 1.0], [1.0, None, 1.0]):
        results = traced_results(figures)
        problem = tracing_ratio(results)["not_counted"]
        assert "covergate-tracing/batch-100 round 2" in problem
        g = goal(results, "tracing cost (batch-100)")
        assert g["value"] is None and g["met"] is None and g["excluded"].startswith("not counted")
        text = report.render(results)
        assert "0.90x (not counted)" in text and "round 2" in text.split("(not counted):")[1]
    assert goal(traced_results([0.98]), "tracing: no span lost")["value"] == 2_000


def test_audit_phases_and_redis_figures_are_printed_and_decide_their_goals() -> None:
    results = copy.deepcopy(synthetic_results())
    results["audit"] = {
        "receiver-outage": {
            "outage_s": 30.0, "duration_s": 50.0, "lookups_answered": 5_000_000,
            "lookup_spans": 5_000_000, "lost": 0, "refused": 0, "before_per_s": 100_000.0,
            "during_per_s": 98_000.0, "after_per_s": 97_000.0,
            "spool_peak_bytes": 1_300_000_000, "drain_s": 12.5,
        },
        "spool-full": {
            "outage_s": 8.0, "spool_max_bytes": 1 << 20, "lookups_answered": 9_600,
            "lookup_spans": 9_600, "lost": 0, "refused": 7_947, "backlog_share": 1.0,
            "refusals": {"UNAVAILABLE AUDIT_BACKLOG": 7_947},
        },
        "export-rate": {
            "spans": 1_000_000, "seconds": 4.0, "spans_per_s": 250_000.0,
            "batch_lookups_per_s": 125_000.0, "batch_rate_from": "covergate batch-100",
            "vs_batch_rate": 2.0,
        },
    }  # fmt: skip
    cluster = {"round_trips_per_1000": 1.1, "commands_per_1000": 18.0}
    conventional = {"round_trips_per_1000": 10.0, "commands_per_1000": 2000.0}
    for variant, figures in (("covergate-cluster", cluster), ("conventional", conventional)):
        cell = closed_cell(variant, "batch-100", [1_000.0])
        cell["rounds"][0]["redis"] = figures  # type: ignore[index]
        results["closed_loop"].append(cell)
    results["goals"] = report.evaluate_goals(results)
    for name in ("receiver down: no span lost", "receiver down: answers go on"):
        assert goal(results, name)["met"] is True
    assert goal(results, "spool full: refusals are AUDIT_BACKLOG")["met"] is True
    assert goal(results, "export rate vs batch rate")["value"] == 2.0
    text = report.render(results)
    assert "| spool peak (bytes)" in text and "1,300,000,000" in text
    assert "UNAVAILABLE AUDIT_BACKLOG x7947" in text and "250,000 spans/s" in text
    assert "| batch-100 | covergate-cluster |        1.10 |" in text
    assert "0.1100x the Redis round trips of the conventional stack" in text
    results["audit"]["spool-full"].update(backlog_share=0.5, lost=3)
    results["goals"] = report.evaluate_goals(results)
    assert goal(results, "spool full: refusals are AUDIT_BACKLOG")["met"] is False
    assert goal(results, "spool full: no answer without its span")["met"] is False
