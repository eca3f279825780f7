"""Worker processes for the baseline servers: N spawned asyncio gRPC servers sharing one loopback
port through SO_REUSEPORT, as covergate does, so baselines get the same process model.

The supervisor prints `<name>: serving on 127.0.0.1:PORT with N worker(s)` once all are listening
and stops them on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# A worker's setup: registers servicers on the server; runs in the worker process.
Setup = Callable[[grpc.aio.Server, dict[str, Any]], Awaitable[None]]


async def _serve(port: int, setup: Setup, options: dict[str, Any], ready: Any) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    await setup(server, options)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    ready.send(port)
    await stopping.wait()
    await server.stop(2)


def _worker(port: int, setup: Setup, options: dict[str, Any], ready: Any) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(port, setup, options, ready))


def serve(name: str, setup: Setup, workers: int, options: dict[str, Any]) -> int:
    workers = workers or os.cpu_count() or 1
    reserved = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    got_signal: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        got_signal.append(signum)

    # Before the workers exist, so that a stop during start-up still stops them.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx = multiprocessing.get_context("spawn")
    procs = []
    pipes = []
    for _ in range(workers):
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(port, setup, options, sender))
        proc.start()
        sender.close()
        procs.append(proc)
        pipes.append(receiver)
    ok = all(p.poll(60) and p.recv() == port for p in pipes)
    if ok and not got_signal:
        print(f"{name}: serving on 127.0.0.1:{port} with {workers} worker(s)", flush=True)
        while not got_signal and all(p.is_alive() for p in procs):
            multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.5)
    else:
        print(f"{name}: workers did not start", file=sys.stderr, flush=True)
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    reserved.close()
    return 0 if ok else 1
