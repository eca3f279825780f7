"""grpc-status checks around each load run: a grpc.aio client replays the exact request bytes the
load generator posts and checks status codes, decisions and batch shapes.

h2load counts HTTP 200s, and a gRPC error is an HTTP 200 too; the probe (before and after every
run) and the body-size check in bench.h2load are what turn such failures into reported failures.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from bench import frames
from bench.frames import CheckSpec


@dataclass
class ProbeResult:
    calls: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    # Body sizes of the answers that passed (0: an expected trailers-only error): what every
    # answer of the run must look like to h2load.
    frame_sizes: Counter[int] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def frame_size(self) -> int | None:
        return self.frame_sizes.most_common(1)[0][0] if self.frame_sizes else None

    def merge(self, other: ProbeResult) -> None:
        self.calls += other.calls
        self.failures.update(other.failures)
        self.frame_sizes.update(other.frame_sizes)

    def to_json(self) -> dict[str, object]:
        return {
            "calls": self.calls,
            "failed": self.failed,
            "failures": dict(self.failures),
            "frame_sizes": {str(k): v for k, v in self.frame_sizes.items()},
        }


def _code(exc: grpc.aio.AioRpcError) -> int:
    return int(exc.code().value[0])


async def _unary_calls(
    target: str, token: str, method: str, message: bytes, calls: int
) -> list[tuple[int, bytes | None]]:
    out: list[tuple[int, bytes | None]] = []
    async with grpc.aio.insecure_channel(target) as channel:
        rpc = channel.unary_unary(method)  # no serializers: bytes in, bytes out
        for _ in range(calls):
            try:
                out.append((0, await rpc(message, metadata=_auth(token), timeout=30)))
            except grpc.aio.AioRpcError as exc:
                out.append((_code(exc), None))
    return out


def _auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def unary(
    target: str,
    token: str,
    method: str,
    message: bytes,
    spec: CheckSpec,
    *,
    calls: int,
    decisions: bool,
) -> ProbeResult:
    result = ProbeResult()
    for code, payload in asyncio.run(_unary_calls(target, token, method, message, calls)):
        result.calls += 1
        problem = frames.check_unary(spec, code, payload, decisions=decisions)
        if problem:
            result.failures[problem] += 1
        else:
            result.frame_sizes[_body_size(payload)] += 1
    return result


def batch(
    target: str,
    token: str,
    method: str,
    message: bytes,
    specs: Sequence[CheckSpec],
    *,
    calls: int,
    decisions: bool,
) -> ProbeResult:
    result = ProbeResult()
    for code, payload in asyncio.run(_unary_calls(target, token, method, message, calls)):
        result.calls += 1
        problems = frames.check_batch(specs, code, payload, decisions=decisions)
        for problem in problems:
            result.failures[problem] += 1
        if not problems:
            result.frame_sizes[_body_size(payload)] += 1
    return result


async def _stream_calls(
    target: str, token: str, method: str, messages: Sequence[bytes], calls: int
) -> list[tuple[int, list[bytes]]]:
    out: list[tuple[int, list[bytes]]] = []
    async with grpc.aio.insecure_channel(target) as channel:
        rpc = channel.stream_stream(method)
        for _ in range(calls):
            call = rpc(iter(messages), metadata=_auth(token), timeout=30)
            answers: list[bytes] = []
            try:
                async for answer in call:
                    answers.append(answer)
                out.append((0, answers))
            except grpc.aio.AioRpcError as exc:
                out.append((_code(exc), answers))
    return out


def stream(
    target: str,
    token: str,
    method: str,
    messages: Sequence[bytes],
    specs: Sequence[CheckSpec],
    *,
    calls: int,
    decisions: bool,
) -> ProbeResult:
    """Stream calls sending every message then half-closing, as the h2load body does."""
    result = ProbeResult()
    for code, answers in asyncio.run(_stream_calls(target, token, method, messages, calls)):
        result.calls += 1
        problems = []
        if code != 0:
            problems.append(f"stream of {len(specs)}: grpc-status {code}, expected 0")
        elif len(answers) != len(specs):
            problems.append(f"stream of {len(specs)}: {len(answers)} answers")
        else:
            for spec, answer in zip(specs, answers, strict=True):
                problem = frames.check_item(spec, answer, decisions=decisions)
                if problem:
                    problems.append(problem)
        for problem in problems:
            result.failures[problem] += 1
        if not problems:
            result.frame_sizes[sum(_body_size(a) for a in answers)] += 1
    return result


def _body_size(payload: bytes | None) -> int:
    """A body as h2load counts it: gRPC prefix + message; none for a trailers-only error."""
    return frames.GRPC_PREFIX_SIZE + len(payload) if payload is not None else 0
