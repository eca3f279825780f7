"""`covergate import rights` of one file, alternated between two source trees (A B A B ...), each
run a fresh process on one core into a fresh data dir: the import rate of a change against what it
replaced, measured in the same minutes.

    python -m bench.import_pair FILE --old /path/to/other/checkout [--rounds 5] [--cpu 1]
        [--json OUT.json]

`--old` is a checkout whose Cython extension is built in place (`setup.py build_ext --inplace`);
it runs on this interpreter with that tree first on PYTHONPATH. "new" is this tree. For the
bench's sample, FILE is `bench/.cache/<dataset>/import-sample.csv`. Each run reports the rows/s
the command prints, the whole command's wall time and its CPU time (user + system); the summary
gives medians and the per-round ratio of the two (with --json, every run as well).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from service.cli import main; sys.argv[0] = 'covergate'; sys.exit(main())"
REPORTED = re.compile(r"imported ([\d,]+) rights rows .* in ([\d.]+)s \(([\d,]+) rows/s\)")


def run_once(tree: Path, path: Path, pepper: Path, cpu: int) -> tuple[float, float, float]:
    """(rows/s as reported, wall seconds, CPU seconds) of one import into a fresh data dir."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("COVERGATE_NO_EXTENSIONS", None)
    with tempfile.TemporaryDirectory(prefix="covergate-import-pair-") as data:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(
            ["taskset", "-c", str(cpu), sys.executable, "-c", CLI, "import", "rights",
             str(path), "--data", data, "--no-progress", "--pepper-file", str(pepper)],
            capture_output=True, text=True, env=env, cwd=tree,
        )  # fmt: skip
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"import from {tree} failed:\n{done.stderr[-2000:]}")
    found = REPORTED.search(done.stdout)
    if found is None:
        raise RuntimeError(f"unexpected import output: {done.stdout!r}")
    cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return float(found.group(3).replace(",", "")), wall, cpu_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--old", type=Path, required=True, help="the other source tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=1, help="the core both run on")
    parser.add_argument("--json", type=Path, help="write the runs and medians there")
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": ROOT}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="covergate-import-pair-") as tmp:
        pepper = Path(tmp) / "pepper"
        fd = os.open(pepper, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_bytes(32).hex() + "\n")
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                rate, wall, cpu_s = run_once(tree, args.file.resolve(), pepper, args.cpu)
                results[name].append((rate, wall, cpu_s))
                print(f"round {round_} {name}: {rate:>12,.0f} rows/s, whole command "
                      f"{wall:.2f} s wall, {cpu_s:.2f} s CPU", flush=True)  # fmt: skip
    for name, runs in results.items():
        print(
            f"{name} median: {statistics.median(r[0] for r in runs):,.0f} rows/s, whole command "
            f"{statistics.median(r[1] for r in runs):.2f} s wall, "
            f"{statistics.median(r[2] for r in runs):.2f} s CPU"
        )
    ratios = [new[0] / old[0] for old, new in zip(results["old"], results["new"], strict=True)]
    print(
        "new/old rows/s per round: "
        + ", ".join(f"{r:.1f}x" for r in ratios)
        + f"; median {statistics.median(ratios):.1f}x"
    )
    if args.json:
        runs = {
            name: [{"rows_per_s": r, "wall_s": w, "cpu_s": c} for r, w, c in found]
            for name, found in results.items()
        }
        summary = {
            "file": str(args.file),
            "old": str(trees["old"]),
            "cpu": args.cpu,
            "runs": runs,
            "median_rows_per_s": {
                name: statistics.median(r[0] for r in found) for name, found in results.items()
            },
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
        }
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
