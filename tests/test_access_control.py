"""Quotas and the harvest guard through real servers: exact across worker processes, durable across
restarts, the same for unary, batch and stream, and administered live from the CLI.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import (
    HOSPITAL_ID,
    PHARMACIST_ID,
    PHARMACY_AMC,
    Dataset,
    RunningServer,
    build_dataset,
    cli,
    make_identity,
)

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # real servers on loopback: `make test-fast` skips them


def _reason_of_status(status: Any) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def _outcome(call: Any) -> str:
    """OK, or the ErrorInfo reason of the refusal."""
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        return _reason_of_status(status) if status else exc.code().name


def _request(ds: Dataset, who: Any = None) -> pb.CheckCoverageRequest:
    who = who or ds.covered
    return pb.CheckCoverageRequest(
        **who.fields(), amc_number=PHARMACY_AMC, domain=pb.CARE_DOMAIN_PHARMACY
    )


def _set_quota(ds: Dataset, pid: str, *settings: str) -> None:
    args = []
    for s in settings:
        args += ["--set", s]
    cli("practitioner", "quota", pid, *args, data_dir=ds.data_dir)


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    return build_dataset(tmp_path, extra_beneficiaries=200)


def test_daily_limit_is_exact_across_workers_and_survives_a_restart(dataset: Dataset) -> None:
    limit = 150
    _set_quota(dataset, PHARMACIST_ID, f"daily_limit={limit}", "rate_per_minute=100000",
               "burst=100000")  # fmt: skip
    metadata = (("authorization", f"Bearer {dataset.tokens['pharmacist']}"),)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def hammer(server: RunningServer) -> None:
        # A channel per thread: several connections, spread over both workers.
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.CoverageServiceStub(channel)
            for _ in range(40):
                r = _outcome(lambda: stub.CheckCoverage(_request(dataset), metadata=metadata,
                                                        timeout=10))  # fmt: skip
                with lock:
                    outcomes[r] += 1

    with RunningServer(dataset.data_dir, workers=2) as server:
        threads = [threading.Thread(target=hammer, args=(server,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pids = {line.split("[")[1].split("]")[0] for line in server.log().splitlines()
                if "listening on port" in line}  # fmt: skip
        assert len(pids) == 2
    assert outcomes == {"OK": limit, "DAILY_LIMIT": 320 - limit}

    # Counters live in the shared state file: a restarted server still refuses.
    with (
        RunningServer(dataset.data_dir, workers=1) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.CoverageServiceStub(channel)
        assert _outcome(lambda: stub.CheckCoverage(_request(dataset), metadata=metadata)) == (
            "DAILY_LIMIT"
        )
    shown = cli("practitioner", "show", PHARMACIST_ID, data_dir=dataset.data_dir).stdout
    assert f"today         {limit} lookups, 1 distinct beneficiaries" in shown


def test_distinct_limit_is_exact_across_workers(dataset: Dataset) -> None:
    cap = 30
    _set_quota(dataset, HOSPITAL_ID, f"distinct_limit={cap}", "rate_per_minute=100000",
               "burst=100000", "shadow=guard")  # fmt: skip
    people = [r.identity for r in dataset.rights if r.amc_number == PHARMACY_AMC]
    people = list(dict.fromkeys(people))[:60]
    assert len(people) == 60
    metadata = (("authorization", f"Bearer {dataset.tokens['hospital']}"),)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def walk(server: RunningServer, chunk: list[Any]) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.CoverageServiceStub(channel)
            for who in chunk:
                r = _outcome(lambda w=who: stub.CheckCoverage(_request(dataset, w),
                                                              metadata=metadata))  # fmt: skip
                with lock:
                    outcomes[r] += 1

    with RunningServer(dataset.data_dir, workers=2) as server:
        threads = [threading.Thread(target=walk, args=(server, people[i::6])) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert outcomes == {"OK": cap, "DISTINCT_LIMIT": 60 - cap}


def test_guard_ends_a_stream_and_the_suspension_persists(dataset: Dataset) -> None:
    rng = random.Random(99)
    _set_quota(dataset, PHARMACIST_ID, "rate_per_minute=100000", "burst=100000")
    metadata = (("authorization", f"Bearer {dataset.tokens['pharmacist']}"),)
    guesses = [_request(dataset, make_identity(rng)) for _ in range(100)]
    with (
        RunningServer(dataset.data_dir, workers=2) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.CoverageServiceStub(channel)
        answers = []
        with pytest.raises(grpc.RpcError) as err:
            for resp in stub.CheckCoverageStream(iter(guesses), metadata=metadata):
                answers.append(resp)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
        assert status is not None and _reason_of_status(status) == "PRACTITIONER_SUSPENDED"
        # Every answered guess was a NO_MATCH, and the guard fired well within 50 lookups.
        assert answers and all(a.decision == pb.DECISION_NO_MATCH for a in answers)
        assert len(answers) <= 50
        # The other worker refuses too, at once: the suspension is in the shared state.
        for _ in range(4):
            with grpc.insecure_channel(server.target) as fresh:
                refused = _outcome(lambda c=fresh: pb_grpc.CoverageServiceStub(c).CheckCoverage(
                    _request(dataset), metadata=metadata))  # fmt: skip
                assert refused == "PRACTITIONER_SUSPENDED"
    shown = cli("practitioner", "show", PHARMACIST_ID, data_dir=dataset.data_dir).stdout
    assert "status        suspended (harvest guard" in shown
    assert "SUSPENDED by the guard" in shown

    # A restart does not lift it; a human does.
    with RunningServer(dataset.data_dir) as server, grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.CoverageServiceStub(ch)
        assert _outcome(lambda: stub.CheckCoverage(_request(dataset), metadata=metadata)) == (
            "PRACTITIONER_SUSPENDED"
        )
        cli("practitioner", "reinstate", PHARMACIST_ID, data_dir=dataset.data_dir)
        assert _outcome(lambda: stub.CheckCoverage(_request(dataset), metadata=metadata)) == "OK"


def test_unary_batch_and_stream_share_one_limit_and_overrides_apply_live(dataset: Dataset) -> None:
    metadata = (("authorization", f"Bearer {dataset.tokens['pharmacist']}"),)
    _set_quota(dataset, PHARMACIST_ID, "daily_limit=10", "rate_per_minute=100000",
               "burst=100000")  # fmt: skip
    with (
        RunningServer(dataset.data_dir, workers=2) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.CoverageServiceStub(channel)
        assert _outcome(lambda: stub.CheckCoverage(_request(dataset), metadata=metadata)) == "OK"
        batch = stub.CheckCoverageBatch(
            pb.CheckCoverageBatchRequest(items=[_request(dataset)] * 6), metadata=metadata
        )
        assert all(i.decision == pb.DECISION_COVERED for i in batch.items)
        stream = list(stub.CheckCoverageStream(iter([_request(dataset)] * 5), metadata=metadata))
        assert [r.decision for r in stream[:3]] == [pb.DECISION_COVERED] * 3
        assert all(r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                   for r in stream[3:])  # fmt: skip
        assert _outcome(lambda: stub.CheckCoverage(_request(dataset), metadata=metadata)) == (
            "DAILY_LIMIT"
        )
        # Raising the override reaches the running workers without a restart.
        _set_quota(dataset, PHARMACIST_ID, "daily_limit=12")
        assert _outcome(lambda: stub.CheckCoverage(_request(dataset), metadata=metadata)) == "OK"
