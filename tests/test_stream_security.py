"""An open stream is no way around authorisation or quotas: each message is authorised and metered
as if it were its own unary call, over a real server, with each gate.

Every test keeps one stream open, changes something from the admin CLI (or forces the worker to
replace its gate), then sends the next message and checks it gets what a fresh call gets.
"""

from __future__ import annotations

import queue
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from harness import (
    PHARMACIST_ID,
    PHARMACY_AMC,
    Dataset,
    PractitionerRow,
    RunningServer,
    build_dataset,
    cli,
    create_token,
    write_practitioners_csv,
)

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # real servers on loopback: `make test-fast` skips them

GATES = {
    "cython": {},
    "python": {"COVERGATE_NO_EXTENSIONS": "1", "COVERGATE_REQUIRE_EXTENSIONS": "0"},
}


def _reason(status: status_pb2.Status | None) -> str:
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


class OpenStream:
    """A CheckCoverageStream whose messages the test sends one at a time."""

    def __init__(self, stub: pb_grpc.CoverageServiceStub, token: str) -> None:
        self._requests: queue.Queue[pb.CheckCoverageRequest | None] = queue.Queue()
        self._responses: Iterator[pb.CheckCoverageResponse] = stub.CheckCoverageStream(
            iter(self._requests.get, None),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=120,
        )

    def send(self, request: pb.CheckCoverageRequest) -> str:
        """The message's outcome: its decision name, its item error's reason, or, when the stream
        ended on it, `ended:<code>:<reason>`."""
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as exc:
            status = rpc_status.from_call(exc)  # type: ignore[arg-type]
            return f"ended:{exc.code().name}:{_reason(status)}"
        if response.HasField("error"):
            return _reason(response.error)
        return str(pb.Decision.Name(response.decision))

    def close(self) -> None:
        self._requests.put(None)


def _unary(stub: pb_grpc.CoverageServiceStub, token: str, request: Any) -> str:
    try:
        response = stub.CheckCoverage(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=30
        )
    except grpc.RpcError as exc:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        return f"ended:{exc.code().name}:{_reason(status)}"
    return str(pb.Decision.Name(response.decision))


def _request(ds: Dataset) -> pb.CheckCoverageRequest:
    return pb.CheckCoverageRequest(
        **ds.covered.fields(), amc_number=PHARMACY_AMC, domain=pb.CARE_DOMAIN_PHARMACY
    )


@pytest.fixture(params=sorted(GATES))
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Dataset, Any]]:
    ds = build_dataset(tmp_path, extra_beneficiaries=5)
    cli(
        "practitioner", "quota", PHARMACIST_ID, "--set", "daily_limit=6",
        "--set", "rate_per_minute=100000", "--set", "burst=100000", data_dir=ds.data_dir,
    )  # fmt: skip
    with RunningServer(ds.data_dir, workers=1, env=GATES[request.param]) as server:
        assert f"with the {request.param} fast path" in server.log()
        with server.channel() as channel:
            yield ds, pb_grpc.CoverageServiceStub(channel)


def _daily_count(ds: Dataset) -> int:
    out = cli("practitioner", "show", PHARMACIST_ID, data_dir=ds.data_dir).stdout
    match = re.search(r"^today\s+(\d+) lookups", out, re.MULTILINE)
    assert match, f"no daily count in:\n{out}"
    return int(match.group(1))


def test_a_gate_replaced_while_a_stream_is_open_never_serves_it_unmetered(
    served: tuple[Dataset, Any], tmp_path: Path
) -> None:
    """New practitioners past the mapped quota file make the worker map it again and replace its
    gate; the open stream goes on with the new gate and its quotas, never with the closed one."""
    ds, stub = served
    stream = OpenStream(stub, ds.tokens["pharmacist"])
    try:
        assert [stream.send(_request(ds)) for _ in range(3)] == ["DECISION_COVERED"] * 3
        rows = [
            PractitionerRow(f"2000000{i:04d}", "pharmacist", (PHARMACY_AMC,)) for i in range(70)
        ]
        write_practitioners_csv(tmp_path / "more.csv", rows)
        cli("import", "practitioners", str(tmp_path / "more.csv"), "--merge", data_dir=ds.data_dir)
        newcomer = create_token(ds.data_dir, rows[-1].practitioner_id)
        # Its quota slot is past the 64 the worker mapped: this call replaces the gate.
        assert _unary(stub, newcomer, _request(ds)) == "DECISION_COVERED"
        outcomes = [stream.send(_request(ds)) for _ in range(5)]
        assert outcomes == ["DECISION_COVERED"] * 3 + ["DAILY_LIMIT"] * 2
        assert _unary(stub, ds.tokens["pharmacist"], _request(ds)).endswith("DAILY_LIMIT")
        assert _daily_count(ds) == 6
    finally:
        stream.close()


def test_a_suspension_ends_an_open_stream_at_its_next_message(served: tuple[Dataset, Any]) -> None:
    ds, stub = served
    stream = OpenStream(stub, ds.tokens["pharmacist"])
    try:
        assert stream.send(_request(ds)) == "DECISION_COVERED"
        cli("practitioner", "suspend", PHARMACIST_ID, data_dir=ds.data_dir)
        fresh = _unary(stub, ds.tokens["pharmacist"], _request(ds))
        assert fresh == "ended:PERMISSION_DENIED:PRACTITIONER_SUSPENDED"
        assert stream.send(_request(ds)) == fresh
    finally:
        stream.close()


def test_a_revoked_token_ends_an_open_stream_at_its_next_message(
    served: tuple[Dataset, Any],
) -> None:
    ds, stub = served
    stream = OpenStream(stub, ds.tokens["pharmacist"])
    try:
        assert stream.send(_request(ds)) == "DECISION_COVERED"
        cli("token", "revoke", PHARMACIST_ID, data_dir=ds.data_dir)
        fresh = _unary(stub, ds.tokens["pharmacist"], _request(ds))
        assert fresh == "ended:UNAUTHENTICATED:CREDENTIAL_INVALID"
        assert stream.send(_request(ds)) == fresh
    finally:
        stream.close()


def test_a_quota_change_applies_to_an_open_stream_from_its_next_message(
    served: tuple[Dataset, Any],
) -> None:
    ds, stub = served
    stream = OpenStream(stub, ds.tokens["pharmacist"])
    try:
        assert [stream.send(_request(ds)) for _ in range(2)] == ["DECISION_COVERED"] * 2
        cli("practitioner", "quota", PHARMACIST_ID, "--set", "daily_limit=2",
            data_dir=ds.data_dir)  # fmt: skip
        assert stream.send(_request(ds)) == "DAILY_LIMIT"
        assert _unary(stub, ds.tokens["pharmacist"], _request(ds)).endswith("DAILY_LIMIT")
        # And raised again: the stream is served again, as a fresh call would be.
        cli("practitioner", "quota", PHARMACIST_ID, "--set", "daily_limit=10",
            data_dir=ds.data_dir)  # fmt: skip
        assert stream.send(_request(ds)) == "DECISION_COVERED"
        # The scope too: an insurer the practitioner has no agreement with is refused.
        other = _request(ds)
        other.amc_number = "555"
        assert stream.send(other) == "AMC_OUT_OF_SCOPE"
    finally:
        stream.close()
