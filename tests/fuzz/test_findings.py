"""What the differential fuzzer found, one minimal reproducer each, xfail until fixed.

strict=True: the fix turns a test into XPASS, which fails the suite, so that its marker (and the
entry in fuzz.differential.KNOWN_ISSUES that lets the fuzzer go on past it) is removed with it.
`python -m fuzz --explain FILE` prints the same for any saved input.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import KNOWN_IDENTITIES, TODAY, UNKNOWN_IDENTITY, RightsStore

from fuzz import wire
from fuzz.cases import SLOT_HEAD_ONLY, Case, with_slot_fields
from fuzz.differential import Checker, Divergence

VALID = KNOWN_IDENTITIES[0].request().SerializeToString()  # COVERED
UNKNOWN = UNKNOWN_IDENTITY.request().SerializeToString()  # NO_MATCH
ROOMY, HAIR_TRIGGER = 1, 3  # fuzz.cases.PROFILES
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checker(
    cython_gate_module: ModuleType,
    python_gate_module: ModuleType,
    rights_env: RightsStore,
    tmp_path: Path,
) -> Iterator[Checker]:
    gates = [cython_gate_module, python_gate_module]
    with Checker(rights_env, gates, workdir=tmp_path, garbage_metered=True) as checker:
        yield checker


# Issue 9, known: found again by the fuzzer within seconds (it plants corrupted slot heads).
# Case bytes: 00812000000000000000000000000000000000f7ff3401000000000000000041000000 + 28 zero
# bytes + the request. The C gate leaves window_len at 65, the reference writes 64.
@pytest.mark.xfail(
    strict=True, raises=Divergence, reason="issue 9: window_len > 64 kept by C, clamped by Python"
)
def test_corrupted_window_len_over_64(checker: Checker) -> None:
    case = Case(method=0, profile=ROOMY, slot_mode=SLOT_HEAD_ONLY, request=VALID)
    checker.check(with_slot_fields(case, day=TODAY, window_len=65))


# NEW. A slot whose guard_fired counter is at its maximum (a u32: 2**32 - 1), the guard firing
# once more. The reference computes guard_fired + 1 = 2**32 and struct.pack raises struct.error
# ("'I' format requires 0 <= number <= 4294967295") inside the slot lock: the call raises (the
# client would get INTERNAL/UNKNOWN), nothing is written, and the practitioner is never suspended.
# The C gate wraps the counter to 0 and suspends. Only a corrupted (or 4-billion-times-suspended)
# slot reaches it, but issue 9 asks that the gates agree on corrupted state. Either saturate at
# 2**32 - 1 in both, or wrap in both.
# Case bytes: 00832000000000ffffffff0000000000000000f7ff3401 + zeros to 64 bytes + UNKNOWN.
@pytest.mark.xfail(
    strict=True, raises=Divergence, reason="new: guard_fired = 2**32 - 1: C wraps, Python raises"
)
def test_corrupted_guard_fired_at_its_maximum(checker: Checker) -> None:
    case = Case(method=0, profile=HAIR_TRIGGER, slot_mode=SLOT_HEAD_ONLY, request=UNKNOWN)
    checker.check(with_slot_fields(case, day=TODAY, guard_fired=0xFFFFFFFF))


# Issue 9, being fixed: garbage (bytes upb rejects; a batch over max_batch_items) must spend the
# caller's rate and count as bad for the harvest guard. Today both gates refuse it before the
# quota slot is touched. When this passes, set fuzz.differential.GARBAGE_IS_METERED = True.
@pytest.mark.xfail(
    strict=True, raises=Divergence, reason="issue 9: malformed and oversize requests cost nothing"
)
@pytest.mark.parametrize(
    "case",
    [
        Case(method=0, profile=ROOMY, request=b"\x07"),  # case bytes 00810007
        Case(method=1, profile=ROOMY, request=b"\x0a\x05"),
        Case(method=2, profile=ROOMY, request=wire.len_field(1, VALID) * 5),  # 5 items, max 4
    ],
    ids=["check", "check_item", "oversize-batch"],
)
def test_garbage_is_metered(checker: Checker, case: Case) -> None:
    checker.check(case)


# Issue 9, known: with the pure-Python protobuf backend, a string field holding invalid UTF-8
# raises UnicodeDecodeError (not DecodeError) from FromString, and both gates let it escape.
# Case bytes: 0081000a... (VALID) + 1202c0af (nir = b"\xc0\xaf").
@pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="issue 9: UnicodeDecodeError, pure-Python backend"
)
def test_invalid_utf8_on_the_pure_python_protobuf_backend(tmp_path: Path) -> None:
    case = Case(method=0, profile=ROOMY, request=VALID + wire.len_field(2, b"\xc0\xaf"))
    (tmp_path / "case").write_bytes(case.encode())
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python",
               PYTHONPATH=str(ROOT / "tests"))  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "fuzz", "--explain", str(tmp_path / "case")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if "-> " not in run.stdout:  # the checker did not run: a broken test, not the finding
        raise RuntimeError(run.stdout + run.stderr)
    assert "-> both gates agree" in run.stdout, run.stdout
