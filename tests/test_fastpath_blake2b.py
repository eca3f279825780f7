"""The C gate's vendored BLAKE2b (key, salt, personalisation), HMAC-SHA256 and SipHash-2-4 give
exactly what hashlib, hmac and the SipHash reference give, at every length around the block
boundaries; and the pure-Python SipHash (fastpath.rules) matches both."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath import rules

hashes = pytest.importorskip("fastpath._hashes_for_tests")


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(max_size=300),
    digest_size=st.integers(1, 64),
    key=st.binary(max_size=64),
    salt=st.binary(max_size=16),
    person=st.binary(max_size=16),
)
def test_blake2b_matches_hashlib(
    data: bytes, digest_size: int, key: bytes, salt: bytes, person: bytes
) -> None:
    expected = hashlib.blake2b(
        data, digest_size=digest_size, key=key, salt=salt, person=person
    ).digest()
    assert hashes.blake2b(data, digest_size, key, salt, person) == expected


# Published vectors: RFC 7693 Appendix A (BLAKE2b-512 of "abc"), and the first keyed entries of
# the BLAKE2 reference's blake2b-kat.txt (key 00..3f, message 00..(n-1)).
BLAKE2B_VECTORS = [
    (
        b"abc",
        b"",
        "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1"
        "7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923",
    ),
    (
        b"",
        bytes(range(64)),
        "10ebb67700b1868efb4417987acf4690ae9d972fb7a590c2f02871799aaa4786"
        "b5e996e8f0f4eb981fc214b005f42d2ff4233499391653df7aefcbc13fc51568",
    ),
]


@pytest.mark.parametrize(("data", "key", "expected"), BLAKE2B_VECTORS)
def test_blake2b_published_vectors(data: bytes, key: bytes, expected: str) -> None:
    assert hashes.blake2b(data, 64, key, b"", b"").hex() == expected


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=128),
    digest_size=st.integers(1, 64),
    key=st.binary(min_size=1, max_size=64),
    person=st.binary(max_size=16),
)
def test_blake2b_from_a_prekeyed_state_matches_hashlib(
    data: bytes, digest_size: int, key: bytes, person: bytes
) -> None:
    """The gate's storage key and beneficiary tag: one compression from a state keyed once."""
    expected = hashlib.blake2b(data, digest_size=digest_size, key=key, person=person).digest()
    assert hashes.blake2b_prekeyed(data, digest_size, key, person) == expected


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 22, 63, 64, 65, 111, 112, 127, 128])
def test_blake2b_prekeyed_at_every_word_boundary(n: int) -> None:
    data = bytes((i * 13 + 5) % 256 for i in range(n))
    for key in (b"k", b"k" * 32, b"k" * 64):
        expected = hashlib.blake2b(data, digest_size=16, key=key, person=b"cg.store").digest()
        assert hashes.blake2b_prekeyed(data, 16, key, b"cg.store") == expected


def _cpu_has_sha_ni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " sha_ni" in f.read()
    except OSError:
        return False


@pytest.fixture(params=["sha-ni", "portable"])
def sha256_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """The MAC's SHA-256 compression both ways: with the CPU's SHA extensions and without."""
    if request.param == "sha-ni" and not _cpu_has_sha_ni():
        pytest.skip("this CPU has no SHA extensions")
    assert hashes.sha256_use_ni(request.param == "sha-ni") == (request.param == "sha-ni")
    yield request.param
    hashes.sha256_use_ni(True)  # the default: SHA-NI where the CPU has it


@pytest.mark.parametrize("n", [0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 300])
def test_hmac_sha256_at_block_boundaries(n: int, sha256_path: str) -> None:
    msg = bytes((i * 7) % 256 for i in range(n))
    for key in (b"", b"k" * 32, b"k" * 64, b"k" * 65, b"k" * 200):
        assert hashes.hmac_sha256(key, msg) == hmac.digest(key, msg, "sha256")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.binary(max_size=100), msg=st.binary(max_size=400))
def test_hmac_sha256_matches_hmac(key: bytes, msg: bytes, sha256_path: str) -> None:
    assert hashes.hmac_sha256(key, msg) == hmac.digest(key, msg, "sha256")


def test_the_default_uses_sha_ni_where_the_cpu_has_it() -> None:
    assert hashes.sha256_use_ni(True) == _cpu_has_sha_ni()


# SipHash-2-4 reference implementation's vectors.h: key 00..0f, message 00..(n-1), for n = 0..15.
SIPHASH_VECTORS = {
    0: "310e0edd47db6f72",
    1: "fd67dc93c539f874",
    2: "5a4fa9d909806c0d",
    3: "2d7efbd796666785",
    7: "37d1018bf50002ab",
    8: "6224939a79f5f593",
    15: "e545be4961ca29a1",
}


@pytest.mark.parametrize(("n", "expected"), sorted(SIPHASH_VECTORS.items()))
def test_siphash_reference_vectors(n: int, expected: str) -> None:
    key, msg = bytes(range(16)), bytes(range(n))
    assert rules.siphash24(key, msg).hex() == expected
    assert hashes.siphash24(key, msg).hex() == expected


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=16, max_size=16), data=st.binary(max_size=70))
def test_siphash_c_matches_python(key: bytes, data: bytes) -> None:
    assert hashes.siphash24(key, data) == rules.siphash24(key, data)


@pytest.mark.parametrize(
    ("digest_size", "key", "salt", "person"),
    [(65, b"", b"", b""), (0, b"", b"", b""), (32, b"k" * 65, b"", b""), (32, b"", b"s" * 17, b""),
     (32, b"", b"", b"p" * 17), (32, b"k" * 200, b"", b"")],
)  # fmt: skip
def test_the_test_hooks_are_bounds_checked(
    digest_size: int, key: bytes, salt: bytes, person: bytes
) -> None:
    with pytest.raises(ValueError):
        hashes.blake2b(b"data", digest_size, key, salt, person)


def test_the_shipped_gate_has_no_test_hooks() -> None:
    gate_c = pytest.importorskip("fastpath._gate_c")
    hooks = [name for name in dir(gate_c) if "for_tests" in name or "use_ni" in name]
    assert hooks == []


def test_the_timing_hooks_time_and_are_bounds_checked() -> None:
    """bench.micro's stage table times the hashes in C; what they measure is not tested here
    (timing never decides a test), only that they run and refuse what they cannot hash."""
    key = b"k" * 32
    assert hashes.time_blake2b(b"x" * 22, 16, key, b"", b"cg.store.v1", True, 10) > 0
    assert hashes.time_blake2b(b"x" * 9, 16, key, b"s" * 16, b"cg.member.v1", False, 10) > 0
    assert hashes.time_hmac_sha256(key, b"m" * 60, 10) > 0
    assert hashes.time_siphash24(b"k" * 16, b"m" * 16, 10) > 0
    for bad in (
        lambda: hashes.time_blake2b(b"", 16, key, b"", b"", True, 10),
        lambda: hashes.time_blake2b(b"x" * 257, 16, key, b"", b"", True, 10),
        lambda: hashes.time_blake2b(b"x", 65, key, b"", b"", True, 10),
        lambda: hashes.time_blake2b(b"x", 16, b"", b"", b"", True, 10),
        lambda: hashes.time_blake2b(b"x", 16, key, b"s" * 17, b"", True, 10),
        lambda: hashes.time_blake2b(b"x", 16, key, b"", b"", True, 0),
        lambda: hashes.time_hmac_sha256(key, b"m" * 257, 10),
        lambda: hashes.time_siphash24(b"k" * 15, b"m", 10),
        lambda: hashes.time_blake2b(b"x" * 129, 16, key, b"", b"", True, 10),
        lambda: hashes.blake2b_prekeyed(b"", 16, key, b""),
        lambda: hashes.blake2b_prekeyed(b"x" * 129, 16, key, b""),
        lambda: hashes.blake2b_prekeyed(b"x", 16, b"", b""),
        lambda: hashes.blake2b_prekeyed(b"x", 65, key, b""),
    ):
        with pytest.raises(ValueError):
            bad()
