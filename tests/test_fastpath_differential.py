"""Differential property tests: the Cython gate and the pure-Python reference give the same bytes,
error payloads, store reads and exceptions for generated, arbitrary and mutated input.

These are authorization decisions: any drift between the two is a security bug.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spans import masked_spans

from covergate.v1 import covergate_pb2 as pb
from fastpath import rules
from fastpath.rules import Practitioner, RightRow

pytestmark = pytest.mark.slow  # hypothesis over both gates: `make test-fast` skips it

# One fixed profile for the whole module: broad enough to matter, fast enough for `make test`.
DIFFERENTIAL = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- the two gates ---------------------------------------------------------------------------------


class GatePair:
    """The same store behind both implementations; every call is made on both and compared.
    With tracing on, the spans each call recorded are compared too (timestamps masked)."""

    def __init__(self, cython: ModuleType, python: ModuleType, store: Any, **options: Any) -> None:
        self.cython = cython.Gate(store.env, store.db, store.keys, **options)
        self.python = python.Gate(store.env, store.db, store.keys, **options)
        self.traced = bool(options.get("trace"))

    def same(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        reads = (self.cython.store_reads, self.python.store_reads)
        got = _outcome(getattr(self.cython, method), *args, **kwargs)
        expected = _outcome(getattr(self.python, method), *args, **kwargs)
        assert got == expected, method
        assert self.cython.store_reads - reads[0] == self.python.store_reads - reads[1], method
        if self.traced:
            assert masked_spans(self.cython.take_spans()) == masked_spans(
                self.python.take_spans()
            ), method
            assert self.cython.lookup_counts() == self.python.lookup_counts(), method
        return expected

    def same_everywhere(self, practitioner: Any, request: bytes, today: Any, now: Any) -> None:
        """check, check_item, and check_batch on the bytes as a batch and as one batch item."""
        for method in ("check", "check_item", "check_batch"):
            self.same(method, practitioner, request, today, now)
        as_item = b"\x0a" + _varint(len(request)) + request
        self.same("check_batch", practitioner, as_item, today, now)


def _outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    try:
        return ("returned", call(*args, **kwargs))
    except Exception as exc:  # compared, not hidden: both must raise the same way
        return ("raised", type(exc), str(exc))


@pytest.fixture(scope="module", params=["untraced", "traced"])
def gates(request, cython_gate_module, python_gate_module, rights_env) -> GatePair:
    """Both ways: tracing must change no decision, and the spans must match too."""
    traced = request.param == "traced"
    return GatePair(
        cython_gate_module,
        python_gate_module,
        rights_env,
        max_batch_items=6,
        trace=traced,
        trace_seed=20250615 if traced else None,
    )


@pytest.fixture(scope="module")
def scratch_gates(cython_gate_module, python_gate_module, scratch_rights_env) -> GatePair:
    return GatePair(cython_gate_module, python_gate_module, scratch_rights_env)


# -- request strategies ----------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
ASCII_TEXT = st.text(st.characters(max_codepoint=127), max_size=24)
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=70)
ALNUM = st.text(string.ascii_letters + string.digits, max_size=22)
# Letters and digits with the ASCII neighbours of their ranges: off-by-one bait.
NEAR_ALNUM = st.text(string.ascii_letters + string.digits + "/:@[`{-. \x7f", max_size=22)
LOOKALIKE_DIGITS = st.text("0123456789\u0660\u0661\u06f1\uff11\u00b2", min_size=1, max_size=13)


def digits(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(string.digits, min_size=min_size, max_size=max_size)


def messy(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly plausible values, sometimes anything at all."""
    return st.one_of(valid, valid, valid, ANY_TEXT, ASCII_TEXT, NEAR_ALNUM, LOOKALIKE_DIGITS)


@st.composite
def formatted_nirs(draw: st.DrawFn) -> str:
    first = draw(st.sampled_from("1234785690"))
    middle = draw(st.one_of(digits(2, 2), st.sampled_from(["2A", "2B", "2a", "2b", "2C", "A2"])))
    return first + draw(digits(4, 4)) + middle + draw(digits(6, 6))


def correct_key(nir: str) -> str | None:
    normalised = rules.normalise_nir(nir)
    return f"{rules.nir_key_for(normalised):02d}" if rules.valid_nir(normalised) else None


# Leap days of century years, month and year edges of both date rules.
EDGE_DATES = st.builds(
    lambda y, md: f"{y:04d}{md}",
    st.sampled_from([1849, 1850, 1896, 1899, 1900, 1904, 2000, 2024, 2025, 2100, 2199, 2200]),
    st.sampled_from(
        [
            "0229",
            "0228",
            "0230",
            "0000",
            "0015",
            "0200",
            "0431",
            "0430",
            "1231",
            "1232",
            "1300",
            "0101",
            "0100",
            "0001",
        ]
    ),
)
DATES = st.one_of(
    EDGE_DATES,
    st.builds(
        lambda y, m, d: f"{y:04d}{m:02d}{d:02d}",
        st.integers(1840, 2210),
        st.integers(0, 13),
        st.integers(0, 32),
    ),
)
BOUNDARY_CARE_DATES = st.sampled_from(
    [
        "20191231",
        "20200101",
        "20250614",
        "20250615",
        "20250616",
        "20251231",
        "20260101",
        "20271231",
        "20240229",
        "20250229",
        "19000101",
        "21991231",
        "22000101",
    ]
)
KNOWN_AMCS = ["123456789", "987654321", "1122", "555", "0123456789"]

FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "request_id": st.one_of(
        st.just(""), PRINTABLE, ANY_TEXT, st.sampled_from(["Q" * 64, "Q" * 65])
    ),
    "nir": messy(formatted_nirs()),
    "birth_date": messy(DATES),
    "birth_rank": st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),
    "amc_number": messy(st.one_of(st.sampled_from(KNOWN_AMCS), digits(0, 12))),
    "member_number": st.one_of(st.just(""), st.just("A0001234"), ALNUM, NEAR_ALNUM, ANY_TEXT),
    "domain": st.one_of(st.integers(0, 12), st.integers(-(2**31), 2**31 - 1)),
    "care_date": st.one_of(
        st.just(""), BOUNDARY_CARE_DATES, EDGE_DATES, messy(DATES), digits(0, 9)
    ),
}


@st.composite
def nir_keys(draw: st.DrawFn, nir: str) -> str:
    key = correct_key(nir)
    options = [digits(2, 2), messy(digits(0, 3))]
    if key is not None:
        options = [st.just(key), st.just(key), *options]
    return draw(st.one_of(*options))


def requests(identities: list[Any]) -> st.SearchStrategy[pb.CheckCoverageRequest]:
    @st.composite
    def strategy(draw: st.DrawFn) -> pb.CheckCoverageRequest:
        if draw(st.integers(0, 3)):
            # A known (or the unknown) beneficiary with a few factors perturbed.
            who = draw(st.sampled_from(identities))
            fields: dict[str, Any] = {
                "request_id": f"r-{who.label}",
                "nir": who.nir,
                "nir_key": who.nir_key,
                "birth_date": who.birth_date,
                "birth_rank": who.birth_rank,
                "amc_number": who.amc_number,
                "member_number": who.member_number,
                "domain": who.domain,
            }
            for name in draw(st.sets(st.sampled_from([*FIELD_VALUES, "nir_key"]), max_size=3)):
                if name == "nir_key":
                    fields["nir_key"] = draw(nir_keys(fields["nir"]))
                else:
                    fields[name] = draw(FIELD_VALUES[name])
                if name == "nir" and draw(st.booleans()):
                    fields["nir_key"] = draw(nir_keys(fields["nir"]))
        else:
            fields = {
                name: draw(values)
                for name, values in FIELD_VALUES.items()
                if draw(st.integers(0, 5))  # sometimes absent
            }
            fields["nir_key"] = draw(nir_keys(fields.get("nir", "")))
        return pb.CheckCoverageRequest(**fields)

    return strategy()


# -- raw wire strategies ---------------------------------------------------------------------------


def _varint(value: int, padding: int = 0) -> bytes:
    """`value` as a varint, made `padding` bytes longer than needed (still the same value)."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    if padding:
        out[-1] |= 0x80
        out += b"\x80" * (padding - 1) + b"\x00"
    return bytes(out)


@st.composite
def wire_fields(draw: st.DrawFn) -> bytes:
    """One field as any encoder (or attacker) could write it: known and unknown numbers, right
    and wrong wire types, over-long and oversized varints, lengths that lie, groups."""
    number = draw(
        st.one_of(
            st.integers(1, 9), st.integers(1, 9), st.integers(0, 20), st.integers(1, 2**29 - 1)
        )
    )
    wire_type = draw(st.one_of(st.sampled_from([0, 2]), st.integers(0, 7)))
    tag = _varint(number << 3 | wire_type, draw(st.sampled_from([0, 0, 0, 1])))
    if wire_type == 0:
        value = draw(
            st.one_of(
                st.integers(0, 12),
                st.integers(0, 2**32 + 5),
                st.integers(0, 2**64 - 1),
                st.integers(2**31 - 2, 2**31 + 2),
            )
        )
        encoded = _varint(value, draw(st.sampled_from([0, 0, 0, 1, 4, 9])))
        if draw(st.integers(0, 9)) == 0:
            encoded = encoded[:-1]  # the varint runs into whatever follows
        return tag + encoded
    if wire_type == 2:
        payload = draw(
            st.one_of(
                digits(0, 14).map(str.encode),
                ANY_TEXT.map(lambda s: s.encode("utf-8")),
                st.binary(max_size=20),
            )
        )
        length = len(payload) + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
        return tag + _varint(max(length, 0)) + payload
    if wire_type == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    return tag + draw(st.binary(max_size=3))  # groups (3, 4) and invalid wire types (6, 7)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        if not data:
            kind = "insert"
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[position] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 4))]
        elif kind == "truncate":
            del data[position:]
        else:
            data += draw(wire_fields())
    return bytes(data)


@pytest.fixture(scope="module")
def identities(known_identities, unknown_identity) -> list[Any]:
    return [*known_identities.values(), unknown_identity]


TODAY, NOW = 20250615, 1_749_974_400


# -- the properties --------------------------------------------------------------------------------


@DIFFERENTIAL
@given(data=st.data())
def test_generated_requests(gates, identities, practitioner, data):
    request = data.draw(requests(identities)).SerializeToString()
    for method in ("check", "check_item"):
        outcome = gates.same(method, practitioner, request, TODAY, NOW)
        assert outcome[0] == "returned"  # a client can never make the gate raise


@DIFFERENTIAL
@given(data=st.data())
def test_generated_batches(gates, identities, practitioner, data):
    # max_batch_items is 6 here, so some batches are refused whole.
    items = data.draw(st.lists(requests(identities), max_size=8))
    request = pb.CheckCoverageBatchRequest(items=items).SerializeToString()
    outcome = gates.same("check_batch", practitioner, request, TODAY, NOW)
    assert outcome[0] == "returned"


@DIFFERENTIAL
@given(request=st.binary(max_size=160))
def test_arbitrary_bytes(gates, practitioner, request):
    gates.same_everywhere(practitioner, request, TODAY, NOW)


@DIFFERENTIAL
@given(fields=st.lists(wire_fields(), max_size=6), prefix=st.booleans(), data=st.data())
def test_hand_written_wire(gates, identities, practitioner, fields, prefix, data):
    base = b""
    if prefix:
        base = data.draw(st.sampled_from(identities)).request().SerializeToString()
    gates.same_everywhere(practitioner, base + b"".join(fields), TODAY, NOW)


@DIFFERENTIAL
@given(data=st.data())
def test_mutated_serializations(gates, identities, practitioner, data):
    if data.draw(st.booleans()):
        base = data.draw(requests(identities)).SerializeToString()
    else:
        items = data.draw(st.lists(requests(identities), min_size=1, max_size=4))
        base = pb.CheckCoverageBatchRequest(items=items).SerializeToString()
    gates.same_everywhere(practitioner, data.draw(mutated(base)), TODAY, NOW)


@DIFFERENTIAL
@given(
    today=st.one_of(
        st.just(TODAY),
        st.integers(20190101, 20300101),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.sampled_from([None, "20250615", True, 2**32 + TODAY]),
    ),
    now=st.one_of(
        st.just(NOW),
        st.integers(-(2**40), 2**40),
        st.sampled_from([None, 2**32 - 7 * 86400, 2**32 - 7 * 86400 - 1, -7 * 86400, 1.5]),
    ),
    practitioner_id=st.one_of(
        st.just("10001234567"),
        ANY_TEXT,
        st.sampled_from(["9" * 255, "9" * 256, "\u00e9" * 128, "\ud800", ""]),
    ),
    data=st.data(),
)
def test_caller_supplied_clock_and_practitioner(
    gates, identities, today, now, practitioner_id, data
):
    """Values from the server, not the client, but the two must still agree (or fail alike)."""
    who = data.draw(st.sampled_from(identities))
    overrides = data.draw(st.sampled_from([{}, {"care_date": "20250301"}, {"domain": 2}]))
    request = who.request(**overrides).SerializeToString()
    practitioner = Practitioner(practitioner_id=practitioner_id)
    gates.same_everywhere(practitioner, request, today, now)


# -- rights records as the reference decoder reads them --------------------------------------------

RECORD_IDENTITY = "member"


@st.composite
def right_rows(draw: st.DrawFn, member_hash: bytes) -> RightRow:
    return RightRow(
        domain=draw(st.one_of(st.integers(0, 12), st.integers(0, 255))),
        rate_percent=draw(st.integers(0, 255)),
        start=draw(st.one_of(st.integers(20240101, 20260101), st.integers(0, 2**32 - 1))),
        end=draw(st.one_of(st.integers(20240101, 20280101), st.integers(0, 2**32 - 1))),
        amc_number=draw(st.sampled_from(KNOWN_AMCS)),
        convention_type=draw(st.text(string.ascii_letters + string.digits, max_size=18)),
        member_hash=draw(
            st.one_of(st.none(), st.just(member_hash), st.binary(min_size=16, max_size=16))
        ),
    )


def last_row_boundaries(rows: list[RightRow]) -> list[int]:
    """Offsets in encode_record(rows) where the last row's head, AMC, convention length,
    convention and member hash end."""
    start = len(rules.encode_record(rows[:-1]))
    last = rows[-1]
    head = start + 12
    amc = head + len(last.amc_number)
    convention = amc + 1 + len(last.convention_type)
    member = convention + (len(last.member_hash) if last.member_hash is not None else 0)
    return [start, head, amc, amc + 1, convention, member]


@pytest.fixture(scope="module")
def planted_record(scratch_rights_env, known_identities) -> Iterator[Callable[[bytes], None]]:
    """Put any value under one known beneficiary's key; the original comes back afterwards."""
    who = known_identities[RECORD_IDENTITY]
    key = scratch_rights_env.keys.storage_key(who.identity)
    with scratch_rights_env.env.begin(db=scratch_rights_env.db) as txn:
        original = txn.get(key)
    yield lambda value: scratch_rights_env.put(key, value)
    scratch_rights_env.put(key, original)


@DIFFERENTIAL
@given(data=st.data())
def test_rights_records_are_read_like_the_reference_decoder(
    scratch_gates, known_identities, test_keys, practitioner, planted_record, data
):
    who = known_identities[RECORD_IDENTITY]
    member_hash = test_keys.member_hash(test_keys.storage_key(who.identity), who.member_number)
    rows = data.draw(st.lists(right_rows(member_hash), max_size=5))
    record = rules.encode_record(rows)
    shape = data.draw(
        st.sampled_from(["whole", "whole", "cut", "cut", "truncated", "extended", "mutated", "raw"])
    )
    if shape == "cut" and rows:
        # Cut the last row at (or next to) one of its field boundaries: where the reference
        # decoder goes from tolerating a short slice to raising.
        boundary = data.draw(st.sampled_from(last_row_boundaries(rows)))
        record = record[: max(boundary + data.draw(st.sampled_from([-1, 0, 0, 1])), 0)]
    elif shape == "truncated":
        record = record[: data.draw(st.integers(0, len(record)))]
    elif shape == "extended":
        record += data.draw(st.binary(min_size=1, max_size=20))
    elif shape == "mutated":
        record = data.draw(mutated(record))
    elif shape == "raw":
        record = data.draw(st.binary(max_size=60))
    planted_record(record)
    for overrides in (
        {},
        {"member_number": ""},
        {"member_number": "", "amc_number": data.draw(st.sampled_from(KNOWN_AMCS))},
        {"domain": data.draw(st.integers(1, 10)), "care_date": data.draw(BOUNDARY_CARE_DATES)},
    ):
        request = who.request(**overrides).SerializeToString()
        for method in ("check", "check_item"):
            scratch_gates.same(method, practitioner, request, TODAY, NOW)
