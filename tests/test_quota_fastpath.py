"""Scope, quotas and the harvest guard inside the fast path, on both implementations, with a clock
the tests control; and differential property tests over sequences of requests (quota effects and
the shared state's bytes included).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import KNOWN_IDENTITIES, NOW, TODAY, UNKNOWN_IDENTITY, RightsStore
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spans import masked_spans

from covergate.v1 import covergate_pb2 as pb
from fastpath import rules
from fastpath.quota import (
    SHADOW_DAILY,
    SHADOW_DISTINCT,
    SHADOW_GUARD,
    SHADOW_RATE,
    QuotaFile,
    QuotaProfile,
)
from fastpath.rules import Practitioner

PROFILE = QuotaProfile(
    rate_per_minute=60,
    burst=5,
    daily_limit=12,
    distinct_limit=4,
    guard_window=10,
    guard_min_lookups=5,
    guard_bad_percent=60,
)
AMCS = frozenset({"123456789", "987654321", "1122"})
PHAR_ONLY = 1 << 1


def practitioner(profile: QuotaProfile = PROFILE, slot: int = 3, **kw: Any) -> Practitioner:
    values: dict[str, Any] = {
        "practitioner_id": "10001234567",
        "profession": "pharmacist",
        "amc_numbers": AMCS,
        "slot": slot,
        "domains": rules.ALL_DOMAINS,
        "quota": profile,
    }
    values.update(kw)
    return Practitioner(**values)


def status_of(payload: bytes) -> status_pb2.Status:
    return status_pb2.Status.FromString(payload)


def reason_of(payload: bytes) -> str:
    for detail in status_of(payload).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


@pytest.fixture
def quota_file(tmp_path: Path) -> Any:
    q = QuotaFile(tmp_path / "quota" / "state", 8)
    yield q
    q.close()


@pytest.fixture
def qgate(gate_module: ModuleType, rights_env: RightsStore, quota_file: QuotaFile) -> Any:
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, quota=quota_file)
    yield gate
    gate.close()


def covered_request(i: int = 0) -> bytes:
    who = [k for k in KNOWN_IDENTITIES if k.expected == rules.DECISION_COVERED][i]
    return who.request().SerializeToString()


def test_rate_limit_burst_then_interval(qgate: Any) -> None:
    p = practitioner()
    codes = [qgate.check(p, covered_request(), TODAY, NOW)[0] for _ in range(PROFILE.burst)]
    assert codes == [rules.OK] * PROFILE.burst
    code, payload = qgate.check(p, covered_request(), TODAY, NOW)
    assert code == rules.RESOURCE_EXHAUSTED and reason_of(payload) == rules.REASON_RATE
    status = status_of(payload)
    kinds = {d.type_url.rsplit(".", 1)[-1] for d in status.details}
    assert kinds == {"QuotaFailure", "RetryInfo", "ErrorInfo"}
    # One emission interval later, one more lookup is admitted.
    assert qgate.check(p, covered_request(), TODAY, NOW + 1.0)[0] == rules.OK


def test_daily_limit_then_next_day(qgate: Any) -> None:
    p = practitioner(dataclasses.replace(PROFILE, rate_per_minute=100000, burst=1000))
    for _ in range(PROFILE.daily_limit):
        assert qgate.check(p, covered_request(), TODAY, NOW)[0] == rules.OK
    code, payload = qgate.check(p, covered_request(), TODAY, NOW)
    assert code == rules.RESOURCE_EXHAUSTED and reason_of(payload) == rules.REASON_DAILY
    assert qgate.check(p, covered_request(), TODAY + 1, NOW + 86400)[0] == rules.OK


def test_distinct_limit_counts_people_not_lookups(qgate: Any) -> None:
    p = practitioner(dataclasses.replace(PROFILE, rate_per_minute=100000, burst=1000,
                                         daily_limit=1000))  # fmt: skip
    people = [k.request().SerializeToString() for k in KNOWN_IDENTITIES]
    assert len(people) > PROFILE.distinct_limit
    for request in people[: PROFILE.distinct_limit]:
        for _ in range(3):  # checking the same person again is free
            assert qgate.check(p, request, TODAY, NOW)[0] == rules.OK
    code, payload = qgate.check(p, people[PROFILE.distinct_limit], TODAY, NOW)
    assert code == rules.RESOURCE_EXHAUSTED and reason_of(payload) == rules.REASON_DISTINCT
    # Those already seen today are still answered.
    assert qgate.check(p, people[0], TODAY, NOW)[0] == rules.OK


def test_guard_suspends_a_guesser_and_it_persists(qgate: Any, quota_file: QuotaFile) -> None:
    p = practitioner(dataclasses.replace(PROFILE, rate_per_minute=100000, burst=1000,
                                         daily_limit=1000, distinct_limit=1000))  # fmt: skip
    unknown = UNKNOWN_IDENTITY.request().SerializeToString()
    answered = 0
    while not qgate.suspensions:
        code, _ = qgate.check(p, unknown, TODAY, NOW)
        assert code == rules.OK
        answered += 1
        assert answered <= PROFILE.guard_min_lookups
    assert qgate.suspensions == [p.practitioner_id]
    code, payload = qgate.check(p, covered_request(), TODAY, NOW)
    assert code == rules.PERMISSION_DENIED and reason_of(payload) == rules.REASON_SUSPENDED
    state = quota_file.read(p.slot)
    assert state.flags & 1 and state.guard_fired == 1
    quota_file.reinstate(p.slot)
    assert qgate.check(p, covered_request(), TODAY, NOW)[0] == rules.OK


def test_shadow_mode_traces_but_allows(qgate: Any) -> None:
    shadow = SHADOW_RATE | SHADOW_DAILY | SHADOW_DISTINCT | SHADOW_GUARD
    p = practitioner(dataclasses.replace(PROFILE, shadow=shadow))
    unknown = UNKNOWN_IDENTITY.request().SerializeToString()
    for _ in range(50):
        assert qgate.check(p, unknown, TODAY, NOW)[0] == rules.OK
    assert qgate.suspensions == []


def test_scope_refusals_never_read_the_store(qgate: Any) -> None:
    p = practitioner(domains=PHAR_ONLY, amc_numbers=frozenset({"123456789"}))
    before = qgate.store_reads
    optical = covered_request().replace(b"@\x01", b"@\x05")
    code, payload = qgate.check(p, optical, TODAY, NOW)
    assert code == rules.PERMISSION_DENIED and reason_of(payload) == rules.REASON_DOMAIN
    other_amc = pb.CheckCoverageRequest.FromString(covered_request())
    other_amc.amc_number = "987654321"
    code, payload = qgate.check(p, other_amc.SerializeToString(), TODAY, NOW)
    assert code == rules.PERMISSION_DENIED and reason_of(payload) == rules.REASON_AMC
    assert qgate.store_reads == before


def test_batch_items_each_count_and_carry_their_refusal(qgate: Any) -> None:
    p = practitioner()
    batch = pb.CheckCoverageBatchRequest(
        items=[pb.CheckCoverageRequest.FromString(covered_request())] * (PROFILE.burst + 2)
    )
    code, payload = qgate.check_batch(p, batch.SerializeToString(), TODAY, NOW)
    assert code == rules.OK
    items = pb.CheckCoverageBatchResponse.FromString(payload).items
    assert [i.decision for i in items[: PROFILE.burst]] == [rules.DECISION_COVERED] * PROFILE.burst
    for refused in items[PROFILE.burst :]:
        assert refused.error.code == rules.RESOURCE_EXHAUSTED
        assert refused.decision == rules.DECISION_UNSPECIFIED


# -- differential: sequences of calls, quota state included ---------------------------------------

REQUESTS = (
    [k.request().SerializeToString() for k in KNOWN_IDENTITIES]
    + [UNKNOWN_IDENTITY.request().SerializeToString()]
    + [KNOWN_IDENTITIES[0].request(nir_key="00").SerializeToString()]  # invalid
    + [KNOWN_IDENTITIES[0].request(domain=5).SerializeToString()]  # out of scope below
    + [KNOWN_IDENTITIES[0].request(amc_number="555").SerializeToString()]  # no agreement
)
# Whole messages the gates cannot read, sent as they are (a batch limit of 3 in these tests).
RAW_MESSAGES = (
    b"\xff\xff",  # not protobuf
    b"\x0a\x05\x0a\x01",  # truncated
    b"\x0a\x00" * 5,  # five empty items: an oversize batch
    b"\x78\x00" + b"\x0a\x00" * 5,  # an unknown field, then too many items
    b"\x0a\x00" * 4 + b"\x7b",  # too many items, then garbage that upb would refuse
    b"\x0b\x0c" + b"\x0a\x00" * 2,  # a group: the framing counter gives up, upb decides
)

profiles = st.builds(
    QuotaProfile,
    rate_per_minute=st.sampled_from([6, 60, 600]),
    burst=st.integers(1, 6),
    daily_limit=st.integers(1, 15),
    distinct_limit=st.integers(1, 6),
    guard_window=st.integers(3, 12),
    guard_min_lookups=st.just(3),
    guard_bad_percent=st.sampled_from([30, 50, 100]),
    shadow=st.integers(0, 15),
)
steps = st.lists(
    st.tuples(
        st.sampled_from(["check", "check_item", "check_batch"]),
        st.one_of(
            st.lists(st.sampled_from(REQUESTS), min_size=1, max_size=4),
            st.sampled_from(RAW_MESSAGES),
        ),
        st.sampled_from([0.0, 0.0, 0.3, 2.5, 20.0, 86400.0]),  # clock advance
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(profile=profiles, calls=steps, traced=st.booleans(), with_parent=st.booleans())
def test_quota_sequences_identical_in_c_and_python(
    cython_gate_module: ModuleType,
    python_gate_module: ModuleType,
    rights_env: RightsStore,
    tmp_path_factory: pytest.TempPathFactory,
    profile: QuotaProfile,
    calls: list[tuple[str, list[bytes] | bytes, float]],
    traced: bool,
    with_parent: bool,
) -> None:
    tmp = tmp_path_factory.mktemp("q")
    files = [QuotaFile(tmp / name, 4) for name in ("c", "py")]
    gates: list[Any] = []
    try:
        gates += [
            m.Gate(
                rights_env.env,
                rights_env.db,
                rights_env.keys,
                quota=f,
                trace=traced,
                trace_seed=99,
                max_batch_items=3,
            )
            for m, f in zip((cython_gate_module, python_gate_module), files, strict=True)
        ]
        p = practitioner(profile, slot=2, domains=rules.ALL_DOMAINS & ~(1 << 5))
        now = float(NOW)
        for method, requests, advance in calls:
            now += advance
            today = TODAY + int((now - NOW) // 86400)
            if isinstance(requests, bytes):
                args = requests
            elif method == "check_batch":
                args = pb.CheckCoverageBatchRequest(
                    items=[pb.CheckCoverageRequest.FromString(r) for r in requests]
                ).SerializeToString()
            else:
                args = requests[0]
            context = (b"\x01" * 16, b"\x02" * 8 if with_parent else b"")
            kwargs = {"trace": context} if with_parent else {}
            results = [getattr(g, method)(p, args, today, now, **kwargs) for g in gates]
            assert results[0] == results[1], method
            if traced:
                spans = [masked_spans(g.take_spans()) for g in gates]
                assert spans[0] == spans[1], method
                assert gates[0].lookup_counts() == gates[1].lookup_counts()
            assert gates[0].suspensions == gates[1].suspensions
            assert gates[0].store_reads == gates[1].store_reads
        assert files[0].map[:] == files[1].map[:]  # the shared state itself
    finally:
        for g in gates:
            g.close()
        for f in files:
            f.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    agreements=st.frozensets(
        st.one_of(
            st.sampled_from(sorted(AMCS)),
            st.text("0123456789", max_size=12),
            st.sampled_from(["12a", "", "\uff11\uff12\uff13", "12345678"]),
        ),
        max_size=5,
    ),
    amc=st.one_of(st.sampled_from(sorted(AMCS)), st.text("0123456789", min_size=1, max_size=10)),
)
def test_insurer_scope_identical_in_c_and_python(
    cython_gate_module: ModuleType,
    python_gate_module: ModuleType,
    rights_env: RightsStore,
    agreements: frozenset[str],
    amc: str,
) -> None:
    """The Cython gate checks agreements on Practitioner.amc_view (packed once), the reference on
    the set itself: prefixes, lengths, malformed entries and the empty set must all agree."""
    who = next(k for k in KNOWN_IDENTITIES if k.expected == rules.DECISION_COVERED)
    request = who.request(amc_number=amc).SerializeToString()
    p = practitioner(None, slot=-1, amc_numbers=agreements)  # type: ignore[arg-type]
    answers = [
        m.Gate(rights_env.env, rights_env.db, rights_env.keys).check(p, request, TODAY, NOW)
        for m in (cython_gate_module, python_gate_module)
    ]
    assert answers[0] == answers[1]
    if amc not in agreements:
        assert answers[0][0] == rules.PERMISSION_DENIED
        assert reason_of(answers[0][1]) == rules.REASON_AMC


# -- refusals of whole messages and missing state, on both gates -----------------------------------


def test_undecodable_requests_spend_the_rate(qgate: Any) -> None:
    """Garbage is an attempt like any other: it spends the rate, so a flood of it is throttled."""
    p = practitioner(dataclasses.replace(PROFILE, guard_min_lookups=50, guard_window=64))
    codes = [qgate.check(p, b"\xff\xff", TODAY, NOW)[0] for _ in range(PROFILE.burst)]
    assert codes == [rules.INVALID_ARGUMENT] * PROFILE.burst
    code, payload = qgate.check(p, b"\xff\xff", TODAY, NOW)
    assert code == rules.RESOURCE_EXHAUSTED and reason_of(payload) == rules.REASON_RATE
    # A batch refused whole is one attempt too, and so is an unreadable stream message.
    code, payload = qgate.check_batch(p, b"\x0a\x00" * 600, TODAY, NOW)
    assert code == rules.RESOURCE_EXHAUSTED and reason_of(payload) == rules.REASON_RATE
    item = pb.CheckCoverageResponse.FromString(qgate.check_item(p, b"\xff", TODAY, NOW))
    assert reason_of(item.error.SerializeToString()) == rules.REASON_RATE


@pytest.mark.parametrize(
    "message",
    [b"\xff\xff", b"\x0a\x00" * 501, b"\x0a\x03\x0a\x01"],
    ids=["garbage", "oversize", "truncated"],
)
@pytest.mark.parametrize("method", ["check", "check_item", "check_batch"])
def test_the_guard_suspends_a_caller_that_sends_garbage(
    qgate: Any, message: bytes, method: str
) -> None:
    p = practitioner(dataclasses.replace(PROFILE, rate_per_minute=6000, burst=100))
    for _ in range(PROFILE.guard_min_lookups):
        getattr(qgate, method)(p, message, TODAY, NOW)
    assert qgate.suspensions == [p.practitioner_id]
    code, payload = qgate.check(p, covered_request(), TODAY, NOW)
    assert code == rules.PERMISSION_DENIED and reason_of(payload) == rules.REASON_SUSPENDED


def test_an_oversize_batch_is_refused_from_its_first_items(
    gate_module: ModuleType, rights_env: RightsStore
) -> None:
    """Refused after counting max_batch_items + 1 items, whatever follows them: garbage that the
    protobuf parser would refuse after them is never read."""
    gate = gate_module.Gate(
        rights_env.env, rights_env.db, rights_env.keys, max_batch_items=3, trace=True
    )
    oversize = rules.batch_too_large_status(3)
    item = pb.CheckCoverageRequest(nir="1").SerializeToString()
    framed = b"\x0a" + bytes((len(item),)) + item
    garbage = b"\xff" * 1000
    p = practitioner(None, slot=-1)  # type: ignore[arg-type]
    assert gate.check_batch(p, framed * 4 + garbage, TODAY, NOW) == (
        rules.INVALID_ARGUMENT,
        oversize,
    )
    # Unknown fields before the items are stepped over, not a way around the count.
    unknown = b"\x78\x01" + b"\x79" + b"\x00" * 8 + b"\x7a\x02ab" + b"\x7d" + b"\x00" * 4
    assert gate.check_batch(p, unknown + framed * 4 + garbage, TODAY, NOW)[1] == oversize
    # Three items and then garbage: malformed, as the protobuf parser says.
    assert gate.check_batch(p, framed * 3 + garbage, TODAY, NOW)[1] == (
        rules.malformed_message_status("CheckCoverageBatchRequest")
    )
    assert gate.store_reads == 0
    assert rules.count_batch_items(framed * 4 + garbage, 3) == 4
    assert rules.count_batch_items(unknown + framed * 2, 3) == 2
    assert rules.count_batch_items(b"\x0b" + framed, 3) is None  # a group: upb decides


def test_a_closed_gate_refuses_and_never_serves_unmetered(
    gate_module: ModuleType, rights_env: RightsStore, quota_file: QuotaFile
) -> None:
    """A caller still holding a replaced gate must not get answers without quotas."""
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, quota=quota_file)
    p = practitioner()
    assert gate.check(p, covered_request(), TODAY, NOW)[0] == rules.OK
    before = quota_file.map[:]
    gate.close()
    assert gate.closed
    refused = (rules.UNAVAILABLE, rules.QUOTA_STATE_UNAVAILABLE)
    assert gate.check(p, covered_request(), TODAY, NOW) == refused
    assert gate.check_batch(p, b"\x0a\x00", TODAY, NOW) == refused
    item = pb.CheckCoverageResponse.FromString(gate.check_item(p, covered_request(), TODAY, NOW))
    assert item.error.SerializeToString() == rules.QUOTA_STATE_UNAVAILABLE
    assert gate.store_reads == 1
    assert quota_file.map[:] == before


@pytest.mark.parametrize("slot", [-1, 8, 1000], ids=["no-slot", "past-the-file", "far-past"])
def test_missing_quota_state_refuses(qgate: Any, slot: int) -> None:
    p = practitioner(slot=slot)
    assert qgate.check(p, covered_request(), TODAY, NOW) == (
        rules.UNAVAILABLE,
        rules.QUOTA_STATE_UNAVAILABLE,
    )
    assert qgate.check(practitioner(None), covered_request(), TODAY, NOW)[0] == rules.UNAVAILABLE  # type: ignore[arg-type]
    assert qgate.store_reads == 0


def test_a_corrupted_guard_window_length_is_mended_alike(
    cython_gate_module: ModuleType,
    python_gate_module: ModuleType,
    rights_env: RightsStore,
    tmp_path: Path,
) -> None:
    """A slot whose window_len is past 64 (only corruption gives one): both gates write the same
    bytes back (the length clamped to 64)."""
    files = [QuotaFile(tmp_path / name, 8) for name in ("c", "py")]
    p = practitioner()
    try:
        for module, f in zip((cython_gate_module, python_gate_module), files, strict=True):
            state = f.read(p.slot)
            state.window_len, state.window_bits, state.day = 100, 0x0F0F, TODAY
            f.write(p.slot, state)
            gate = module.Gate(rights_env.env, rights_env.db, rights_env.keys, quota=f)
            gate.check(p, covered_request(), TODAY, NOW)
            gate.close()
        assert files[0].map[:] == files[1].map[:]
        assert files[0].read(p.slot).window_len == 64
    finally:
        for f in files:
            f.close()


# -- several hosts: spending cluster credit, differential ------------------------------------------

credit_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("call"),
            st.sampled_from(["check", "check_item", "check_batch"]),
            st.one_of(
                st.lists(st.sampled_from(REQUESTS), min_size=1, max_size=4),
                st.sampled_from(RAW_MESSAGES),
            ),
            st.sampled_from([0, 0, 0, 1, 2, 3]),  # rules.CREDIT_SPEND .. CREDIT_OPEN
        ),
        st.tuples(
            st.just("grant"),
            st.integers(0, 4),  # daily
            st.integers(0, 3),  # distinct
            st.integers(0, 4),  # rate tokens
            st.sampled_from([500, 5000, 60_000]),  # lease, ms
        ),
        st.tuples(st.just("clock"), st.sampled_from([0.3, 2.5, 20.0, 86400.0])),
    ),
    min_size=1,
    max_size=30,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(profile=profiles, steps=credit_steps, traced=st.booleans())
def test_cluster_credit_is_spent_identically_in_c_and_python(
    cython_gate_module: ModuleType,
    python_gate_module: ModuleType,
    rights_env: RightsStore,
    tmp_path_factory: pytest.TempPathFactory,
    profile: QuotaProfile,
    steps: list[tuple[Any, ...]],
    traced: bool,
) -> None:
    """Both gates spend a host's cluster credit alike: what is set aside (SHORT) and what is
    refused in each credit mode, the tokens, leases and their expiry on the gate's clock, the
    report ring and outcomes, and every byte of both files."""
    from fastpath.quota import CreditFile

    tmp = tmp_path_factory.mktemp("credit")
    files = [QuotaFile(tmp / f"q{i}", 4) for i in range(2)]
    credits = [CreditFile(tmp / f"c{i}", 4) for i in range(2)]
    gates: list[Any] = []
    try:
        gates += [
            m.Gate(
                rights_env.env,
                rights_env.db,
                rights_env.keys,
                quota=f,
                credit=c,
                trace=traced,
                trace_seed=7,
                max_batch_items=3,
            )
            for m, f, c in zip(
                (cython_gate_module, python_gate_module), files, credits, strict=True
            )
        ]
        p = practitioner(profile, slot=2, domains=rules.ALL_DOMAINS & ~(1 << 5))
        now = float(NOW)
        for step in steps:
            today = TODAY + int((now - NOW) // 86400)
            if step[0] == "clock":
                now += step[1]
                continue
            if step[0] == "grant":
                _, daily, distinct, tokens, lease = step
                for f, c in zip(files, credits, strict=True):
                    f.lock(p.slot)
                    try:
                        state = c.read(p.slot)
                        c.roll_day(state, today)
                        state.daily += daily
                        state.distinct += distinct
                        state.rate_tokens += tokens
                        state.lease_expiry_ms = int(now * 1000) + lease
                        state.rate_expiry_ms = int(now * 1000) + min(lease, 1000)
                        c.write(p.slot, state)
                    finally:
                        f.unlock(p.slot)
                continue
            _, method, requests, mode = step
            if isinstance(requests, bytes):
                args = requests
            elif method == "check_batch":
                args = pb.CheckCoverageBatchRequest(
                    items=[pb.CheckCoverageRequest.FromString(r) for r in requests]
                ).SerializeToString()
            else:
                args = requests[0]
            for g in gates:  # the lookup spans of a host without Redis say so
                g.cluster_degraded = mode == rules.CREDIT_BACKEND
            results = [getattr(g, method)(p, args, today, now, credit_mode=mode) for g in gates]
            assert results[0] == results[1], (method, mode)
            assert gates[0].short == gates[1].short
            assert gates[0].last_bad == gates[1].last_bad
            if traced:
                spans = [masked_spans(g.take_spans()) for g in gates]
                assert spans[0] == spans[1], method
                assert gates[0].lookup_counts() == gates[1].lookup_counts()
            assert gates[0].suspensions == gates[1].suspensions
            assert gates[0].store_reads == gates[1].store_reads
            assert files[0].map[:] == files[1].map[:]
            assert credits[0].map[:] == credits[1].map[:]
    finally:
        for g in gates:
            g.close()
        for f in (*files, *credits):
            f.close()


def test_a_lookup_without_credit_is_set_aside_then_refused_as_the_mode_says(
    gate_module: ModuleType, rights_env: RightsStore, tmp_path: Path
) -> None:
    from fastpath.quota import CreditFile

    quota, credit = QuotaFile(tmp_path / "q", 8), CreditFile(tmp_path / "c", 8)
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, quota=quota,
                            credit=credit)  # fmt: skip
    try:
        p = practitioner()
        assert gate.check(p, covered_request(), TODAY, NOW) == (rules.SHORT, b"")
        state = quota.read(p.slot)  # nothing spent
        assert gate.short == [0] and state.day == TODAY
        assert (state.tat_ms, state.daily_count, state.window_len) == (0, 0, 0)
        assert gate.check(p, covered_request(), TODAY, NOW, credit_mode=rules.CREDIT_BACKEND) == (
            rules.UNAVAILABLE,
            rules.QUOTA_BACKEND_UNAVAILABLE,
        )
        code, payload = gate.check(p, covered_request(), TODAY, NOW, credit_mode=rules.CREDIT_LIMIT)
        assert code == rules.RESOURCE_EXHAUSTED and reason_of(payload) == rules.REASON_RATE
        assert gate.check(p, covered_request(), TODAY, NOW, credit_mode=rules.CREDIT_OPEN)[0] == (
            rules.OK
        )
        # Credit granted: spent, and what was spent is there to report.
        quota.lock(p.slot)
        state = credit.read(p.slot)
        state.daily, state.distinct, state.rate_tokens = 2, 1, 5
        state.lease_expiry_ms = state.rate_expiry_ms = NOW * 1000 + 60_000
        credit.write(p.slot, state)
        quota.unlock(p.slot)
        batch = pb.CheckCoverageBatchRequest(
            items=[pb.CheckCoverageRequest.FromString(covered_request(i)) for i in (1, 1, 2)]
        ).SerializeToString()
        code, payload = gate.check_batch(p, batch, TODAY, NOW)
        assert code == rules.OK and gate.short == [2]  # a third lookup, with daily credit spent
        items = pb.CheckCoverageBatchResponse.FromString(payload).items
        assert [i.decision for i in items[:2]] == [rules.DECISION_COVERED] * 2
        assert items[2] == pb.CheckCoverageResponse()
        state = credit.read(p.slot)
        assert (state.daily, state.distinct, state.rate_tokens) == (0, 0, 3)
        assert state.used == 3 and state.ring_len == 2  # the OPEN one too; two new people
        assert state.outcomes_len == 3 and state.outcomes_bits == 0
    finally:
        gate.close()
        quota.close()
        credit.close()
