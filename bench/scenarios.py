"""The load scenarios: which RPC, how many items per call, which mix of request kinds, and how
much concurrency the closed-loop generator keeps in flight.

Add a scenario by adding it to SCENARIOS; `bench.plan` says which variants run it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.frames import COVERED, INVALID, NO_MATCH, NOT_COVERED

UNARY = "unary"
BATCH = "batch"
STREAM = "stream"

H2LOAD = "h2load"
GRPC_AIO = "grpc.aio"

METHODS = {
    UNARY: "/covergate.v1.CoverageService/CheckCoverage",
    BATCH: "/covergate.v1.CoverageService/CheckCoverageBatch",
    STREAM: "/covergate.v1.CoverageService/CheckCoverageStream",
}

# A realistic day at a pharmacy counter: most people covered, some not, a few typos.
COUNTER_MIX: tuple[tuple[str, int], ...] = (
    (COVERED, 6),
    (NOT_COVERED, 2),
    (NO_MATCH, 1),
    (INVALID, 1),
)


@dataclass(frozen=True)
class Scenario:
    name: str
    rpc: str
    description: str
    batch_size: int = 1
    mix: tuple[tuple[str, int], ...] = ((COVERED, 1),)
    # h2load -m (concurrent streams per connection) for closed-loop runs; connections come from
    # the run options. Bigger batches need fewer calls in flight to keep a worker busy.
    streams_per_client: int = 8
    # H2LOAD posts pre-encoded frames (a stream call carries `batch_size` messages in one body and
    # half-closes); GRPC_AIO drives long-lived pipelined streams from bench.stream_client.
    driver: str = "h2load"
    # Practitioners the load is spread over (one h2load process each, with its own token and a
    # share of the connections): 1 puts every worker on one quota slot, 8 spreads them over 8.
    practitioners: int = 1

    @property
    def method(self) -> str:
        return METHODS[self.rpc]

    @property
    def items_per_call(self) -> int:
        """Decisions per h2load call: batch items, or the messages of a stream call's body."""
        if self.rpc == BATCH or (self.rpc == STREAM and self.driver == H2LOAD):
            return self.batch_size
        return 1

    @property
    def weights(self) -> dict[str, int]:
        return dict(self.mix)

    @property
    def is_mix(self) -> bool:
        return len(self.mix) > 1


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("unary", UNARY, "CheckCoverage, a covered beneficiary"),
        Scenario(
            "unary-mix",
            UNARY,
            "CheckCoverage, 60% covered / 20% not covered / 10% no match / 10% invalid "
            "(one h2load process per kind, connections split by share)",
            mix=COUNTER_MIX,
        ),
        Scenario(
            "unary-p8",
            UNARY,
            "CheckCoverage, a covered beneficiary, from 8 practitioners (a quota slot each; one "
            "h2load process per practitioner, connections split evenly)",
            practitioners=8,
        ),
        Scenario("batch-10", BATCH, "CheckCoverageBatch, 10 covered", 10, streams_per_client=4),
        Scenario("batch-100", BATCH, "CheckCoverageBatch, 100 covered", 100, streams_per_client=2),
        Scenario("batch-500", BATCH, "CheckCoverageBatch, 500 covered", 500, streams_per_client=1),
        Scenario(
            "batch-100-p8",
            BATCH,
            "CheckCoverageBatch, 100 covered, from 8 practitioners (a quota slot each)",
            100,
            streams_per_client=2,
            practitioners=8,
        ),
        Scenario(
            "batch-100-mix",
            BATCH,
            "CheckCoverageBatch, 100 items in the counter mix",
            100,
            mix=COUNTER_MIX,
            streams_per_client=2,
        ),
        Scenario(
            "stream",
            STREAM,
            "CheckCoverageStream, covered beneficiaries, long-lived pipelined streams "
            "(Python grpc.aio client, 8 streams x 32 in flight)",
            driver=GRPC_AIO,
        ),
        Scenario(
            "stream-100",
            STREAM,
            "CheckCoverageStream, 100 covered messages per call sent at once then half-closed "
            "(h2load, so the client is not the bottleneck)",
            100,
            streams_per_client=2,
        ),
    )
}
