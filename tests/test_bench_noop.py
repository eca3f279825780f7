"""The no-op ceiling compares like with like: its answer to each bench request has exactly the
size of the C gate's COVERED answer to the same request (a pharmacy check by an 11-character
practitioner id on a 9-digit AMC, a 4-character convention), unary and batched."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import noop_server
from covergate.v1 import covergate_pb2 as pb
from fastpath import rules

# Request ids as bench.run, bench.frames and bench.stream_client number them.
BENCH_REQUEST_IDS = ("r-covered", "r-not_covered", "s0000", "s00000042", "b0007", "")


def _covered(known_identities: dict[str, Any]) -> Any:
    identity = known_identities["several-amcs"]
    assert identity.expected == rules.DECISION_COVERED
    return identity


@pytest.mark.parametrize("request_id", BENCH_REQUEST_IDS)
def test_the_unary_answer_has_the_size_of_covergates(
    cython_gate_module: ModuleType,
    rights_env: Any,
    known_identities: dict[str, Any],
    practitioner: rules.Practitioner,
    today: int,
    now: int,
    request_id: str,
) -> None:
    gate = cython_gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys)
    request = _covered(known_identities).request(request_id=request_id)
    code, payload = gate.check(practitioner, request.SerializeToString(), today, now)
    assert code == 0
    answer = pb.CheckCoverageResponse.FromString(payload)
    assert answer.decision == pb.DECISION_COVERED
    assert len(answer.attestation) == noop_server.ATTESTATION_CHARS
    assert noop_server.answer(len(request_id)).ByteSize() == len(payload)


@pytest.mark.parametrize("items", [0, 1, 100, 500])
def test_the_batch_answer_has_the_size_of_covergates(
    cython_gate_module: ModuleType,
    rights_env: Any,
    known_identities: dict[str, Any],
    practitioner: rules.Practitioner,
    today: int,
    now: int,
    items: int,
) -> None:
    gate = cython_gate_module.Gate(
        rights_env.env, rights_env.db, rights_env.keys, max_batch_items=500
    )
    identity = _covered(known_identities)
    request = pb.CheckCoverageBatchRequest(
        items=[identity.request(request_id=f"b{i:04d}") for i in range(items)]
    )
    code, payload = gate.check_batch(practitioner, request.SerializeToString(), today, now)
    assert code == 0
    answers = pb.CheckCoverageBatchResponse.FromString(payload).items
    assert [a.decision for a in answers] == [pb.DECISION_COVERED] * items
    assert noop_server.batch_answer(request).ByteSize() == len(payload)
