"""`make run`: make the demo data dir if it is missing, serve it in plaintext on loopback, wait
until it is healthy, then print the export lines and ready-to-paste `covergate check` commands.

SIGTERM, SIGINT and SIGHUP to this wrapper stop the server (it drains and exits); the server is
also told by the kernel to stop if this wrapper dies without a word (Linux: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGTERM when this wrapper goes (Linux only)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def wait_serving(
    target: str,
    server: subprocess.Popen[bytes],
    stopping: list[int],
    timeout: float = 120.0,
) -> bool:
    """True once health says SERVING; False if the server exits, a stop is asked for, or the time
    runs out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and server.poll() is None and not stopping:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


def live_examples(examples: str, data_dir: Path) -> list[str]:
    """The examples file with every line whose token was revoked since left out (said once per
    token, with the command that makes a new one)."""
    from service.store import Store

    lines = examples.splitlines()
    tokens: dict[str, str] = {}  # token -> who
    for line in lines:
        name, sep, rest = line.partition("=")
        if sep and name.startswith("TOKEN_") and rest.startswith("cg1."):
            token, _, comment = rest.partition(" ")
            tokens[token] = comment.strip().lstrip("#").strip().split(" ")[-1]
    with Store(data_dir) as store:
        revoked = {t for t in tokens if store.credential(t.split(".")[1]) is None}
    shown = []
    for line in lines:
        dead = next((t for t in revoked if t in line), None)
        if dead is None:
            shown.append(line)
        elif line.startswith("TOKEN_"):
            name = line.partition("=")[0]
            shown.append(f"# {name} was revoked; a new one: covergate token create {tokens[dead]}")
    # An example whose command was dropped loses its label line too.
    return [
        line
        for i, line in enumerate(shown)
        if not (
            line.startswith("# ")
            and line.rstrip().endswith(("COVERED", "NOT_COVERED", "NO_MATCH"))
            and not (i + 1 < len(shown) and shown[i + 1].startswith("covergate check"))
        )
    ]


def banner(listen: str, data_dir: Path, examples_file: Path, bindir: str) -> str:
    target_flag = "" if listen == "127.0.0.1:50051" else f" --target {listen}"
    out = [
        f"\ncovergate is serving the demo data on {listen}. In another terminal:\n",
        f"  export PATH={bindir}:$PATH",
        f"  export COVERGATE_DATA={data_dir.resolve()}   # admin commands: this data dir\n",
    ]
    for line in live_examples(examples_file.read_text(), data_dir):
        if line.startswith("covergate check"):
            line = line.replace("covergate check", "covergate check" + target_flag, 1)
        elif line.startswith("TOKEN_"):
            line = "export " + line
        out.append("  " + line)
    out.append(
        f"\nHealth: grpc.health.v1 on the same port; reflection is on (grpcurl -plaintext "
        f"{listen} list). The tokens are in {examples_file} (mode 0600). Ctrl-C stops the "
        "server.\n"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.devrun", description="What `make run` runs."
    )
    parser.add_argument("--data", required=True, help="the demo data dir (made if missing)")
    parser.add_argument("--examples", required=True, help="the demo's tokens and example checks")
    parser.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to serve on")
    parser.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    parser.add_argument(
        "--beneficiaries", type=int, default=100_000, help="size of a new demo data dir"
    )
    args = parser.parse_args(argv)
    covergate = Path(sys.executable).with_name("covergate")
    data_dir, examples_file = Path(args.data), Path(args.examples)

    stop_requested: list[int] = []
    server: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.append(signum)
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)

    if not examples_file.exists() or not (data_dir / "store").exists():
        print(
            f"covergate: making the demo data in {data_dir} (once; delete it for fresh data) ...",
            file=sys.stderr,
            flush=True,
        )
        demo_cmd = [
            str(covergate), "demo", "--data", str(data_dir), "--examples", str(examples_file),
            "--beneficiaries", str(args.beneficiaries), "--if-missing",
        ]  # fmt: skip
        # Its summary would repeat what the banner says; its progress goes to stderr.
        demo = subprocess.run(demo_cmd, stdout=subprocess.DEVNULL)
        if demo.returncode != 0 or stop_requested:
            return demo.returncode or 1
    cmd = [str(covergate), "serve", "--insecure", "--data", str(data_dir), "--listen", args.listen]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    print(f"covergate: starting the server on {args.listen} ...", file=sys.stderr, flush=True)
    server = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    try:
        if stop_requested:
            server.send_signal(signal.SIGTERM)
        elif wait_serving(args.listen, server, stop_requested):
            print(banner(args.listen, data_dir, examples_file, str(covergate.parent)), flush=True)
        elif server.poll() is None and not stop_requested:
            print("covergate: the server did not become healthy; stopping it", file=sys.stderr)
            server.send_signal(signal.SIGTERM)
        code = server.wait()
        return 0 if stop_requested and code == 0 else code
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    sys.exit(main())
