"""The shared domain rules: field formats, NIR keys, dates, the rights record and attestation
formats, and the keyed hashes derived from the pepper.

Expected NIR keys are computed here independently of `rules` (Corsica as "20" minus 10^6 or 2*10^6).
"""

from __future__ import annotations

import base64
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpath import rules
from fastpath.rules import Keys, RightRow

# -- NIR -------------------------------------------------------------------------------------------


def independent_key(nir: str) -> int:
    """97 - (n mod 97), where 2A/2B are read as 20 then lowered by 1,000,000 / 2,000,000 (the
    department digits sit at 10^7 and 10^6), which is the same as replacing them by 19 / 18."""
    middle = nir[5:7].upper()
    if middle in ("2A", "2B"):
        n = int(nir[:5] + "20" + nir[7:]) - (1_000_000 if middle == "2A" else 2_000_000)
    else:
        n = int(nir)
    return 97 - n % 97


# Worked by hand from the definition; 2A and 2B rows are the same NIR with the letters swapped.
KNOWN_KEYS = [
    ("1850775123456", 8),
    ("2690149588157", 16),
    ("185072A123456", 65),
    ("185072B123456", 92),
    ("297092B033885", 11),
    ("181032A004670", 61),
    ("1000000000000", 47),
    ("8991299999999", 2),
]


@pytest.mark.parametrize(("nir", "key"), KNOWN_KEYS)
def test_nir_key_known_examples(nir: str, key: int) -> None:
    assert rules.valid_nir(nir)
    assert rules.nir_key_for(nir) == key
    assert independent_key(nir) == key


def test_corsican_key_is_replacement_19_and_18() -> None:
    base = "1850720123456"
    assert rules.nir_number("185072A123456") == int("1850719123456")
    assert rules.nir_number("185072B123456") == int("1850718123456")
    assert rules.nir_number(base) == int(base)
    # 2A and 2B never share a key with each other (they differ by 10^6, not a multiple of 97).
    assert rules.nir_key_for("185072A123456") != rules.nir_key_for("185072B123456")


@settings(deadline=None)
@given(
    first=st.sampled_from("123478"),
    digits=st.text(alphabet=string.digits, min_size=12, max_size=12),
    corsica=st.sampled_from(["", "2A", "2B", "2a", "2b"]),
)
def test_nir_key_matches_independent_computation(first: str, digits: str, corsica: str) -> None:
    raw = first + digits
    if corsica:
        raw = raw[:5] + corsica + raw[7:]
    nir = rules.normalise_nir(raw)
    assert rules.valid_nir(nir)
    key = rules.nir_key_for(nir)
    assert 1 <= key <= 97
    assert key == independent_key(raw)
    assert rules.valid_nir_key_format(f"{key:02d}")


@pytest.mark.parametrize(
    "nir",
    [
        "1850775123456",
        "2690149588157",
        "3850775123456",
        "4850775123456",
        "7850775123456",
        "8850775123456",
        "185072A123456",
        "185072B123456",
    ],
)
def test_valid_nirs(nir: str) -> None:
    assert rules.valid_nir(rules.normalise_nir(nir))


@pytest.mark.parametrize("nir", ["185072a123456", "185072b123456"])
def test_corsica_lower_case_accepted_after_normalising(nir: str) -> None:
    normalised = rules.normalise_nir(nir)
    assert normalised == nir.upper()
    assert rules.valid_nir(normalised)
    assert rules.nir_key_for(normalised) == independent_key(nir)


@pytest.mark.parametrize(
    ("nir", "why"),
    [
        ("0850775123456", "first digit 0"),
        ("5850775123456", "first digit 5"),
        ("6850775123456", "first digit 6"),
        ("9850775123456", "first digit 9"),
        ("A850775123456", "letter first"),
        ("18507751234A6", "letter in the order number"),
        ("18A0775123456", "letter in the year"),
        ("185072C123456", "2C is not a department"),
        ("18507A2123456", "A2 reversed"),
        ("185073A123456", "3A is not a department"),
        ("18507751234567", "14 characters"),
        ("185077512345", "12 characters"),
        ("", "empty"),
        ("18507751234 6", "space"),
        ("185077512345\u0666", "Arabic-Indic digit"),
        ("\uff11850775123456", "full-width digit"),
    ],
)
def test_invalid_nirs(nir: str, why: str) -> None:
    assert not rules.valid_nir(rules.normalise_nir(nir)), why


@pytest.mark.parametrize("key", ["00", "08", "97", "42"])
def test_nir_key_format_ok(key: str) -> None:
    assert rules.valid_nir_key_format(key)


@pytest.mark.parametrize("key", ["8", "008", "", "4a", "\u0664\u0662", " 8"])
def test_nir_key_format_bad(key: str) -> None:
    assert not rules.valid_nir_key_format(key)


# -- dates -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "date",
    [
        "19850701",
        "19850000",  # lunar: day and month unknown
        "19850700",  # day unknown
        "19850012",  # month unknown, day known
        "18500101",
        "20000229",  # 2000 is a leap year (divisible by 400)
        "20240229",
        "19960229",
        "19850131",
        "19850430",
    ],
)
def test_birth_dates_accepted(date: str) -> None:
    assert rules.valid_birth_date(date)


@pytest.mark.parametrize(
    "date",
    [
        "19850230",  # 30 February
        "19850431",  # 31 April
        "19850631",
        "19850229",  # not a leap year
        "19000229",  # 1900 is not a leap year
        "20230229",
        "19851301",
        "19850132",
        "18491231",  # before 1850
        "1985071",
        "198507011",
        "1985-07-",
        "",
        "1985O701",
        "\u0661\u0669\u0668\u0665\u0660\u0667\u0660\u0661",
    ],
)
def test_birth_dates_rejected(date: str) -> None:
    assert not rules.valid_birth_date(date)


@pytest.mark.parametrize(
    ("date", "ok"),
    [
        ("20240229", True),
        ("20000229", True),
        ("21000229", False),
        ("19000229", False),
        ("20230228", True),
        ("20230229", False),
        ("20240431", False),
        ("20240430", True),
        ("20241231", True),
        ("20240001", False),  # calendar dates never have 00
        ("20240100", False),
        ("20241301", False),
        ("19000101", True),
        ("18991231", False),
        ("21991231", True),
        ("22000101", False),
        ("2024011", False),
        ("2024O101", False),
    ],
)
def test_calendar_dates(date: str, ok: bool) -> None:
    assert rules.valid_calendar_date(date) is ok


def test_days_in_month_leap_rules() -> None:
    assert rules.days_in_month(2024, 2) == 29
    assert rules.days_in_month(2000, 2) == 29
    assert rules.days_in_month(1900, 2) == 28
    assert rules.days_in_month(2023, 2) == 28
    assert [rules.days_in_month(2023, m) for m in range(1, 13)] == [
        31,
        28,
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ]


# -- identifiers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("1", True),
        ("123456789", True),
        ("1234567890", True),
        ("12345678901", False),
        ("", False),
        ("12345678a", False),
        (" 123", False),
        ("\u0661\u0662\u0663", False),
    ],
)
def test_amc_number(value: str, ok: bool) -> None:
    assert rules.valid_amc_number(value) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("", True),
        ("A0001234", True),
        ("a1", True),
        ("1" * 20, True),
        ("1" * 21, False),
        ("A-0001", False),
        ("A 0001", False),
        ("é123", False),
        ("A\n1", False),
    ],
)
def test_member_number(value: str, ok: bool) -> None:
    assert rules.valid_member_number(value) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("TP01", True),
        ("a", True),
        ("X" * 16, True),
        ("X" * 17, False),
        ("", False),
        ("TP-1", False),
        ("TPé", False),
    ],
)
def test_convention_type(value: str, ok: bool) -> None:
    assert rules.valid_convention_type(value) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("123456789", True),  # ADELI / FINESS
        ("10001234567", True),  # RPPS
        ("1" * 14, True),
        ("12345678", False),
        ("1" * 15, False),
        ("1000123456A", False),
        ("", False),
        ("\u0661" * 11, False),
    ],
)
def test_practitioner_id(value: str, ok: bool) -> None:
    assert rules.valid_practitioner_id(value) is ok


def test_identity_bytes() -> None:
    assert rules.identity_bytes("185072A123456", "19850700", 2) == b"185072A123456198507002"
    assert len(rules.identity_bytes("1850775123456", "19850701", 1)) == 22


# -- rights records --------------------------------------------------------------------------------

right_rows = st.builds(
    RightRow,
    domain=st.integers(1, rules.MAX_DOMAIN),
    rate_percent=st.integers(0, 100),
    start=st.integers(0, 2**32 - 1),
    end=st.integers(0, 2**32 - 1),
    amc_number=st.text(alphabet=string.digits, min_size=1, max_size=rules.MAX_AMC_NUMBER),
    convention_type=st.text(
        alphabet=string.ascii_letters + string.digits,
        min_size=1,
        max_size=rules.MAX_CONVENTION_TYPE,
    ),
    member_hash=st.none()
    | st.binary(min_size=rules.MEMBER_HASH_SIZE, max_size=rules.MEMBER_HASH_SIZE),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(right_rows, max_size=20))
def test_record_round_trip(rows: list[RightRow]) -> None:
    encoded = rules.encode_record(rows)
    assert encoded[0] == rules.RECORD_VERSION
    assert rules.decode_record(encoded) == rows


def test_record_layout_fixed_example() -> None:
    row = RightRow(1, 100, 20240101, 20261231, "123456789", "TP01", None)
    encoded = rules.encode_record([row])
    assert encoded == (
        b"\x01\x01\x00"  # version 1, one row
        + bytes((1, 100))
        + (20240101).to_bytes(4, "little")
        + (20261231).to_bytes(4, "little")
        + b"\x00\x09123456789\x04TP01"
    )


def test_record_unknown_version_refused() -> None:
    encoded = bytearray(rules.encode_record([]))
    encoded[0] = 2
    with pytest.raises(ValueError):
        rules.decode_record(bytes(encoded))


# -- attestations ----------------------------------------------------------------------------------

attestation_fields = st.fixed_dictionaries(
    {
        "expires": st.integers(0, 2**32 - 1),
        "domain": st.integers(1, rules.MAX_DOMAIN),
        "care_date": st.integers(19000101, 21991231),
        "amc_number": st.text(alphabet=string.digits, min_size=1, max_size=10),
        "practitioner_id": st.text(alphabet=string.digits, min_size=9, max_size=14),
        "beneficiary_tag": st.binary(min_size=8, max_size=8),
    }
)
attestation_keys = st.binary(min_size=32, max_size=32)


@settings(max_examples=200, deadline=None)
@given(key=attestation_keys, fields=attestation_fields)
def test_attestation_round_trip(key: bytes, fields: dict) -> None:
    token = rules.encode_attestation(key, **fields)
    assert token.isascii() and "=" not in token
    claims = rules.decode_attestation(key, token)
    assert claims == rules.AttestationClaims(**fields)


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@settings(max_examples=300, deadline=None)
@given(key=attestation_keys, fields=attestation_fields, data=st.data())
def test_attestation_any_single_byte_change_fails_the_mac(
    key: bytes, fields: dict, data: st.DataObject
) -> None:
    raw = bytearray(_raw(rules.encode_attestation(key, **fields)))
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    flip = data.draw(st.integers(1, 255), label="xor")
    raw[index] ^= flip
    assert rules.decode_attestation(key, _token(bytes(raw))) == "TAMPERED"


@settings(deadline=None)
@given(key=attestation_keys, other=attestation_keys, fields=attestation_fields)
def test_attestation_other_key_fails(key: bytes, other: bytes, fields: dict) -> None:
    token = rules.encode_attestation(key, **fields)
    if other != key:
        assert rules.decode_attestation(other, token) == "TAMPERED"


@pytest.mark.parametrize("token", ["", "!!!!", "é", "A" * 600, "AAAA"])
def test_attestation_malformed(token: str) -> None:
    assert rules.decode_attestation(b"k" * 32, token) == "MALFORMED"


def test_attestation_truncated_or_extended_is_refused() -> None:
    key = b"k" * 32
    token = rules.encode_attestation(
        key,
        expires=1,
        domain=1,
        care_date=20240101,
        amc_number="1",
        practitioner_id="123456789",
        beneficiary_tag=b"t" * 8,
    )
    raw = _raw(token)
    assert rules.decode_attestation(key, _token(raw[:-1])) in ("TAMPERED", "MALFORMED")
    assert rules.decode_attestation(key, _token(raw + b"\x00")) in ("TAMPERED", "MALFORMED")


# -- keyed hashes ----------------------------------------------------------------------------------

PEPPER_A = bytes(range(32))
PEPPER_B = bytes(range(1, 33))


@settings(deadline=None)
@given(
    nir=st.text(alphabet=string.digits, min_size=13, max_size=13),
    birth=st.text(alphabet=string.digits, min_size=8, max_size=8),
    rank=st.integers(1, 9),
)
def test_keys_are_distinct_and_depend_on_the_pepper(nir: str, birth: str, rank: int) -> None:
    identity = rules.identity_bytes(nir, birth, rank)
    a, b = Keys(PEPPER_A), Keys(PEPPER_B)
    storage, pseudonym, tag = (
        a.storage_key(identity),
        a.pseudonym(identity),
        a.beneficiary_tag(identity),
    )
    assert len(storage) == rules.STORAGE_KEY_SIZE == 16
    assert len(pseudonym) == rules.PSEUDONYM_SIZE
    assert len(tag) == rules.BENEFICIARY_TAG_SIZE
    # Not the same value, nor one a truncation of another.
    assert pseudonym != tag
    assert storage[: len(pseudonym)] != pseudonym
    assert storage[: len(tag)] != tag
    assert identity not in storage + pseudonym + tag
    # Another pepper gives other values everywhere.
    assert b.storage_key(identity) != storage
    assert b.pseudonym(identity) != pseudonym
    assert b.beneficiary_tag(identity) != tag
    # Deterministic.
    assert Keys(PEPPER_A).storage_key(identity) == storage


def test_keys_identity_factors_all_count() -> None:
    keys = Keys(PEPPER_A)
    base = keys.storage_key(rules.identity_bytes("1850775123456", "19850701", 1))
    assert keys.storage_key(rules.identity_bytes("1850775123456", "19850701", 2)) != base
    assert keys.storage_key(rules.identity_bytes("1850775123456", "19850702", 1)) != base
    assert keys.storage_key(rules.identity_bytes("1850775123457", "19850701", 1)) != base


def test_member_hash_salted_by_storage_key_and_pepper() -> None:
    a, b = Keys(PEPPER_A), Keys(PEPPER_B)
    k1 = a.storage_key(rules.identity_bytes("1850775123456", "19850701", 1))
    k2 = a.storage_key(rules.identity_bytes("1850775123456", "19850701", 2))
    h = a.member_hash(k1, "A0001234")
    assert len(h) == rules.MEMBER_HASH_SIZE
    assert h != a.member_hash(k2, "A0001234")
    assert h != a.member_hash(k1, "A0001235")
    assert h != b.member_hash(k1, "A0001234")
    assert b"A0001234" not in h


def test_derived_secrets_depend_on_the_pepper() -> None:
    a, b = Keys(PEPPER_A), Keys(PEPPER_B)
    assert a.attestation_key != b.attestation_key
    assert len(a.attestation_key) == 32
    assert a.fingerprint != b.fingerprint
    assert len(a.fingerprint) == 32 and int(a.fingerprint, 16) >= 0
    assert PEPPER_A.hex() not in a.fingerprint
    assert PEPPER_A.hex() not in repr(a)


@pytest.mark.parametrize("size", [0, 15, 65])
def test_keys_refuse_bad_pepper_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        Keys(b"p" * size)
