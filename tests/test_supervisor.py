"""Integration tests of the supervisor of `covergate serve`: one address is served by one server
only (a second covergate, or a covergate on a port another program holds, exits at once), and the
workers die with their supervisor, even when it is SIGKILLed.

Real `covergate serve` processes on loopback, real sockets, real gRPC calls; processes and sockets
are read from /proc.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from harness import COVERGATE, PHARMACY_AMC, Dataset, RunningServer, build_dataset

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc

pytestmark = [
    pytest.mark.slow,  # real servers: `make test-fast` skips them
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG, SO_REUSEPORT and /proc"
    ),
]

DEADLINE = 60.0  # seconds; generous: only a bound on waiting, never what a test measures
REFUSED = re.compile(
    r"^covergate: cannot serve on \S+: the address is already in use "
    r"\(another covergate or another program is listening there\)$"
)
LISTENING = re.compile(r"covergate\[(\d+)\] INFO covergate\.server: worker (\d+) listening")


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return build_dataset(tmp_path_factory.mktemp("first"))


@pytest.fixture(scope="module")
def other_ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """A second data dir: other beneficiaries, other pepper, other tokens."""
    return build_dataset(tmp_path_factory.mktemp("second"), seed=99)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.05)


def serve_once(data_dir: Path, listen: str) -> subprocess.CompletedProcess[str]:
    """A `covergate serve` that is expected to exit by itself."""
    return subprocess.run(
        [COVERGATE, "serve", "--insecure", "--listen", listen, "--workers", "2"],
        env=dict(os.environ, COVERGATE_DATA=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


def assert_refused_in_one_line(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    # --insecure always prints its plaintext banner (lines of `!!`) first; then one line.
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("!!")]
    assert len(lines) == 1, proc.stderr
    assert REFUSED.match(lines[0]), lines[0]
    assert "worker" not in proc.stderr  # refused before any worker was started


def covered_request(ds: Dataset, request_id: str) -> pb.CheckCoverageRequest:
    c = ds.covered
    return pb.CheckCoverageRequest(
        request_id=request_id,
        nir=c.nir,
        nir_key=c.nir_key,
        birth_date=c.birth_date,
        birth_rank=c.birth_rank,
        amc_number=PHARMACY_AMC,
        domain=pb.CARE_DOMAIN_PHARMACY,
        care_date="20250310",
    )


def checks_answered_from(ds: Dataset, target: str, calls: int = 8) -> int:
    """How many of `calls` checks, each on a connection of its own, `ds`'s store answers: its
    token is unknown and its beneficiary absent in any other data dir."""
    answered = 0
    for i in range(calls):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(target, options=options) as channel:
            resp = pb_grpc.CoverageServiceStub(channel).CheckCoverage(
                covered_request(ds, f"r{i}"),
                metadata=(("authorization", f"Bearer {ds.tokens['pharmacist']}"),),
                timeout=10,
            )
        answered += resp.decision == pb.DECISION_COVERED and resp.request_id == f"r{i}"
    return answered


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- one address, one server -----------------------------------------------------------------------


def test_a_second_covergate_on_a_served_address_exits_at_once(
    ds: Dataset, other_ds: Dataset
) -> None:
    with RunningServer(ds.data_dir, workers=2) as first:
        # The same address, and every other spelling that covers it.
        for listen in (
            first.target,
            f"0.0.0.0:{first.port}",
            f"[::]:{first.port}",
            f":{first.port}",
            f"localhost:{first.port}",
        ):
            assert_refused_in_one_line(serve_once(other_ds.data_dir, listen))
        assert checks_answered_from(ds, first.target) == 8
        assert first.proc.poll() is None


def test_covergates_started_together_on_one_port_leave_one_serving(ds: Dataset) -> None:
    """Started at the same moment, three covergates race for one free port: whoever wins, one
    serves and the other two exit with the one line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, COVERGATE_DATA=str(ds.data_dir))
    command = [COVERGATE, "serve", "--insecure", "--listen", f"127.0.0.1:{port}", "--workers", "1"]
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    try:
        wait_until(
            lambda: sum(p.poll() is not None for p in procs) >= 2, "two of the three have exited"
        )
        exited = [p for p in procs if p.poll() is not None]
        (serving,) = [p for p in procs if p.poll() is None]
        for proc in exited:
            out, err = proc.communicate()
            assert_refused_in_one_line(
                subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            )
        assert serving.stdout is not None
        assert f"serving on 127.0.0.1:{port}" in serving.stdout.readline()
        assert checks_answered_from(ds, f"127.0.0.1:{port}", calls=2) == 2
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=DEADLINE)


def test_a_port_held_by_another_program_is_refused(ds: Dataset) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        for listen in (f"127.0.0.1:{port}", f"0.0.0.0:{port}", f"[::]:{port}"):
            assert_refused_in_one_line(serve_once(ds.data_dir, listen))
    # A listener that itself allows sharing (SO_REUSEPORT, as covergate's workers do) is no
    # invitation either: covergate never joins a group it did not start.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sharing:
        sharing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sharing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sharing.bind(("127.0.0.1", 0))
        sharing.listen()
        assert_refused_in_one_line(serve_once(ds.data_dir, f"127.0.0.1:{sharing.getsockname()[1]}"))


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_an_ipv6_listener_is_found_by_a_wildcard(ds: Dataset) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6:
        v6.bind(("::1", 0))
        v6.listen()
        port = v6.getsockname()[1]
        for listen in (f"[::1]:{port}", f"[::]:{port}", f"0.0.0.0:{port}"):
            assert_refused_in_one_line(serve_once(ds.data_dir, listen))


def test_a_restart_on_the_same_port_is_not_blocked_by_time_wait(ds: Dataset) -> None:
    with RunningServer(ds.data_dir, workers=1) as first:
        port = first.port
        # A connection the server closes first (on stop) leaves its side in TIME_WAIT.
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        client.recv(1024)  # the server's SETTINGS: the connection is the worker's now
        first.stop()
    client.settimeout(DEADLINE)
    while client.recv(1024):  # until the server's FIN
        pass
    client.close()
    wait_until(lambda: port in time_wait_ports(), "the server's side of it in TIME_WAIT")
    with RunningServer(ds.data_dir, workers=1, args=["--listen", f"127.0.0.1:{port}"]) as second:
        assert second.port == port
        assert checks_answered_from(ds, second.target, calls=2) == 2


def time_wait_ports() -> set[int]:
    ports = set()
    for line in (
        Path("/proc/net/tcp").read_text().splitlines()[1:]
        + (Path("/proc/net/tcp6").read_text().splitlines()[1:])
    ):
        cols = line.split()
        if cols[3] == "06":
            ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_an_unusable_listen_address_is_one_line_too(ds: Dataset) -> None:
    for listen, message, status in (
        # A malformed option is a usage mistake (2); an address that cannot be served, 1.
        ("127.0.0.1:99999", "covergate: --listen must be HOST:PORT", 2),
        ("no-such-host.invalid:50051", "covergate: cannot resolve 'no-such-host.invalid'", 1),
    ):
        proc = serve_once(ds.data_dir, listen)
        assert proc.returncode == status
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("!!")]
        assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


# -- workers die with their supervisor -------------------------------------------------------------


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def worker_pids(server: RunningServer, count: int) -> list[int]:
    wait_until(lambda: len(LISTENING.findall(server.log())) >= count, f"{count} workers")
    return [int(pid) for pid, _ in LISTENING.findall(server.log())]


@pytest.fixture
def running(ds: Dataset) -> Iterator[RunningServer]:
    server = RunningServer(ds.data_dir, workers=2)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_die_with_their_supervisor(
    ds: Dataset, running: RunningServer, sig: signal.Signals
) -> None:
    workers = worker_pids(running, 2)
    assert all(alive(pid) for pid in workers)
    assert checks_answered_from(ds, running.target, calls=2) == 2
    running.proc.send_signal(sig)
    running.proc.wait(DEADLINE)
    wait_until(lambda: not any(alive(pid) for pid in workers), "every worker has exited")
    wait_until(lambda: not accepts_connections(running.port), "the port refuses connections")
    assert "Traceback" not in running.log()
    if sig == signal.SIGKILL:
        # Told by the kernel (PR_SET_PDEATHSIG), they drained as on a SIGTERM.
        assert running.log().count("draining") == 2, running.log()


def test_a_worker_whose_supervisor_died_before_it_started_does_not_serve(tmp_path: Path) -> None:
    """The supervisor can die between starting a worker and the worker's prctl: the worker
    then finds itself re-parented and exits instead of serving."""
    # The worker's check itself, in a process whose parent is not the pid it is given.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from service.server import _die_with_supervisor; "
            "_die_with_supervisor(os.getppid() + 1); print('serving')",
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 1
    assert "serving" not in proc.stdout
    assert "the supervisor" in proc.stderr and "is gone" in proc.stderr
