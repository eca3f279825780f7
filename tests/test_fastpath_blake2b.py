"""The C gate's vendored BLAKE2b (key, salt, personalisation) and HMAC-SHA256 give exactly what
hashlib and hmac give, at every length around the block boundaries."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gate_c = pytest.importorskip("fastpath._gate_c")


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
    assert gate_c._blake2b_for_tests(data, digest_size, key, salt, person) == expected


@pytest.mark.parametrize("n", [0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 300])
def test_hmac_sha256_at_block_boundaries(n: int) -> None:
    msg = bytes((i * 7) % 256 for i in range(n))
    for key in (b"", b"k" * 32, b"k" * 64, b"k" * 65, b"k" * 200):
        assert gate_c._hmac_sha256_for_tests(key, msg) == hmac.digest(key, msg, "sha256")


@settings(max_examples=300, deadline=None)
@given(key=st.binary(max_size=100), msg=st.binary(max_size=400))
def test_hmac_sha256_matches_hmac(key: bytes, msg: bytes) -> None:
    assert gate_c._hmac_sha256_for_tests(key, msg) == hmac.digest(key, msg, "sha256")
