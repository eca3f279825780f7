"""What the audit shipper costs per span, and what glibc's handling of its chunk-sized buffers
adds to it.

A spool is filled once in process by the Cython gate (batches of 100 covered lookups of the bench
dataset, written to the spool as a worker writes them), then copied and drained by
`service.shipper` into a live `bench.otlp_receiver` (which counts every span), each drain in its
own process pinned to one core, alternating two sides round by round:

- `default`: glibc's malloc as it comes (a buffer of a chunk's size gets its own mmap, unmapped
  when freed);
- `kept`: the shipper's `keep_chunk_memory()` (what `python -m service.shipper` and the server's
  shipper process do).

`python -m bench.export_cost --dataset bench/.cache/<1M dataset> [--spans 1000000] [--rounds 2]`
prints a table on stderr and JSON on stdout: CPU microseconds per span (user and system), minor
page faults per 1,000 spans and spans/s, each drain checked against the receiver's count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import dataset as bench_dataset
from bench import frames, otlp_receiver
from bench.frames import COVERED

SIDES = ("default", "kept")


def fill(ds: bench_dataset.Dataset, root: Path, spans: int, config_path: str | None) -> int:
    """Write at least `spans` lookup spans to a spool under `root`, as a worker would; returns
    the count written."""
    from bench.micro import _server_parts
    from fastpath import _gate_c
    from service import telemetry
    from service.spool import SpoolSettings, SpoolWriter

    store, keys, quota, served_as = _server_parts(ds, config_path)
    gate = _gate_c.Gate(
        store.env, store.rights_db, keys, max_batch_items=500, quota=quota, trace=True
    )
    covered = ds.pools[COVERED]
    batches = frames.whole_batches(covered)
    settings = SpoolSettings(root, 1 << 40, "refuse", 8 << 20)
    writer = SpoolWriter(
        settings,
        telemetry.encode_resource({"service.name": "covergate-bench"}),
        telemetry.encode_scope("covergate", "bench"),
    )
    today, now = int(ds.care_date), int(time.time())
    i = 0
    while writer.spans_written < spans:
        code, _answer = gate.check_batch(served_as, batches[i % len(batches)], today, now)
        if code != 0:
            raise RuntimeError(f"the bench batch was refused (status {code})")
        writer.write_gate(gate)
        i += 1
    written = writer.spans_written
    writer.close()
    store.close()
    return written


def drain(fixture: Path, side: str, cpu: int | None) -> dict[str, Any]:
    """One side, in this process: copy the fixture, drain it into a fresh receiver."""
    from service import shipper

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if side == "kept" and not shipper.keep_chunk_memory():
        raise RuntimeError("this C library has no mallopt: nothing to compare")
    # The receiver in its own process (on another core when pinned): its CPU is not the shipper's.
    recv_cmd = [sys.executable, "-m", "bench.otlp_receiver", "--port", "0"]
    others = sorted(set(range(os.cpu_count() or 1)) - {cpu}) if cpu is not None else []
    if others:
        recv_cmd = ["taskset", "-c", str(others[-1]), *recv_cmd]
    receiver = subprocess.Popen(
        recv_cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    work = Path(tempfile.mkdtemp(prefix="export-cost-"))
    try:
        assert receiver.stdout is not None
        target = receiver.stdout.readline().split()[-1]  # "otlp receiver serving on HOST:PORT"
        root = work / "spool"
        shutil.copytree(fixture, root)
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{target}"
        sender = shipper.Sender()
        ship = shipper.Shipper(root, sender, 0.0)
        ship.stopping = True  # drain what is there, then return
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        ship.run(drain_seconds=600.0)
        after, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        sender.close()
        received = otlp_receiver.counts(target)["spans"]
    finally:
        receiver.terminate()
        receiver.wait()
        shutil.rmtree(work, ignore_errors=True)
    n = ship.stats.exported
    return {
        "side": side,
        "spans": n,
        "received": received,
        "user_us_per_span": (after.ru_utime - before.ru_utime) * 1e6 / n,
        "sys_us_per_span": (after.ru_stime - before.ru_stime) * 1e6 / n,
        "minor_faults_per_1000": (after.ru_minflt - before.ru_minflt) * 1000 / n,
        "spans_per_second": n / (t1 - t0),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| round | side | spans received | CPU us/span | user | sys | faults/1000 | spans/s |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["drains"]:
        total = r["user_us_per_span"] + r["sys_us_per_span"]
        lines.append(
            f"| {r['round']} | {r['side']} | {r['received']:,} | {total:.3f} | "
            f"{r['user_us_per_span']:.3f} | {r['sys_us_per_span']:.3f} | "
            f"{r['minor_faults_per_1000']:.1f} | {r['spans_per_second']:,.0f} |"
        )
    for side in SIDES:
        cpu = [r["user_us_per_span"] + r["sys_us_per_span"] for r in result["drains"]
               if r["side"] == side]  # fmt: skip
        lines.append(f"\n{side}: mean {sum(cpu) / len(cpu):.3f} us CPU per span")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.export_cost", description=__doc__)
    parser.add_argument("--dataset", required=True, help="a bench dataset cache dir")
    parser.add_argument("--config", help="the covergate variant's config (quotas), as in micro")
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpu", type=int, default=None, help="pin each drain to this core")
    parser.add_argument("--drain", nargs=2, metavar=("FIXTURE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain:
        print(json.dumps(drain(Path(args.drain[0]), args.drain[1], args.cpu)))
        return 0
    ds = bench_dataset.load(Path(args.dataset))
    if ds is None:
        parser.error(f"no dataset in {args.dataset}")
    with tempfile.TemporaryDirectory(prefix="export-cost-fixture-") as tmp:
        fixture = Path(tmp) / "spool"
        written = fill(ds, fixture, args.spans, args.config)
        print(f"bench: spool of {written:,} spans filled", file=sys.stderr)
        drains = []
        for round_no in range(1, args.rounds + 1):
            for side in SIDES:
                cmd = [sys.executable, "-m", "bench.export_cost", "--dataset", args.dataset,
                       "--drain", str(fixture), side]  # fmt: skip
                if args.cpu is not None:
                    cmd += ["--cpu", str(args.cpu)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = dict(json.loads(out), round=round_no)
                if r["received"] != r["spans"] or r["spans"] != written:
                    raise RuntimeError(f"{side}: {r['spans']} exported, {r['received']} received, "
                                       f"{written} written")  # fmt: skip
                drains.append(r)
    result = {"spans_written": written, "drains": drains}
    print(table(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
