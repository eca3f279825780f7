"""Load for the audit phases (bench.audit): batch calls from a grpc.aio client that counts, second
by second, the lookups answered and the calls refused, by status and ErrorInfo reason. Run as a
subprocess (pinned).

Unlike h2load it sees each call's gRPC status, so "answered" is exact: a call counts once its
answer arrived, and the client waits for the calls in flight before it stops. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.scenarios import BATCH, METHODS

REFUSAL_PAUSE = 0.005  # after a refusal: a client honouring RetryInfo would wait longer


def refusal_label(code: grpc.StatusCode, trailing: Any) -> str:
    """'CODE' or 'CODE REASON' (google.rpc.ErrorInfo in grpc-status-details-bin)."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in trailing or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return f"{code.name} {info.reason}"
    return code.name


@dataclass
class Tally:
    """Per whole second of wall time (time.time()): lookups answered, calls refused."""

    answered: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    refused: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    refusals: Counter[str] = field(default_factory=Counter)
    calls: int = 0

    def to_json(self) -> dict[str, Any]:
        seconds = sorted(set(self.answered) | set(self.refused))
        return {
            "calls": self.calls,
            "answered": sum(self.answered.values()),
            "refused": sum(self.refused.values()),
            "refusals": dict(self.refusals),
            "timeline": [[s, self.answered.get(s, 0), self.refused.get(s, 0)] for s in seconds],
        }


async def _caller(
    stub: Any, request: bytes, items: int, token: str, stop: asyncio.Event, tally: Tally
) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    while not stop.is_set():
        try:
            await stub(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            tally.calls += 1
            tally.refused[int(time.time())] += 1
            tally.refusals[refusal_label(exc.code(), exc.trailing_metadata())] += 1
            await asyncio.sleep(REFUSAL_PAUSE)
            continue
        tally.calls += 1
        tally.answered[int(time.time())] += items


async def run(args: argparse.Namespace, request: bytes, token: str) -> dict[str, Any]:
    tally = Tally()
    stop = asyncio.Event()
    channels = [
        grpc.aio.insecure_channel(args.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(args.connections)
    ]
    tasks = [
        asyncio.create_task(
            _caller(channel.unary_unary(METHODS[BATCH]), request, args.items, token, stop, tally)
        )
        for channel in channels
        for _ in range(args.concurrency)
    ]
    started = time.time()
    await asyncio.sleep(args.duration)
    stop.set()
    await asyncio.gather(*tasks)  # every call in flight ends, answered or not
    ended = time.time()
    for channel in channels:
        await channel.close()
    return {"started": started, "ended": ended, **tally.to_json()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--request", required=True, type=Path, help="an encoded batch request")
    parser.add_argument("--items", type=int, required=True, help="lookups per batch")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight per connection")
    args = parser.parse_args()
    token = os.environ.get("BENCH_TOKEN", "")  # not on the command line
    result = asyncio.run(run(args, args.request.read_bytes(), token))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
