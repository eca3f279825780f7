"""The ceiling: a grpc.aio server built the ordinary way from covergate's protos (the generated
servicer classes) that does no work and answers every check with one constant, valid response.

Batches get as many items as they asked for; streams one answer per message. Each answer is the
size of covergate's COVERED answer to the same request, so that both send as many bytes: whatever
covergate loses against this is the cost of its own work, not of gRPC in Python.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench import workers
from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc

# covergate's COVERED answer to a bench request: a 4-character convention, an end date, and an
# attestation of 75 base64url characters (the bench practitioner's 11-character id and a 9-digit
# AMC). tests/test_bench_noop.py checks the sizes against the C gate's answers.
ATTESTATION_CHARS = 75


@functools.lru_cache(maxsize=64)
def answer(request_id_size: int) -> pb.CheckCoverageResponse:
    """The constant answer to a request whose id has `request_id_size` characters: as many bytes
    as covergate's COVERED answer echoing that id."""
    return pb.CheckCoverageResponse(
        request_id="r" * request_id_size,
        decision=pb.DECISION_COVERED,
        rate_percent=100,
        convention_type="TP01",
        rights_end_date="20261231",
        attestation="A" * ATTESTATION_CHARS,
    )


def batch_answer(request: pb.CheckCoverageBatchRequest) -> pb.CheckCoverageBatchResponse:
    """One answer per item, sized by the first item's id: the bench's batches number their items
    with ids of one length (bench.frames.batch_bytes), and reading one id per batch keeps the
    ceiling free of per-item Python."""
    items = request.items
    if not items:
        return pb.CheckCoverageBatchResponse()
    return pb.CheckCoverageBatchResponse(items=[answer(len(items[0].request_id))] * len(items))


class NoopCoverage(pb_grpc.CoverageServiceServicer):
    async def CheckCoverage(
        self, request: pb.CheckCoverageRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckCoverageResponse:
        return answer(len(request.request_id))

    async def CheckCoverageBatch(
        self, request: pb.CheckCoverageBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckCoverageBatchResponse:
        return batch_answer(request)

    async def CheckCoverageStream(
        self,
        request_iterator: AsyncIterator[pb.CheckCoverageRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.CheckCoverageResponse]:
        async for request in request_iterator:
            yield answer(len(request.request_id))


async def setup(server: grpc.aio.Server, options: dict[str, Any]) -> None:
    pb_grpc.add_CoverageServiceServicer_to_server(NoopCoverage(), server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    return workers.serve("bench-noop", setup, args.workers, {})


if __name__ == "__main__":
    raise SystemExit(main())
