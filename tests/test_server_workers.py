"""Integration tests of `covergate serve --workers N`: several worker processes share one port, a
dead worker is replaced, and SIGTERM drains the calls in flight before the process exits 0.

Real servers on loopback over a real data dir; which worker holds a connection is read from /proc.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import PHARMACY_AMC, Dataset, RunningServer, build_dataset

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc

pytestmark = [
    pytest.mark.slow,  # real multi-worker servers: `make test-fast` skips them
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="reads worker sockets from /proc"
    ),
]

GRACE_SECONDS = 8
LONG_GRACE_SECONDS = 3600
EXIT_WAIT_SECONDS = 300  # generous: well under LONG_GRACE_SECONDS, far over a normal exit
CALLS_PER_CONNECTION = 4
CARE_DATE = "20250310"
PATH_BATCH = "/covergate.v1.CoverageService/CheckCoverageBatch"
LISTENING = re.compile(r"covergate\[(\d+)\] INFO covergate\.server: worker (\d+) listening")


class Server(RunningServer):
    """RunningServer that can tell its workers apart from the log."""

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest start, from the log."""
        return {int(i): int(pid) for pid, i in LISTENING.findall(self.log())}

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if len(re.findall(pattern, log)) >= count:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} x{count} never logged:\n{self.log()}")


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return build_dataset(tmp_path_factory.mktemp("workers"))


@pytest.fixture(scope="module")
def server_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "covergate.toml"
    # Quotas in shadow mode: the bursts below are far above a pharmacist's rate limit.
    path.write_text(
        f"[server]\nshutdown_grace_seconds = {GRACE_SECONDS}\n"
        '[quota]\nshadow = ["rate", "daily", "distinct", "guard"]\n'
    )
    return path


def md(ds: Dataset) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)


def covered_request(ds: Dataset, request_id: str = "w") -> pb.CheckCoverageRequest:
    c = ds.covered
    return pb.CheckCoverageRequest(
        request_id=request_id,
        nir=c.nir,
        nir_key=c.nir_key,
        birth_date=c.birth_date,
        birth_rank=c.birth_rank,
        amc_number=PHARMACY_AMC,
        domain=pb.CARE_DOMAIN_PHARMACY,
        care_date=CARE_DATE,
    )


def assert_covered(resp: pb.CheckCoverageResponse, request_id: str) -> None:
    assert (resp.request_id, resp.decision, resp.rate_percent) == (
        request_id,
        pb.DECISION_COVERED,
        100,
    )
    assert resp.attestation


def fresh_channel(target: str) -> grpc.Channel:
    """A channel with a connection of its own (not shared with other channels to the target)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


# -- which process holds a connection --


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _established() -> list[tuple[int, int, int]]:
    """(local port, remote port, inode) of every established TCP socket on the host."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "01":
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in cols[1:3])
                rows.append((local, remote, int(cols[9])))
    return rows


def connections_per_worker(server: Server) -> dict[int, int]:
    """Worker pid -> how many of this test process's connections to the server it holds."""
    established = _established()
    mine = _socket_inodes(os.getpid())
    client_ports = {
        local for local, remote, inode in established if remote == server.port and inode in mine
    }
    server_side = {
        inode
        for local, remote, inode in established
        if local == server.port and remote in client_ports
    }
    return {pid: len(_socket_inodes(pid) & server_side) for pid in server.worker_pids().values()}


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


# -- several workers --


def test_two_workers_serve_from_two_processes(ds: Dataset, server_config: Path) -> None:
    with Server(ds.data_dir, workers=2, args=["--config", str(server_config)]) as server:
        server.wait_log(r"worker \d+ listening", 2)
        pids = server.worker_pids()
        assert sorted(pids) == [0, 1]
        assert len(set(pids.values())) == 2
        for pid in pids.values():
            assert pid != server.proc.pid
            assert parent_pid(pid) == server.proc.pid
        channels: list[grpc.Channel] = []
        try:
            per_worker: dict[int, int] = {}
            # Fresh connections are spread over the workers by the kernel (SO_REUSEPORT): keep
            # opening them until both workers hold some (2**-31 odds that 32 all land on one).
            while len(channels) < 256 and min(per_worker.values(), default=0) == 0:
                for _ in range(32):
                    ch = fresh_channel(server.target)
                    channels.append(ch)
                    rid = f"c{len(channels)}"
                    resp = pb_grpc.CoverageServiceStub(ch).CheckCoverage(
                        covered_request(ds, rid), metadata=md(ds), timeout=10
                    )
                    assert_covered(resp, rid)
                per_worker = connections_per_worker(server)
            assert sum(per_worker.values()) == len(channels), per_worker
            assert all(n > 0 for n in per_worker.values()), per_worker
        finally:
            for ch in channels:
                ch.close()
        assert server.stop() == 0
        log = server.log()
        assert len(re.findall(r"worker \d stopped", log)) == 2, log
        assert "Traceback" not in log


def test_a_dead_worker_is_replaced(ds: Dataset, server_config: Path) -> None:
    with Server(ds.data_dir, workers=2, args=["--config", str(server_config)]) as server:
        server.wait_log(r"worker \d+ listening", 2)
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        log = server.wait_log(r"worker \d+ listening", 3)
        assert "worker 0 exited" in log
        assert server.worker_pids()[0] != victim
        for i in range(16):
            with fresh_channel(server.target) as ch:
                resp = pb_grpc.CoverageServiceStub(ch).CheckCoverage(
                    covered_request(ds, f"d{i}"), metadata=md(ds), timeout=10, wait_for_ready=True
                )
                assert_covered(resp, f"d{i}")
        assert server.stop() == 0


# -- graceful shutdown --


class HeldStream:
    """A CheckCoverageStream the test feeds one message at a time, on a channel of its own."""

    def __init__(self, target: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.channel = fresh_channel(target)
        self._outbox: queue.Queue[pb.CheckCoverageRequest | None] = queue.Queue()
        self.call = pb_grpc.CoverageServiceStub(self.channel).CheckCoverageStream(
            self._requests(), metadata=metadata, timeout=60
        )

    def _requests(self) -> Iterator[pb.CheckCoverageRequest]:
        while (item := self._outbox.get(timeout=60)) is not None:
            yield item

    def ask(self, request: pb.CheckCoverageRequest) -> pb.CheckCoverageResponse:
        self._outbox.put(request)
        return next(self.call)

    def finish(self) -> grpc.StatusCode:
        self._outbox.put(None)
        rest = list(self.call)
        assert rest == []
        return self.call.code()

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def new_call_is_refused(target: str) -> bool:
    with fresh_channel(target) as ch:
        try:
            health = ch.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=None,
                response_deserializer=None,
            )
            health(b"", timeout=2)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    return False


def test_sigterm_lets_streams_in_flight_finish(ds: Dataset, tmp_path: Path) -> None:
    # A grace far longer than any wait below: the server exiting at all proves it went as soon as
    # its streams finished rather than waiting out the grace (no clock decides this test).
    config = tmp_path / "long-grace.toml"
    config.write_text(
        f"[server]\nshutdown_grace_seconds = {LONG_GRACE_SECONDS}\n"
        '[quota]\nshadow = ["rate", "daily", "distinct", "guard"]\n'
    )
    server = Server(ds.data_dir, workers=2, args=["--config", str(config)])
    streams: list[HeldStream] = []
    try:
        server.wait_log(r"worker \d+ listening", 2)
        for i in range(8):
            stream = HeldStream(server.target, md(ds))
            streams.append(stream)
            assert_covered(stream.ask(covered_request(ds, f"s{i}-0")), f"s{i}-0")
        per_worker = connections_per_worker(server)
        assert sum(per_worker.values()) == len(streams)

        server.proc.send_signal(signal.SIGTERM)
        server.wait_log(r"worker \d draining", 2)
        # Draining: the streams already open keep being answered.
        for n in range(1, 6):
            for i, stream in enumerate(streams):
                rid = f"s{i}-{n}"
                assert_covered(stream.ask(covered_request(ds, rid)), rid)
        assert server.proc.poll() is None
        for stream in streams:
            assert stream.finish() == grpc.StatusCode.OK
        code = server.proc.wait(timeout=EXIT_WAIT_SECONDS)
        assert code == 0, server.log()
        log = server.log()
        assert len(re.findall(r"worker \d stopped", log)) == 2, log
        assert new_call_is_refused(server.target)
    finally:
        for stream in streams:
            stream.close()
        server.stop()


def test_sigterm_during_a_burst_of_calls_completes_them(ds: Dataset, server_config: Path) -> None:
    """Calls the server received before SIGTERM are answered, not cancelled; then it exits 0."""
    server = Server(ds.data_dir, workers=2, args=["--config", str(server_config)])
    channels: list[grpc.Channel] = []
    try:
        server.wait_log(r"worker \d+ listening", 2)
        for _ in range(128):
            ch = fresh_channel(server.target)
            grpc.channel_ready_future(ch).result(timeout=10)
            channels.append(ch)
        per_worker = connections_per_worker(server)
        assert all(n > 0 for n in per_worker.values()), per_worker

        # 500 items (~30 kB) a call, a few calls a connection: inside HTTP/2 flow-control windows,
        # so every byte of the burst is on the server's side at once, and enough work (256k
        # items) that the server is still busy with it when SIGTERM comes.
        items = 500
        batch = pb.CheckCoverageBatchRequest(
            items=[covered_request(ds, f"b{i}") for i in range(items)]
        ).SerializeToString()
        calls = [
            ch.unary_unary(PATH_BATCH, request_serializer=None, response_deserializer=None)
            for ch in channels
        ]
        futures = [
            call.future(batch, metadata=md(ds), timeout=60) for call in calls * CALLS_PER_CONNECTION
        ]
        # Once the server answers, the whole burst has long been delivered over loopback.
        deadline = time.monotonic() + 300  # generous: a condition is awaited, not timed
        while not any(f.done() for f in futures):
            assert time.monotonic() < deadline, "no answer to the burst"
            time.sleep(0.001)
        time.sleep(0.05)
        done_before = sum(f.done() for f in futures)
        server.proc.send_signal(signal.SIGTERM)

        outcomes: Counter[str] = Counter()
        for f in futures:
            try:
                resp = pb.CheckCoverageBatchResponse.FromString(f.result())
            except grpc.RpcError as exc:
                outcomes[f"{exc.code().name}: {exc.details()}"] += 1  # type: ignore[attr-defined]
            else:
                assert [r.request_id for r in resp.items] == [f"b{i}" for i in range(items)]
                assert {r.decision for r in resp.items} == {pb.DECISION_COVERED}
                outcomes["OK"] += 1
        code = server.proc.wait(timeout=GRACE_SECONDS + 10)
        assert outcomes == Counter({"OK": len(futures)}), (
            f"{done_before} of {len(futures)} calls were answered before SIGTERM; "
            f"all of them ended: {dict(outcomes)}"
        )
        assert code == 0
        assert new_call_is_refused(server.target)
    finally:
        for ch in channels:
            ch.close()
        server.stop()


def test_sigterm_with_concurrent_unary_callers(ds: Dataset, server_config: Path) -> None:
    """Clients hammering the server when SIGTERM arrives get correct answers until the server
    goes, then refusals; never an error of the server's making, and the process exits 0.

    A call that reaches grpc core after the shutdown began may be CANCELLED by grpc itself
    (whether it was sent before or after SIGTERM cannot be told apart here): allowed.
    """
    server = Server(ds.data_dir, workers=2, args=["--config", str(server_config)])
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    wrong: list[str] = []

    def caller(n: int) -> None:
        with fresh_channel(server.target) as ch:
            stub = pb_grpc.CoverageServiceStub(ch)
            i = 0
            while not stop.is_set():
                rid = f"u{n}-{i}"
                i += 1
                try:
                    resp = stub.CheckCoverage(covered_request(ds, rid), metadata=md(ds), timeout=10)
                except grpc.RpcError as exc:
                    key = exc.code().name  # type: ignore[attr-defined]
                else:
                    key = "OK"
                    if resp.request_id != rid or resp.decision != pb.DECISION_COVERED:
                        wrong.append(rid)
                with lock:
                    outcomes[key] += 1
                if key != "OK":
                    return  # the server is going away; a real client would go elsewhere

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    try:
        server.wait_log(r"worker \d+ listening", 2)
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300  # generous: a condition is awaited, not timed
        while sum(outcomes.values()) < 200:
            assert time.monotonic() < deadline, dict(outcomes)
            assert all(t.is_alive() for t in threads), dict(outcomes)
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=GRACE_SECONDS + 10)
        stop.set()
        for t in threads:
            t.join(timeout=20)
        assert code == 0, server.log()
        assert not wrong
        assert set(outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, dict(outcomes)
        assert outcomes["OK"] >= 200
    finally:
        stop.set()
        server.stop()
