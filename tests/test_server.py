"""Integration tests of the gRPC server: a real `covergate serve` on a loopback port, a real LMDB
data dir built through the CLI, real bearer tokens; nothing mocked.

One server serves most of this module (started once); the data-not-loaded and short-TTL cases start
their own. Tests that change a practitioner (revoke, suspend) or that send garbage (which a harvest
guard may punish) use practitioners of their own, so they cannot disturb the others.
"""

from __future__ import annotations

import base64
import logging
import queue
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import unknown_fields
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from harness import (
    CLAIMS_ID,
    HOSPITAL_ID,
    OTHER_AMC,
    PHARMACIST_ID,
    PHARMACY_AMC,
    Dataset,
    Identity,
    PractitionerRow,
    Right,
    RunningServer,
    build_dataset,
    cli,
    create_token,
    write_practitioners_csv,
    write_rights_csv,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc
from fastpath import rules

pytestmark = pytest.mark.slow  # real servers on loopback: `make test-fast` skips them

COVERAGE = "/covergate.v1.CoverageService/"
PATH_CHECK = COVERAGE + "CheckCoverage"
PATH_BATCH = COVERAGE + "CheckCoverageBatch"
PATH_STREAM = COVERAGE + "CheckCoverageStream"
PATH_VERIFY = "/covergate.v1.AttestationService/VerifyAttestation"

PHAR = pb.CARE_DOMAIN_PHARMACY
MEDE = pb.CARE_DOMAIN_MEDICAL
CARE_DATE = "20250310"  # inside every open right of the dataset, after the expired one ended

# Practitioners of their own for tests that revoke, suspend or send garbage.
FUZZ_ID = "10000000011"
REVOKED_ID = "10000000022"
SUSPENDED_ID = "10000000033"
LEAK_ID = "10000000044"

# Codes a client can legitimately get for anything it sends (quota and the harvest guard may
# refuse a credential that sends garbage); never INTERNAL, UNKNOWN or the like.
CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
COVERED_FIELDS = {
    "request_id",
    "decision",
    "rate_percent",
    "convention_type",
    "rights_end_date",
    "attestation",
}


# -- fixtures --


Server = RunningServer


@dataclass
class World:
    ds: Dataset
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)
    channel: grpc.Channel | None = None

    @property
    def ch(self) -> grpc.Channel:
        assert self.channel is not None
        return self.channel

    def md(self, who: str = "pharmacist") -> tuple[tuple[str, str], ...]:
        return bearer(self.tokens[who])

    def coverage(self) -> pb_grpc.CoverageServiceStub:
        return pb_grpc.CoverageServiceStub(self.ch)

    def attestation(self) -> pb_grpc.AttestationServiceStub:
        return pb_grpc.AttestationServiceStub(self.ch)


# Quotas and the harvest guard would refuse this module's hundreds of calls (and rightly suspend
# the credential that sends garbage): every rule runs in shadow mode here, which still evaluates it.
QUOTA_SHADOW = '[quota]\nshadow = ["rate", "daily", "distinct", "guard"]\n'


def write_config(path: Path, text: str = "") -> Path:
    path.write_text(QUOTA_SHADOW + text)
    return path


def add_practitioners(tmp: Path, data_dir: Path, rows: list[PractitionerRow]) -> None:
    path = write_practitioners_csv(tmp / "more-practitioners.csv", rows)
    cli("import", "practitioners", str(path), "--merge", data_dir=data_dir)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("server")
    ds = build_dataset(tmp)
    both = (PHARMACY_AMC, OTHER_AMC)
    add_practitioners(
        tmp,
        ds.data_dir,
        [
            PractitionerRow(pid, "pharmacist", both)
            for pid in (FUZZ_ID, REVOKED_ID, SUSPENDED_ID, LEAK_ID)
        ],
    )
    tokens = dict(ds.tokens)
    for name, pid in (
        ("fuzz", FUZZ_ID),
        ("revoked", REVOKED_ID),
        ("suspended", SUSPENDED_ID),
        ("leak", LEAK_ID),
    ):
        tokens[name] = create_token(ds.data_dir, pid)
    # DEBUG makes the no-personal-data-in-logs test stricter: every logger speaks. The store is
    # prefaulted at start here (store.prefault), and not in the other servers' tests.
    config = write_config(tmp / "covergate.toml", "[store]\nprefault = true\n")
    server = Server(
        ds.data_dir, args=["--config", str(config)], env={"COVERGATE_LOG_LEVEL": "DEBUG"}
    )
    w = World(ds, server, tokens, grpc.insecure_channel(server.target))
    try:
        yield w
    finally:
        w.ch.close()
        server.stop()


# -- helpers --


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def check_request(
    identity: Identity,
    *,
    amc: str = PHARMACY_AMC,
    domain: int = PHAR,
    request_id: str = "r1",
    member_number: str = "",
    care_date: str = CARE_DATE,
) -> pb.CheckCoverageRequest:
    return pb.CheckCoverageRequest(
        request_id=request_id,
        nir=identity.nir,
        nir_key=identity.nir_key,
        birth_date=identity.birth_date,
        birth_rank=identity.birth_rank,
        amc_number=amc,
        member_number=member_number,
        domain=domain,  # type: ignore[arg-type]
        care_date=care_date,
    )


def identity_with_nir(nir: str, birth_date: str, rank: int = 1) -> Identity:
    return Identity(nir, f"{rules.nir_key_for(nir):02d}", birth_date, rank)


def other_nir(nir: str) -> str:
    """Another valid NIR: the same person's NIR with a different serial number."""
    order = (int(nir[10:13]) % 998) + 1
    return nir[:10] + f"{order:03d}"


UNKNOWN = identity_with_nir("1770599123417", "19770513")  # in no dataset of this module


def unpack_details(status: status_pb2.Status) -> dict[str, Any]:
    """google.rpc details by short type name."""
    out: dict[str, Any] = {}
    for detail in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
                break
        else:
            raise AssertionError(f"unexpected detail type {detail.type_url}")
    return out


@dataclass
class Refused:
    code: grpc.StatusCode
    message: str
    status: status_pb2.Status
    details_bin: bytes
    details: dict[str, Any]

    @property
    def reason(self) -> str:
        info = self.details.get("ErrorInfo")
        return info.reason if info else ""

    @property
    def fields(self) -> list[str]:
        bad = self.details.get("BadRequest")
        return [v.field for v in bad.field_violations] if bad else []


def refused(exc: grpc.RpcError) -> Refused:
    """The google.rpc status of a refused call; it must be there and agree with the call."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, f"{exc.code()} without grpc-status-details-bin: {exc.details()}"  # type: ignore[attr-defined]
    assert status.code == exc.code().value[0]  # type: ignore[attr-defined]
    bins = [v for k, v in exc.trailing_metadata() or () if k == "grpc-status-details-bin"]  # type: ignore[attr-defined]
    return Refused(exc.code(), exc.details(), status, bins[0], unpack_details(status))  # type: ignore[attr-defined]


def expect_refusal(call: Callable[[], Any], code: grpc.StatusCode) -> Refused:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):  # a stream: the refusal comes while reading
            list(result)
    assert info.value.code() == code, info.value.details()  # type: ignore[attr-defined]
    return refused(info.value)


def item_error(resp: pb.CheckCoverageResponse) -> Refused:
    assert resp.HasField("error")
    assert resp.decision == pb.DECISION_UNSPECIFIED
    code = next(c for c in grpc.StatusCode if c.value[0] == resp.error.code)
    return Refused(
        code,
        resp.error.message,
        resp.error,
        resp.error.SerializeToString(),
        unpack_details(resp.error),
    )


def raw_unary(ch: grpc.Channel, path: str) -> grpc.UnaryUnaryMultiCallable:
    return ch.unary_unary(path, request_serializer=None, response_deserializer=None)


def raw_stream(ch: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    return ch.stream_stream(PATH_STREAM, request_serializer=None, response_deserializer=None)


def assert_still_serving(w: World) -> None:
    """A correct answer through a clean credential, and no worker died or logged a crash."""
    resp = w.coverage().CheckCoverage(
        check_request(w.ds.covered, request_id="after"), metadata=w.md(), timeout=5
    )
    assert (resp.request_id, resp.decision, resp.rate_percent) == (
        "after",
        pb.DECISION_COVERED,
        100,
    )
    log = w.server.log()
    assert w.server.proc.poll() is None
    assert len(re.findall(r"worker \d+ listening", log)) == 1, log
    for bad in ("Traceback", "restarting", " ERROR ", " CRITICAL "):
        assert bad not in log, log


# -- 1. the contract --


def test_unary_decisions_for_the_dataset_identities(world: World) -> None:
    ds, stub, md = world.ds, world.coverage(), world.md()

    def check(identity: Identity, **kw: Any) -> pb.CheckCoverageResponse:
        return stub.CheckCoverage(check_request(identity, **kw), metadata=md, timeout=5)

    covered = check(ds.covered, request_id="cov-1")
    assert covered.request_id == "cov-1"
    assert covered.decision == pb.DECISION_COVERED
    assert (covered.rate_percent, covered.convention_type, covered.rights_end_date) == (
        100,
        "TP01",
        "20991231",
    )
    assert covered.attestation
    assert not covered.HasField("error")

    medical = stub.CheckCoverage(
        check_request(ds.covered, domain=MEDE), metadata=world.md("hospital"), timeout=5
    )
    assert (medical.decision, medical.rate_percent, medical.convention_type) == (
        pb.DECISION_COVERED,
        70,
        "TP02",
    )

    with_member = check(ds.covered, member_number=ds.member_number)
    assert with_member.decision == pb.DECISION_COVERED

    expired = check(ds.not_covered)
    assert expired == pb.CheckCoverageResponse(request_id="r1", decision=pb.DECISION_NOT_COVERED)
    before_start = check(ds.covered, care_date="20191231")
    assert before_start.decision == pb.DECISION_NOT_COVERED

    twin = check(ds.twin, amc=OTHER_AMC)
    assert (twin.decision, twin.rate_percent) == (pb.DECISION_COVERED, 65)
    # The twin has no right at the covered person's insurer, and vice versa.
    assert check(ds.twin).decision == pb.DECISION_NO_MATCH
    assert check(ds.covered, amc=OTHER_AMC).decision == pb.DECISION_NO_MATCH

    assert ds.corsican.nir[5:7] == "2A"
    corsican = check(ds.corsican)
    assert (corsican.decision, corsican.rate_percent, corsican.convention_type) == (
        pb.DECISION_COVERED,
        90,
        "CO2A",
    )
    lower = Identity(ds.corsican.nir.lower(), ds.corsican.nir_key, ds.corsican.birth_date, 1)
    assert check(lower).decision == pb.DECISION_COVERED

    assert ds.lunar.birth_date.endswith("0000")
    lunar = check(ds.lunar)
    assert (lunar.decision, lunar.convention_type) == (pb.DECISION_COVERED, "LUNA")

    assert check(UNKNOWN) == pb.CheckCoverageResponse(
        request_id="r1", decision=pb.DECISION_NO_MATCH
    )


def mixed_items(ds: Dataset) -> tuple[list[pb.CheckCoverageRequest], list[Any]]:
    bad = check_request(ds.covered, request_id="i2")
    bad.nir = "12345"
    items = [
        check_request(ds.covered, request_id="i0"),
        check_request(ds.not_covered, request_id="i1"),
        bad,
        check_request(ds.twin, amc=OTHER_AMC, request_id="i3"),
        check_request(ds.corsican, request_id="i4"),
        check_request(ds.lunar, request_id="i5"),
        check_request(UNKNOWN, request_id="i6"),
        check_request(ds.twin, request_id="i7"),
    ]
    expected = [
        pb.DECISION_COVERED,
        pb.DECISION_NOT_COVERED,
        pb.DECISION_UNSPECIFIED,
        pb.DECISION_COVERED,
        pb.DECISION_COVERED,
        pb.DECISION_COVERED,
        pb.DECISION_NO_MATCH,
        pb.DECISION_NO_MATCH,
    ]
    return items, expected


def assert_mixed_answers(responses: list[pb.CheckCoverageResponse], expected: list[Any]) -> None:
    assert [r.request_id for r in responses] == [f"i{i}" for i in range(len(expected))]
    assert [r.decision for r in responses] == expected
    for i, r in enumerate(responses):
        if i == 2:
            err = item_error(r)
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.fields == ["nir"]
            assert set(err.details) == {"BadRequest"}
        else:
            assert not r.HasField("error"), r
    assert responses[0].rate_percent == 100
    assert responses[3].rate_percent == 65
    assert responses[4].convention_type == "CO2A"
    assert responses[5].convention_type == "LUNA"


def test_batch_answers_in_order_with_per_item_errors(world: World) -> None:
    items, expected = mixed_items(world.ds)
    resp = world.coverage().CheckCoverageBatch(
        pb.CheckCoverageBatchRequest(items=items), metadata=world.md(), timeout=5
    )
    assert len(resp.items) == len(items)
    assert_mixed_answers(list(resp.items), expected)


def test_empty_batch_is_an_empty_answer(world: World) -> None:
    resp = world.coverage().CheckCoverageBatch(
        pb.CheckCoverageBatchRequest(), metadata=world.md(), timeout=5
    )
    assert list(resp.items) == []


def test_batch_item_with_an_invalid_request_id_does_not_echo_it(world: World) -> None:
    bad = check_request(world.ds.covered, request_id="Z" * 65)
    resp = world.coverage().CheckCoverageBatch(
        pb.CheckCoverageBatchRequest(items=[bad, check_request(world.ds.covered)]),
        metadata=world.md(),
        timeout=5,
    )
    assert resp.items[0].request_id == ""
    assert item_error(resp.items[0]).fields == ["request_id"]
    assert (resp.items[1].request_id, resp.items[1].decision) == ("r1", pb.DECISION_COVERED)


def test_stream_answers_one_response_per_request_in_order(world: World) -> None:
    items, expected = mixed_items(world.ds)
    responses = list(
        world.coverage().CheckCoverageStream(iter(items), metadata=world.md(), timeout=10)
    )
    assert_mixed_answers(responses, expected)
    assert (
        list(world.coverage().CheckCoverageStream(iter([]), metadata=world.md(), timeout=5)) == []
    )


def test_a_long_stream_stays_in_order(world: World) -> None:
    ds = world.ds
    people = [ds.covered, ds.not_covered, UNKNOWN]
    decisions = [pb.DECISION_COVERED, pb.DECISION_NOT_COVERED, pb.DECISION_NO_MATCH]
    requests = (check_request(people[i % 3], request_id=f"L{i}") for i in range(2000))
    responses = list(
        world.coverage().CheckCoverageStream(requests, metadata=world.md(), timeout=60)
    )
    assert [r.request_id for r in responses] == [f"L{i}" for i in range(2000)]
    assert [r.decision for r in responses] == [decisions[i % 3] for i in range(2000)]


def test_stream_answers_each_message_before_the_next_is_sent(world: World) -> None:
    """A client that waits for each answer before sending the next one is not deadlocked."""
    outbox: queue.Queue[pb.CheckCoverageRequest | None] = queue.Queue()

    def requests() -> Iterator[pb.CheckCoverageRequest]:
        while (item := outbox.get(timeout=10)) is not None:
            yield item

    call = world.coverage().CheckCoverageStream(requests(), metadata=world.md(), timeout=20)
    for i in range(20):
        identity = world.ds.covered if i % 2 else world.ds.not_covered
        outbox.put(check_request(identity, request_id=f"s{i}"))
        resp = next(call)
        assert resp.request_id == f"s{i}"
        assert resp.decision == (pb.DECISION_COVERED if i % 2 else pb.DECISION_NOT_COVERED)
    outbox.put(None)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK


def test_verify_attestation_through_the_stub(world: World) -> None:
    ds = world.ds
    covered = world.coverage().CheckCoverage(
        check_request(ds.covered), metadata=world.md(), timeout=5
    )
    resp = world.attestation().VerifyAttestation(
        verify_request(covered.attestation, PHARMACIST_ID, ds.covered),
        metadata=world.md("claims"),
        timeout=5,
    )
    assert resp.valid


# -- 2. the error table --


def all_methods(w: World, md: Any) -> dict[str, Callable[[], Any]]:
    ds = w.ds
    req = check_request(ds.covered)
    return {
        "CheckCoverage": lambda: w.coverage().CheckCoverage(req, metadata=md, timeout=5),
        "CheckCoverageBatch": lambda: w.coverage().CheckCoverageBatch(
            pb.CheckCoverageBatchRequest(items=[req]), metadata=md, timeout=5
        ),
        "CheckCoverageStream": lambda: w.coverage().CheckCoverageStream(
            iter([req]), metadata=md, timeout=5
        ),
        "VerifyAttestation": lambda: w.attestation().VerifyAttestation(
            verify_request("AAAA", PHARMACIST_ID, ds.covered), metadata=md, timeout=5
        ),
    }


def test_no_credential_is_unauthenticated_with_error_info(world: World) -> None:
    for name, call in all_methods(world, ()).items():
        r = expect_refusal(call, grpc.StatusCode.UNAUTHENTICATED)
        assert set(r.details) == {"ErrorInfo"}, name
        assert r.reason == "CREDENTIAL_MISSING", name
        assert r.details["ErrorInfo"].domain == "covergate.v1"


def tampered_secret(token: str) -> str:
    head, _, secret = token.rpartition(".")
    return f"{head}.{('A' if secret[0] != 'A' else 'B')}{secret[1:]}"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer cg1.0123456789abcdef.unknownsecretunknownsecretunknownsecret12",
        "Bearer garbage",
        "Bearer cg1.onlyanid",
        "Bearer cg1..secret",
        "Bearer cg2.0123456789abcdef.secret",
        "Bearer " + "cg1." + "a" * 300 + ".secret",
        "Bearer cg1.\u00e9\u00e9.secret".encode("ascii", "replace").decode(),
        "Basic dXNlcjpwYXNz",
        "cg1.0123456789abcdef.secret",
        "Bearer",
        "<tampered>",
    ],
)
def test_unknown_or_malformed_credential_is_unauthenticated(
    world: World, authorization: str
) -> None:
    if authorization == "<tampered>":  # a real token id with a wrong secret
        authorization = "Bearer " + tampered_secret(world.tokens["pharmacist"])
    md = (("authorization", authorization),)
    for name, call in all_methods(world, md).items():
        r = expect_refusal(call, grpc.StatusCode.UNAUTHENTICATED)
        assert "ErrorInfo" in r.details, name
        assert r.reason in ("CREDENTIAL_INVALID", "CREDENTIAL_MISSING"), name


def test_revoked_credential_is_refused_on_the_next_call_without_restart(world: World) -> None:
    stub, md = world.coverage(), world.md("revoked")
    assert stub.CheckCoverage(check_request(world.ds.covered), metadata=md, timeout=5).decision == (
        pb.DECISION_COVERED
    )
    cli("token", "revoke", REVOKED_ID, data_dir=world.ds.data_dir)
    for call in all_methods(world, md).values():
        r = expect_refusal(call, grpc.StatusCode.UNAUTHENTICATED)
        assert r.reason == "CREDENTIAL_INVALID"
    # A new token for the same practitioner works at once, with the same server.
    fresh = create_token(world.ds.data_dir, REVOKED_ID)
    resp = stub.CheckCoverage(check_request(world.ds.covered), metadata=bearer(fresh), timeout=5)
    assert resp.decision == pb.DECISION_COVERED
    expect_refusal(
        lambda: stub.CheckCoverage(check_request(world.ds.covered), metadata=md, timeout=5),
        grpc.StatusCode.UNAUTHENTICATED,
    )


def test_wrong_role_is_permission_denied(world: World) -> None:
    for name, call in all_methods(world, world.md("claims")).items():
        if name == "VerifyAttestation":
            continue
        r = expect_refusal(call, grpc.StatusCode.PERMISSION_DENIED)
        assert r.reason == "ROLE_NOT_ALLOWED", name
        assert set(r.details) == {"ErrorInfo"}
    r = expect_refusal(
        all_methods(world, world.md("pharmacist"))["VerifyAttestation"],
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert r.reason == "ROLE_NOT_ALLOWED"


def test_suspended_practitioner_is_refused_then_reinstated(world: World) -> None:
    stub, md = world.coverage(), world.md("suspended")
    req = check_request(world.ds.covered)
    assert stub.CheckCoverage(req, metadata=md, timeout=5).decision == pb.DECISION_COVERED
    cli("practitioner", "suspend", SUSPENDED_ID, data_dir=world.ds.data_dir)
    try:
        r = expect_refusal(
            lambda: stub.CheckCoverage(req, metadata=md, timeout=5),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert r.reason == "PRACTITIONER_SUSPENDED"
        # A batch or a stream is refused as a whole, or item by item with the same error.
        batch = pb.CheckCoverageBatchRequest(items=[req, req])
        try:
            items = list(stub.CheckCoverageBatch(batch, metadata=md, timeout=5).items)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
            assert refused(exc).reason == "PRACTITIONER_SUSPENDED"
        else:
            assert [item_error(i).reason for i in items] == ["PRACTITIONER_SUSPENDED"] * 2
        try:
            items = list(stub.CheckCoverageStream(iter([req, req]), metadata=md, timeout=5))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
            assert refused(exc).reason == "PRACTITIONER_SUSPENDED"
        else:
            assert [item_error(i).reason for i in items] == ["PRACTITIONER_SUSPENDED"] * 2
    finally:
        cli("practitioner", "reinstate", SUSPENDED_ID, data_dir=world.ds.data_dir)
    assert stub.CheckCoverage(req, metadata=md, timeout=5).decision == pb.DECISION_COVERED


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("request_id", {"request_id": "x" * 65}),
    ("request_id", {"request_id": "tab\there"}),
    ("request_id", {"request_id": "caf\u00e9"}),
    ("nir", {"nir": "123"}),
    ("nir", {"nir": "9850775123456"}),
    ("nir", {"nir": "18507\u0661\u0662123456"}),  # Arabic-Indic digits are not ASCII digits
    ("nir_key", {"nir_key": "00"}),
    ("nir_key", {"nir_key": "7"}),
    ("nir_key", {"nir_key": "ab"}),
    ("birth_date", {"birth_date": "19850230"}),
    ("birth_date", {"birth_date": "18491231"}),
    ("birth_date", {"birth_date": "1985-07-01"}),
    ("birth_rank", {"birth_rank": 0}),
    ("birth_rank", {"birth_rank": 10}),
    ("amc_number", {"amc_number": ""}),
    ("amc_number", {"amc_number": "12345678901"}),
    ("amc_number", {"amc_number": "12a"}),
    ("member_number", {"member_number": "M-1"}),
    ("member_number", {"member_number": "M" * 21}),
    ("domain", {"domain": 0}),
    ("domain", {"domain": 11}),
    ("care_date", {"care_date": "20250229"}),
    ("care_date", {"care_date": "21000000"}),
    ("care_date", {"care_date": "18991231"}),
]


@pytest.mark.parametrize(("field_name", "change"), BAD_FIELDS)
def test_malformed_field_is_invalid_argument_naming_the_field(
    world: World, field_name: str, change: dict[str, Any]
) -> None:
    req = check_request(world.ds.covered)
    for name, value in change.items():
        setattr(req, name, value)
    r = expect_refusal(
        lambda: world.coverage().CheckCoverage(req, metadata=world.md(), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert r.fields == [field_name]
    assert set(r.details) == {"BadRequest"}
    assert all(v.description for v in r.details["BadRequest"].field_violations)


def test_every_malformed_field_is_reported_at_once(world: World) -> None:
    req = pb.CheckCoverageRequest(
        request_id="x" * 65,
        nir="1",
        nir_key="1",
        birth_date="1",
        birth_rank=0,
        amc_number="",
        member_number="-",
        domain=0,  # type: ignore[arg-type]
        care_date="1",
    )
    r = expect_refusal(
        lambda: world.coverage().CheckCoverage(req, metadata=world.md(), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert r.fields == list(rules.FIELD_NAMES.values())
    empty = expect_refusal(
        lambda: world.coverage().CheckCoverage(
            pb.CheckCoverageRequest(), metadata=world.md(), timeout=5
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert empty.fields == ["nir", "nir_key", "birth_date", "birth_rank", "amc_number", "domain"]


def test_malformed_verify_fields_are_invalid_argument(world: World) -> None:
    ds = world.ds
    good = verify_request("AAAA", PHARMACIST_ID, ds.covered)
    cases: dict[str, dict[str, Any]] = {
        "attestation": {"attestation": ""},
        "practitioner_id": {"practitioner_id": "12ab"},
        "nir": {"nir": "x"},
        "nir_key": {"nir_key": "00"},
        "birth_date": {"birth_date": "19851340"},
        "birth_rank": {"birth_rank": 12},
    }
    for field_name, change in cases.items():
        req = pb.VerifyAttestationRequest()
        req.CopyFrom(good)
        for name, value in change.items():
            setattr(req, name, value)
        r = expect_refusal(
            lambda req=req: world.attestation().VerifyAttestation(  # type: ignore[misc]
                req, metadata=world.md("claims"), timeout=5
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert r.fields == [field_name]


def test_batch_over_the_limit_is_invalid_argument_on_items(world: World) -> None:
    req = check_request(world.ds.covered)
    stub = world.coverage()
    full = stub.CheckCoverageBatch(
        pb.CheckCoverageBatchRequest(items=[req] * 500), metadata=world.md(), timeout=30
    )
    assert len(full.items) == 500
    assert {i.decision for i in full.items} == {pb.DECISION_COVERED}
    r = expect_refusal(
        lambda: stub.CheckCoverageBatch(
            pb.CheckCoverageBatchRequest(items=[req] * 501), metadata=world.md(), timeout=30
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert r.fields == ["items"]
    assert set(r.details) == {"BadRequest"}


def test_data_not_loaded_is_unavailable_until_an_import(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    practitioners = write_practitioners_csv(
        tmp_path / "p.csv", [PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC,))]
    )
    cli("import", "practitioners", str(practitioners), data_dir=data_dir)
    token = create_token(data_dir, PHARMACIST_ID)
    claims = create_token(data_dir, CLAIMS_ID, "claims")
    person = identity_with_nir("2880631555123", "19880610")
    with (
        Server(data_dir, wait_serving=False) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        for service in ("", "covergate.v1.CoverageService", "covergate.v1.AttestationService"):
            assert server.health(service) == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = pb_grpc.CoverageServiceStub(ch)
        req = check_request(person)
        calls = {
            "unary": lambda: stub.CheckCoverage(req, metadata=bearer(token), timeout=5),
            "batch": lambda: stub.CheckCoverageBatch(
                pb.CheckCoverageBatchRequest(items=[req]), metadata=bearer(token), timeout=5
            ),
            "stream": lambda: stub.CheckCoverageStream(
                iter([req]), metadata=bearer(token), timeout=5
            ),
            "verify": lambda: pb_grpc.AttestationServiceStub(ch).VerifyAttestation(
                verify_request("AAAA", PHARMACIST_ID, person),
                metadata=bearer(claims),
                timeout=5,
            ),
        }
        for name, call in calls.items():
            r = expect_refusal(call, grpc.StatusCode.UNAVAILABLE)
            assert r.reason == "DATA_NOT_LOADED", name

        rights = write_rights_csv(tmp_path / "r.csv", [Right(person, PHARMACY_AMC, "PHAR")])
        cli("import", "rights", str(rights), data_dir=data_dir)
        server.wait_health(health_pb2.HealthCheckResponse.SERVING)
        assert (
            server.health("covergate.v1.CoverageService") == health_pb2.HealthCheckResponse.SERVING
        )
        resp = stub.CheckCoverage(req, metadata=bearer(token), timeout=5)
        assert resp.decision == pb.DECISION_COVERED
        assert "worker 0 listening" in server.log()


# -- 3. nothing a client sends is an internal error --


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    return varint(field_number << 3 | wire_type)


def ld(field_number: int, payload: bytes) -> bytes:
    return tag(field_number, 2) + varint(len(payload)) + payload


def vint(field_number: int, value: int) -> bytes:
    return tag(field_number, 0) + varint(value)


def hostile_messages(valid: bytes) -> list[bytes]:
    """Truncations, garbage, huge values, wrong wire types and non-UTF-8 strings."""
    out = [valid[:n] for n in range(len(valid))]  # every truncation, the empty message included
    out += [
        b"\x00",
        b"\xff" * 16,
        b"\x80" * 11 + b"\x01",  # an over-long varint tag
        vint(5, (1 << 64) - 1),  # birth_rank: 64-bit value in a uint32
        vint(5, (1 << 32) - 1),
        vint(8, (1 << 64) - 1),  # domain -1 as a 10-byte varint
        vint(8, (1 << 31) - 1),
        vint(8, 1 << 31),
        ld(2, b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5\xf4\xf3"),  # non-UTF-8 NIR
        ld(1, b"\xc0\xaf"),  # over-long UTF-8 in request_id
        ld(1, b"\xed\xa0\x80"),  # a UTF-8-encoded surrogate
        ld(6, "\u0661\u0662\u0663".encode()),  # non-ASCII digits as AMC
        ld(2, b"1" * 900_000),  # a huge NIR, under the message limit
        ld(1, b"r" * 100_000) + ld(7, b"M" * 100_000),
        tag(2, 2) + varint(1 << 40) + b"short",  # a length beyond the message
        tag(2, 2) + varint((1 << 64) - 1),
        tag(2, 0) + varint(5),  # a string field sent as a varint
        tag(5, 2) + varint(3) + b"abc",  # a varint field sent as bytes
        tag(5, 1) + b"\x01" * 8,  # fixed64 for a varint field
        tag(5, 5) + b"\x01" * 4,
        tag(3, 3) + tag(3, 4),  # a group (deprecated wire types)
        tag(3, 3) * 200,  # unterminated nested groups
        tag(9, 4),  # an end-group without a start
        tag(0, 0) + b"\x01",  # field number 0
        tag(536_870_911, 0) + b"\x01",  # the largest field number, unknown
        tag(1, 6) + b"\x00",  # wire type 6 does not exist
        tag(1, 7) + b"\x00",
        valid + ld(99, b"unknown but well formed"),
        valid + valid,  # fields repeated: last one wins
        valid + b"\x12",
    ]
    return out


def valid_bytes(w: World) -> bytes:
    return check_request(w.ds.covered).SerializeToString()


def call_raw_everywhere(w: World, message: bytes) -> None:
    """Send `message` to every method as the request (or a batch item, or a stream message)."""
    ch = w.ch
    md, claims = w.md("fuzz"), w.md("claims")
    for path, who in ((PATH_CHECK, md), (PATH_BATCH, md), (PATH_VERIFY, claims)):
        try:
            raw_unary(ch, path)(message, metadata=who, timeout=20)
        except grpc.RpcError as exc:
            assert exc.code() in CLIENT_CODES, (path, exc.code(), exc.details())  # type: ignore[attr-defined]
            refused(exc)  # details present and consistent
    # As one item of a batch, wrapped correctly.
    try:
        raw = raw_unary(ch, PATH_BATCH)(
            ld(1, message) + ld(1, valid_bytes(w)), metadata=md, timeout=20
        )
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_CODES, (exc.code(), exc.details())  # type: ignore[attr-defined]
        refused(exc)
    else:
        batch = pb.CheckCoverageBatchResponse.FromString(raw)
        assert len(batch.items) == 2
    # As stream messages, between valid ones: one answer per message, in order.
    answers = list(
        raw_stream(ch)(iter([message, valid_bytes(w), message]), metadata=md, timeout=20)
    )
    assert len(answers) == 3
    parsed = [pb.CheckCoverageResponse.FromString(a) for a in answers]
    for resp in parsed:
        if resp.HasField("error"):
            err = item_error(resp)
            assert err.code in CLIENT_CODES - {grpc.StatusCode.OK}
    # The valid message in the middle is answered (unless the credential itself is refused).
    if not parsed[1].HasField("error"):
        assert parsed[1].decision == pb.DECISION_COVERED


def test_hostile_messages_never_cause_internal_errors(world: World) -> None:
    valid = valid_bytes(world)
    verify = verify_request("AAAA", PHARMACIST_ID, world.ds.covered).SerializeToString()
    for message in hostile_messages(valid) + [verify[:n] for n in range(1, len(verify))]:
        call_raw_everywhere(world, message)
    assert_still_serving(world)


def test_malformed_message_is_invalid_argument(world: World) -> None:
    for path, who in ((PATH_CHECK, "fuzz"), (PATH_BATCH, "fuzz"), (PATH_VERIFY, "claims")):
        r = expect_refusal(
            lambda path=path, who=who: raw_unary(world.ch, path)(  # type: ignore[misc]
                b"\xff\xff\xff", metadata=world.md(who), timeout=5
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "BadRequest" in r.details
    # Invalid UTF-8 in a string field is a malformed message, not a crash.
    r = expect_refusal(
        lambda: raw_unary(world.ch, PATH_CHECK)(
            ld(2, b"\xff" * 13), metadata=world.md("fuzz"), timeout=5
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "BadRequest" in r.details


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(message=st.binary(max_size=200))
def test_random_bytes_never_cause_internal_errors(world: World, message: bytes) -> None:
    call_raw_everywhere(world, message)


def test_server_still_serves_after_random_bytes(world: World) -> None:
    """Self-contained (not relying on the hypothesis test having run before it): random messages
    of every size to every method, then a correct answer, no crash, no restart."""
    rng = random.Random(916)
    for size in range(0, 200, 2):
        call_raw_everywhere(world, rng.randbytes(size))
    assert_still_serving(world)


# -- 4. no request value in any error or log line --

LEAK_NIR = "1651144777058"  # valid, in no dataset
LEAK_VALUES_INVALID = {
    "request_id": "LEAKREQIDQZ" * 7,  # too long
    "nir": "LEAKNIRQZ7777",
    "nir_key": "Q9",
    "birth_date": "LEAKBDQZ",
    "birth_rank": 987654321,
    "amc_number": "LEAKAMCQZX",
    "member_number": "LEAK-MEMBER-QZ",
    "domain": 7777777,
    "care_date": "LEAKCDQZ",
}


def leak_markers() -> list[str]:
    return [m for m in _leak_markers() if len(m) >= 6]


def _leak_markers() -> list[str]:
    markers = [str(v) for v in LEAK_VALUES_INVALID.values()] + ["LEAKREQIDQZ"]
    markers += [
        LEAK_NIR,
        "19650719",  # birth date
        "7364519028",  # AMC
        "LEAKVALIDMEMBER9",
        "20260417",  # care date
        "LEAKVALIDREQ5",
        "LEAKATTESTATIONQZ",
        "8877665544",  # practitioner id
        "LEAKTOKENSECRETQZ",
        "leaktokenid42",
    ]
    return markers


def leak_requests(w: World) -> list[pb.CheckCoverageRequest]:
    leak = identity_with_nir(LEAK_NIR, "19650719", 4)
    valid = check_request(
        leak,
        amc="7364519028",
        member_number="LEAKVALIDMEMBER9",
        care_date="20260417",
        request_id="LEAKVALIDREQ5",
    )
    all_bad = pb.CheckCoverageRequest(**LEAK_VALUES_INVALID)  # type: ignore[arg-type]
    wrong_key = pb.CheckCoverageRequest()
    wrong_key.CopyFrom(valid)
    wrong_key.nir_key = f"{(int(valid.nir_key) % 97) + 1:02d}"
    bad_dates = pb.CheckCoverageRequest()
    bad_dates.CopyFrom(valid)
    bad_dates.birth_date = "19650732"
    bad_dates.care_date = "20260432"
    return [valid, all_bad, wrong_key, bad_dates]


def assert_no_marker(where: str, data: str | bytes) -> None:
    text = data if isinstance(data, str) else data.decode("latin-1")
    for marker in leak_markers():
        assert marker not in text, f"{marker!r} leaked into {where}"


def test_no_request_value_in_errors_or_logs(world: World, tmp_path: Path) -> None:
    # A server of its own, stopped before its log is read: every line it would ever write is in
    # the file by then (reading a running server's log could miss a late line and pass vacuously).
    config = write_config(tmp_path / "covergate.toml")
    server = Server(
        world.ds.data_dir, args=["--config", str(config)], env={"COVERGATE_LOG_LEVEL": "DEBUG"}
    )
    own = World(world.ds, server, world.tokens, grpc.insecure_channel(server.target))
    try:
        _leak_calls(own)
    finally:
        own.ch.close()
        code = server.stop()
    log = server.log()
    assert code == 0 and "worker 0 stopped" in log, log  # the whole log, to its last line
    assert_no_marker("the server log", log)
    for token in world.tokens.values():
        assert token.rpartition(".")[2] not in log, "a token secret leaked into the log"


def _leak_calls(world: World) -> None:
    """Every request, error and credential path carrying distinctive values; errors checked."""
    stub, attest = world.coverage(), world.attestation()
    md = world.md("leak")
    requests = leak_requests(world)
    seen_errors = 0

    def collect(call: Callable[[], Any]) -> Any:
        nonlocal seen_errors
        try:
            return call()
        except grpc.RpcError as exc:
            seen_errors += 1
            r = refused(exc)
            assert_no_marker("status message", r.message)
            assert_no_marker("status details", r.details_bin)
            assert_no_marker("debug string", exc.debug_error_string())  # type: ignore[attr-defined]
            return None

    for req in requests:
        collect(lambda req=req: stub.CheckCoverage(req, metadata=md, timeout=5))  # type: ignore[misc]
    batch = collect(
        lambda: stub.CheckCoverageBatch(
            pb.CheckCoverageBatchRequest(items=requests), metadata=md, timeout=5
        )
    )
    streamed = collect(
        lambda: list(stub.CheckCoverageStream(iter(requests), metadata=md, timeout=5))
    )
    for resp in list(batch.items) + streamed:
        if resp.HasField("error"):
            seen_errors += 1
            assert_no_marker("item error", resp.error.SerializeToString())
    # Values sent as non-UTF-8 around the markers, through the raw channel.
    raw = ld(1, b"LEAKREQIDQZ\xff") + ld(2, b"LEAKNIRQZ7777\xfe") + ld(6, b"LEAKAMCQZX")
    collect(lambda: raw_unary(world.ch, PATH_CHECK)(raw, metadata=md, timeout=5))
    collect(lambda: raw_unary(world.ch, PATH_BATCH)(ld(1, raw), metadata=md, timeout=5))
    collect(lambda: list(raw_stream(world.ch)(iter([raw]), metadata=md, timeout=5)))

    # Attestations: garbage, a forged-looking one, valid fields with distinctive values.
    leak = identity_with_nir(LEAK_NIR, "19650719", 4)
    claims = world.md("claims")
    forged = base64.urlsafe_b64encode(b"LEAKATTESTATIONQZ" * 4).decode().rstrip("=")
    for att in ("LEAKATTESTATIONQZ", forged, "LEAKATTESTATIONQZ" * 40):
        collect(
            lambda att=att: attest.VerifyAttestation(  # type: ignore[misc]
                verify_request(att, "8877665544", leak), metadata=claims, timeout=5
            )
        )
    bad_verify = pb.VerifyAttestationRequest(
        attestation="LEAKATTESTATIONQZ",
        practitioner_id="8877665544" * 2,
        nir="LEAKNIRQZ7777",
        nir_key="Q9",
        birth_date="LEAKBDQZ",
        birth_rank=987654321,
    )
    collect(lambda: attest.VerifyAttestation(bad_verify, metadata=claims, timeout=5))

    # Unknown and malformed credentials carrying distinctive values.
    for token in ("cg1.leaktokenid42.LEAKTOKENSECRETQZ", "LEAKTOKENSECRETQZ"):
        collect(
            lambda token=token: stub.CheckCoverage(  # type: ignore[misc]
                requests[0], metadata=bearer(token), timeout=5
            )
        )
    assert seen_errors >= 12


# -- 5. minimal disclosure --


def test_every_wrong_factor_answers_exactly_like_an_unknown_person(world: World) -> None:
    ds = world.ds
    c = ds.covered
    base: dict[str, Any] = {"request_id": "same-id", "member_number": ds.member_number}
    reference = check_request(UNKNOWN, **base)
    variants = {
        "nir": check_request(identity_with_nir(other_nir(c.nir), c.birth_date), **base),
        "birth_date": check_request(
            Identity(c.nir, c.nir_key, str(int(c.birth_date) + 1), c.birth_rank), **base
        ),
        "birth_rank (the twin)": check_request(ds.twin, **base),
        "birth_rank (nobody)": check_request(Identity(c.nir, c.nir_key, c.birth_date, 3), **base),
        "amc_number": check_request(c, amc=OTHER_AMC, **base),
        "member_number": check_request(c, request_id="same-id", member_number="M0099999"),
        "member_number (other)": check_request(c, request_id="same-id", member_number="X1"),
    }
    assert rules.valid_birth_date(variants["birth_date"].birth_date)
    call = raw_unary(world.ch, PATH_CHECK)
    md = world.md()
    expected_bytes, expected_call = call.with_call(
        reference.SerializeToString(), metadata=md, timeout=5
    )
    expected = pb.CheckCoverageResponse.FromString(expected_bytes)
    assert expected == pb.CheckCoverageResponse(request_id="same-id", decision=pb.DECISION_NO_MATCH)
    # The real person answers differently, so the comparison below means something.
    covered = pb.CheckCoverageResponse.FromString(
        call(check_request(c, **base).SerializeToString(), metadata=md, timeout=5)
    )
    assert covered.decision == pb.DECISION_COVERED
    stub = world.coverage()
    for name, req in variants.items():
        got, got_call = call.with_call(req.SerializeToString(), metadata=md, timeout=5)
        assert got == expected_bytes, name
        parsed = stub.CheckCoverage(req, metadata=md, timeout=5)
        assert parsed.SerializeToString() == expected.SerializeToString(), name
        assert dict(got_call.trailing_metadata() or ()) == dict(
            expected_call.trailing_metadata() or ()
        ), name
        assert dict(got_call.initial_metadata() or ()) == dict(
            expected_call.initial_metadata() or ()
        ), name
    # The same inside a batch.
    batch = stub.CheckCoverageBatch(
        pb.CheckCoverageBatchRequest(items=[reference, *variants.values()]), metadata=md, timeout=5
    )
    serialized = {i.SerializeToString() for i in batch.items}
    assert serialized == {expected.SerializeToString()}


def test_answers_carry_only_the_designed_fields(world: World) -> None:
    ds = world.ds
    raw = raw_unary(world.ch, PATH_CHECK)(
        check_request(ds.covered, member_number=ds.member_number).SerializeToString(),
        metadata=world.md(),
        timeout=5,
    )
    resp = pb.CheckCoverageResponse.FromString(raw)
    assert {f.name for f, _ in resp.ListFields()} == COVERED_FIELDS
    assert len(unknown_fields.UnknownFieldSet(resp)) == 0
    # Nothing of the identity travels back, not even inside the attestation.
    decoded = base64.urlsafe_b64decode(resp.attestation + "=" * (-len(resp.attestation) % 4))
    for value in (ds.covered.nir, ds.covered.birth_date, ds.member_number):
        assert value.encode() not in raw
        assert value.encode() not in decoded
    for identity in (ds.not_covered, UNKNOWN):
        other = world.coverage().CheckCoverage(
            check_request(identity), metadata=world.md(), timeout=5
        )
        assert {f.name for f, _ in other.ListFields()} == {"request_id", "decision"}


# -- 6. attestations end to end --


def verify_request(
    attestation: str, practitioner_id: str, identity: Identity
) -> pb.VerifyAttestationRequest:
    return pb.VerifyAttestationRequest(
        attestation=attestation,
        practitioner_id=practitioner_id,
        nir=identity.nir,
        nir_key=identity.nir_key,
        birth_date=identity.birth_date,
        birth_rank=identity.birth_rank,
    )


def flip_one_character(attestation: str) -> str:
    i = len(attestation) // 2
    replacement = "A" if attestation[i] != "A" else "B"
    return attestation[:i] + replacement + attestation[i + 1 :]


def test_attestation_verifies_and_binds_practitioner_and_beneficiary(world: World) -> None:
    ds = world.ds
    covered = world.coverage().CheckCoverage(
        check_request(ds.covered, care_date="20250311"), metadata=world.md(), timeout=5
    )
    att = covered.attestation
    verify = world.attestation().VerifyAttestation
    claims = world.md("claims")

    ok = verify(verify_request(att, PHARMACIST_ID, ds.covered), metadata=claims, timeout=5)
    assert ok == pb.VerifyAttestationResponse(
        valid=True, domain=PHAR, care_date="20250311", amc_number=PHARMACY_AMC
    )
    # Corsican letters in either case identify the same beneficiary.
    corsican = world.coverage().CheckCoverage(
        check_request(ds.corsican), metadata=world.md(), timeout=5
    )
    lower = Identity(ds.corsican.nir.lower(), ds.corsican.nir_key, ds.corsican.birth_date, 1)
    assert verify(
        verify_request(corsican.attestation, PHARMACIST_ID, lower), metadata=claims, timeout=5
    ).valid

    def reason(req: pb.VerifyAttestationRequest) -> str:
        resp = verify(req, metadata=claims, timeout=5)
        assert not resp.valid
        assert {f.name for f, _ in resp.ListFields()} == {"reason"}
        return resp.reason

    tampered = flip_one_character(att)
    assert tampered != att
    assert reason(verify_request(tampered, PHARMACIST_ID, ds.covered)) == "TAMPERED"
    assert reason(verify_request(att, HOSPITAL_ID, ds.covered)) == "WRONG_PRACTITIONER"
    assert reason(verify_request(att, PHARMACIST_ID, ds.twin)) == "WRONG_BENEFICIARY"
    assert reason(verify_request(att, PHARMACIST_ID, ds.not_covered)) == "WRONG_BENEFICIARY"
    # The twin's own attestation holds for the twin and for nobody else.
    twin = world.coverage().CheckCoverage(
        check_request(ds.twin, amc=OTHER_AMC), metadata=world.md(), timeout=5
    )
    twin_ok = verify(
        verify_request(twin.attestation, PHARMACIST_ID, ds.twin), metadata=claims, timeout=5
    )
    assert (twin_ok.valid, twin_ok.amc_number) == (True, OTHER_AMC)
    assert (
        reason(verify_request(twin.attestation, PHARMACIST_ID, ds.covered)) == "WRONG_BENEFICIARY"
    )
    # Every single character matters.
    for i in range(0, len(att), 7):
        changed = att[:i] + ("A" if att[i] != "A" else "B") + att[i + 1 :]
        assert not verify(
            verify_request(changed, PHARMACIST_ID, ds.covered), metadata=claims, timeout=5
        ).valid
    assert reason(verify_request(att[:-4], PHARMACIST_ID, ds.covered)) in ("TAMPERED", "MALFORMED")
    assert reason(verify_request("!!!!", PHARMACIST_ID, ds.covered)) in ("TAMPERED", "MALFORMED")


def test_expired_attestation_is_rejected(world: World, tmp_path: Path) -> None:
    config = write_config(tmp_path / "short-ttl.toml", "[server]\nattestation_ttl_seconds = 1\n")
    ds = world.ds
    with (
        Server(ds.data_dir, args=["--config", str(config)]) as server,
        grpc.insecure_channel(server.target) as ch,
    ):
        covered = pb_grpc.CoverageServiceStub(ch).CheckCoverage(
            check_request(ds.covered), metadata=world.md(), timeout=5
        )
        assert covered.decision == pb.DECISION_COVERED
        issued = time.time()
        time.sleep(max(0.0, issued + 2.2 - time.time()))  # past `expires` (issue second + 1)
        req = verify_request(covered.attestation, PHARMACIST_ID, ds.covered)
        for channel in (ch, world.ch):  # the same verdict from a server with the default TTL
            resp = pb_grpc.AttestationServiceStub(channel).VerifyAttestation(
                req, metadata=world.md("claims"), timeout=5
            )
            assert (resp.valid, resp.reason) == (False, "EXPIRED")


# -- 7. health and reflection --


def test_health_reports_serving(world: World) -> None:
    stub = health_pb2_grpc.HealthStub(world.ch)
    for service in ("", "covergate.v1.CoverageService", "covergate.v1.AttestationService"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_reflection_lists_and_describes_the_services(world: World) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(world.ch)
    responses = list(
        stub.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="covergate.v1.CoverageService"
                    ),
                ]
            ),
            timeout=5,
        )
    )
    names = {s.name for s in responses[0].list_services_response.service}
    assert {
        "covergate.v1.CoverageService",
        "covergate.v1.AttestationService",
        "grpc.health.v1.Health",
    } <= names
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert files, responses[1]
    from google.protobuf import descriptor_pb2

    protos = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in files]
    services = {s.name for p in protos if p.package == "covergate.v1" for s in p.service}
    assert {"CoverageService", "AttestationService"} <= services


# -- 8. limits --


def test_oversized_message_is_resource_exhausted_and_the_server_keeps_serving(world: World) -> None:
    md = world.md("fuzz")
    huge = ld(2, b"1" * (1 << 20))  # just over 1 MiB
    for path in (PATH_CHECK, PATH_BATCH, PATH_VERIFY):
        with pytest.raises(grpc.RpcError) as info:
            raw_unary(world.ch, path)(huge, metadata=md, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as info:
        list(raw_stream(world.ch)(iter([valid_bytes(world), huge]), metadata=md, timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    # Just under the limit is read and refused by covergate itself.
    r = expect_refusal(
        lambda: raw_unary(world.ch, PATH_CHECK)(
            ld(2, b"1" * ((1 << 20) - 64)), metadata=md, timeout=10
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert r.fields == ["nir", "nir_key", "birth_date", "birth_rank", "amc_number", "domain"]
    assert_still_serving(world)


def test_oversized_metadata_is_resource_exhausted_and_compression_unimplemented(
    world: World,
) -> None:
    call = raw_unary(world.ch, PATH_CHECK)
    md = world.md("fuzz")
    for size in (20_000, 100_000):
        with pytest.raises(grpc.RpcError) as info:
            call(
                valid_bytes(world), metadata=(("authorization", "Bearer " + "a" * size),), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as info:
        call(valid_bytes(world), metadata=(*md, ("x-filler", "v" * 20_000)), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    # Compressed requests are refused before anything is inflated (10 MiB that compress to a
    # few kB, and a sane one alike); with [server] accept_compressed_requests = true, see
    # test_server_limits.py.
    bomb = ld(2, b"0" * (10 << 20))
    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
        for message in (bomb, valid_bytes(world)):
            with pytest.raises(grpc.RpcError) as info:
                call(message, metadata=md, timeout=10, compression=compression)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert_still_serving(world)


def test_expired_deadline_is_deadline_exceeded(world: World) -> None:
    req = check_request(world.ds.covered)
    stub, md = world.coverage(), world.md()
    calls: dict[str, Callable[[float], Any]] = {
        "unary": lambda t: stub.CheckCoverage(req, metadata=md, timeout=t),
        "batch": lambda t: stub.CheckCoverageBatch(
            pb.CheckCoverageBatchRequest(items=[req] * 50), metadata=md, timeout=t
        ),
        "stream": lambda t: list(stub.CheckCoverageStream(iter([req] * 5), metadata=md, timeout=t)),
        "verify": lambda t: world.attestation().VerifyAttestation(
            verify_request("AAAA", PHARMACIST_ID, world.ds.covered),
            metadata=world.md("claims"),
            timeout=t,
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call(-1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, name  # type: ignore[attr-defined]
        # Deadlines that run out while the call travels: an answer or DEADLINE_EXCEEDED only.
        for timeout in (0.0, 1e-6, 1e-4, 1e-3):
            for _ in range(5):
                try:
                    call(timeout)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, name  # type: ignore[attr-defined]
    assert_still_serving(world)


def test_an_answer_written_to_an_ended_call_is_not_logged_as_an_error() -> None:
    """grpc.aio's ExecuteBatchError for a stream answer written just after the call ended (its
    deadline passed between the check and the write) becomes one DEBUG line; other errors of
    grpc's logger are untouched."""
    import io

    from grpc._cython import cygrpc

    from service.server import configure_logging

    configure_logging()
    core = logging.getLogger("grpc._cython.cygrpc")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setLevel(logging.INFO)
    core.addHandler(handler)
    try:
        try:
            raise cygrpc.ExecuteBatchError("Failed execute_batch")
        except cygrpc.ExecuteBatchError:
            core.exception("ExecuteBatchError raised in core by servicer method [%s]", "/m/Stream")
        assert out.getvalue() == ""
        try:
            raise ValueError("something else")
        except ValueError:
            core.exception("Unexpected [%s] raised by servicer method [%s]", "ValueError", "/m")
        assert "Traceback" in out.getvalue() and "something else" in out.getvalue()
    finally:
        core.removeHandler(handler)
