"""Pre-encoded gRPC requests for the load generators, and the answers each one must get back.

h2load posts one fixed body per process, so every request body is built here once: a protobuf
message behind gRPC's 5-byte length prefix. The same bytes are replayed by the probe to check
grpc-status and decisions, which h2load cannot see.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from covergate.v1 import covergate_pb2 as pb

# What a request is meant to exercise. The shares of a mix are weights over these kinds.
COVERED = "covered"
NOT_COVERED = "not_covered"
NO_MATCH = "no_match"
INVALID = "invalid"
KINDS = (COVERED, NOT_COVERED, NO_MATCH, INVALID)

# grpc status codes (google.rpc.Code values) the bench expects.
OK = 0
INVALID_ARGUMENT = 3

DECISION_NAMES: dict[int, str] = {
    pb.DECISION_UNSPECIFIED: "UNSPECIFIED",
    pb.DECISION_COVERED: "COVERED",
    pb.DECISION_NOT_COVERED: "NOT_COVERED",
    pb.DECISION_NO_MATCH: "NO_MATCH",
}
_EXPECTED_DECISION = {
    COVERED: pb.DECISION_COVERED,
    NOT_COVERED: pb.DECISION_NOT_COVERED,
    NO_MATCH: pb.DECISION_NO_MATCH,
}

_PREFIX = struct.Struct(">BI")
GRPC_PREFIX_SIZE = _PREFIX.size


@dataclass(frozen=True)
class CheckSpec:
    """One coverage check the bench sends (synthetic identity) and the kind of answer it gets."""

    kind: str
    nir: str
    nir_key: str
    birth_date: str
    birth_rank: int
    amc_number: str
    member_number: str
    domain: int
    care_date: str

    @property
    def expected_code(self) -> int:
        return INVALID_ARGUMENT if self.kind == INVALID else OK

    @property
    def expected_decision(self) -> int | None:
        return _EXPECTED_DECISION.get(self.kind)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> CheckSpec:
        return cls(**raw)  # type: ignore[arg-type]


# -- gRPC framing ----------------------------------------------------------------------------------


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message, as sent in an HTTP/2 DATA frame body."""
    return _PREFIX.pack(0, len(message)) + message


def split_frames(data: bytes) -> list[bytes]:
    """The messages of a gRPC body (several length-prefixed messages back to back)."""
    messages = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < GRPC_PREFIX_SIZE:
            raise ValueError("truncated gRPC message prefix")
        flag, size = _PREFIX.unpack_from(data, pos)
        if flag not in (0, 1):
            raise ValueError(f"bad gRPC compressed flag {flag}")
        if flag:
            raise ValueError("compressed gRPC messages are not used by the bench")
        pos += GRPC_PREFIX_SIZE
        if len(data) - pos < size:
            raise ValueError("truncated gRPC message")
        messages.append(data[pos : pos + size])
        pos += size
    return messages


# -- requests --------------------------------------------------------------------------------------


def request(spec: CheckSpec, request_id: str = "") -> pb.CheckCoverageRequest:
    return pb.CheckCoverageRequest(
        request_id=request_id,
        nir=spec.nir,
        nir_key=spec.nir_key,
        birth_date=spec.birth_date,
        birth_rank=spec.birth_rank,
        amc_number=spec.amc_number,
        member_number=spec.member_number,
        domain=spec.domain,  # type: ignore[arg-type]
        care_date=spec.care_date,
    )


def request_bytes(spec: CheckSpec, request_id: str = "") -> bytes:
    return request(spec, request_id).SerializeToString()


def batch_bytes(specs: Sequence[CheckSpec], id_prefix: str = "b") -> bytes:
    batch = pb.CheckCoverageBatchRequest(
        items=[request(s, f"{id_prefix}{i:04d}") for i, s in enumerate(specs)]
    )
    return batch.SerializeToString()


def whole_batches(specs: Sequence[CheckSpec], size: int = 100) -> list[bytes]:
    """`specs` cut into batch requests of `size` items each (a last, shorter one left out)."""
    return [
        batch_bytes(specs[i : i + size], f"b{i}-") for i in range(0, len(specs) - size + 1, size)
    ]


def mixed(
    pools: Mapping[str, Sequence[CheckSpec]],
    weights: Mapping[str, int],
    count: int,
    offset: int = 0,
) -> list[CheckSpec]:
    """`count` checks interleaved by weight (e.g. 6 covered, 2 not covered, 1, 1 per 10),
    cycling through each pool from `offset` so that consecutive calls use distinct identities."""
    order = [kind for kind, w in weights.items() for _ in range(w)]
    if not order:
        raise ValueError("a mix needs at least one kind with a positive weight")
    taken = dict.fromkeys(weights, offset)
    out = []
    for i in range(count):
        kind = order[i % len(order)]
        pool = pools[kind]
        if not pool:
            raise ValueError(f"no {kind} identities in the sample")
        out.append(pool[taken[kind] % len(pool)])
        taken[kind] += 1
    return out


# -- expected answers ------------------------------------------------------------------------------


def _check_item(spec: CheckSpec, resp: pb.CheckCoverageResponse, decisions: bool) -> str | None:
    if spec.expected_code != OK:
        if not resp.HasField("error") or resp.error.code != spec.expected_code:
            got = resp.error.code if resp.HasField("error") else "no error"
            return f"{spec.kind}: item error {got}, expected code {spec.expected_code}"
        return None
    if resp.HasField("error"):
        return f"{spec.kind}: item refused with code {resp.error.code} ({resp.error.message})"
    if decisions and resp.decision != spec.expected_decision:
        got = DECISION_NAMES.get(resp.decision, resp.decision)
        want = DECISION_NAMES.get(spec.expected_decision or 0)
        return f"{spec.kind}: decision {got}, expected {want}"
    if resp.decision == pb.DECISION_UNSPECIFIED:
        return f"{spec.kind}: decision UNSPECIFIED"
    return None


def check_unary(
    spec: CheckSpec, code: int, payload: bytes | None, *, decisions: bool
) -> str | None:
    """None when a unary answer is what `spec` must get, else what went wrong (no identity in it).

    With `decisions` false (the no-op ceiling) only the status and the message shape count.
    """
    if not decisions:
        if code != OK:
            return f"{spec.kind}: grpc-status {code}, expected 0"
    elif code != spec.expected_code:
        return f"{spec.kind}: grpc-status {code}, expected {spec.expected_code}"
    if code != OK:
        return None
    try:
        resp = pb.CheckCoverageResponse.FromString(payload or b"")
    except Exception:
        return f"{spec.kind}: the response is not a CheckCoverageResponse"
    if not decisions:
        return None if resp.decision != pb.DECISION_UNSPECIFIED else f"{spec.kind}: no decision"
    return _check_item(spec, resp, decisions)


def check_item(spec: CheckSpec, payload: bytes, *, decisions: bool) -> str | None:
    """A stream message's answer (refusals travel in `error`)."""
    try:
        resp = pb.CheckCoverageResponse.FromString(payload)
    except Exception:
        return f"{spec.kind}: the response is not a CheckCoverageResponse"
    if not decisions:
        return None if resp.decision != pb.DECISION_UNSPECIFIED else f"{spec.kind}: no decision"
    return _check_item(spec, resp, decisions)


def check_batch(
    specs: Sequence[CheckSpec], code: int, payload: bytes | None, *, decisions: bool
) -> list[str]:
    """Every problem with a batch answer: status, item count, and each item's answer."""
    if code != OK:
        return [f"batch of {len(specs)}: grpc-status {code}, expected 0"]
    try:
        resp = pb.CheckCoverageBatchResponse.FromString(payload or b"")
    except Exception:
        return [f"batch of {len(specs)}: the response is not a CheckCoverageBatchResponse"]
    if len(resp.items) != len(specs):
        return [f"batch of {len(specs)}: {len(resp.items)} items answered"]
    problems = []
    for spec, item in zip(specs, resp.items, strict=True):
        if not decisions:
            if item.decision == pb.DECISION_UNSPECIFIED and not item.HasField("error"):
                problems.append(f"{spec.kind}: item without decision")
            continue
        problem = _check_item(spec, item, decisions)
        if problem:
            problems.append(problem)
    return problems


def kinds_count(specs: Iterable[CheckSpec]) -> dict[str, int]:
    counts = dict.fromkeys(KINDS, 0)
    for s in specs:
        counts[s.kind] += 1
    return {k: v for k, v in counts.items() if v}
