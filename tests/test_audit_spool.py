"""Every lookup leaves its record, even when the tracing backend lags or is down: the audit spool
(service.spool) and the shipper (service.shipper), with real servers, real worker crashes and a real
OTLP receiver started and stopped by the test.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import (
    CLAIMS_ID,
    HOSPITAL_ID,
    PHARMACIST_ID,
    PHARMACY_AMC,
    Dataset,
    PractitionerRow,
    RunningServer,
    build_dataset,
    cli,
    create_token,
    error_reason,
    write_practitioners_csv,
)
from spans import attributes

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc
from service import spool as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.slow  # real servers on loopback: `make test-fast` skips them

WORKER_DIR_PREFIX = "w-"


def _free_port() -> int:
    """A port no receiver listens on yet (one is started there later)."""
    with OtlpReceiver() as probe:
        return probe.port


def _env(port: int, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "300",
        "OTEL_METRIC_EXPORT_INTERVAL": "600000",
        **extra,
    }


def _wait(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def _request(ds: Dataset, who: Any = None, domain: int = pb.CARE_DOMAIN_PHARMACY) -> Any:
    who = who or ds.covered
    return pb.CheckCoverageRequest(**who.fields(), amc_number=PHARMACY_AMC, domain=domain)


def lookup_spans_by_practitioner(receiver: OtlpReceiver) -> Counter[str]:
    """Distinct lookup spans (a decision or a refusal) per practitioner. A span may arrive twice
    (a crash between a send and its acknowledgement), only ever with the same id and bytes."""
    seen: dict[bytes, bytes] = {}
    counts: Counter[str] = Counter()
    for span in receiver.spans():
        a = attributes(span)
        if "covergate.decision" not in a and "covergate.refusal" not in a:
            continue
        raw = span.SerializeToString()
        if span.span_id in seen:
            assert seen[span.span_id] == raw, "two different spans with one id"
            continue
        seen[span.span_id] = raw
        counts[a["covergate.practitioner.id"]] += 1
    return counts


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    ds = build_dataset(tmp_path, extra_beneficiaries=40)
    for pid in (PHARMACIST_ID, HOSPITAL_ID):
        cli("practitioner", "quota", pid, "--set", "rate_per_minute=100000",
            "--set", "burst=100000", data_dir=ds.data_dir)  # fmt: skip
    return ds


def _lookups(ds: Dataset, server: RunningServer) -> Counter[str]:
    """Unary, batch and stream lookups (decisions and per-item refusals) by two practitioners;
    what each was answered."""
    answered: Counter[str] = Counter()
    people = [r.identity for r in ds.rights if r.amc_number == PHARMACY_AMC][:10]
    with server.channel() as channel:
        stub = pb_grpc.CoverageServiceStub(channel)
        for pid, role in ((PHARMACIST_ID, "pharmacist"), (HOSPITAL_ID, "hospital")):
            metadata = (("authorization", f"Bearer {ds.tokens[role]}"),)
            for who in people:
                stub.CheckCoverage(_request(ds, who), metadata=metadata, timeout=10)
                answered[pid] += 1
            items = [_request(ds, who) for who in people] + [
                _request(ds, domain=pb.CARE_DOMAIN_OPTICAL)  # refused in the batch, still a lookup
            ]
            out = stub.CheckCoverageBatch(
                pb.CheckCoverageBatchRequest(items=items), metadata=metadata, timeout=10
            )
            answered[pid] += len(out.items)
            replies = list(stub.CheckCoverageStream(iter(items), metadata=metadata, timeout=10))
            answered[pid] += len(replies)
    return answered


def test_every_answered_lookup_reaches_the_receiver_after_a_crash_and_a_restart(
    dataset: Dataset,
) -> None:
    """The receiver is down; lookups are answered (their spans wait in the spool); a worker is
    killed with SIGKILL; the server is restarted; only then does the receiver come up. Every
    lookup answered arrives, counted per practitioner, and the dead workers' directories go."""
    ds = dataset
    port = _free_port()
    spool_root = ds.data_dir / "spool"
    with RunningServer(ds.data_dir, workers=2, env=_env(port)) as server:
        answered = _lookups(ds, server)
        # The worker that served them (one channel: one connection, one worker) dies holding
        # its unsent spans.
        before = sp.writer_dirs(spool_root)
        victim = max(before, key=sp.pending_bytes)
        assert sp.pending_bytes(victim) > 0
        os.kill(int(victim.name.split("-")[1]), signal.SIGKILL)
        _wait(lambda: "restarting it" in server.log(), what="the worker restarted")
        _wait(lambda: len(set(sp.writer_dirs(spool_root)) - set(before)) == 1, what="its spool")
        server.wait_health(1)  # SERVING
        more = _lookups(ds, server)
        server.stop()
    assert "dropped" not in server.log()
    pending = sp.spool_pending_bytes(spool_root)
    assert pending > 0

    with (
        RunningServer(ds.data_dir, workers=2, env=_env(port)),
        OtlpReceiver(port) as receiver,
    ):
        expected = answered + more
        _wait(lambda: lookup_spans_by_practitioner(receiver) == expected, what="every span")
        _wait(lambda: len(sp.writer_dirs(spool_root)) == 2, what="dead dirs removed")
        assert sp.spool_pending_bytes(spool_root) == 0
    assert expected[PHARMACIST_ID] == expected[HOSPITAL_ID] == 2 * (10 + 11 + 11)


def test_a_full_spool_refuses_with_audit_backlog_then_recovers(
    dataset: Dataset, tmp_path: Path
) -> None:
    ds = dataset
    config = tmp_path / "tiny-spool.toml"
    config.write_text("[telemetry]\nspool_max_bytes = 8192\nspool_segment_bytes = 4096\n")
    port = _free_port()
    metadata = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)
    with (
        RunningServer(ds.data_dir, args=["--config", str(config)], env=_env(port)) as server,
        server.channel() as channel,
    ):
        if True:
            stub = pb_grpc.CoverageServiceStub(channel)
            answered = 0
            for _ in range(500):
                try:
                    stub.CheckCoverage(_request(ds), metadata=metadata, timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    assert error_reason(exc) == "AUDIT_BACKLOG"
                    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
                    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
                    break
                answered += 1
            else:
                raise AssertionError("a full spool never refused")
            assert answered > 0
            # A stream and a batch are refused the same way.
            with pytest.raises(grpc.RpcError) as raised:
                stub.CheckCoverageBatch(
                    pb.CheckCoverageBatchRequest(items=[_request(ds)]), metadata=metadata
                )
            assert error_reason(raised.value) == "AUDIT_BACKLOG"
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.CheckCoverageStream(iter([_request(ds)]), metadata=metadata))
            assert error_reason(raised.value) == "AUDIT_BACKLOG"

            with OtlpReceiver(port) as receiver:
                # The shipper drains the spool, and lookups are answered again.
                def served() -> bool:
                    try:
                        stub.CheckCoverage(_request(ds), metadata=metadata, timeout=10)
                    except grpc.RpcError:
                        return False
                    return True

                _wait(served, what="the spool to drain")
                _wait(lambda: lookup_spans_by_practitioner(receiver)[PHARMACIST_ID] == answered + 1,
                      what="every answered lookup's span")  # fmt: skip
    assert "AUDIT" not in server.log() or "Traceback" not in server.log()


def test_when_full_drop_keeps_answering_and_records_the_gap(
    dataset: Dataset, tmp_path: Path
) -> None:
    ds = dataset
    config = tmp_path / "drop.toml"
    config.write_text(
        '[telemetry]\nspool_max_bytes = 8192\nspool_segment_bytes = 4096\nwhen_full = "drop"\n'
    )
    port = _free_port()
    metadata = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)
    with RunningServer(ds.data_dir, args=["--config", str(config)], env=_env(port)) as server:
        assert "when_full" in server.log() and "DROP" in server.log()
        with server.channel() as channel:
            stub = pb_grpc.CoverageServiceStub(channel)
            for _ in range(300):
                stub.CheckCoverage(_request(ds), metadata=metadata, timeout=10)
            _wait(lambda: "spans are being DROPPED" in server.log(), what="the drop warning")
            with OtlpReceiver(port) as receiver:

                def gap() -> bool:
                    stub.CheckCoverage(_request(ds), metadata=metadata, timeout=10)
                    return any(s.name == "covergate.audit.gap" for s in receiver.spans())

                _wait(gap, what="the gap span")
                (span,) = [s for s in receiver.spans() if s.name == "covergate.audit.gap"]
                assert attributes(span)["covergate.audit.dropped_spans"] > 0
                assert [e.name for e in span.events] == ["covergate.spans_dropped"]


def test_every_authenticated_attempt_leaves_a_record(dataset: Dataset, tmp_path: Path) -> None:
    """Refusals decided before any gate (a claims credential on a practitioner method, data not
    loaded) and whole-message refusals are traced, with their reason, as the caller's."""
    ds = dataset
    with OtlpReceiver() as receiver:
        env = _env(receiver.port)
        with RunningServer(ds.data_dir, env=env) as server, server.channel() as channel:
            stub = pb_grpc.CoverageServiceStub(channel)
            claims = (("authorization", f"Bearer {ds.tokens['claims']}"),)
            with pytest.raises(grpc.RpcError) as raised:
                stub.CheckCoverage(_request(ds), metadata=claims)
            assert error_reason(raised.value) == "ROLE_NOT_ALLOWED"
            pharmacist = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)
            raw = channel.unary_unary("/covergate.v1.CoverageService/CheckCoverageBatch")
            for message in (b"\xff\xff", b"\x0a\x00" * 501):
                with pytest.raises(grpc.RpcError) as raised:
                    raw(message, metadata=pharmacist)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            def refusals() -> Counter[tuple[str, str]]:
                return Counter(
                    (attributes(s)["covergate.practitioner.id"], attributes(s)["covergate.refusal"])
                    for s in receiver.spans()
                    if "covergate.refusal" in attributes(s)
                )

            _wait(lambda: refusals()[(CLAIMS_ID, "ROLE_NOT_ALLOWED")] == 1, what="role")
            _wait(lambda: refusals()[(PHARMACIST_ID, "INVALID_ARGUMENT")] == 2, what="malformed")

        # A data dir with practitioners and tokens but no rights yet: UNAVAILABLE, traced.
        empty = tmp_path / "empty"
        write_practitioners_csv(
            tmp_path / "p.csv", [PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC,))]
        )
        cli("import", "practitioners", str(tmp_path / "p.csv"), data_dir=empty)
        token = create_token(empty, PHARMACIST_ID)
        with RunningServer(empty, env=env, wait_serving=False) as server:
            server.wait_health(2)  # NOT_SERVING
            with server.channel() as channel, pytest.raises(grpc.RpcError) as raised:
                pb_grpc.CoverageServiceStub(channel).CheckCoverage(
                    _request(ds), metadata=(("authorization", f"Bearer {token}"),)
                )
            assert error_reason(raised.value) == "DATA_NOT_LOADED"
            _wait(lambda: refusals()[(PHARMACIST_ID, "DATA_NOT_LOADED")] == 1, what="not loaded")


def test_nothing_personal_in_the_spool_files(dataset: Dataset) -> None:
    """The spool holds what is exported, no more: the same scan as the exported bytes."""
    ds = dataset
    port = _free_port()
    with RunningServer(ds.data_dir, env=_env(port)) as server:
        _lookups(ds, server)
    files = [p for p in (ds.data_dir / "spool").rglob("*") if p.is_file()]
    raw = b"".join(p.read_bytes() for p in files)
    assert any(p.suffix == ".seg" for p in files) and len(raw) > 10_000
    for right in ds.rights:
        i = right.identity
        for value in (i.nir, i.birth_date, right.member_number):
            if value:
                assert value.encode() not in raw
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in files)
