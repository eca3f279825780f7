"""The first seconds after start: latency of the C gate's unary decisions in a fresh process whose
rights file was just dropped from the page cache, with and without `[store] prefault`.

`python -m bench.warmup --dataset DIR` alternates the two sides over rounds, each in its own
process; prints a table on stderr and JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import dataset as bench_dataset
from bench import frames
from bench.frames import COVERED, NO_MATCH, NOT_COVERED
from bench.stats import percentile

SIDES = ("plain", "prefault")


def drop_from_page_cache(data_file: Path) -> None:
    """Evict the file's clean pages (only pages no process maps), as after a reboot or the
    arrival of a new generation."""
    fd = os.open(data_file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(
    ds: bench_dataset.Dataset, config_path: str | None, prefault: bool, args: Any
) -> dict[str, Any]:
    """Open the store as a worker does, then decide at a fixed pace for `seconds`; latencies are
    taken from each call's scheduled time (open loop: a slow call delays the ones after it)."""
    from bench.micro import _server_parts
    from fastpath import _gate_c
    from service import store as store_module

    started = time.perf_counter()
    store, keys, quota, who = _server_parts(ds, config_path)
    advised = store_module.prefault(store.env) if prefault else 0
    gate = _gate_c.Gate(store.env, store.rights_db, keys, max_batch_items=500, quota=quota)
    ready = time.perf_counter() - started
    specs = [s for kind in (COVERED, NOT_COVERED, NO_MATCH) for s in ds.pools[kind]]
    random.Random(args.seed).shuffle(specs)
    requests = [frames.request_bytes(s, f"r{i:08d}") for i, s in enumerate(specs)]
    today, now = int(ds.care_date), int(time.time())
    interval = 1.0 / args.rate
    latencies = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for i in range(int(args.seconds * args.rate)):
        scheduled = t0 + i * interval
        while time.perf_counter() < scheduled:
            pass
        gate.check(who, requests[i % len(requests)], today, now)
        latencies.append((time.perf_counter() - scheduled) * 1e6)
    after = resource.getrusage(resource.RUSAGE_SELF)
    gate.close()
    if quota is not None:
        quota.close()
    store.close()
    latencies.sort()
    return {
        "ready_s": ready,
        "prefaulted_bytes": advised,
        "calls": len(latencies),
        "p50_us": percentile(latencies, 50),
        "p99_us": percentile(latencies, 99),
        "p99.9_us": percentile(latencies, 99.9),
        "max_us": latencies[-1],
        "major_faults": after.ru_majflt - before.ru_majflt,
        "minor_faults": after.ru_minflt - before.ru_minflt,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True, help="a bench dataset cache dir")
    parser.add_argument("--data", help="data dir to read (default: the dataset's own)")
    parser.add_argument("--config", help="covergate TOML config (quota limits)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured after start")
    parser.add_argument("--rate", type=float, default=2000.0, help="decisions per second")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="leave the file in the page cache (a restart): only the process's map is new",
    )
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ds = bench_dataset.load(Path(args.dataset))
    if ds is None:
        parser.error(f"no dataset in {args.dataset}")
    if args.data:
        ds.data_dir = Path(args.data)
    if args.child:
        json.dump(child(ds, args.config, args.child == "prefault", args), sys.stdout)
        return 0
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else tuple(reversed(SIDES)):
            if not args.warm_cache:
                drop_from_page_cache(ds.data_dir / "store" / "data.mdb")
            cmd = [sys.executable, "-m", "bench.warmup", *sys.argv[1:], "--child", side]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[side].append(json.loads(done.stdout))
    keys = ("ready_s", "p50_us", "p99_us", "p99.9_us", "max_us", "major_faults", "minor_faults")
    print(f"{'side':<9} " + " ".join(f"{k:>12}" for k in keys), file=sys.stderr)
    for side, rounds in results.items():
        for one in rounds:
            cells = " ".join(f"{one[k]:>12.{3 if k == 'ready_s' else 0}f}" for k in keys)
            print(f"{side:<9} {cells}", file=sys.stderr)
    json.dump({"seconds": args.seconds, "rate": args.rate, "results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
