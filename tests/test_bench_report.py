"""bench honesty: an open-loop cell that missed its offered rate is flagged and decides no goal,
absent cells read "n/a", the import rate is printed once, the latency plot's data skips absent
values instead of drawing zeros."""

from __future__ import annotations

import copy
from typing import Any

from test_bench_harness import synthetic_results

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
