"""Load for CheckCoverageStream: a grpc.aio client keeping a window of messages in flight on each
of several bidirectional streams, each on its own connection. Run as a subprocess (pinned).

Requests are pre-encoded bytes; a sample of the answers (every Nth, and every status at the end of
each stream) is checked. Prints one JSON object: messages/s over the measured window, client CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench import frames
from bench.frames import CheckSpec
from bench.scenarios import METHODS, STREAM


@dataclass
class _State:
    measuring: bool = False
    stop: bool = False
    counted: int = 0
    checked: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    codes: Counter[int] = field(default_factory=Counter)


async def _one_stream(
    target: str,
    token: str,
    messages: list[bytes],
    specs: list[CheckSpec],
    offset: int,
    window: int,
    check_every: int,
    decisions: bool,
    state: _State,
) -> None:
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per stream
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = channel.stream_stream(METHODS[STREAM])(
            metadata=(("authorization", f"Bearer {token}"),)
        )
        slots = asyncio.Semaphore(window)
        n = len(messages)

        async def writer() -> None:
            i = offset
            try:
                while not state.stop:
                    await slots.acquire()
                    await call.write(messages[i % n])
                    i += 1
                await call.done_writing()
            except grpc.aio.AioRpcError:
                pass  # the stream ended; its status is read below

        task = asyncio.create_task(writer())
        index = offset
        try:
            while True:
                answer = await call.read()
                if answer is grpc.aio.EOF:
                    break
                slots.release()
                if state.measuring:
                    state.counted += 1
                if index % check_every == 0:
                    state.checked += 1
                    problem = frames.check_item(specs[index % n], answer, decisions=decisions)
                    if problem:
                        state.failures[problem] += 1
                index += 1
        except grpc.aio.AioRpcError:
            pass
        await task
        code = await call.code()
        state.codes[int(code.value[0])] += 1
        if code != grpc.StatusCode.OK:
            state.failures[f"stream ended with {code.name}"] += 1


async def run(args: argparse.Namespace, specs: list[CheckSpec], token: str) -> dict[str, object]:
    messages = [frames.request_bytes(s, f"s{i:08d}") for i, s in enumerate(specs)]
    state = _State()
    tasks = [
        asyncio.create_task(
            _one_stream(
                args.target,
                token,
                messages,
                specs,
                k * 997,
                args.window,
                args.check_every,
                args.decisions,
                state,
            )
        )
        for k in range(args.streams)
    ]
    await asyncio.sleep(args.warmup)
    state.measuring = True
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(args.duration)
    state.measuring = False
    cpu1, t1 = time.process_time(), time.perf_counter()
    state.stop = True
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    seconds = t1 - t0
    return {
        "messages": state.counted,
        "seconds": seconds,
        "messages_per_s": state.counted / seconds if seconds else 0.0,
        "client_cpu_s": cpu1 - cpu0,
        "streams": args.streams,
        "window": args.window,
        "checked": state.checked,
        "failures": dict(state.failures),
        "stream_status": {str(k): v for k, v in state.codes.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--specs", required=True, help="JSON list of CheckSpec")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--check-every", type=int, default=64)
    parser.add_argument("--no-decisions", dest="decisions", action="store_false")
    args = parser.parse_args()
    token = os.environ.get("BENCH_TOKEN", "")  # not on the command line
    specs = [CheckSpec.from_json(s) for s in json.loads(Path(args.specs).read_text())]
    result = asyncio.run(run(args, specs, token))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
