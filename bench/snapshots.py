"""Rights snapshots, measured: the time to create, fetch and activate a generation of the bench
dataset (1,000,000 beneficiaries by default), and a server's throughput while generations are
activated back and forth against the same server left alone, in alternated rounds.

    python -m bench.snapshots [--beneficiaries N] [--rounds R] [--seconds S]

Prints a table and writes bench/results/snapshots-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import dataset as bench_dataset
from bench import frames
from bench.h2load import ensure_h2load, grpc_headers, parse_summary
from bench.variants import BENCH_CONFIG

REPO = Path(__file__).resolve().parent.parent


def _timed(label: str, results: dict[str, float], fn: Any, *args: Any) -> Any:
    started = time.perf_counter()
    value = fn(*args)
    results[label] = time.perf_counter() - started
    print(f"bench: {label}: {results[label]:.2f} s", flush=True)
    return value


def _load(h2load: str, port: int, frame: Path, token: str, seconds: float) -> int:
    """Calls answered in `seconds` of batch-100 at full speed."""
    command = [h2load, "-D", str(int(seconds)), "-c", "8", "-m", "4", "-d", str(frame)]
    for header in grpc_headers(token):
        command += ["-H", header]
    command.append(f"http://127.0.0.1:{port}/covergate.v1.CoverageService/CheckCoverageBatch")
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return parse_summary(out).succeeded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--beneficiaries", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cache", default=str(REPO / "bench" / ".cache"))
    args = parser.parse_args()
    covergate = str(Path(sys.executable).with_name("covergate"))
    ds = bench_dataset.prepare(Path(args.cache), args.beneficiaries, covergate=covergate)
    h2load = ensure_h2load()
    from service import snapshots
    from service.store import Store

    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="covergate-snapshots-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "host"
        shutil.copytree(ds.data_dir, data)
        public = snapshots.generate_key(tmp / "signing.pem")
        key = snapshots.load_signing_key(tmp / "signing.pem")
        with Store(ds.data_dir) as store:
            fingerprint = store.pepper_fingerprint() or ""
            manifest = _timed("create", timings, snapshots.create, store, tmp / "out", key)
            _timed("create 2", timings, snapshots.create, store, tmp / "out", key)
        _timed("fetch", timings, snapshots.fetch, str(tmp / "out"), data, public, fingerprint, 1)
        snapshots.fetch(str(tmp / "out"), data, public, fingerprint, 2)
        config = tmp / "bench.toml"
        config.write_text(BENCH_CONFIG)
        server = subprocess.Popen(
            [covergate, "serve", "--insecure", "--listen", "127.0.0.1:0", "--workers", "1",
             "--data", str(data), "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, COVERGATE_REQUIRE_EXTENSIONS="1", COVERGATE_LOG_LEVEL="INFO"),
        )  # fmt: skip
        assert server.stdout is not None and server.stderr is not None
        port = int(re.search(r":(\d+) with", server.stdout.readline()).group(1))  # type: ignore[union-attr]
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(server.stderr), daemon=True).start()  # type: ignore[arg-type]
        time.sleep(2)
        specs = ds.pools["covered"][:100]
        frame = tmp / "batch.bin"
        frame.write_bytes(frames.grpc_frame(frames.batch_bytes(specs)))
        try:
            # Activation: from the switch of DIR/snapshots/active to the worker serving it.
            started = time.perf_counter()
            snapshots.set_active(data, 1)
            while not any("serving rights generation 1" in line for line in log):
                time.sleep(0.01)
            timings["activate"] = time.perf_counter() - started
            print(f"bench: activate: {timings['activate']:.2f} s", flush=True)
            ratios = []
            for round_ in range(args.rounds):
                # Alternated order, so that the host warming up or slowing down cancels out.
                quiet = _load(h2load, port, frame, ds.token, args.seconds) if round_ % 2 else 0
                stop = threading.Event()

                def flip(stop: threading.Event = stop) -> None:
                    n = 1
                    while not stop.is_set():
                        n = 2 if n == 1 else 1
                        snapshots.set_active(data, n)
                        time.sleep(0.5)

                flipper = threading.Thread(target=flip)
                flipper.start()
                busy = _load(h2load, port, frame, ds.token, args.seconds)
                stop.set()
                flipper.join()
                if not round_ % 2:
                    quiet = _load(h2load, port, frame, ds.token, args.seconds)
                ratios.append(busy / quiet if quiet else 0.0)
                print(f"bench: batch-100 calls: {quiet} quiet, {busy} while activating every "
                      f"0.5 s ({ratios[-1]:.2f}x)", flush=True)  # fmt: skip
            switches = sum("serving rights generation" in line for line in log)
        finally:
            server.terminate()
            server.wait(30)
    result = {
        "beneficiaries": ds.beneficiaries,
        "snapshot_bytes": manifest.size,
        "seconds": timings,
        "throughput_while_activating": statistics.median(ratios),
        "per_round": ratios,
        "switches": switches,
    }
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"snapshots-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\n| {ds.beneficiaries:,} beneficiaries ({manifest.size / 1e6:.0f} MB) | seconds |")
    print("|---|---:|")
    for label in ("create", "fetch", "activate"):
        print(f"| {label} | {timings[label]:.2f} |")
    print(f"\nbatch-100 throughput while activating every 0.5 s ({switches} switches): "
          f"{statistics.median(ratios):.2f}x of the same server left alone (median of "
          f"{len(ratios)} alternated rounds)\nresults: {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
