"""Starting and stopping the processes a run needs: each variant's server (pinned with taskset)
and a private redis-server, plus the CPU time a process tree used, read from /proc.

Every server announces `... serving on 127.0.0.1:PORT ...` on its first stdout line (covergate's
own format); the harness then waits for grpc.health.v1 to say SERVING.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ServerFailed(RuntimeError):
    pass


def taskset(cpus: str | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus is not None else cmd


class ServerProcess:
    """One server (a supervisor and its workers) started in its own process group."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        env: dict[str, str],
        cpus: str | None,
        log_path: Path,
        cwd: Path,
        start_timeout: float = 120.0,
    ) -> None:
        self.name = name
        self.cpus = cpus
        self.log_path = log_path
        self.command = taskset(cpus, cmd)
        self._log = open(log_path, "w")  # noqa: SIM115 (open for the server's whole life)
        self.proc = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + start_timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line or "serving on" in line:
                break
        match = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
        if not match:
            self.stop()
            raise ServerFailed(f"{name} did not start: {line!r}\n{self.log_tail()}")
        self.port = int(match.group(1))
        self.target = f"127.0.0.1:{self.port}"
        self.wait_serving(deadline)

    def wait_serving(self, deadline: float) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise ServerFailed(f"{self.name} never reported SERVING\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Only this server's own process group, which it was started in.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


# -- Redis -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisCounters:
    """Redis's counters of read events (one per request or pipeline a client sends: its round
    trips) and of commands run (those a Lua script calls included), from INFO stats, over one
    connection kept open: a reading costs Redis one read and one command, nothing else."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=timeout)

    def read(self) -> dict[str, int]:
        info = self._client.info("stats")
        return {
            "reads": int(info["total_reads_processed"]),
            "commands": int(info["total_commands_processed"]),
        }

    def close(self) -> None:
        self._client.close()


class RedisProcess:
    """A throwaway redis-server on a free loopback port: no persistence, pinned like the server
    it serves, so the conventional stack gets the same CPU budget as covergate."""

    def __init__(self, cpus: str | None, log_path: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = open(log_path, "w")  # noqa: SIM115 (open for Redis's whole life)
        self.proc = subprocess.Popen(
            taskset(
                cpus,
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "yes",
                ],
            ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if redis_ping("127.0.0.1", self.port):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise ServerFailed(f"redis-server did not start (see {log_path})")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- /proc -----------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one live process (0 when it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this VM's CPUs wanted it (all CPUs)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / _CLK_TCK if len(fields) > 8 else 0.0


def machine_speed(cpu: int | None, seconds: float = 0.2) -> float:
    """Iterations per second of a fixed pure-Python loop on `cpu`: taken between runs, it shows
    when the machine itself got slower (a busy neighbour, steal) so those rounds can be read as
    such. Ratios between variants of one round stay comparable either way."""
    previous = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        loops = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            total = 0
            for i in range(10_000):
                total += i * i % 7
            loops += 1
        return loops * 10_000 / (time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, previous)


def busy_processes(exclude: set[int], min_share: float = 0.2, window: float = 1.0) -> list[str]:
    """Other processes using more than `min_share` of a core over `window` seconds: benchmark
    numbers taken while they run are not worth much, so the run records them."""

    def snapshot() -> dict[int, tuple[float, str]]:
        snap = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in exclude:
                try:
                    name = Path(f"/proc/{entry}/comm").read_text().strip()
                except OSError:
                    continue
                snap[int(entry)] = (cpu_seconds(int(entry)), name)
        return snap

    before = snapshot()
    time.sleep(window)
    after = snapshot()
    busy = []
    for pid, (cpu, name) in after.items():
        if pid in before:
            share = (cpu - before[pid][0]) / window
            if share >= min_share:
                busy.append(f"{name}[{pid}] {share:.0%}")
    return busy
