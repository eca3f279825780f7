"""h2load as the gRPC load generator: finding or installing it, its command line for pre-encoded
gRPC frames, and parsing its summary and per-request log.

h2load speaks HTTP/2 only; grpc-status lives in trailers it ignores. The response body size it
counts is checked against the size the probe saw, so a run whose answers changed (an error has no
body) does not pass for a fast one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "h2load (nghttp2 >= 1.52) is needed: as root run "
    "`apt-get update && apt-get install -y nghttp2-client`, or install nghttp2 from your "
    "distribution, then run the bench again"
)


class H2loadMissing(RuntimeError):
    pass


def ensure_h2load(say: Callable[[str], None] = print) -> str:
    """The h2load path, installing nghttp2-client with apt-get when missing and running as root."""
    path = shutil.which("h2load")
    if path:
        return path
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        say("bench: h2load not found; installing nghttp2-client with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "nghttp2-client"],
        ):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise H2loadMissing(
                    f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}\n{INSTALL_HINT}"
                )
        path = shutil.which("h2load")
        if path:
            return path
    raise H2loadMissing(INSTALL_HINT)


def version(h2load: str) -> str:
    done = subprocess.run([h2load, "--version"], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()


@dataclass(frozen=True)
class H2loadRun:
    """One h2load invocation posting the same gRPC frame for `duration` seconds."""

    url: str
    body: Path
    headers: tuple[str, ...]
    duration: float
    clients: int
    streams: int
    rps: float | None = None  # per client: open loop
    log_file: Path | None = None
    threads: int = 1

    def command(self, h2load: str = "h2load") -> list[str]:
        cmd = [
            h2load,
            "--duration",
            _seconds(self.duration),
            "--clients",
            str(self.clients),
            "--max-concurrent-streams",
            str(self.streams),
            "--threads",
            str(self.threads),
            "--data",
            str(self.body),
        ]
        for header in self.headers:
            cmd += ["--header", header]
        if self.rps is not None:
            cmd += ["--rps", f"{self.rps:.3f}"]
        if self.log_file is not None:
            cmd += ["--log-file", str(self.log_file)]
        cmd.append(self.url)
        return cmd


def _seconds(value: float) -> str:
    """h2load takes whole numbers with a unit: 5 -> '5s', 0.5 -> '500ms'."""
    if value <= 0:
        raise ValueError("a duration must be positive")
    return f"{int(value)}s" if value == int(value) else f"{round(value * 1000)}ms"


def grpc_headers(token: str | None) -> tuple[str, ...]:
    headers = ["content-type: application/grpc", "te: trailers"]
    if token:
        headers.append(f"authorization: Bearer {token}")
    return tuple(headers)


# -- output ----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_duration(text: str) -> float:
    """'347us' / '9.06ms' / '1.5s' -> seconds."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"not an h2load duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class H2loadSummary:
    seconds: float = 0.0
    req_per_s: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    status_codes: dict[str, int] = field(default_factory=dict)
    traffic_bytes: dict[str, int] = field(default_factory=dict)
    time_for_request: dict[str, float] = field(default_factory=dict)  # seconds

    @property
    def done(self) -> int:
        return self.requests.get("done", 0)

    @property
    def succeeded(self) -> int:
        return self.requests.get("succeeded", 0)

    @property
    def data_bytes(self) -> int:
        return self.traffic_bytes.get("data", 0)

    @property
    def http_failures(self) -> int:
        r = self.requests
        return r.get("failed", 0) + r.get("errored", 0) + r.get("timeout", 0)

    def to_json(self) -> dict[str, object]:
        return {
            "seconds": self.seconds,
            "req_per_s": self.req_per_s,
            "requests": self.requests,
            "status_codes": self.status_codes,
            "traffic_bytes": self.traffic_bytes,
            "time_for_request_s": self.time_for_request,
        }


def parse_summary(text: str) -> H2loadSummary:
    """The summary h2load prints at the end of a run."""
    out = H2loadSummary()
    found = False
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"finished in ([0-9.]+\w+), ([0-9.]+) req/s", line):
            out.seconds = parse_duration(m.group(1))
            out.req_per_s = float(m.group(2))
            found = True
        elif line.startswith("requests:"):
            out.requests = {k: int(v) for v, k in re.findall(r"(\d+) (\w+)", line)}
        elif line.startswith("status codes:"):
            out.status_codes = {k: int(v) for v, k in re.findall(r"(\d+) (\dxx)", line)}
        elif line.startswith("traffic:"):
            out.traffic_bytes = {
                k: int(v) for v, k in re.findall(r"\((\d+)\) (total|headers|data)", line)
            }
        elif line.startswith("time for request:"):
            values = line.split(":", 1)[1].split()
            names = ("min", "max", "mean", "sd")
            out.time_for_request = {
                n: parse_duration(v) for n, v in zip(names, values[:4], strict=True)
            }
    if not found:
        raise ValueError("no h2load summary in the output")
    return out


def parse_log(text: str) -> tuple[list[int], dict[int, int]]:
    """(durations in microseconds, count by HTTP status) from an h2load --log-file.

    Each line: start time (us since epoch), HTTP status, microseconds until the end of the
    response. A status of -1 is a request that did not complete.
    """
    durations: list[int] = []
    statuses: dict[int, int] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            status, duration = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        statuses[status] = statuses.get(status, 0) + 1
        if 200 <= status < 300:
            durations.append(duration)
    return durations, statuses


def body_check(data_bytes: int, done: int, frame_size: int, in_flight: int = 0) -> dict[str, Any]:
    """Whether every completed call carried the body the probe saw (`frame_size` bytes, gRPC
    prefixes included; 0 for an expected trailers-only error).

    h2load counts the bytes of calls still in flight when it stops (part of a stream's answers)
    but not the calls: up to `in_flight` bodies more than `done` are fine. Fewer bytes than `done`
    bodies means some calls ended without their answer, i.e. with a gRPC error. `responses_off`
    estimates how many calls were wrong.
    """
    low = done * frame_size
    high = (done + in_flight) * frame_size
    if frame_size:
        missing = max(0, low - data_bytes)
        excess = max(0, data_bytes - high)
        off = -(-(missing + excess) // frame_size)  # ceiling: any byte off is a wrong answer
    else:
        off = done if data_bytes else 0
    return {
        "expected_bytes": [low, high],
        "data_bytes": data_bytes,
        "frame_size": frame_size,
        "responses_off": off,
        "ok": off == 0,
    }


def run(
    runs: Sequence[H2loadRun],
    *,
    h2load: str,
    cpus: str | None,
    timeout: float,
) -> list[tuple[H2loadSummary, str]]:
    """Start every run at once (one process each, pinned to `cpus`) and wait for all of them."""
    procs = []
    for r in runs:
        cmd = r.command(h2load)
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise RuntimeError(f"h2load did not finish in {timeout:.0f}s:\n{out[-2000:]}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"h2load exited with {proc.returncode}:\n{out[-2000:]}")
        results.append((parse_summary(out), out))
    return results
