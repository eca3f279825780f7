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
from fuzz.differential import Checker

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


# Each was an xfail(strict=True) reproducer until its fix landed; they now guard the fixes.


# window_len > 64 in a corrupted slot: the C gate kept it, the reference wrote 64. Case bytes:
# 00812000000000000000000000000000000000f7ff3401000000000000000041000000 + 28 zero bytes + request.
def test_corrupted_window_len_over_64(checker: Checker) -> None:
    case = Case(method=0, profile=ROOMY, slot_mode=SLOT_HEAD_ONLY, request=VALID)
    checker.check(with_slot_fields(case, day=TODAY, window_len=65))


# guard_fired at its u32 maximum and the guard firing once more: the reference raised
# struct.error inside the slot lock (no suspension), the C gate wrapped to 0 and suspended. Both
# now saturate and suspend. Case bytes: 00832000000000ffffffff0000000000000000f7ff3401 + zeros to
# 64 bytes + UNKNOWN.
def test_corrupted_guard_fired_at_its_maximum(checker: Checker) -> None:
    case = Case(method=0, profile=HAIR_TRIGGER, slot_mode=SLOT_HEAD_ONLY, request=UNKNOWN)
    checker.check(with_slot_fields(case, day=TODAY, guard_fired=0xFFFFFFFF))


# Garbage (bytes upb rejects; a batch over max_batch_items) spends the caller's rate and counts as
# bad for the harvest guard (the checker's metering oracle), in both gates alike.
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


# The pure-Python protobuf backend raised UnicodeDecodeError (not DecodeError) for invalid UTF-8
# and both gates let it escape; the gates now refuse to start on that backend at all.
def test_the_fuzzer_stops_at_once_on_the_pure_python_protobuf_backend(tmp_path: Path) -> None:
    case = Case(method=0, profile=ROOMY, request=VALID + wire.len_field(2, b"\xc0\xaf"))
    (tmp_path / "case").write_bytes(case.encode())
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python",
               PYTHONPATH=str(ROOT / "tests"))  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "fuzz", "--explain", str(tmp_path / "case")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0
    assert "needs protobuf's upb backend" in run.stdout + run.stderr
