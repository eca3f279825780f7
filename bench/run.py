"""One benchmark run: dataset, micro-benchmarks, servers, closed-loop rounds with variants
alternated, open-loop latency at a fraction of each maximum, checks, then report and files.

CPU placement on a machine with two or more cores: one-worker servers (and the conventional
stack's Redis) on the first core, load generators on the last; N-worker runs share every core.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import audit, frames, h2load, otlp_receiver, plan, probe, report, stats
from bench import dataset as bench_dataset
from bench.frames import CheckSpec
from bench.scenarios import BATCH, GRPC_AIO, H2LOAD, SCENARIOS, UNARY, Scenario
from bench.servers import (
    RedisCounters,
    RedisProcess,
    ServerFailed,
    ServerProcess,
    busy_processes,
    cpu_seconds,
    machine_speed,
    redis_ping,
    steal_seconds,
)
from bench.variants import VARIANTS, ServerContext, Variant
from service.spool import spool_pending_bytes

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"

SETTLE_TIMEOUT = 60.0  # how long a tracing cell waits at its edges for its spool to drain
SETTLE_POLL = 0.25

QUICK = {
    "audit_outage": 6.0,
    "audit_full_outage": 4.0,
    "audit_edge": 3.0,
    "audit_fill": 4.0,
    "beneficiaries": 100_000,
    "duration": 2.0,
    "warmup": 0.5,
    "rounds": 1,
    "micro_seconds": 0.5,
    "micro_rounds": 1,
    "probe_calls": 3,
}
FULL = {
    "audit_outage": 30.0,
    "audit_full_outage": 8.0,
    "audit_edge": 10.0,
    "audit_fill": 8.0,
    "beneficiaries": 1_000_000,
    "duration": 5.0,
    "warmup": 1.0,
    "rounds": 3,
    "micro_seconds": 2.0,
    "micro_rounds": 3,
    "probe_calls": 10,
}


@dataclass
class Options:
    quick: bool = False
    beneficiaries: int = FULL["beneficiaries"]  # type: ignore[assignment]
    duration: float = FULL["duration"]
    warmup: float = FULL["warmup"]
    rounds: int = FULL["rounds"]  # type: ignore[assignment]
    micro_seconds: float = FULL["micro_seconds"]
    micro_rounds: int = FULL["micro_rounds"]  # type: ignore[assignment]
    probe_calls: int = FULL["probe_calls"]  # type: ignore[assignment]
    workers: int = 0  # N of the N-worker variant; 0: one per core
    clients: int = 16  # h2load connections
    stream_streams: int = 8
    stream_window: int = 32
    open_fraction: float = 0.7
    open_streams: int = 100  # h2load -m in open loop: high enough never to hold a request back
    open_clients: int = 0  # h2load connections in open loop; 0: one per server worker
    open_loop: bool = True
    micro: bool = True
    plots: bool = True
    scenarios: list[str] | None = None
    variants: list[str] | None = None
    redis: str | None = None  # use this Redis instead of starting one
    # bench.audit's phases; None: all of them when covergate-tracing is among the variants.
    audit: list[str] | None = None
    audit_outage: float = FULL["audit_outage"]  # receiver-outage: seconds the receiver is down
    audit_full_outage: float = FULL["audit_full_outage"]  # spool-full: seconds it is down
    audit_edge: float = FULL["audit_edge"]  # load before and after an outage
    audit_fill: float = FULL["audit_fill"]  # export-rate: seconds of load filling the spool
    audit_settle: float = 180.0  # how long a phase waits for its spool to drain
    cache: Path = BENCH_DIR / ".cache"
    results: Path = BENCH_DIR / "results"


@dataclass(frozen=True)
class Placement:
    """Which CPUs servers and load generators get (taskset lists), by worker count."""

    cores: tuple[int, ...]

    @property
    def pinned(self) -> bool:
        return len(self.cores) >= 2

    def server(self, workers: int) -> str | None:
        if not self.pinned:
            return None
        return str(self.cores[0]) if workers == 1 else ",".join(map(str, self.cores))

    def client(self, workers: int) -> str | None:
        if not self.pinned:
            return None
        return str(self.cores[-1]) if workers == 1 else ",".join(map(str, self.cores))

    def summary(self) -> str:
        if not self.pinned:
            return "one core: server and load share it (no pinning)"
        return (
            f"1-worker servers (and Redis) on core {self.cores[0]}, load on core {self.cores[-1]}; "
            f"N-worker servers and their load share cores {','.join(map(str, self.cores))}"
        )


@dataclass
class Load:
    """One h2load process's share of a scenario: a request kind, its body and its connections."""

    kind: str
    body: Path
    message: bytes
    specs: list[CheckSpec]
    clients: int
    messages: list[bytes] = field(default_factory=list)  # a stream call's messages
    token: str = ""  # the practitioner it calls as ("": the dataset's first)


@dataclass
class RunState:
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    probe_calls: int = 0
    stream_checked: int = 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class BenchRun:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        self.run_dir = opts.cache / "runs" / self.stamp
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cores = len(os.sched_getaffinity(0))
        self.placement = Placement(tuple(sorted(os.sched_getaffinity(0))))
        self.state = RunState()
        self.servers: dict[str, ServerProcess] = {}
        self.redis: RedisProcess | None = None
        self.redis_url: str | None = None
        self.redis_counters_client: RedisCounters | None = None
        self.otlp: ServerProcess | None = None
        self.h2load = ""
        self.covergate = str(Path(sys.executable).with_name("covergate"))
        self.ds: bench_dataset.Dataset | None = None
        self.data_dir = Path()  # this run's copy of the dataset's data dir
        self.own_data: dict[str, Path] = {}  # the copies of variants with a data dir of their own
        self.spool_dirs: dict[str, Path] = {}  # the audit spools of the tracing variants
        self.loads: dict[str, list[Load]] = {}

    # -- setup -----------------------------------------------------------------------------------

    def workers_of(self, variant: Variant) -> int:
        return variant.workers or self.opts.workers or self.cores

    def cells(self) -> list[tuple[str, str]]:
        return plan.cells(self.opts.scenarios, self.opts.variants)

    def build_loads(self) -> None:
        """Every request body of the run, written once, shared by all variants and rounds."""
        assert self.ds is not None
        pools = self.ds.pools
        bodies = self.run_dir / "bodies"
        bodies.mkdir(exist_ok=True)
        for name in {s for _, s in self.cells()}:
            scenario = SCENARIOS[name]
            loads = []
            if scenario.rpc == UNARY:
                split = stats.split_clients(scenario.weights, self.opts.clients)
                for kind, clients in split.items():
                    spec = pools[kind][0]
                    message = frames.request_bytes(spec, f"r-{kind}")
                    loads.append(
                        Load(kind, bodies / f"{name}-{kind}.bin", message, [spec], clients)
                    )
            elif scenario.rpc == BATCH:
                specs = frames.mixed(pools, scenario.weights, scenario.batch_size)
                message = frames.batch_bytes(specs)
                loads.append(
                    Load("batch", bodies / f"{name}.bin", message, specs, self.opts.clients)
                )
            elif scenario.driver == H2LOAD:
                # One stream call per h2load request: every message in the body, then half-close.
                specs = frames.mixed(pools, scenario.weights, scenario.batch_size)
                messages = [frames.request_bytes(s, f"s{i:04d}") for i, s in enumerate(specs)]
                body = bodies / f"{name}.bin"
                loads.append(Load("stream", body, b"", specs, self.opts.clients, messages))
            else:
                specs = frames.mixed(pools, scenario.weights, 2000)
                path = bodies / f"{name}-specs.json"
                path.write_text(json.dumps([s.to_json() for s in specs]))
                loads.append(Load("stream", path, b"", specs, self.opts.stream_streams))
            for load in loads:
                if load.message:
                    load.body.write_bytes(frames.grpc_frame(load.message))
                elif load.messages:
                    load.body.write_bytes(b"".join(frames.grpc_frame(m) for m in load.messages))
            self.loads[name] = self._per_practitioner(loads, scenario.practitioners)

    def _per_practitioner(self, loads: list[Load], count: int) -> list[Load]:
        """Each load split over `count` practitioners: the same body, one h2load process per
        practitioner with its own token and an even share of the connections."""
        assert self.ds is not None
        if count == 1:
            return loads
        if len(self.ds.tokens) < count:
            raise SystemExit(
                f"bench: the dataset has {len(self.ds.tokens)} practitioner tokens, "
                f"a scenario needs {count}; delete {self.ds.root} to rebuild it"
            )
        return [
            replace(
                load,
                kind=f"{load.kind}-p{i + 1}",
                clients=max(1, load.clients // count),
                token=self.ds.tokens[i],
            )
            for load in loads
            for i in range(count)
        ]

    def start_servers(self, names: list[str]) -> None:
        assert self.ds is not None
        logs = self.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        if any(VARIANTS[n].needs_redis for n in names):
            self.redis_url = self.start_redis(logs)
        if any(VARIANTS[n].needs_otlp for n in names):
            # Its own process on the load's cores: the collector is not the server's CPU.
            self.otlp = ServerProcess(
                "otlp-receiver",
                [sys.executable, "-m", "bench.otlp_receiver"],
                env=dict(os.environ),
                cpus=self.placement.client(1),
                log_path=logs / "otlp-receiver.log",
                cwd=REPO,
            )
        for name in names:
            variant = VARIANTS[name]
            if variant.needs_redis and self.redis_url is None:
                _say(f"bench: skipping {name}: no Redis (install redis-server or pass --redis)")
                continue
            workers = self.workers_of(variant)
            data_dir = self.data_dir
            if variant.own_data:
                data_dir = self.own_data[name] = bench_dataset.working_copy(
                    self.ds, self.run_dir / f"data-{name}"
                )
            if variant.needs_otlp:
                self.spool_dirs[name] = self.run_dir / f"spool-{name}"
            ctx = ServerContext(
                python=sys.executable,
                covergate=self.covergate,
                data_dir=data_dir,
                workers=workers,
                redis_url=self.redis_url,
                spool_dir=self.spool_dirs.get(name),
            )
            config = variant.config_text(ctx)
            if config is not None:
                ctx = dataclasses.replace(ctx, config_path=self.run_dir / f"{name}.toml")
                assert ctx.config_path is not None
                ctx.config_path.write_text(config)
            cpus = self.placement.server(workers)
            _say(f"bench: starting {name} ({workers} worker(s), cpus {cpus or 'any'})")
            try:
                self.servers[name] = ServerProcess(
                    name,
                    variant.command(ctx),
                    env=variant.environment(
                        otlp_endpoint=f"http://{self.otlp.target}" if self.otlp else None
                    ),
                    cpus=cpus,
                    log_path=logs / f"{name}.log",
                    cwd=REPO,
                )
            except ServerFailed as exc:
                self.record(f"{name} start", str(exc).splitlines()[0])
                _say(f"bench: {exc}")

    def start_redis(self, logs: Path) -> str | None:
        if self.opts.redis:
            return self.opts.redis
        try:
            self.redis = RedisProcess(self.placement.server(1), logs / "redis.log")
            return self.redis.url
        except (FileNotFoundError, ServerFailed) as exc:
            _say(f"bench: cannot start redis-server ({exc}); trying 127.0.0.1:6379")
        if redis_ping("127.0.0.1", 6379):
            return "redis://127.0.0.1:6379/0"
        return None

    def stop_servers(self) -> None:
        for name, server in self.servers.items():
            code = server.stop()
            if code not in (0, None, -15):
                self.record(f"{name} stop", f"exited with {code}")
        self.servers.clear()
        if self.otlp is not None:
            self.otlp.stop()  # it logs what it received to its log
            self.otlp = None
        if self.redis_counters_client is not None:
            self.redis_counters_client.close()
            self.redis_counters_client = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def record(self, where: str, problem: str, count: int = 1) -> None:
        self.state.failures[(where, problem)] += count

    # -- measurements ----------------------------------------------------------------------------

    def _probe_load(
        self, server: ServerProcess, variant: Variant, scenario: Scenario, load: Load, where: str
    ) -> probe.ProbeResult:
        assert self.ds is not None
        if scenario.rpc == UNARY:
            result = probe.unary(
                server.target,
                load.token or self.ds.token,
                scenario.method,
                load.message,
                load.specs[0],
                calls=self.opts.probe_calls,
                decisions=variant.checks_decisions,
            )
        elif scenario.rpc == BATCH:
            result = probe.batch(
                server.target,
                load.token or self.ds.token,
                scenario.method,
                load.message,
                load.specs,
                calls=self.opts.probe_calls,
                decisions=variant.checks_decisions,
            )
        else:
            result = probe.stream(
                server.target,
                load.token or self.ds.token,
                scenario.method,
                load.messages,
                load.specs,
                calls=self.opts.probe_calls,
                decisions=variant.checks_decisions,
            )
        self.state.probe_calls += result.calls
        for problem, n in result.failures.items():
            self.record(where, problem, n)
        return result

    def _h2load_runs(
        self,
        scenario: Scenario,
        server: ServerProcess,
        duration: float,
        rps_per_client: float | None = None,
        tag: str = "",
        clients: dict[str, int] | None = None,
    ) -> list[h2load.H2loadRun]:
        assert self.ds is not None
        runs = []
        for load in self.loads[scenario.name]:
            headers = h2load.grpc_headers(load.token or self.ds.token)
            log_file = None
            if rps_per_client is not None:
                log_file = self.run_dir / f"{tag}-{load.kind}.log"
                log_file.unlink(missing_ok=True)  # h2load appends
            runs.append(
                h2load.H2loadRun(
                    url=f"http://{server.target}{scenario.method}",
                    body=load.body,
                    headers=headers,
                    duration=duration,
                    clients=clients[load.kind] if clients else load.clients,
                    streams=(
                        self.opts.open_streams
                        if rps_per_client is not None
                        else scenario.streams_per_client
                    ),
                    rps=rps_per_client,
                    log_file=log_file,
                )
            )
        return runs

    def closed_cell(self, variant: Variant, scenario: Scenario, round_index: int) -> dict[str, Any]:
        server = self.servers[variant.name]
        where = f"{variant.name}/{scenario.name} round {round_index + 1}"
        if scenario.driver == GRPC_AIO:
            return self.stream_cell(variant, scenario, server, where)
        workers = self.workers_of(variant)
        cpus = self.placement.client(workers)
        loads = self.loads[scenario.name]
        traced = variant.needs_otlp and self.otlp is not None
        spans0 = self.settled_spans(variant, where) if traced else None
        before = [
            self._probe_load(server, variant, scenario, ld, where + " probe before") for ld in loads
        ]
        warm: list[tuple[h2load.H2loadSummary, str]] = []
        if self.opts.warmup > 0:
            warm = h2load.run(
                self._h2load_runs(scenario, server, self.opts.warmup),
                h2load=self.h2load,
                cpus=cpus,
                timeout=self.opts.warmup + 60,
            )
        redis0 = self.redis_counters(variant)
        by0 = self.server_cpu_by_process(variant)
        cpu0, ru0, t0 = sum(by0.values()), _children_cpu(), time.perf_counter()
        steal0 = steal_seconds()
        outcomes = h2load.run(
            self._h2load_runs(scenario, server, self.opts.duration),
            h2load=self.h2load,
            cpus=cpus,
            timeout=self.opts.duration + 60,
        )
        by1 = self.server_cpu_by_process(variant)
        cpu1, ru1, t1 = sum(by1.values()), _children_cpu(), time.perf_counter()
        steal = steal_seconds() - steal0
        redis1 = self.redis_counters(variant)
        after = [
            self._probe_load(server, variant, scenario, ld, where + " probe after") for ld in loads
        ]
        wall = t1 - t0
        calls = sum(s.req_per_s for s, _ in outcomes)
        processes = []
        for load, (summary, _), b, a in zip(loads, outcomes, before, after, strict=True):
            seen = probe.ProbeResult()
            seen.merge(b)
            seen.merge(a)
            processes.append(self._check_process(where, load, summary, seen))
        cell: dict[str, Any] = {
            "calls_per_s": calls,
            "items_per_s": calls * scenario.items_per_call,
            "wall_s": wall,
            "server_cpu": stats.cpu_share(cpu1 - cpu0, wall),
            "steal": stats.cpu_share(steal, wall),
            "server_cpu_by_process": {
                k: stats.cpu_share(v - by0.get(k, 0.0), wall) for k, v in by1.items()
            },
            "client_cpu": stats.cpu_share(ru1 - ru0, wall),
            "client_cpus": cpus,
            "processes": processes,
        }
        items = scenario.items_per_call
        measured_items = sum(summary.done for summary, _ in outcomes) * items
        if redis0 is not None and redis1 is not None:
            cell["redis"] = stats.redis_per_lookups(redis0, redis1, measured_items)
        if spans0 is not None:
            spans1 = self.settled_spans(variant, where)
            if spans1 is not None:
                probed = sum(r.calls for r in (*before, *after)) * items
                warmed = sum(summary.done for summary, _ in warm) * items
                in_flight = sum(
                    max(0, summary.requests.get("started", 0) - summary.done)
                    for summary, _ in (*warm, *outcomes)
                )
                cell["audit"] = stats.span_audit(
                    probed + warmed + measured_items, spans0, spans1, in_flight * items
                )
        return cell

    def settled_spans(self, variant: Variant, where: str) -> dict[str, Any] | None:
        """The receiver's counts once the variant's spool is empty and nothing more arrives: every
        span of the calls answered so far has been received (None, and a failure, if the spool
        does not drain within SETTLE_TIMEOUT)."""
        assert self.otlp is not None
        spool = self.spool_dirs[variant.name]
        deadline = time.monotonic() + SETTLE_TIMEOUT
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            pending = spool_pending_bytes(spool)
            counts = otlp_receiver.counts(self.otlp.target)
            if pending == 0 and last is not None and counts["spans"] == last["spans"]:
                return counts
            last = counts if pending == 0 else None
            time.sleep(SETTLE_POLL)
        self.record(where, f"the audit spool did not drain within {SETTLE_TIMEOUT:.0f} s")
        return None

    def redis_counters(self, variant: Variant) -> dict[str, int] | None:
        """Redis's command and read counters, for the variants that use this run's Redis."""
        if not variant.needs_redis or self.redis_url is None:
            return None
        if self.redis_counters_client is None:
            self.redis_counters_client = RedisCounters(self.redis_url)
        return self.redis_counters_client.read()

    def _check_process(
        self,
        where: str,
        load: Load,
        summary: h2load.H2loadSummary,
        seen: probe.ProbeResult,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "kind": load.kind,
            "clients": load.clients,
            "h2load": summary.to_json(),
            "probe": seen.to_json(),
        }
        if summary.http_failures:
            self.record(where, f"h2load: {summary.http_failures} failed/errored/timed-out requests")
        non_2xx = sum(v for k, v in summary.status_codes.items() if k != "2xx")
        if non_2xx:
            self.record(where, f"h2load: {non_2xx} non-2xx HTTP responses")
        if seen.frame_size is None:
            entry["body_check"] = {"ok": None, "note": "no correct answer to compare with"}
        else:
            # Calls started but not done when h2load stopped may have part of their body counted.
            in_flight = max(0, summary.requests.get("started", 0) - summary.done)
            check = h2load.body_check(summary.data_bytes, summary.done, seen.frame_size, in_flight)
            entry["body_check"] = check
            if not check["ok"]:
                self.record(
                    where,
                    f"{load.kind}: about {check['responses_off']} response bodies differ from the "
                    "probe's (gRPC errors or different answers during the run)",
                )
        if len(seen.frame_sizes) > 1:
            entry["note"] = "the probe saw answers of different sizes"
        return entry

    def stream_cell(
        self, variant: Variant, scenario: Scenario, server: ServerProcess, where: str
    ) -> dict[str, Any]:
        assert self.ds is not None
        load = self.loads[scenario.name][0]
        workers = self.workers_of(variant)
        cpus = self.placement.client(workers)
        cmd = [
            sys.executable,
            "-m",
            "bench.stream_client",
            "--target",
            server.target,
            "--specs",
            str(load.body),
            "--duration",
            str(self.opts.duration),
            "--warmup",
            str(self.opts.warmup),
            "--streams",
            str(self.opts.stream_streams),
            "--window",
            str(self.opts.stream_window),
        ]
        if not variant.checks_decisions:
            cmd.append("--no-decisions")
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        env = dict(os.environ, BENCH_TOKEN=self.ds.token)
        cpu0, t0 = self.server_cpu(variant), time.perf_counter()
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=self.opts.duration + self.opts.warmup + 120,
        )
        cpu1, t1 = self.server_cpu(variant), time.perf_counter()
        if done.returncode != 0:
            raise RuntimeError(f"stream client failed:\n{done.stderr[-2000:]}")
        out = json.loads(done.stdout)
        self.state.stream_checked += out["checked"]
        for problem, n in out["failures"].items():
            self.record(where, problem, n)
        rate = out["messages_per_s"]
        # Server CPU over the client's whole life (warm-up and connection set-up included).
        return {
            "calls_per_s": rate,
            "items_per_s": rate,
            "wall_s": out["seconds"],
            "server_cpu": stats.cpu_share(cpu1 - cpu0, t1 - t0),
            "client_cpu": stats.cpu_share(out["client_cpu_s"], out["seconds"]),
            "client_cpus": cpus,
            "stream": out,
        }

    def open_cell(
        self, variant: Variant, scenario: Scenario, max_calls: float, round_index: int
    ) -> dict[str, Any]:
        server = self.servers[variant.name]
        where = f"{variant.name}/{scenario.name} open loop round {round_index + 1}"
        workers = self.workers_of(variant)
        cpus = self.placement.client(workers)
        loads = self.loads[scenario.name]
        # Few connections: h2load paces each connection with its own timer and those timers fire
        # together, so many slow connections send synchronised bursts that measure h2load's
        # queueing, not the server's. One connection per worker spreads the rate evenly.
        total = self.opts.open_clients or workers
        if scenario.rpc == UNARY:
            clients = stats.split_clients(scenario.weights, total)
        else:
            clients = {ld.kind: total for ld in loads}
        offered, per_client = stats.open_loop_rate(
            max_calls, self.opts.open_fraction, sum(clients.values())
        )
        before = [
            self._probe_load(server, variant, scenario, ld, where + " probe before") for ld in loads
        ]
        tag = f"open-{variant.name}-{scenario.name}-{round_index}"
        runs = self._h2load_runs(scenario, server, self.opts.duration, per_client, tag, clients)
        outcomes = h2load.run(runs, h2load=self.h2load, cpus=cpus, timeout=self.opts.duration + 60)
        after = [
            self._probe_load(server, variant, scenario, ld, where + " probe after") for ld in loads
        ]
        durations: list[int] = []
        statuses: Counter[int] = Counter()
        processes = []
        for run, load, (summary, _), b, a in zip(runs, loads, outcomes, before, after, strict=True):
            assert run.log_file is not None
            d, s = h2load.parse_log(run.log_file.read_text())
            durations += d
            statuses.update(s)
            seen = probe.ProbeResult()
            seen.merge(b)
            seen.merge(a)
            processes.append(self._check_process(where, load, summary, seen))
        bad = sum(n for code, n in statuses.items() if not 200 <= code < 300)
        if bad:
            self.record(where, f"h2load log: {bad} requests without a 2xx response")
        summary_ms = stats.latency_summary(durations)
        achieved = sum(s.req_per_s for s, _ in outcomes)
        return {
            "offered_per_s": offered,
            "connections": clients,
            "rps_per_client": per_client,
            "achieved_per_s": achieved,
            **summary_ms,
            "processes": processes,
        }

    def server_cpu(self, variant: Variant) -> float:
        return sum(self.server_cpu_by_process(variant).values())

    def server_cpu_by_process(self, variant: Variant) -> dict[str, float]:
        """CPU seconds of each process of the variant's stack (supervisor, workers, Redis)."""
        server = self.servers[variant.name]
        out = {f"pid {pid}": cpu_seconds(pid) for pid in server.pids()}
        if variant.needs_redis and self.redis is not None:
            out["redis"] = self.redis.cpu_seconds()
        return out

    def micro(self) -> dict[str, Any]:
        assert self.ds is not None
        cpus = self.placement.client(1)
        cmd = [
            sys.executable,
            "-m",
            "bench.micro",
            "--dataset",
            str(self.ds.root),
            "--seconds",
            str(self.opts.micro_seconds),
            "--rounds",
            str(self.opts.micro_rounds),
            "--covergate",
            self.covergate,
            "--data",
            str(self.data_dir),
        ]
        config = VARIANTS[plan.PRIMARY].config
        if config is not None:
            path = self.run_dir / "micro.toml"
            path.write_text(config)
            cmd += ["--config", str(path)]
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        _say(f"bench: fast-path micro-benchmarks (cpu {cpus or 'any'})")
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            self.record("micro", done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
            _say(done.stderr[-3000:])
            return {}
        raw = json.loads(done.stdout)
        decisions: dict[str, Any] = {"ratios": {}}
        for impl, measures in raw["decisions"].items():
            decisions[impl] = {
                m: {"rounds": rounds, "median": stats.median(rounds)}
                for m, rounds in measures.items()
            }
        for m in decisions.get("cython", {}):
            c = decisions["cython"][m]["rounds"]
            p = decisions.get("python", {}).get(m, {}).get("rounds", [])
            decisions["ratios"][m] = stats.paired_ratios(c, p)["ratio"]
        pairs: dict[str, Any] = {}
        for pair, shapes in raw.get("pairs", {}).items():
            pairs[pair] = {
                shape: {
                    "rounds": rounds,
                    "ratio": stats.median(r["ratio"] for r in rounds),
                    "on_per_s": stats.median(r["on_per_s"] for r in rounds),
                    "off_per_s": stats.median(r["off_per_s"] for r in rounds),
                }
                for shape, rounds in shapes.items()
            }
        return {
            "cpus": raw["cpus"],
            "decisions": decisions,
            "pairs": pairs,
            "import": raw.get("import"),
        }

    # -- the run ---------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        opts = self.opts
        started = datetime.datetime.now()
        self.h2load = h2load.ensure_h2load(_say)
        exclude = {os.getpid()}
        noise: dict[str, Any] = {"load_before": os.getloadavg()}
        noise["busy_before"] = busy_processes(exclude)
        noise["speed"] = []
        steal0 = steal_seconds()
        if noise["busy_before"]:
            _say(f"bench: WARNING: other processes are using the CPU: {noise['busy_before']}")
        self.ds = bench_dataset.prepare(
            opts.cache, opts.beneficiaries, covergate=self.covergate, say=_say
        )
        self.data_dir = bench_dataset.working_copy(self.ds, self.run_dir / "data")
        self.build_loads()
        micro = self.micro() if opts.micro else {}
        cells = self.cells()
        variants = list(dict.fromkeys(v for v, _ in cells))
        closed: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in cells}
        open_results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        audit_results: dict[str, Any] = {}
        try:
            self.start_servers(variants)
            by_scenario: dict[str, list[str]] = {}
            for v, s in cells:
                if v in self.servers:
                    by_scenario.setdefault(s, []).append(v)
            for r in range(opts.rounds):
                self._speed(f"closed-loop round {r + 1}", noise)
                for s, vs in by_scenario.items():
                    for v in plan.rotated(vs, r):
                        self._closed(v, s, r, closed)
            if opts.open_loop:
                points = [(v, s) for v, s in plan.OPEN_LOOP if closed.get((v, s))]
                for r in range(opts.rounds):
                    self._speed(f"open-loop round {r + 1}", noise)
                    for v, s in plan.rotated(points, r):
                        self._open(v, s, r, closed, open_results)
            audit_results = self.audit(closed)
        finally:
            self.stop_servers()
            # The copies served their purpose; logs and request bodies stay in the run dir.
            for path in (self.data_dir, *self.own_data.values(), *self.spool_dirs.values()):
                shutil.rmtree(path, ignore_errors=True)
        self._speed("end", noise)
        noise["steal_s"] = steal_seconds() - steal0
        noise["load_after"] = os.getloadavg()
        noise["busy_after"] = busy_processes(exclude)
        results = self.assemble(started, micro, closed, open_results, noise)
        results["audit"] = audit_results
        results["goals"] = report.evaluate_goals(results)
        return results

    def audit_phases(self) -> list[str]:
        if self.opts.audit is not None:
            return self.opts.audit
        if self.opts.variants is None or "covergate-tracing" in self.opts.variants:
            return list(audit.PHASES)
        return []

    def audit(self, closed: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, Any]:
        """bench.audit's phases, each with its own server and receiver."""
        phases = self.audit_phases()
        if not phases:
            return {}
        out: dict[str, Any] = {}
        runner = audit.AuditPhases(self)
        try:
            for phase in phases:
                _say(f"bench: audit phase {phase}")
                try:
                    if phase == "receiver-outage":
                        out[phase] = runner.receiver_outage()
                    elif phase == "spool-full":
                        out[phase] = runner.spool_full()
                    else:
                        out[phase] = runner.export_rate(*self._batch_rate(closed))
                except Exception as exc:
                    self.record(f"audit {phase}", _first_line(exc))
                    _say(f"bench: audit phase {phase} failed: {exc}")
                    continue
                if out[phase].get("drained") is False:
                    self.record(f"audit {phase}", "the spool did not drain")
                _say(f"bench: audit {phase}: " + report.audit_line(phase, out[phase]))
        finally:
            runner.close()
        return out

    @staticmethod
    def _batch_rate(
        closed: dict[tuple[str, str], list[dict[str, Any]]],
    ) -> tuple[float | None, str]:
        """The service's own batch-100 rate in this run: tracing off if measured, else on."""
        for variant in ("covergate", "covergate-tracing"):
            rate = stats.median(c["items_per_s"] for c in closed.get((variant, "batch-100"), ()))
            if rate is not None:
                return rate, f"{variant} batch-100, closed loop"
        return None, ""

    def _speed(self, when: str, noise: dict[str, Any]) -> None:
        cores = self.placement.cores
        rate = machine_speed(cores[0] if self.placement.pinned else None)
        best = max([rate] + [s["loops_per_s"] for s in noise["speed"]])
        noise["speed"].append({"when": when, "loops_per_s": rate})
        if rate < 0.85 * best:
            _say(f"bench: WARNING: the machine runs at {rate / best:.0%} of its best speed so far")

    def _closed(
        self, v: str, s: str, r: int, closed: dict[tuple[str, str], list[dict[str, Any]]]
    ) -> None:
        variant, scenario = VARIANTS[v], SCENARIOS[s]
        if not self.servers[v].alive():
            self.record(f"{v}/{s}", "server not running")
            return
        try:
            cell = self.closed_cell(variant, scenario, r)
        except Exception as exc:  # one failed cell must not lose the whole run
            self.record(f"{v}/{s} round {r + 1}", _first_line(exc))
            _say(f"bench: {v}/{s} round {r + 1} failed: {exc}")
            return
        closed[(v, s)].append(cell)
        _say(
            f"bench: round {r + 1} {s:<13} {v:<13} {cell['calls_per_s']:>10,.0f} calls/s "
            f"{cell['items_per_s']:>11,.0f} items/s  server cpu {_fmt(cell['server_cpu'])} "
            f"load cpu {_fmt(cell['client_cpu'])}"
        )

    def _open(
        self,
        v: str,
        s: str,
        r: int,
        closed: dict[tuple[str, str], list[dict[str, Any]]],
        open_results: dict[tuple[str, str], list[dict[str, Any]]],
    ) -> None:
        max_calls = stats.median(c["calls_per_s"] for c in closed[(v, s)])
        if max_calls is None or not self.servers[v].alive():
            return
        try:
            cell = self.open_cell(VARIANTS[v], SCENARIOS[s], max_calls, r)
        except Exception as exc:
            self.record(f"{v}/{s} open loop round {r + 1}", _first_line(exc))
            _say(f"bench: {v}/{s} open loop failed: {exc}")
            return
        open_results.setdefault((v, s), []).append(cell)
        _say(
            f"bench: round {r + 1} open loop {s} {v}: offered {cell['offered_per_s']:,.0f}/s, "
            f"achieved {cell['achieved_per_s']:,.0f}/s, p50 {cell.get('p50_ms', 0):.2f} ms, "
            f"p99 {cell.get('p99_ms', 0):.2f} ms"
        )

    def assemble(
        self,
        started: datetime.datetime,
        micro: dict[str, Any],
        closed: dict[tuple[str, str], list[dict[str, Any]]],
        open_results: dict[tuple[str, str], list[dict[str, Any]]],
        noise: dict[str, Any],
    ) -> dict[str, Any]:
        assert self.ds is not None
        closed_list: list[dict[str, Any]] = []
        for (v, s), rounds in closed.items():
            if not rounds:
                continue
            audits = [r["audit"] for r in rounds if "audit" in r]
            redis = [r["redis"] for r in rounds if "redis" in r]
            closed_list.append(
                {
                    "variant": v,
                    "scenario": s,
                    "traced": VARIANTS[v].needs_otlp,
                    "median_spans_per_lookup": stats.median(a["spans_per_lookup"] for a in audits),
                    "median_redis_round_trips_per_1000": stats.median(
                        r["round_trips_per_1000"] for r in redis
                    ),
                    "workers": self.workers_of(VARIANTS[v]),
                    "server_cpus": self.placement.server(self.workers_of(VARIANTS[v])),
                    "rounds": rounds,
                    "median_calls_per_s": stats.median(r["calls_per_s"] for r in rounds),
                    "median_items_per_s": stats.median(r["items_per_s"] for r in rounds),
                    "median_server_cpu": stats.median(r["server_cpu"] for r in rounds),
                    "median_client_cpu": stats.median(r["client_cpu"] for r in rounds),
                }
            )
        open_list: list[dict[str, Any]] = []
        for (v, s), rounds in open_results.items():
            keys = ["offered_per_s", "achieved_per_s", "max_ms", "mean_ms"] + [
                stats.percentile_key(p) for p in stats.LATENCY_PERCENTILES
            ]
            open_list.append(
                {
                    "variant": v,
                    "scenario": s,
                    "rounds": rounds,
                    "median": {k: stats.median(r.get(k) for r in rounds) for k in keys},
                }
            )
        results: dict[str, Any] = {
            "schema": 1,
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "options": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.opts).items()
            },
            "environment": environment(self.h2load),
            "dataset": self.ds.describe(),
            "placement": {
                "summary": self.placement.summary(),
                "cores": list(self.placement.cores),
                "variants": {
                    name: {
                        "workers": self.workers_of(VARIANTS[name]),
                        "server_cpus": self.placement.server(self.workers_of(VARIANTS[name])),
                        "load_cpus": self.placement.client(self.workers_of(VARIANTS[name])),
                        "description": VARIANTS[name].description,
                        "env": dict(VARIANTS[name].env),
                        "unset_env": list(VARIANTS[name].unset_env),
                        "config": VARIANTS[name].config,
                    }
                    for name in dict.fromkeys(c["variant"] for c in closed_list)
                },
                "redis": "private redis-server on the server core"
                if self.redis_url and not self.opts.redis
                else self.opts.redis,
            },
            "scenarios": {
                name: {
                    "rpc": SCENARIOS[name].rpc,
                    "description": SCENARIOS[name].description,
                    "items_per_call": SCENARIOS[name].items_per_call,
                    "mix": dict(SCENARIOS[name].mix),
                    "driver": SCENARIOS[name].driver,
                    "load": [
                        {
                            "kind": ld.kind,
                            "clients": ld.clients,
                            "kinds": frames.kinds_count(ld.specs),
                            "message_bytes": len(ld.message),
                        }
                        for ld in self.loads.get(name, [])
                    ],
                }
                for name in dict.fromkeys(c["scenario"] for c in closed_list)
            },
            "closed_loop": closed_list,
            "open_loop": open_list,
            "micro": micro,
            "noise": noise,
            "checks": {
                "probe_calls": self.state.probe_calls,
                "stream_checked": self.state.stream_checked,
            },
            "failures": [
                {"where": w, "problem": p, "count": n} for (w, p), n in self.state.failures.items()
            ],
        }
        results["comparisons"] = report.comparisons(closed_list)
        return results


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' / '.join(lines[:2])[:300]}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def environment(h2load_path: str) -> dict[str, Any]:
    import google.protobuf
    import grpc
    import lmdb

    import fastpath

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis_version = None
    if shutil.which("redis-server"):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        redis_version = out.strip()
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "service", "fastpath", "protos"],
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout.strip()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "lmdb": lmdb.__version__,
        "fastpath": fastpath.IMPLEMENTATION,
        "require_extensions": os.environ.get("COVERGATE_REQUIRE_EXTENSIONS", ""),
        "h2load": h2load.version(h2load_path),
        "redis": redis_version,
        "git": git + (" (service/fastpath modified)" if dirty else ""),
        "load_average": os.getloadavg(),
    }


def main(opts: Options) -> int:
    run = BenchRun(opts)
    results = run.execute()
    opts.results.mkdir(parents=True, exist_ok=True)
    prefix = opts.results / run.stamp
    json_path = prefix.with_suffix(".json")
    text = report.render(results)
    report.write_json(results, json_path)  # first: a plotting error must not cost the run
    plots: list[Path] = []
    if opts.plots:
        try:
            plots = report.plot(results, prefix)
        except Exception as exc:
            print(f"plots: failed ({_first_line(exc)})")
        results["plots"] = [str(p) for p in plots]
        report.write_json(results, json_path)
    print(text)
    print(f"results: {json_path}")
    for p in plots:
        print(f"plot:    {p}")
    if opts.plots and not plots:
        print("plots:   skipped (pip install matplotlib)")
    return 1 if results["failures"] else 0
