"""The ceiling: a grpc.aio server built the ordinary way from covergate's protos (the generated
servicer classes) that does no work and answers every check with one constant, valid response.

Batches get as many items as they asked for; streams one answer per message. Whatever covergate
loses against this is the cost of its own work, not of gRPC in Python.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench import workers
from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc

# Shaped like a real COVERED answer (an attestation is 75 base64url characters).
ANSWER = pb.CheckCoverageResponse(
    request_id="r000000001",
    decision=pb.DECISION_COVERED,
    rate_percent=100,
    convention_type="TP01",
    rights_end_date="20261231",
    attestation="A" * 75,
)


class NoopCoverage(pb_grpc.CoverageServiceServicer):
    async def CheckCoverage(
        self, request: pb.CheckCoverageRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckCoverageResponse:
        return ANSWER

    async def CheckCoverageBatch(
        self, request: pb.CheckCoverageBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckCoverageBatchResponse:
        return pb.CheckCoverageBatchResponse(items=[ANSWER] * len(request.items))

    async def CheckCoverageStream(
        self,
        request_iterator: AsyncIterator[pb.CheckCoverageRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.CheckCoverageResponse]:
        async for _ in request_iterator:
            yield ANSWER


async def setup(server: grpc.aio.Server, options: dict[str, Any]) -> None:
    pb_grpc.add_CoverageServiceServicer_to_server(NoopCoverage(), server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    return workers.serve("bench-noop", setup, args.workers, {})


if __name__ == "__main__":
    raise SystemExit(main())
