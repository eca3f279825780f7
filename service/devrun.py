"""`make run`: serve the demo data dir in plaintext on loopback, wait until it is healthy, then
print ready-to-paste `covergate check` commands. Ctrl-C stops the server cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_serving(target: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m service.devrun")
    parser.add_argument("--data", required=True)
    parser.add_argument("--examples", required=True)
    parser.add_argument("--listen", default="127.0.0.1:50051")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    covergate = Path(sys.executable).with_name("covergate")
    cmd = [str(covergate), "serve", "--insecure", "--data", args.data, "--listen", args.listen]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    server = subprocess.Popen(cmd)
    try:
        if not wait_serving(args.listen):
            print("covergate: the server did not become healthy", file=sys.stderr)
            server.terminate()
            return 1
        bindir = str(covergate.parent)
        examples = Path(args.examples).read_text()
        target_flag = "" if args.listen == "127.0.0.1:50051" else f" --target {args.listen}"
        print("\ncovergate is serving the demo data on " + args.listen + ". In another terminal:\n")
        print(f"  export PATH={bindir}:$PATH\n")
        for line in examples.splitlines():
            if line.startswith("covergate check"):
                line = line.replace("covergate check", "covergate check" + target_flag, 1)
            print("  " + line)
        print(
            "\nHealth: grpc.health.v1 on the same port; reflection is on (grpcurl -plaintext "
            f"{args.listen} list). Ctrl-C stops the server.\n",
            flush=True,
        )
        return server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGTERM)
        return server.wait()
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
