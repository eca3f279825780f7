"""Spans recorded by the gates, on both implementations: one per lookup, the attributes DESIGN.md
lists, the caller's trace context honoured, the guard's events, and never a request's personal data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import KNOWN_IDENTITIES, NOW, TODAY, UNKNOWN_IDENTITY, RightsStore
from hypothesis import given, settings
from hypothesis import strategies as st
from spans import attributes, decode_spans

from covergate.v1 import covergate_pb2 as pb
from fastpath import rules
from fastpath import trace as tr
from fastpath.quota import SHADOW_DISTINCT, QuotaFile, QuotaProfile
from fastpath.rules import Practitioner

PROFILE = QuotaProfile(
    rate_per_minute=100000, burst=1000, daily_limit=50, distinct_limit=40,
    guard_window=10, guard_min_lookups=5, guard_bad_percent=60,
)  # fmt: skip
PHARMACIST = Practitioner(
    practitioner_id="10001234567",
    profession="pharmacist",
    amc_numbers=frozenset({"123456789", "987654321", "1122"}),
    slot=1,
    domains=rules.ALL_DOMAINS & ~(1 << 5),  # no optical
    quota=PROFILE,
)
TRACE_ID = bytes(range(1, 17))
PARENT = bytes(range(101, 109))


@pytest.fixture
def quota_file(tmp_path: Path) -> Any:
    q = QuotaFile(tmp_path / "quota" / "state", 4)
    yield q
    q.close()


@pytest.fixture
def tgate(gate_module: ModuleType, rights_env: RightsStore, quota_file: QuotaFile) -> Any:
    gate = gate_module.Gate(
        rights_env.env, rights_env.db, rights_env.keys, quota=quota_file, trace=True, trace_seed=7
    )
    yield gate
    gate.close()


def covered() -> Any:
    return next(k for k in KNOWN_IDENTITIES if k.expected == rules.DECISION_COVERED)


def personal_values() -> list[bytes]:
    values = []
    for who in (*KNOWN_IDENTITIES, UNKNOWN_IDENTITY):
        values += [who.nir.encode(), who.nir.upper().encode(), who.birth_date.encode()]
        if who.member_number:
            values.append(who.member_number.encode())
    return values


def test_untraced_gate_records_nothing(gate_module, rights_env):
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys)
    assert gate.trace is False
    gate.check(
        PHARMACIST, covered().request().SerializeToString(), TODAY, NOW, trace=(TRACE_ID, b"")
    )
    assert gate.take_spans() == b""
    assert set(gate.lookup_counts()) == {0}


def test_unary_call_is_one_server_span_with_the_lookup(tgate, rights_env):
    who = covered()
    code, _ = tgate.check(PHARMACIST, who.request().SerializeToString(), TODAY, NOW)
    assert code == rules.OK
    (span,) = decode_spans(tgate.take_spans())
    assert span.name == "covergate.v1.CoverageService/CheckCoverage"
    assert span.kind == span.SPAN_KIND_SERVER
    assert len(span.trace_id) == 16 and len(span.span_id) == 8 and not span.parent_span_id
    assert span.start_time_unix_nano == NOW * 10**9 <= span.end_time_unix_nano
    a = attributes(span)
    assert a["rpc.system"] == "grpc"
    assert a["rpc.service"] == "covergate.v1.CoverageService"
    assert a["rpc.method"] == "CheckCoverage"
    assert a["rpc.grpc.status_code"] == 0
    assert a["covergate.practitioner.id"] == PHARMACIST.practitioner_id
    assert a["covergate.practitioner.profession"] == "pharmacist"
    assert a["covergate.domain"] == rules.DOMAIN_NAMES[who.domain]
    assert a["covergate.amc"] == who.amc_number
    assert a["covergate.decision"] == "COVERED"
    assert "covergate.refusal" not in a
    pseudonym = rights_env.keys.pseudonym(who.identity)
    assert a["covergate.beneficiary"] == pseudonym.hex()
    assert rights_env.keys.storage_key(who.identity).hex()[:16] != pseudonym.hex()
    assert a["covergate.quota.daily_remaining"] == PROFILE.daily_limit - 1
    assert a["covergate.distinct_today"] == 1
    assert a["covergate.guard.fired"] is False
    assert "covergate.quota.would_deny" not in a


def test_batch_is_an_rpc_span_with_one_child_per_item(tgate):
    items = [covered().request(), UNKNOWN_IDENTITY.request(), covered().request(nir_key="00")]
    request = pb.CheckCoverageBatchRequest(items=items).SerializeToString()
    assert tgate.check_batch(PHARMACIST, request, TODAY, NOW, trace=(TRACE_ID, PARENT))[0] == 0
    spans = decode_spans(tgate.take_spans())
    (rpc,) = [s for s in spans if s.kind == s.SPAN_KIND_SERVER]
    lookups = [s for s in spans if s.name == "covergate.lookup"]
    assert len(spans) == 4 and len(lookups) == 3
    assert rpc.name == "covergate.v1.CoverageService/CheckCoverageBatch"
    assert rpc.trace_id == TRACE_ID and rpc.parent_span_id == PARENT
    assert attributes(rpc)["covergate.batch.items"] == 3
    assert attributes(rpc)["rpc.method"] == "CheckCoverageBatch"
    for span in lookups:
        assert span.trace_id == TRACE_ID and span.parent_span_id == rpc.span_id
        assert span.kind == span.SPAN_KIND_INTERNAL
    outcomes = [attributes(s).get("covergate.decision") or attributes(s)["covergate.refusal"]
                for s in lookups]  # fmt: skip
    assert outcomes == ["COVERED", "NO_MATCH", "INVALID_ARGUMENT"]
    invalid = attributes(lookups[2])
    assert not {"covergate.domain", "covergate.amc", "covergate.beneficiary"} & set(invalid)
    assert len({s.span_id for s in spans}) == 4


def test_stream_message_is_one_lookup_span_under_the_callers_parent(tgate):
    response = tgate.check_item(
        PHARMACIST, covered().request().SerializeToString(), TODAY, NOW, trace=(TRACE_ID, PARENT)
    )
    assert pb.CheckCoverageResponse.FromString(response).decision == rules.DECISION_COVERED
    (span,) = decode_spans(tgate.take_spans())
    assert span.name == "covergate.lookup" and span.kind == span.SPAN_KIND_INTERNAL
    assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT
    assert "rpc.method" not in attributes(span)
    tgate.check_item(PHARMACIST, b"\xff\xff", TODAY, NOW)
    (malformed,) = decode_spans(tgate.take_spans())
    assert attributes(malformed)["covergate.refusal"] == "INVALID_ARGUMENT"
    assert malformed.trace_id != TRACE_ID


def test_scope_and_quota_refusals_carry_their_reason(tgate):
    optical = covered().request(domain=5).SerializeToString()
    code, _ = tgate.check(PHARMACIST, optical, TODAY, NOW)
    assert code == rules.PERMISSION_DENIED
    (span,) = decode_spans(tgate.take_spans())
    a = attributes(span)
    assert a["covergate.refusal"] == rules.REASON_DOMAIN
    assert a["rpc.grpc.status_code"] == rules.PERMISSION_DENIED
    assert a["covergate.domain"] == "OPTI" and "covergate.beneficiary" in a


def test_guard_firing_is_an_event_on_the_lookup_that_fired_it(tgate):
    unknown = UNKNOWN_IDENTITY.request().SerializeToString()
    while not tgate.suspensions:
        tgate.check(PHARMACIST, unknown, TODAY, NOW)
    spans = decode_spans(tgate.take_spans())
    fired = [s for s in spans if attributes(s)["covergate.guard.fired"]]
    assert fired == [spans[-1]]
    assert [e.name for e in fired[0].events] == [tr.EVENT_GUARD_FIRED, tr.EVENT_SUSPENDED]
    assert all(not s.events for s in spans[:-1])
    tgate.check(PHARMACIST, covered().request().SerializeToString(), TODAY, NOW)
    (after,) = decode_spans(tgate.take_spans())
    assert attributes(after)["covergate.refusal"] == rules.REASON_SUSPENDED


def test_shadow_rules_are_recorded_as_would_deny(gate_module, rights_env, quota_file):
    shadowed = dataclasses.replace(PHARMACIST, quota=dataclasses.replace(
        PROFILE, distinct_limit=1, shadow=SHADOW_DISTINCT))  # fmt: skip
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, quota=quota_file,
                            trace=True)  # fmt: skip
    for who in KNOWN_IDENTITIES[:2]:
        assert gate.check(shadowed, who.request().SerializeToString(), TODAY, NOW)[0] == 0
    first, second = (attributes(s) for s in decode_spans(gate.take_spans()))
    assert "covergate.quota.would_deny" not in first
    assert second["covergate.quota.would_deny"] == rules.REASON_DISTINCT
    assert second["covergate.distinct_today"] == 2
    gate.close()


def test_no_personal_data_in_any_span(tgate):
    requests = [w.request() for w in (*KNOWN_IDENTITIES, UNKNOWN_IDENTITY)]
    requests += [w.request(nir_key="00", member_number="ZZ99") for w in KNOWN_IDENTITIES]
    batch = pb.CheckCoverageBatchRequest(items=requests).SerializeToString()
    tgate.check_batch(PHARMACIST, batch, TODAY, NOW)
    for r in requests:
        tgate.check(PHARMACIST, r.SerializeToString(), TODAY, NOW)
        tgate.check_item(PHARMACIST, r.SerializeToString(), TODAY, NOW)
    spans = tgate.take_spans()
    assert len(decode_spans(spans)) == 1 + 3 * len(requests)
    for value in [*personal_values(), b"ZZ99"]:
        assert value not in spans
    for r in requests:
        assert r.request_id.encode() not in spans


def test_lookup_counts_by_profession_and_outcome(tgate):
    tgate.check(PHARMACIST, covered().request().SerializeToString(), TODAY, NOW)
    tgate.check_item(PHARMACIST, UNKNOWN_IDENTITY.request().SerializeToString(), TODAY, NOW)
    counts = tgate.lookup_counts()
    assert len(counts) == tr.N_PROFESSIONS * tr.N_OUTCOMES
    pharmacist = tr.PROFESSIONS.index("pharmacist") * tr.N_OUTCOMES
    assert counts[pharmacist + tr.O_COVERED] == 1
    assert counts[pharmacist + tr.O_NO_MATCH] == 1
    assert sum(counts) == 2


def test_ids_follow_the_seed_and_bad_contexts_are_refused(gate_module, rights_env):
    a, b = (gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, trace=True,
                             trace_seed=42) for _ in range(2))  # fmt: skip
    assert [a.new_trace_id(), a.new_span_id()] == [b.new_trace_id(), b.new_span_id()]
    state = 42
    state, low = tr.splitmix64(state)
    state, high = tr.splitmix64(state)
    c = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, trace=True, trace_seed=42)
    assert c.new_trace_id() == low.to_bytes(8, "little") + high.to_bytes(8, "little")
    request = covered().request().SerializeToString()
    for bad in ((b"x" * 15, b""), (TRACE_ID, b"x" * 7), [TRACE_ID, b""], (TRACE_ID,)):
        with pytest.raises(ValueError):
            a.check(PHARMACIST, request, TODAY, NOW, trace=bad)
    a.add_span(tr.encode_span(TRACE_ID, PARENT, b"", "x", tr.KIND_SERVER, 1, 2, b""))
    (span,) = decode_spans(a.take_spans())
    assert span.name == "x" and span.span_id == PARENT


def test_export_requests_wrap_each_chunk_exactly_as_the_reference_envelope(tgate):
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    resource = tr.field_bytes(
        0x0A, tr.field_bytes(0x0A, b"service.name") + b"\x12\x0a\x0a\x08cg-tests"
    )
    scope = tr.field_bytes(0x0A, tr.SCOPE_NAME.encode()) + tr.field_bytes(0x12, b"0.test")
    request = covered().request().SerializeToString()
    for _ in range(12):
        tgate.check(PHARMACIST, request, TODAY, NOW)
    batch = pb.CheckCoverageBatchRequest(items=[covered().request()] * 5).SerializeToString()
    tgate.check_batch(PHARMACIST, batch, TODAY, NOW)
    requests = tgate.take_export_requests(resource, scope, 1500)
    assert tgate.span_bytes == 0 and len(requests) > 1
    assert sum(n for _, n in requests) == 12 + 5 + 1
    scope_field = tr.field_bytes(0x0A, scope)
    for raw, n in requests:
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        (resource_spans,) = message.resource_spans
        assert resource_spans.resource.attributes[0].value.string_value == "cg-tests"
        (scope_spans,) = resource_spans.scope_spans
        assert scope_spans.scope.name == tr.SCOPE_NAME and scope_spans.scope.version == "0.test"
        assert len(scope_spans.spans) == n
        # Byte for byte what the reference envelope makes of the same spans.
        spans = raw[raw.index(scope_field) + len(scope_field) :]
        assert tr.export_trace_request(resource, scope, spans) == raw
        assert len(spans) <= 1500 or n == 1


def test_span_chunks_cut_at_span_boundaries(tgate):
    request = covered().request().SerializeToString()
    for _ in range(10):
        tgate.check(PHARMACIST, request, TODAY, NOW)
    assert tgate.span_bytes > 0
    one = len(tr.encode_span(TRACE_ID, PARENT, b"", "x", 1, 0, 0, b""))
    tgate.add_span(tr.encode_span(TRACE_ID, PARENT, b"", "x" * 3000, 1, 0, 0, b""))
    everything = []
    for _ in range(10):
        tgate.check(PHARMACIST, request, TODAY, NOW)
    chunks = tgate.take_span_chunks(1000)
    assert tgate.span_bytes == 0 and tgate.take_spans() == b""
    assert sum(n for _, n in chunks) == 21
    for chunk, n in chunks:
        assert len(decode_spans(chunk)) == n
        assert len(chunk) <= 1000 or n == 1
        everything.append(chunk)
    assert any(len(c) > 3000 for c in everything) and one < 3000


@settings(max_examples=300, deadline=None)
@given(
    spans=st.lists(st.binary(max_size=300), max_size=12),
    cut=st.integers(0, 40),
    tail=st.binary(max_size=6),
    max_bytes=st.integers(0, 4000),
)
def test_the_shippers_cut_is_the_same_in_c_and_python(
    spans: list[bytes], cut: int, tail: bytes, max_bytes: int
) -> None:
    """fastpath.complete_spans (C) and fastpath.trace.complete_spans: the same end and count for
    framed spans, a torn last one, and bytes that are not spans at all."""
    c = pytest.importorskip("fastpath._gate_c")
    framed = b"".join(b"\x12" + tr.varint(len(s)) + s for s in spans)
    for data in (framed, framed[: max(0, len(framed) - cut)], framed + tail, tail + framed):
        results = []
        for implementation in (c.complete_spans, tr.complete_spans):
            try:
                results.append(implementation(data, max_bytes))
            except ValueError:
                results.append("not spans")
        assert results[0] == results[1]
        if data == framed and spans:
            end, count = results[0]  # type: ignore[misc]
            assert count >= 1 and end <= max(max_bytes, len(framed[:end]))
