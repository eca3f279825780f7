"""`make run` (service/devrun.py) as real processes: it makes the demo data once, prints the export
lines and every token once (never a revoked one), the README's examples run as written against it,
and SIGTERM, SIGINT or SIGHUP to the wrapper stops the server: the port is freed, nothing is left.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import COVERGATE, cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

ROOT = Path(__file__).resolve().parent.parent
TOKEN_RE = re.compile(r"cg1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}")
BANNER_END = "Ctrl-C stops the server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


def processes_using(path: Path) -> list[str]:
    """Command lines of the live processes that mention `path` (the demo data dir)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path).encode() in raw and state != "Z":
            found.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return found


@dataclass
class DevRun:
    proc: subprocess.Popen[bytes]
    port: int
    stdout: str
    log: Path


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devrun")


def start(demo_dir: Path) -> DevRun:
    """devrun on a free port; returns once its banner is printed (or fails with its output)."""
    port = free_port()
    log = demo_dir / f"devrun-{port}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.devrun",
                "--data",
                str(demo_dir / "data"),
                "--examples",
                str(demo_dir / "try.txt"),
                "--listen",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
                "--beneficiaries",
                "300",
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
        )
    assert proc.stdout is not None
    out = ""
    deadline = time.monotonic() + 300  # generous: demo data, a server start, a busy host
    while BANNER_END not in out:
        assert proc.poll() is None, f"devrun exited {proc.returncode}:\n{out}\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no banner:\n{out}\n{log.read_text()}"
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:  # raw reads: a buffered readline would hide lines from select
            out += os.read(proc.stdout.fileno(), 1 << 16).decode()
    return DevRun(proc, port, out, log)


def stop(run: DevRun, sig: int) -> int:
    run.proc.send_signal(sig)
    try:
        code = run.proc.wait(timeout=120)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
        assert run.proc.stdout is not None
        run.proc.stdout.close()
    return code


@pytest.fixture
def devrun(demo_dir: Path) -> Iterator[DevRun]:
    run = start(demo_dir)
    yield run
    if run.proc.poll() is None:
        stop(run, signal.SIGTERM)


def test_banner_prints_exports_and_each_token_once(devrun: DevRun, demo_dir: Path) -> None:
    out = devrun.stdout
    assert f"export COVERGATE_DATA={(demo_dir / 'data').resolve()}" in out
    assert f"export PATH={Path(COVERGATE).parent}:$PATH" in out
    file_tokens = set(TOKEN_RE.findall((demo_dir / "try.txt").read_text()))
    assert file_tokens
    for token in file_tokens:
        assert out.count(f"={token}") == 1  # its export line, once
    assert "export TOKEN_PHARMACIST=cg1." in out
    assert f"--target 127.0.0.1:{devrun.port}" in out
    # The demo's own summary is not repeated; its progress went to stderr.
    assert "written to" not in out
    assert "importing" in devrun.log.read_text()


def test_readme_examples_run_as_written_against_make_run(devrun: DevRun) -> None:
    """The README's `covergate check` and Python snippet, against the demo `make run` serves."""
    readme = (ROOT / "README.md").read_text()
    token = re.search(r"export TOKEN_PHARMACIST=(\S+)", devrun.stdout)
    assert token
    env = dict(os.environ, TOKEN_PHARMACIST=token.group(1))
    target = f"127.0.0.1:{devrun.port}"

    section = readme.split("### Checking from the command line")[1]
    command = section.split("```sh\n")[1].split("```")[0]
    argv = shlex.split(command.replace("$TOKEN_PHARMACIST", token.group(1)).replace("\\\n", " "))
    assert argv[:2] == ["covergate", "check"]
    proc = subprocess.run(
        [COVERGATE, *argv[1:], "--target", target],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "decision      COVERED"

    snippet = readme.split("### From Python")[1].split("```python\n")[1].split("```")[0]
    assert '"127.0.0.1:50051"' in snippet
    proc = subprocess.run(
        [sys.executable, "-c", snippet.replace('"127.0.0.1:50051"', repr(target))],
        capture_output=True, text=True, env=env, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:3] == ["COVERED", "100", "TP01"], proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=str)
def test_a_signal_to_the_wrapper_stops_the_server(demo_dir: Path, sig: int) -> None:
    run = start(demo_dir)
    assert not port_is_free(run.port)
    assert len(processes_using(demo_dir / "data")) >= 2  # the wrapper, the server (+ workers)
    code = stop(run, sig)
    assert code == 0, run.log.read_text()
    assert port_is_free(run.port)
    # The server is gone too (no orphan still serving the port); wait for the kernel to reap.
    deadline = time.monotonic() + 60
    while processes_using(demo_dir / "data"):
        assert time.monotonic() < deadline, processes_using(demo_dir / "data")
        time.sleep(0.1)
    assert "Traceback" not in run.log.read_text()


def test_a_revoked_token_is_never_printed_again(demo_dir: Path) -> None:
    first = start(demo_dir)
    stop(first, signal.SIGTERM)
    pharmacist = re.search(r"export TOKEN_PHARMACIST=(\S+)\s+# (\d+)", first.stdout)
    assert pharmacist
    token, pid = pharmacist.groups()
    cli("token", "revoke", pid, data_dir=demo_dir / "data")
    second = start(demo_dir)
    stop(second, signal.SIGTERM)
    assert token not in second.stdout
    assert f"# TOKEN_PHARMACIST was revoked; a new one: covergate token create {pid}" in (
        second.stdout
    )
    # The examples that used it are left out, labels included; the others remain.
    assert "covergate check" in second.stdout
    for line in second.stdout.splitlines():
        if line.strip().startswith("# ") and line.rstrip().endswith("COVERED"):
            nxt = second.stdout.split(line, 1)[1].lstrip("\n").lstrip()
            assert nxt.startswith("covergate check"), line
