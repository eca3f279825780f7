"""Tracing end to end: a real covergate server exports to a real OTLP/gRPC receiver (the
opentelemetry-proto TraceService and MetricsService) started by the test. One lookup span per unary
call, batch item and stream message; the attributes; the caller's traceparent; the guard's event;
metrics; and not one NIR, birth date or member number of the dataset in the exported bytes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import (
    PHARMACIST_ID,
    PHARMACY_AMC,
    Dataset,
    RunningServer,
    build_dataset,
    cli,
    make_identity,
)
from spans import attributes

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc
from service.telemetry import parse_traceparent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.slow  # real servers on loopback: `make test-fast` skips them

TRACE_HEX = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_HEX = "00f067aa0ba902b7"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    ds = build_dataset(tmp_path, extra_beneficiaries=60)
    cli("practitioner", "quota", PHARMACIST_ID, "--set", "rate_per_minute=100000", "--set",
        "burst=100000", data_dir=ds.data_dir)  # fmt: skip
    return ds


def _serve(ds: Dataset, receiver: OtlpReceiver, **env: str) -> RunningServer:
    return RunningServer(
        ds.data_dir,
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "COVERGATE_REQUIRE_EXTENSIONS": "1",
            **env,
        },
    )


def _request(who: Any, request_id: str = "", **kw: Any) -> pb.CheckCoverageRequest:
    fields = {"amc_number": PHARMACY_AMC, "domain": pb.CARE_DOMAIN_PHARMACY, **kw}
    return pb.CheckCoverageRequest(request_id=request_id, **who.fields(), **fields)


def _wait(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the receiver")


def _lookups(receiver: OtlpReceiver) -> list[Any]:
    out = []
    for span in receiver.spans():
        if "covergate.decision" in attributes(span) or "covergate.refusal" in attributes(span):
            out.append(span)
    return out


def test_every_lookup_is_exported_with_its_attributes_and_no_personal_data(
    dataset: Dataset, receiver: OtlpReceiver
) -> None:
    ds = dataset
    metadata = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)
    people = [r.identity for r in ds.rights if r.domain == "PHAR" and r.amc_number == PHARMACY_AMC]
    unary = [
        _request(p, f"rq-unary-{i:03d}", member_number=ds.member_number if p == ds.covered else "")
        for i, p in enumerate(people[:12])
    ]
    batch = [_request(p, f"rq-batch-{i:03d}") for i, p in enumerate(people[:25])]
    stream = [_request(p, f"rq-stream-{i:03d}") for i, p in enumerate(people[:9])]
    traceparent = f"00-{TRACE_HEX}-{PARENT_HEX}-01"
    with _serve(ds, receiver) as server, server.channel() as channel:
        stub = pb_grpc.CoverageServiceStub(channel)
        for r in unary:
            assert stub.CheckCoverage(r, metadata=metadata).decision
        answer = stub.CheckCoverageBatch(
            pb.CheckCoverageBatchRequest(items=batch),
            metadata=(*metadata, ("traceparent", traceparent)),
        )
        assert len(answer.items) == len(batch)
        assert len(list(stub.CheckCoverageStream(iter(stream), metadata=metadata))) == len(stream)
        expected = len(unary) + len(batch) + len(stream)
        _wait(lambda: len(_lookups(receiver)) >= expected)
        _wait(lambda: any(m.resource_metrics for m in receiver.metric_exports()))
    lookups = _lookups(receiver)
    assert len(lookups) == expected  # one per lookup, no more, none lost

    by_method: dict[str, list[Any]] = {"unary": [], "batch": [], "stream": []}
    spans = receiver.spans()
    rpc_spans = {s.span_id: s for s in spans if attributes(s).get("rpc.system") == "grpc"}
    for span in lookups:
        a = attributes(span)
        if a.get("rpc.method") == "CheckCoverage":
            by_method["unary"].append(span)
        elif rpc_spans[span.parent_span_id].name.endswith("CheckCoverageBatch"):
            by_method["batch"].append(span)
        else:
            by_method["stream"].append(span)
        assert a["covergate.practitioner.id"] == PHARMACIST_ID
        assert a["covergate.practitioner.profession"] == "pharmacist"
        assert a.get("covergate.domain") == "PHAR", a
        assert a["covergate.amc"] == PHARMACY_AMC
        assert a["covergate.decision"] in ("COVERED", "NOT_COVERED", "NO_MATCH")
        assert len(a["covergate.beneficiary"]) == 16
        assert "covergate.quota.daily_remaining" in a and "covergate.distinct_today" in a
        assert a["covergate.guard.fired"] is False
    assert {k: len(v) for k, v in by_method.items()} == {
        "unary": len(unary), "batch": len(batch), "stream": len(stream)}  # fmt: skip
    # Same person, same pseudonym, wherever the lookup came from; distinct people, distinct ones.
    pseudonyms = {attributes(s)["covergate.beneficiary"] for s in by_method["batch"]}
    assert len(pseudonyms) == len({(p.nir, p.birth_date, p.birth_rank) for p in people[:25]})

    # The RPC spans: standard rpc.* attributes, the caller's trace context honoured.
    (batch_rpc,) = [s for s in rpc_spans.values() if s.name.endswith("CheckCoverageBatch")]
    assert batch_rpc.trace_id.hex() == TRACE_HEX and batch_rpc.parent_span_id.hex() == PARENT_HEX
    assert attributes(batch_rpc)["rpc.grpc.status_code"] == 0
    assert attributes(batch_rpc)["covergate.batch.items"] == len(batch)
    assert all(s.trace_id.hex() == TRACE_HEX for s in by_method["batch"])
    (stream_rpc,) = [s for s in rpc_spans.values() if s.name.endswith("CheckCoverageStream")]
    assert attributes(stream_rpc)["covergate.stream.messages"] == len(stream)
    assert {s.parent_span_id for s in by_method["stream"]} == {stream_rpc.span_id}

    # The resource says who exported.
    resource = {
        kv.key: kv.value for kv in receiver.trace_exports()[0].resource_spans[0].resource.attributes
    }
    assert resource["service.name"].string_value == "covergate"
    assert {"service.version", "host.name", "covergate.worker"} <= set(resource)

    # Metrics: lookups by profession and decision, and latency, arrived.
    names = {
        m.name
        for export in receiver.metric_exports()
        for rm in export.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {"covergate.lookups", "rpc.server.duration"} <= names

    # Not one personal value of the dataset, nor a request_id, in anything exported (the ids are
    # 12 bytes or more: a 3-byte one once matched by chance inside random trace and span ids).
    raw = receiver.raw_traces() + b"".join(receiver.metric_requests)
    for right in ds.rights:
        i = right.identity
        for value in (i.nir, i.birth_date, right.member_number):
            if value:
                assert value.encode() not in raw
    for r in unary + batch + stream:
        assert r.request_id.encode() not in raw


def test_guard_firing_is_a_span_event_and_a_counted_suspension(
    dataset: Dataset, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    ds = dataset
    metadata = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)
    import random

    rng = random.Random(3)
    with _serve(ds, receiver) as server, server.channel() as channel:
        stub = pb_grpc.CoverageServiceStub(channel)
        suspended = False
        for _ in range(200):
            try:
                stub.CheckCoverage(_request(make_identity(rng)), metadata=metadata)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                suspended = True
                break
        assert suspended
        # The stolen credential keeps trying, by every method: each attempt is refused before
        # the gate (authentication reads the persisted suspension) and each is still traced.
        with pytest.raises(grpc.RpcError) as refused:
            stub.CheckCoverageBatch(
                pb.CheckCoverageBatchRequest(items=[_request(make_identity(rng))]),
                metadata=metadata,
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.CheckCoverageStream(iter([_request(make_identity(rng))]), metadata=metadata))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        _wait(lambda: any(s.events for s in receiver.spans()))
        _wait(lambda: _suspensions(receiver) >= 1)
        _wait(lambda: len(_refused(receiver)) >= 3)
    fired = [s for s in receiver.spans() if s.events]
    assert len(fired) == 1
    assert [e.name for e in fired[0].events] == [
        "covergate.guard.fired", "covergate.practitioner.suspended"]  # fmt: skip
    # The events' own attributes (Event field 3: a receiver drops anything else).
    event_attrs = [{kv.key: kv.value for kv in e.attributes} for e in fired[0].events]
    assert event_attrs[0]["covergate.practitioner.suspended"].bool_value is True
    assert event_attrs[1]["covergate.suspended_by"].string_value == "harvest guard"
    a = attributes(fired[0])
    assert a["covergate.guard.fired"] is True and a["covergate.decision"] == "NO_MATCH"
    # The lookup that tipped the guard was answered; what came after was refused.
    lookups = _lookups(receiver)
    assert fired[0].span_id == lookups[-4].span_id
    after = [attributes(s) for s in lookups[-3:]]
    assert [x["rpc.method"] for x in after] == [
        "CheckCoverage", "CheckCoverageBatch", "CheckCoverageStream"]  # fmt: skip
    for x in after:
        assert x["covergate.refusal"] == "PRACTITIONER_SUSPENDED"
        assert x["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert x["covergate.practitioner.id"] == PHARMACIST_ID
        assert x["covergate.practitioner.profession"] == "pharmacist"


def _refused(receiver: OtlpReceiver) -> list[Any]:
    return [
        s
        for s in receiver.spans()
        if attributes(s).get("covergate.refusal") == "PRACTITIONER_SUSPENDED"
        and "rpc.method" in attributes(s)
    ]


def _suspensions(receiver: OtlpReceiver) -> int:
    best = 0
    for export in receiver.metric_exports():
        for rm in export.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == "covergate.suspensions":
                        best = max(best, *(int(p.as_int) for p in m.sum.data_points))
    return best


def test_a_receiver_that_is_down_never_blocks_lookups_nor_loses_them(
    dataset: Dataset, tmp_path: Path
) -> None:
    with OtlpReceiver() as dead:
        endpoint = dead.endpoint
    ds = dataset
    metadata = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "200"}  # fmt: skip
    with RunningServer(ds.data_dir, env=env) as server, server.channel() as channel:
        stub = pb_grpc.CoverageServiceStub(channel)
        for _ in range(20):
            assert stub.CheckCoverage(_request(ds.covered, member_number=ds.member_number),
                                      metadata=metadata, timeout=5).decision  # fmt: skip
        time.sleep(0.5)
        assert server.stop() == 0
    log = server.log()
    assert "dropped" not in log
    assert "stay in the spool for the next start" in log


def test_console_exporter_prints_spans_without_personal_data(dataset: Dataset) -> None:
    ds = dataset
    metadata = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)
    env = {"COVERGATE_TRACE_CONSOLE": "1", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    with RunningServer(ds.data_dir, env=env) as server, server.channel() as channel:
        pb_grpc.CoverageServiceStub(channel).CheckCoverage(_request(ds.covered), metadata=metadata)
        server.stop()
    log = server.log()
    assert '"covergate.decision"' in log and ds.covered.nir not in log


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE_HEX}-{PARENT_HEX}-01", (bytes.fromhex(TRACE_HEX), bytes.fromhex(PARENT_HEX))),
        (f"00-{TRACE_HEX}-{PARENT_HEX}-00", (bytes.fromhex(TRACE_HEX), bytes.fromhex(PARENT_HEX))),
        (
            f"01-{TRACE_HEX}-{PARENT_HEX}-01-extra",
            (bytes.fromhex(TRACE_HEX), bytes.fromhex(PARENT_HEX)),
        ),
        (f"00-{'0' * 32}-{PARENT_HEX}-01", None),
        (f"00-{TRACE_HEX}-{'0' * 16}-01", None),
        (f"ff-{TRACE_HEX}-{PARENT_HEX}-01", None),
        (f"00-{TRACE_HEX.upper()}-{PARENT_HEX}-01", None),
        (f"00-{TRACE_HEX}-{PARENT_HEX}-01-extra", None),
        ("garbage", None),
        ("", None),
    ],
)
def test_traceparent_parsing(header: str, expected: Any) -> None:
    assert parse_traceparent(header) == expected
