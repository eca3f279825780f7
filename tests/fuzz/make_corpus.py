"""Regenerate the seed corpus (tests/fuzz/corpus): `PYTHONPATH=tests python -m fuzz.make_corpus`.

A few hundred small cases, drawn with a fixed seed: valid requests and batches on every method and
setting, their structure-aware mutations, corrupted quota slots, raw bytes, and the crafted inputs
of issue 9. Cases that hit a known issue are left out (tests/fuzz/test_findings.py holds one of
each); a case that hits an unknown one stops the generator.
"""

from __future__ import annotations

import hashlib
import random
import sys
import tempfile
from pathlib import Path

from conftest import KNOWN_IDENTITIES, TEST_PEPPER, open_rights_store, rights_records

from fastpath import _gate_c, _gate_py
from fastpath.rules import Keys
from fuzz import wire
from fuzz.cases import Case, random_case
from fuzz.differential import Checker, Divergence

CORPUS = Path(__file__).resolve().parent / "corpus"
SEED = 20250615
COUNT = 300


def crafted() -> list[Case]:
    """Inputs named in issue 9 (scaled down) and edges worth keeping whatever the draw."""
    who = KNOWN_IDENTITIES[0].request()
    valid = who.SerializeToString()
    item = wire.len_field(wire.F_ITEMS, valid)
    return [
        Case(method=2, request=b"\x0a\x00" * 2000 + b"\x78\x00"),  # empty items, then unknown
        Case(method=2, request=b"\x0a\x02\x28\x01" * 500 + b"\x78\x00"),
        Case(method=2, request=item * 4),  # at the limit (4)
        Case(method=2, request=item * 5),  # one over
        Case(method=2, small_batches=False, request=item * 16 + b"\x78\x00"),
        Case(method=0, request=valid + wire.varint_field(8, -1)),  # a negative enum
        Case(method=1, request=valid + wire.varint_field(5, (1 << 32) + 1)),  # truncated to 1
        Case(method=0, request=valid + wire.len_field(2, b"\xc0\xaf")),  # invalid UTF-8
        Case(method=0, request=wire.tag(2, wire.LEN) + wire.varint(1 << 63)),  # huge length
        Case(method=1, request=valid + wire.tag(10, wire.SGROUP) + wire.tag(10, wire.EGROUP)),
        Case(method=0, request=wire.tag(8, wire.VARINT, 9) + wire.varint(1, 9)),  # 10-byte varints
        Case(method=0, repeats=4, request=b""),  # an empty request, four times
    ]


def main() -> int:
    ch = wire.RandomChoices(random.Random(SEED))
    keys = Keys(TEST_PEPPER)
    kept: dict[str, bytes] = {}
    left_out = 0
    with tempfile.TemporaryDirectory() as tmp:
        store = open_rights_store(
            Path(tmp) / "rights", keys, rights_records(keys, KNOWN_IDENTITIES)
        )
        with Checker(store, [_gate_c, _gate_py]) as checker:  # as make test replays them
            cases = crafted()
            while len(cases) < COUNT * 2:
                case = random_case(ch)
                if len(case.request) <= 2048:
                    cases.append(case)
            for case in cases:
                if len(kept) >= COUNT:
                    break
                try:
                    checker.check(case)
                except Divergence as divergence:
                    issue = checker.known_issue(case, divergence)
                    if issue is None:
                        print(f"unknown divergence: {divergence}\n{case.describe()}")
                        return 1
                    left_out += 1
                    continue
                data = case.encode()
                kept[hashlib.sha1(data).hexdigest()[:20]] = data
        store.env.close()
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.glob("*"):
        old.unlink()
    for name, data in kept.items():
        (CORPUS / name).write_bytes(data)
    size = sum(len(d) for d in kept.values())
    print(
        f"{len(kept)} cases ({size} bytes) in {CORPUS}; {left_out} hitting a known issue left out"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
