"""The audit phases of a run (issue 10): what tracing guarantees when the receiver lags or is away.

- receiver-outage: batch-100 load; the OTLP receiver is stopped mid-run for `outage` seconds, then
  restarted on its port. Every answered lookup's span must arrive in the end, and answers go on
  while the spool has room. The spool's peak (bytes not yet acknowledged) is sampled.
- spool-full: a tiny `spool_max_bytes` and the receiver down: calls must be refused UNAVAILABLE
  with ErrorInfo AUDIT_BACKLOG, and once the receiver is back, every answered lookup has its span.
- export-rate: one worker's spool filled at full batch-100 speed with the receiver down, then
  drained to a receiver that keeps up: the spans/s one worker's shipper exports, against the
  service's own batch-100 rate (exporting must not be what limits it).

Each phase has its own covergate server (tracing on, its own spool directory) and its own receiver
process, so a receiver can be stopped and started again; the load comes from bench.audit_client
(exact answered counts, statuses and ErrorInfo reasons) or h2load (export-rate's fill).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import frames, h2load, otlp_receiver
from bench.frames import COVERED
from bench.scenarios import SCENARIOS
from bench.servers import ServerProcess, free_port
from bench.variants import BENCH_CONFIG, VARIANTS
from service.spool import spool_pending_bytes

if TYPE_CHECKING:
    from bench.run import BenchRun

REPO = Path(__file__).resolve().parent.parent
PHASES = ("receiver-outage", "spool-full", "export-rate")
BATCH = "batch-100"
SPOOL_FULL_BYTES = 1 << 20  # a few dozen batch-100 calls
# A worker at full batch-100 speed fills about 35 MB/s of spool (~450 bytes a span): 30 s without
# a receiver would fill most of the default 1 GiB; this phase is about a spool with room.
OUTAGE_SPOOL_BYTES = 4 << 30
EXPORT_SPOOL_BYTES = 8 << 30  # never full while export-rate fills it
SETTLE_POLL = 0.25
SAMPLE_SECONDS = 0.2


def settle(
    spool: Path, counts: Callable[[], dict[str, Any]], timeout: float
) -> tuple[dict[str, Any] | None, float]:
    """Wait until the spool holds nothing unacknowledged and the receiver's span count stopped
    growing: then every span written so far has been received. Returns the receiver's counts
    (None if that did not happen within `timeout`) and the seconds waited."""
    started = time.monotonic()
    last: dict[str, Any] | None = None
    while time.monotonic() - started < timeout:
        pending = spool_pending_bytes(spool)
        now = counts()
        if pending == 0 and last is not None and now["spans"] == last["spans"]:
            return now, time.monotonic() - started
        last = now if pending == 0 else None
        time.sleep(SETTLE_POLL)
    return None, time.monotonic() - started


def window_rate(timeline: list[list[int]], start: float, end: float) -> float | None:
    """Lookups answered per second over the whole seconds of the audit client's timeline
    ([second, answered, refused]) that lie within [start, end)."""
    seconds = [row for row in timeline if start <= row[0] and row[0] + 1 <= end]
    if not seconds:
        return None
    return sum(row[1] for row in seconds) / len(seconds)


def refusal_summary(refusals: dict[str, int]) -> dict[str, Any]:
    total = sum(refusals.values())
    backlog = sum(n for label, n in refusals.items() if label == "UNAVAILABLE AUDIT_BACKLOG")
    return {"refused": total, "backlog_share": backlog / total if total else None}


class SpoolSampler(threading.Thread):
    """The spool's bytes not yet acknowledged, sampled until stopped: its peak."""

    def __init__(self, spool: Path) -> None:
        super().__init__(daemon=True)
        self.spool = spool
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, spool_pending_bytes(self.spool))

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, spool_pending_bytes(self.spool))
        return self.peak


class Receiver:
    """A bench.otlp_receiver process on a fixed port, which may be stopped and started again; the
    counts of its stopped lives are kept (written by the process once its server has stopped)."""

    def __init__(self, port: int, run: BenchRun, name: str) -> None:
        self.port = port
        self.run = run
        self.name = name
        self.process: ServerProcess | None = None
        self.lives = 0
        self.done: dict[str, int] = {"spans": 0, "lookup_spans": 0}

    def _counts_file(self) -> Path:
        return self.run.run_dir / f"{self.name}-receiver-{self.lives}.json"

    def start(self) -> None:
        self.lives += 1
        self.process = ServerProcess(
            f"{self.name}-receiver",
            [
                sys.executable,
                "-m",
                "bench.otlp_receiver",
                "--port",
                str(self.port),
                "--counts-file",
                str(self._counts_file()),
            ],
            env=dict(os.environ),
            cpus=self.run.placement.client(1),
            log_path=self.run.run_dir / "logs" / f"{self.name}-receiver-{self.lives}.log",
            cwd=REPO,
        )

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.stop()
        self.process = None
        final = json.loads(self._counts_file().read_text())
        for key in self.done:
            self.done[key] += final[key]

    def counts(self) -> dict[str, Any]:
        """Everything received so far, over every life."""
        live = otlp_receiver.counts(self.process.target) if self.process else {}
        return {**live, **{k: v + live.get(k, 0) for k, v in self.done.items()}}


class AuditPhases:
    def __init__(self, run: BenchRun) -> None:
        self.run = run
        self.opts = run.opts
        self.servers: list[ServerProcess] = []
        self.receivers: list[Receiver] = []
        assert run.ds is not None
        specs = frames.mixed(run.ds.pools, {COVERED: 1}, SCENARIOS[BATCH].batch_size)
        self.items = len(specs)
        self.request = run.run_dir / "bodies" / "audit-batch-100.bin"
        self.request.parent.mkdir(exist_ok=True)
        self.request.write_bytes(frames.batch_bytes(specs))
        self.framed = run.run_dir / "bodies" / "audit-batch-100.grpc"
        self.framed.write_bytes(frames.grpc_frame(frames.batch_bytes(specs)))

    # -- processes ---------------------------------------------------------------------------------

    def server(self, name: str, port: int, spool: Path, max_bytes: int) -> ServerProcess:
        run = self.run
        variant = VARIANTS["covergate-tracing"]
        config = run.run_dir / f"{name}.toml"
        config.write_text(
            BENCH_CONFIG + f'\n[telemetry]\nspool_dir = "{spool}"\nspool_max_bytes = {max_bytes}\n'
        )
        cmd = [
            run.covergate, "serve", "--insecure", "--listen", "127.0.0.1:0",
            "--workers", "1", "--data", str(run.data_dir), "--config", str(config),
        ]  # fmt: skip
        server = ServerProcess(
            name,
            cmd,
            env=variant.environment(otlp_endpoint=f"http://127.0.0.1:{port}"),
            cpus=run.placement.server(1),
            log_path=run.run_dir / "logs" / f"{name}.log",
            cwd=REPO,
        )
        self.servers.append(server)
        return server

    def receiver(self, name: str, port: int) -> Receiver:
        receiver = Receiver(port, self.run, name)
        self.receivers.append(receiver)
        return receiver

    def client(self, server: ServerProcess, duration: float) -> subprocess.Popen[str]:
        assert self.run.ds is not None
        cmd = [
            sys.executable, "-m", "bench.audit_client", "--target", server.target,
            "--request", str(self.request), "--items", str(self.items),
            "--duration", str(duration),
        ]  # fmt: skip
        cpus = self.run.placement.client(1)
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        env = dict(os.environ, BENCH_TOKEN=self.run.ds.token)
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
        )

    @staticmethod
    def client_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"audit client failed:\n{err[-2000:]}")
        return json.loads(out)  # type: ignore[no-any-return]

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        for receiver in self.receivers:
            if receiver.process is not None:
                receiver.process.stop()
        self.servers.clear()
        self.receivers.clear()

    # -- phases ------------------------------------------------------------------------------------

    def receiver_outage(self) -> dict[str, Any]:
        """Load throughout; the receiver stopped for `outage` seconds in the middle."""
        outage, edge = self.opts.audit_outage, self.opts.audit_edge
        port = free_port()
        spool = self.run.run_dir / "spool-receiver-outage"
        receiver = self.receiver("receiver-outage", port)
        receiver.start()
        server = self.server("receiver-outage", port, spool, OUTAGE_SPOOL_BYTES)
        sampler = SpoolSampler(spool)
        sampler.start()
        client = self.client(server, edge + outage + edge)
        time.sleep(edge)
        stopped_at = time.time()
        receiver.stop()
        time.sleep(outage)
        restarted_at = time.time()
        receiver.start()
        result = self.client_result(client, edge + outage + 120)
        counts, drain = settle(spool, receiver.counts, self.opts.audit_settle)
        peak = sampler.stop()
        timeline = result["timeline"]
        out = self._tally(result, counts)
        out.update(
            outage_s=outage,
            duration_s=edge + outage + edge,
            before_per_s=window_rate(timeline, result["started"], stopped_at),
            during_per_s=window_rate(timeline, stopped_at, restarted_at),
            after_per_s=window_rate(timeline, restarted_at, result["ended"]),
            spool_peak_bytes=peak,
            drain_s=drain if counts is not None else None,
        )
        return out

    def spool_full(self) -> dict[str, Any]:
        """A tiny spool, the receiver down for a while from the start, then back."""
        outage, edge = self.opts.audit_full_outage, self.opts.audit_edge
        port = free_port()
        spool = self.run.run_dir / "spool-spool-full"
        receiver = self.receiver("spool-full", port)
        server = self.server("spool-full", port, spool, SPOOL_FULL_BYTES)
        client = self.client(server, outage + edge)
        time.sleep(outage)
        receiver.start()
        result = self.client_result(client, outage + edge + 120)
        counts, _ = settle(spool, receiver.counts, self.opts.audit_settle)
        out = self._tally(result, counts)
        out.update(outage_s=outage, spool_max_bytes=SPOOL_FULL_BYTES)
        return out

    def export_rate(self, batch_lookups_per_s: float | None, source: str) -> dict[str, Any]:
        """Fill a spool at full speed (receiver down), then time its drain."""
        run = self.run
        port = free_port()
        spool = run.run_dir / "spool-export-rate"
        receiver = self.receiver("export-rate", port)
        server = self.server("export-rate", port, spool, EXPORT_SPOOL_BYTES)
        load = h2load.H2loadRun(
            url=f"http://{server.target}{SCENARIOS[BATCH].method}",
            body=self.framed,
            headers=h2load.grpc_headers(run.ds.token if run.ds else None),
            duration=self.opts.audit_fill,
            clients=self.opts.clients,
            streams=SCENARIOS[BATCH].streams_per_client,
        )
        ((summary, _),) = h2load.run(
            [load], h2load=run.h2load, cpus=run.placement.client(1),
            timeout=self.opts.audit_fill + 60,
        )  # fmt: skip
        time.sleep(1.0)  # calls h2load left in flight end
        backlog = spool_pending_bytes(spool)
        receiver.start()
        assert receiver.process is not None
        # CPU from the first export on (the shipper may be backing off when the receiver starts).
        deadline = time.monotonic() + 30
        while receiver.counts()["spans"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        cpu0 = (server.cpu_seconds(), receiver.process.cpu_seconds(), time.time())
        counts, _ = settle(spool, receiver.counts, self.opts.audit_settle)
        cpu1 = (server.cpu_seconds(), receiver.process.cpu_seconds())
        if counts is None or counts["spans"] <= counts["first_spans"]:
            raise RuntimeError("the export-rate spool did not drain")
        seconds = counts["last_at"] - counts["first_at"]
        rate = (counts["spans"] - counts["first_spans"]) / seconds if seconds > 0 else None
        if batch_lookups_per_s is None:
            batch_lookups_per_s, source = summary.req_per_s * self.items, "its own fill, h2load"
        return {
            "fill_s": self.opts.audit_fill,
            "fill_lookups_per_s": summary.req_per_s * self.items,
            "backlog_bytes": backlog,
            "spans": counts["spans"],
            "seconds": seconds,
            "spans_per_s": rate,
            "batch_lookups_per_s": batch_lookups_per_s,
            "batch_rate_from": source,
            # Cores busy while draining: the shipper (with its idle worker), and the receiver
            # (below 1.0: it kept up).
            "server_cpu": (cpu1[0] - cpu0[0]) / max(counts["last_at"] - cpu0[2], 0.001),
            "receiver_cpu": (cpu1[1] - cpu0[1]) / max(counts["last_at"] - cpu0[2], 0.001),
            "vs_batch_rate": rate / batch_lookups_per_s if rate and batch_lookups_per_s else None,
        }

    @staticmethod
    def _tally(result: dict[str, Any], counts: dict[str, Any] | None) -> dict[str, Any]:
        answered = result["answered"]
        out: dict[str, Any] = {
            "lookups_answered": answered,
            "calls": result["calls"],
            "refusals": result["refusals"],
            **refusal_summary(result["refusals"]),
            "timeline": result["timeline"],
        }
        if counts is None:
            out.update(lookup_spans=None, spans=None, lost=None, drained=False)
        else:
            out.update(
                lookup_spans=counts["lookup_spans"],
                spans=counts["spans"],
                lost=max(0, answered - counts["lookup_spans"]),
                extra=max(0, counts["lookup_spans"] - answered),
                drained=True,
            )
        return out
