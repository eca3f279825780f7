"""Behaviour of the fast-path gate: decisions, refusals, batches, attestations and store reads.

Every test runs on both implementations (the `gate` fixture is parametrised over them).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from covergate.v1 import covergate_pb2 as pb
from fastpath import rules

OK = rules.OK
INVALID_ARGUMENT = rules.INVALID_ARGUMENT
COVERED = rules.DECISION_COVERED
NOT_COVERED = rules.DECISION_NOT_COVERED
NO_MATCH = rules.DECISION_NO_MATCH
PHAR, MEDE, HOSP, DENT, OPTI = 1, 2, 3, 4, 5


# -- helpers ---------------------------------------------------------------------------------------


def check(gate: Any, practitioner: Any, request: Any, today: int, now: int) -> tuple[int, Any]:
    """A unary call; the response decoded when OK, the raw google.rpc.Status bytes otherwise."""
    code, payload = gate.check(practitioner, _wire(request), today, now)
    if code == OK:
        return code, pb.CheckCoverageResponse.FromString(payload)
    return code, payload


def _wire(request: Any) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def violations(status: bytes) -> list[str]:
    """The field names of a BadRequest in an INVALID_ARGUMENT status."""
    parsed = status_pb2.Status.FromString(status)
    assert parsed.code == code_pb2.INVALID_ARGUMENT
    names = []
    for detail in parsed.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request)
        names.extend(v.field for v in bad_request.field_violations)
    return names


def field_bit(name: str) -> int:
    return 1 << next(number for number, n in rules.FIELD_NAMES.items() if n == name)


def nir_variant(nir: str) -> str:
    """Another valid NIR: the last serial digit changed."""
    return nir[:-1] + str((int(nir[-1]) + 1) % 10)


# -- decisions -------------------------------------------------------------------------------------


def test_every_known_identity_gets_its_expected_decision(
    gate, known_identities, practitioner, today, now
):
    for who in known_identities.values():
        code, response = check(gate, practitioner, who.request(), today, now)
        assert code == OK, who.label
        assert response.decision == who.expected, who.label
        assert response.request_id == f"req-{who.label}"
        assert not response.HasField("error")


def test_a_covered_response_carries_what_billing_needs(
    gate, known_identities, practitioner, today, now
):
    code, response = check(
        gate, practitioner, known_identities["several-amcs"].request(), today, now
    )
    assert code == OK
    assert response.decision == COVERED
    assert response.rate_percent == 100
    assert response.convention_type == "TP01"
    assert response.rights_end_date == "20261231"
    assert response.attestation


def test_only_a_decision_when_not_covered_or_no_match(
    gate, known_identities, unknown_identity, practitioner, today, now
):
    for who in (known_identities["expired"], unknown_identity):
        code, response = check(gate, practitioner, who.request(), today, now)
        assert code == OK
        assert response.decision == who.expected
        assert response.ListFields() == [
            (pb.CheckCoverageResponse.DESCRIPTOR.fields_by_name["request_id"], response.request_id),
            (pb.CheckCoverageResponse.DESCRIPTOR.fields_by_name["decision"], who.expected),
        ]


def test_rights_are_per_domain_and_per_amc(gate, known_identities, practitioner, today, now):
    who = known_identities["several-amcs"]
    expectations = [
        ({"domain": PHAR}, COVERED),
        ({"domain": MEDE}, NOT_COVERED),  # expired at the end of 2024
        ({"domain": OPTI}, NOT_COVERED),  # opens in 2026
        ({"domain": DENT}, NOT_COVERED),  # open, but under the other AMC
        ({"domain": DENT, "amc_number": "987654321"}, COVERED),
        ({"domain": PHAR, "amc_number": "987654321"}, NOT_COVERED),
        ({"domain": PHAR, "amc_number": "555"}, NO_MATCH),  # no right at all with that AMC
    ]
    for overrides, decision in expectations:
        code, response = check(gate, practitioner, who.request(**overrides), today, now)
        assert (code, response.decision) == (OK, decision), overrides


def test_care_date_bounds_are_inclusive(gate, known_identities, practitioner, today, now):
    who = known_identities["expired"]  # PHAR from 20200101 to 20250614
    for care_date, decision in [
        ("20191231", NOT_COVERED),
        ("20200101", COVERED),
        ("20250614", COVERED),
        ("20250615", NOT_COVERED),
    ]:
        _, response = check(gate, practitioner, who.request(care_date=care_date), today, now)
        assert response.decision == decision, care_date


def test_an_empty_care_date_means_the_callers_today(gate, known_identities, practitioner, now):
    who = known_identities["lunar-0000"]  # open on 20250615 only
    assert check(gate, practitioner, who.request(), 20250615, now)[1].decision == COVERED
    assert check(gate, practitioner, who.request(), 20250616, now)[1].decision == NOT_COVERED
    assert check(gate, practitioner, who.request(), 20250614, now)[1].decision == NOT_COVERED


def test_the_longest_running_open_right_wins_and_the_first_on_a_tie(
    gate, known_identities, practitioner, today, now
):
    who = known_identities["longest-wins"]
    _, response = check(gate, practitioner, who.request(), today, now)
    assert (response.rate_percent, response.convention_type, response.rights_end_date) == (
        100,
        "TPB",
        "20271231",
    )


def test_a_zero_rate_is_a_covered_decision_without_rate_field(
    gate, known_identities, practitioner, today, now
):
    who = known_identities["longest-wins"]
    _, response = check(gate, practitioner, who.request(domain=HOSP), today, now)
    assert response.decision == COVERED
    assert response.rate_percent == 0
    assert response.convention_type == "CONVENTION000016"


def test_twins_are_told_apart_by_birth_rank(gate, known_identities, practitioner, today, now):
    first, second = known_identities["twin-1"], known_identities["twin-2"]
    assert (first.nir, first.birth_date) == (second.nir, second.birth_date)
    assert check(gate, practitioner, first.request(domain=PHAR), today, now)[1].decision == COVERED
    assert (
        check(gate, practitioner, second.request(domain=PHAR), today, now)[1].decision
        == NOT_COVERED
    )
    assert check(gate, practitioner, second.request(domain=MEDE), today, now)[1].decision == COVERED
    assert (
        check(gate, practitioner, first.request(domain=MEDE), today, now)[1].decision == NOT_COVERED
    )


def test_corsican_nirs_in_either_case(gate, known_identities, practitioner, today, now):
    for label in ("corsica-2a", "corsica-2b"):
        who = known_identities[label]
        for nir in (who.nir.lower(), who.nir.upper()):
            code, response = check(gate, practitioner, who.request(nir=nir), today, now)
            assert (code, response.decision) == (OK, COVERED), nir
    # The key is computed with 2A as 19: the same digits with 19 carry another key.
    who = known_identities["corsica-2a"]
    digits_nir = who.nir[:5] + "19" + who.nir[7:]
    assert rules.nir_key_for(digits_nir) == int(who.nir_key)
    code, response = check(gate, practitioner, who.request(nir=digits_nir), today, now)
    assert (code, response.decision) == (OK, NO_MATCH)


def test_leap_days_follow_the_gregorian_calendar(gate, known_identities, practitioner, today, now):
    who = known_identities["expired"]  # open from 20200101 to 20250614
    for care_date, valid in [
        ("20240229", True),
        ("20250229", False),
        ("20000229", True),
        ("21000229", False),
        ("19000229", False),
        ("21960229", True),
    ]:
        code, _ = check(gate, practitioner, who.request(care_date=care_date), today, now)
        assert code == (OK if valid else INVALID_ARGUMENT), care_date
    for birth_date, valid in [
        ("20000229", True),
        ("19000229", False),
        ("19000029", True),
        ("19040229", True),
        ("18960229", True),
        ("18490229", False),
    ]:
        code, _ = check(gate, practitioner, who.request(birth_date=birth_date), today, now)
        assert code == (OK if valid else INVALID_ARGUMENT), birth_date


def test_lunar_birth_dates_are_valid(gate, known_identities, practitioner, today, now):
    for label in ("lunar-0000", "lunar-0015"):
        code, response = check(gate, practitioner, known_identities[label].request(), today, now)
        assert (code, response.decision) == (OK, COVERED)


def test_a_member_number_when_sent_must_match(gate, known_identities, practitioner, today, now):
    who = known_identities["member"]
    cases = [
        ({}, COVERED),
        ({"member_number": ""}, COVERED),  # optional: the other factors suffice
        ({"member_number": "A0001235"}, NO_MATCH),
        ({"member_number": "a0001234"}, NO_MATCH),  # compared as printed
        # A row without a member hash cannot confirm a member number that was sent.
        ({"amc_number": "123456789", "domain": PHAR}, NO_MATCH),
        ({"amc_number": "123456789", "domain": PHAR, "member_number": ""}, COVERED),
    ]
    for overrides, decision in cases:
        code, response = check(gate, practitioner, who.request(**overrides), today, now)
        assert (code, response.decision) == (OK, decision), overrides


def test_each_missed_factor_looks_exactly_like_an_unknown_person(
    gate, known_identities, unknown_identity, practitioner, today, now
):
    who = known_identities["member"]
    misses = {
        "nir": {
            "nir": nir_variant(who.nir),
            "nir_key": f"{rules.nir_key_for(nir_variant(who.nir)):02d}",
        },
        "birth_date": {"birth_date": "19720815"},
        "lunar birth_date": {"birth_date": "19720800"},
        "birth_rank": {"birth_rank": 2},
        "amc_number": {"amc_number": "987654322"},
        "member_number": {"member_number": "A0001299"},
    }
    baseline = {"request_id": "same-id", "domain": who.domain}
    unknown = unknown_identity.request(**baseline).SerializeToString()
    expected_unary = gate.check(practitioner, unknown, today, now)
    expected_item = gate.check_item(practitioner, unknown, today, now)
    assert pb.CheckCoverageResponse.FromString(expected_unary[1]).decision == NO_MATCH
    for factor, overrides in misses.items():
        missed = who.request(**baseline, **overrides).SerializeToString()
        reads = gate.store_reads
        assert gate.check(practitioner, missed, today, now) == expected_unary, factor
        assert gate.check_item(practitioner, missed, today, now) == expected_item, factor
        assert gate.store_reads == reads + 2, factor  # same work as for anybody else
    batch = pb.CheckCoverageBatchRequest(
        items=[who.request(**baseline, **o) for o in misses.values()]
    ).SerializeToString()
    code, payload = gate.check_batch(practitioner, batch, today, now)
    assert code == OK
    assert all(
        item.SerializeToString() == expected_item
        for item in pb.CheckCoverageBatchResponse.FromString(payload).items
    )


def test_no_personal_data_in_a_covered_response(gate, known_identities, practitioner, today, now):
    who = known_identities["member"]
    code, payload = gate.check(practitioner, who.request().SerializeToString(), today, now)
    assert code == OK
    for value in (who.nir, who.birth_date, who.member_number, who.nir_key + who.birth_date):
        assert value.encode() not in payload


# -- invalid input ---------------------------------------------------------------------------------

# (field, bad value): every value distinctive enough that finding it in a payload means it leaked.
INVALID_VALUES = [
    ("request_id", "Q" * 65),
    ("request_id", "tab\tQWZ"),
    ("request_id", "QWZ\u00e9"),
    ("nir", "9850775123456"),  # first digit
    ("nir", "28507751234567"),  # 14 characters
    ("nir", "28507XY123456"),
    ("nir", "2850775123\u00e956"),
    ("nir", "285077512345\u0661"),  # an Arabic-Indic digit is not a digit here
    ("nir", "178022C004017"),  # only 2A and 2B
    ("nir_key", "Q!"),
    ("nir_key", "123"),
    ("nir_key", "\u0664\u0662"),
    ("birth_date", "19850230"),
    ("birth_date", "18491231"),
    ("birth_date", "1985-07-01"),
    ("birth_date", "19851301"),
    ("birth_date", "19850032"),
    ("birth_rank", 0),
    ("birth_rank", 10),
    ("birth_rank", 4294967295),
    ("amc_number", ""),
    ("amc_number", "12345678901"),
    ("amc_number", "QWZ12"),
    ("member_number", "QW-Z1"),
    ("member_number", "QWZ" * 7),
    ("member_number", "QWZ\u00e9"),
    ("domain", 0),
    ("domain", 11),
    ("domain", -1),
    ("domain", 2**31 - 1),
    ("care_date", "20250230"),
    ("care_date", "18991231"),
    ("care_date", "22000101"),
    ("care_date", "QWZtomorrow"),
]


@pytest.mark.parametrize(("field", "value"), INVALID_VALUES, ids=lambda v: repr(v)[:20])
def test_an_invalid_field_is_reported_by_name_never_by_value(
    gate, known_identities, practitioner, today, now, field, value
):
    who = known_identities["member"]
    request = who.request(**{field: value})
    reads = gate.store_reads

    code, status = gate.check(practitioner, request.SerializeToString(), today, now)
    assert code == INVALID_ARGUMENT
    assert violations(status) == [field]
    assert status is rules.invalid_fields_status(field_bit(field))  # the shared cached payload

    item = pb.CheckCoverageResponse.FromString(
        gate.check_item(practitioner, request.SerializeToString(), today, now)
    )
    assert item.decision == rules.DECISION_UNSPECIFIED
    assert item.error.SerializeToString() == status
    assert item.request_id == ("" if field == "request_id" else request.request_id)

    assert gate.store_reads == reads
    if isinstance(value, str) and value:
        encoded = value.encode()
        assert encoded not in status
        assert field != "request_id" or encoded not in item.SerializeToString()


def test_a_wrong_nir_key_is_invalid(gate, known_identities, practitioner, today, now):
    who = known_identities["several-amcs"]
    wrong = f"{(int(who.nir_key) % 97) + 1:02d}"
    code, status = gate.check(
        practitioner, who.request(nir_key=wrong).SerializeToString(), today, now
    )
    assert code == INVALID_ARGUMENT
    assert violations(status) == ["nir_key"]


def test_every_invalid_field_is_reported_at_once(gate, practitioner, today, now):
    request = pb.CheckCoverageRequest(
        request_id="\x00",
        nir="x",
        nir_key="x",
        birth_date="x",
        birth_rank=0,
        amc_number="x",
        member_number="-",
        domain=0,
        care_date="x",
    )
    code, status = gate.check(practitioner, request.SerializeToString(), today, now)
    assert code == INVALID_ARGUMENT
    assert violations(status) == list(rules.FIELD_NAMES.values())
    # The empty request: everything required is missing, request_id and member_number are fine.
    code, status = gate.check(practitioner, b"", today, now)
    assert code == INVALID_ARGUMENT
    assert violations(status) == [
        "nir",
        "nir_key",
        "birth_date",
        "birth_rank",
        "amc_number",
        "domain",
    ]


def test_invalid_requests_never_touch_the_store(gate, known_identities, practitioner, today, now):
    who = known_identities["several-amcs"]
    invalid = [who.request(**{f: v}) for f, v in INVALID_VALUES]
    for request in invalid:
        gate.check(practitioner, request.SerializeToString(), today, now)
        gate.check_item(practitioner, request.SerializeToString(), today, now)
    gate.check_batch(
        practitioner, pb.CheckCoverageBatchRequest(items=invalid).SerializeToString(), today, now
    )
    gate.check(practitioner, b"\xff\xff", today, now)
    assert gate.store_reads == 0
    gate.check(practitioner, who.request().SerializeToString(), today, now)
    assert gate.store_reads == 1
    gate.check_batch(
        practitioner,
        pb.CheckCoverageBatchRequest(
            items=[*invalid[:3], who.request(), who.request()]
        ).SerializeToString(),
        today,
        now,
    )
    assert gate.store_reads == 3


# -- malformed messages ----------------------------------------------------------------------------

MALFORMED = [
    b"\xff",
    b"\x00",
    b"\x0a\x05ab",  # truncated string
    b"\x0a\x01\x80",  # not UTF-8
    b"\x0a\x02\xc3",  # truncated UTF-8 inside the string
    b"\x28\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # 11-byte varint
    b"\x0c",  # end group without a start
    b"\x0b\x0a\x01a",  # group never closed
    b"\x12\x0d2850775123456\x1a",  # truncated after a tag
]


@pytest.mark.parametrize("payload", MALFORMED, ids=lambda b: b.hex())
def test_malformed_bytes_are_invalid_argument_never_an_exception(
    gate, practitioner, today, now, payload
):
    malformed = rules.malformed_message_status("CheckCoverageRequest")
    assert gate.check(practitioner, payload, today, now) == (INVALID_ARGUMENT, malformed)
    item = pb.CheckCoverageResponse.FromString(gate.check_item(practitioner, payload, today, now))
    assert item.request_id == ""
    assert item.decision == rules.DECISION_UNSPECIFIED
    assert item.error.SerializeToString() == malformed
    # The same bytes as a batch item: the whole batch is refused, as upb refuses it.
    batch = b"\x0a" + bytes([len(payload)]) + payload
    assert gate.check_batch(practitioner, batch, today, now) == (
        INVALID_ARGUMENT,
        rules.malformed_message_status("CheckCoverageBatchRequest"),
    )
    assert gate.store_reads == 0


def test_unknown_fields_duplicates_and_odd_encodings_read_like_upb(
    gate, known_identities, practitioner, today, now
):
    who = known_identities["several-amcs"]
    plain = who.request().SerializeToString()
    expected = gate.check(practitioner, plain, today, now)
    variants = [
        plain + b"\x78\x01",  # unknown field 15
        b"\xa0\x06\x05" + plain,  # unknown field 100 (a two-byte tag)
        b"\x0a\x03old" + plain,  # an earlier request_id: the last one wins
        plain.replace(b"\x28\x01", b"\x28\x81\x80\x00"),  # over-long birth_rank varint
        plain + b"\x28\x81\x80\x80\x80\x80\x80\x80\x80\x80\x00",  # rank 1 in 10 bytes
    ]
    for variant in variants:
        assert gate.check(practitioner, variant, today, now) == expected, variant.hex()
    # A bytes-like request is read the same way.
    assert gate.check(practitioner, bytearray(plain), today, now) == expected
    assert gate.check(practitioner, memoryview(plain), today, now) == expected


def test_a_birth_rank_varint_is_truncated_to_32_bits_like_upb(
    gate, known_identities, practitioner, today, now
):
    who = known_identities["twin-2"]
    plain = who.request().SerializeToString()
    assert b"\x28\x02" in plain
    # 2 + 2**32 in a 5-byte varint: a uint32 field keeps the low 32 bits.
    wide = plain.replace(b"\x28\x02", b"\x28\x82\x80\x80\x80\x10")
    assert pb.CheckCoverageRequest.FromString(wide).birth_rank == 2
    assert gate.check(practitioner, wide, today, now) == gate.check(practitioner, plain, today, now)


# -- batches ---------------------------------------------------------------------------------------


def test_a_batch_answers_every_item_in_order_with_per_item_errors(
    gate, known_identities, unknown_identity, practitioner, today, now
):
    items = [
        known_identities["several-amcs"].request(request_id="1"),
        known_identities["twin-1"].request(request_id="2", nir="x"),
        unknown_identity.request(request_id="3"),
        known_identities["twin-2"].request(request_id="\x07", domain=0),
        known_identities["expired"].request(request_id="5"),
        known_identities["member"].request(request_id="6"),
    ]
    code, payload = gate.check_batch(
        practitioner, pb.CheckCoverageBatchRequest(items=items).SerializeToString(), today, now
    )
    assert code == OK
    responses = pb.CheckCoverageBatchResponse.FromString(payload).items
    assert [(r.request_id, r.decision) for r in responses] == [
        ("1", COVERED),
        ("2", rules.DECISION_UNSPECIFIED),
        ("3", NO_MATCH),
        ("", rules.DECISION_UNSPECIFIED),  # an invalid request_id is not echoed
        ("5", NOT_COVERED),
        ("6", COVERED),
    ]
    assert violations(responses[1].error.SerializeToString()) == ["nir"]
    assert violations(responses[3].error.SerializeToString()) == ["request_id", "domain"]
    assert [r.HasField("error") for r in responses] == [False, True, False, True, False, False]
    # Each item answers exactly as the stream call for the same request (same clock).
    for request, response in zip(items, responses, strict=True):
        single = gate.check_item(practitioner, request.SerializeToString(), today, now)
        assert response.SerializeToString() == single


def test_an_empty_batch_is_an_empty_answer(gate, practitioner, today, now):
    assert gate.check_batch(practitioner, b"", today, now) == (OK, b"")
    assert gate.store_reads == 0


def test_a_batch_larger_than_allowed_is_refused_whole(
    gate_module, rights_env, known_identities, practitioner, today, now
):
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, max_batch_items=3)
    assert gate.max_batch_items == 3
    item = known_identities["several-amcs"].request()
    three = pb.CheckCoverageBatchRequest(items=[item] * 3).SerializeToString()
    four = pb.CheckCoverageBatchRequest(items=[item] * 4).SerializeToString()
    assert gate.check_batch(practitioner, four, today, now) == (
        INVALID_ARGUMENT,
        rules.batch_too_large_status(3),
    )
    assert gate.store_reads == 0
    code, payload = gate.check_batch(practitioner, three, today, now)
    assert code == OK
    assert len(pb.CheckCoverageBatchResponse.FromString(payload).items) == 3
    assert gate.store_reads == 3
    # Items that are themselves invalid still count.
    invalid = pb.CheckCoverageBatchRequest(items=[pb.CheckCoverageRequest()] * 4)
    assert gate.check_batch(practitioner, invalid.SerializeToString(), today, now)[0] == (
        INVALID_ARGUMENT
    )


def test_the_default_batch_limit_is_500(gate, known_identities, practitioner, today, now):
    assert gate.max_batch_items == 500
    item = known_identities["expired"].request()
    code, _ = gate.check_batch(
        practitioner,
        pb.CheckCoverageBatchRequest(items=[item] * 500).SerializeToString(),
        today,
        now,
    )
    assert code == OK
    assert gate.check_batch(
        practitioner,
        pb.CheckCoverageBatchRequest(items=[item] * 501).SerializeToString(),
        today,
        now,
    ) == (INVALID_ARGUMENT, rules.batch_too_large_status(500))


# -- attestations ----------------------------------------------------------------------------------


def test_the_attestation_is_bound_to_beneficiary_practitioner_and_date(
    gate, known_identities, practitioner, test_keys, today, now
):
    who = known_identities["corsica-2a"]
    for care_date, expected_date in (("", today), ("20250301", 20250301)):
        _, response = check(gate, practitioner, who.request(care_date=care_date), today, now)
        assert response.decision == COVERED
        claims = rules.decode_attestation(test_keys.attestation_key, response.attestation)
        assert isinstance(claims, rules.AttestationClaims)
        assert claims.expires == now + gate.attestation_ttl == now + 7 * 86400
        assert claims.domain == who.domain
        assert claims.care_date == expected_date
        assert claims.amc_number == who.amc_number
        assert claims.practitioner_id == practitioner.practitioner_id
        # Bound to the normalised identity (2A upper case), without naming it.
        assert claims.beneficiary_tag == test_keys.beneficiary_tag(who.identity)
        assert who.nir.upper().encode() not in response.attestation.encode()


def test_an_attestation_is_not_transferable(
    gate, known_identities, practitioner, test_keys, today, now
):
    _, response = check(gate, practitioner, known_identities["twin-1"].request(), today, now)
    claims = rules.decode_attestation(test_keys.attestation_key, response.attestation)
    assert isinstance(claims, rules.AttestationClaims)
    assert claims.beneficiary_tag != test_keys.beneficiary_tag(known_identities["twin-2"].identity)
    # Another pepper's key, or one changed character, and it no longer verifies.
    assert (
        rules.decode_attestation(
            rules.Keys(b"another pepper, 32 bytes long!!!").attestation_key, response.attestation
        )
        == "TAMPERED"
    )
    token = response.attestation
    tampered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    assert rules.decode_attestation(test_keys.attestation_key, tampered) in (
        "TAMPERED",
        "MALFORMED",
    )


def test_attestation_lifetime_and_practitioner_come_from_the_caller(
    gate_module, rights_env, known_identities, test_keys, today, now
):
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, attestation_ttl=3600)
    assert gate.attestation_ttl == 3600
    someone = rules.Practitioner(practitioner_id="99988877766", profession="physician")
    _, response = check(gate, someone, known_identities["corsica-2b"].request(), today, now)
    claims = rules.decode_attestation(test_keys.attestation_key, response.attestation)
    assert isinstance(claims, rules.AttestationClaims)
    assert (claims.expires, claims.practitioner_id) == (now + 3600, "99988877766")


def test_concurrent_calls_answer_as_sequential_ones(
    gate, known_identities, unknown_identity, practitioner, today, now
):
    # py-lmdb and hashlib release the GIL: threads really are inside one gate at once.
    requests = [w.request().SerializeToString() for w in known_identities.values()]
    requests += [unknown_identity.request().SerializeToString(), b"\xff", b""]
    batch = pb.CheckCoverageBatchRequest(
        items=[w.request() for w in known_identities.values()]
    ).SerializeToString()

    def work(_: int) -> tuple[list[Any], list[bytes], tuple[int, bytes]]:
        return (
            [gate.check(practitioner, r, today, now) for r in requests],
            [gate.check_item(practitioner, r, today, now) for r in requests],
            gate.check_batch(practitioner, batch, today, now),
        )

    expected = work(0)
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(result == expected for result in pool.map(work, range(40)))


def test_the_implementation_name(gate_module):
    expected = "cython" if gate_module.__name__.endswith("_gate_c") else "python"
    assert expected == gate_module.IMPLEMENTATION
