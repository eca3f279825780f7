"""The differential checker: one case on the Cython gate and on the reference, each on a fresh copy
of the same state, everything observable compared after every call; and the protobuf oracle.

A finding is a `Divergence`; `Checker.known_issue` tells the ones already filed (KNOWN_ISSUES)
from new ones.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from covergate.v1 import covergate_pb2 as pb
from fastpath import rules
from fastpath.baselines import RECORD_SIZE, BaselineFile
from fastpath.quota import (
    DISTINCT_CAPACITY,
    FLAG_SUSPENDED,
    HEADER_SIZE,
    SHADOW_RATE,
    SLOT_HEAD,
    SLOT_SIZE,
    QuotaFile,
)
from fuzz.cases import (
    PROFILES,
    SLOT_TABLE_FULL,
    SLOT_TABLE_HALF,
    SLOTS,
    Case,
    baseline_record,
    head_fields,
    slot_fields,
    with_slot_fields,
)

TRACE_SEED = 0x5EED_F022

# Undecodable and oversize requests spend the caller's rate and count as bad for the harvest
# guard (issue 9): the metering oracle is on everywhere.
GARBAGE_IS_METERED = True

# Divergences found and not fixed yet, each with a strict xfail in test_findings.py: none today.
# (Fixed: window_len > 64 and guard_fired at 2**32 - 1 in a corrupted slot, unmetered garbage,
# and UnicodeDecodeError on the pure-Python protobuf backend, on which the gates now refuse to
# start: tests/test_fastpath_guard.py.)
KNOWN_ISSUES: dict[str, str] = {}
# Known issues of corrupted quota state: (slot field, whether the case's value is the corrupted
# one, a sound value). A divergence that goes away once the field is sound is that issue.
_SLOT_FIELD_ISSUES: dict[str, tuple[str, Any, int]] = {}

_MALFORMED_REQUEST = rules.malformed_message_status("CheckCoverageRequest")
_MALFORMED_BATCH = rules.malformed_message_status("CheckCoverageBatchRequest")
_MALFORMED_ITEM = pb.CheckCoverageResponse(
    error=status_pb2.Status.FromString(_MALFORMED_REQUEST)
).SerializeToString()


class Divergence(AssertionError):
    """The two gates disagree, or they agree on something the oracle forbids."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Step:
    """Everything observable of one gate after one call."""

    outcome: tuple[Any, ...]  # ("returned", value) or ("raised", type name, message)
    store_reads: int
    spans: bytes
    lookup_counts: tuple[int, ...]
    suspensions: tuple[str, ...]
    spans_dropped: int
    quota: bytes  # the quota file's slots, every byte
    anomaly_counts: tuple[int, ...] = ()
    baseline: bytes = b""  # the baseline file's records, every byte


# -- spans, clock readings masked in place ---------------------------------------------------------


def _varint_at(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _mask_fixed64(data: bytearray, start: int, end: int, masked: dict[int, Any]) -> None:
    """Zero the fixed64 fields of data[start:end] listed in `masked`; recurse into the LEN fields
    mapped to a dict. Anything that is not well-formed protobuf raises ValueError."""
    pos = start
    while pos < end:
        key, pos = _varint_at(data, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint_at(data, pos, end)
        elif wire_type == 1:
            if pos + 8 > end:
                raise ValueError("truncated fixed64")
            if masked.get(number) is True:
                data[pos : pos + 8] = bytes(8)
            pos += 8
        elif wire_type == 2:
            size, pos = _varint_at(data, pos, end)
            if pos + size > end:
                raise ValueError("truncated field")
            inner = masked.get(number)
            if isinstance(inner, dict):
                _mask_fixed64(data, pos, pos + size, inner)
            pos += size
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire_type} in a span")
    if pos != end:
        raise ValueError("field overruns its message")


# Span: 7 start_time_unix_nano, 8 end_time_unix_nano (fixed64), 11 events { 1 time_unix_nano }.
_SPAN_CLOCKS = {7: True, 8: True, 11: {1: True}}


def masked_spans(spans: bytes) -> bytes:
    """take_spans() bytes with every clock reading zeroed and nothing else touched: ids are
    seeded and everything else is deterministic, so the rest must match byte for byte."""
    data = bytearray(spans)
    _mask_fixed64(data, 0, len(data), {2: _SPAN_CLOCKS})
    return bytes(data)


# -- the checker -----------------------------------------------------------------------------------


def outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    try:
        return ("returned", call(*args, **kwargs))
    except Exception as exc:  # compared, and a finding in itself
        return ("raised", f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc))


def official_parse(case: Case) -> int | None:
    """How many items upb (the generated classes) reads in the request (1 for a single request),
    or None when it rejects the bytes."""
    try:
        if case.is_batch:
            return len(pb.CheckCoverageBatchRequest.FromString(case.request).items)
        pb.CheckCoverageRequest.FromString(case.request)
    except Exception:  # DecodeError; UnicodeDecodeError from the pure-Python backend
        return None
    return 1


def refusal(case: Case, value: Any) -> bytes | None:
    """The google.rpc.Status a call returned for the whole request, or None."""
    if case.method_name == "check_item":
        response = pb.CheckCoverageResponse.FromString(value)
        return response.error.SerializeToString() if response.HasField("error") else None
    code, payload = value
    return None if code == rules.OK else payload


def reason(status: bytes) -> tuple[int, str]:
    message = status_pb2.Status.FromString(status)
    for detail in message.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return message.code, info.reason
    return message.code, ""


# Refusals a request may get whatever its bytes: the caller is over its rate, or suspended.
_CALLER_REFUSALS = {
    (rules.RESOURCE_EXHAUSTED, rules.REASON_RATE),
    (rules.PERMISSION_DENIED, rules.REASON_SUSPENDED),
}


class Checker:
    """Runs cases on both gates over one rights store. Each gate has its own quota file, reset
    to the case's state before each case; the gates themselves are new for each case."""

    def __init__(
        self,
        store: Any,
        gates: Sequence[ModuleType | Callable[..., Any]],
        *,
        workdir: Path | None = None,
        garbage_metered: bool = GARBAGE_IS_METERED,
    ) -> None:
        self.store = store
        self.factories = [g.Gate if isinstance(g, ModuleType) else g for g in gates]
        self.garbage_metered = garbage_metered
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="covergate-fuzz-")
            workdir = Path(self._tmp.name)
        self.quota = [QuotaFile(workdir / name / "state", SLOTS) for name in ("c", "reference")]
        self.baseline = [
            BaselineFile(workdir / name / "baseline", SLOTS) for name in ("c", "reference")
        ]
        self.cases = 0
        self.calls = 0

    def close(self) -> None:
        for f in (*self.baseline, *self.quota):
            f.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Checker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state -------------------------------------------------------------------------------------

    def _plant(self, case: Case) -> None:
        for b in self.baseline:
            b.map[HEADER_SIZE:] = bytes(len(b.map) - HEADER_SIZE)
            start = b.offset(case.slot_index)
            b.map[start : start + RECORD_SIZE] = baseline_record(case.caller)
        for q in self.quota:
            q.map[HEADER_SIZE:] = bytes(len(q.map) - HEADER_SIZE)
            if not case.slot_mode:
                continue
            start = q.offset(case.slot_index)
            q.map[start : start + SLOT_HEAD] = case.slot_head.ljust(SLOT_HEAD, b"\0")
            if case.slot_mode in (SLOT_TABLE_FULL, SLOT_TABLE_HALF):
                every = 1 if case.slot_mode == SLOT_TABLE_FULL else 2
                table = bytearray(8 * DISTINCT_CAPACITY)
                for i in range(0, DISTINCT_CAPACITY, every):
                    table[8 * i : 8 * i + 8] = (
                        (i * 0x9E3779B97F4A7C15 | 1) & (2**64 - 1)
                    ).to_bytes(8, "little")
                q.map[start + SLOT_HEAD : start + SLOT_SIZE] = bytes(table)

    def run(self, case: Case) -> list[tuple[Step, Step]]:
        """Both gates' steps, call by call, without judging them (check() does)."""
        return list(self._steps(case))

    def _steps(self, case: Case) -> Any:
        self._plant(case)
        practitioner = case.practitioner()
        gates = [
            factory(
                self.store.env,
                self.store.db,
                self.store.keys,
                max_batch_items=case.max_batch_items,
                quota=q,
                baseline=b,
                trace=True,
                trace_seed=TRACE_SEED,
            )
            for factory, q, b in zip(self.factories, self.quota, self.baseline, strict=True)
        ]
        try:
            for today, now in case.calls():
                steps = []
                for gate, q, b in zip(gates, self.quota, self.baseline, strict=True):
                    before = gate.store_reads
                    result = outcome(
                        getattr(gate, case.method_name),
                        practitioner,
                        case.request,
                        today,
                        now,
                        trace=case.trace_context(),
                    )
                    steps.append(
                        Step(
                            outcome=result,
                            store_reads=gate.store_reads - before,
                            spans=gate.take_spans(),
                            lookup_counts=tuple(gate.lookup_counts()),
                            suspensions=tuple(gate.suspensions),
                            spans_dropped=gate.spans_dropped,
                            quota=bytes(q.map[HEADER_SIZE:]),
                            anomaly_counts=tuple(gate.anomaly_counts()),
                            baseline=bytes(b.map[HEADER_SIZE:]),
                        )
                    )
                    gate.suspensions.clear()
                self.calls += 1
                yield steps[0], steps[1]
        finally:
            for gate in gates:
                gate.close()
            self.cases += 1

    # -- judging -----------------------------------------------------------------------------------

    def check(self, case: Case) -> None:
        """Raise Divergence at the first difference or oracle violation."""
        accepted = official_parse(case)
        head_before = case.slot_head.ljust(SLOT_HEAD, b"\0") if case.slot_mode else bytes(SLOT_HEAD)
        unmetered: Divergence | None = None
        for call, (c, py) in enumerate(self._steps(case)):
            where = f"call {call + 1} of {case.repeats}"
            compare(c, py, where)
            self._oracle(case, py, accepted, where)
            try:
                self._metering(case, head_before, py, accepted, where)
            except Divergence as divergence:
                # Raised at the end: the calls after it are still compared, and any other
                # divergence in them is the one reported.
                unmetered = unmetered or divergence
            start = case.slot_index * SLOT_SIZE
            head_before = py.quota[start : start + SLOT_HEAD]
        if unmetered is not None:
            raise unmetered

    def _oracle(self, case: Case, step: Step, accepted: int | None, where: str) -> None:
        """upb decides what is malformed; a gate never raises on client bytes; answers and spans
        are well-formed protobuf; a batch gets one answer per item."""
        if step.outcome[0] == "raised":
            raise Divergence("raised", f"both gates raised {step.outcome[1:]} ({where})")
        value = step.outcome[1]
        try:
            status = refusal(case, value)
            code = reason(status)[0] if status is not None else rules.OK
            trace_pb2.ScopeSpans.FromString(step.spans)
        except Exception as exc:
            raise Divergence("unreadable", f"{type(exc).__name__}: {exc} ({where})") from exc
        if case.method_name != "check_item" and code != value[0]:
            raise Divergence("answer", f"code {value[0]} with a status of code {code} ({where})")
        if case.method_name == "check_item":
            malformed = value == _MALFORMED_ITEM
        else:
            malformed = status == (_MALFORMED_BATCH if case.is_batch else _MALFORMED_REQUEST)
        caller_refused = status is not None and reason(status) in _CALLER_REFUSALS
        if accepted is None:
            # An oversize batch is refused from its framing, whatever follows its first
            # max_batch_items + 1 items (issue 9): bytes upb would reject later on included.
            counted = rules.count_batch_items(case.request, case.max_batch_items)
            oversize = (
                case.is_batch
                and counted is not None
                and counted > case.max_batch_items
                and status == rules.batch_too_large_status(case.max_batch_items)
            )
            if not (malformed or caller_refused or oversize):
                raise Divergence("parser-oracle", f"upb rejects the bytes, the gates answered "
                                                  f"{value!r} ({where})")  # fmt: skip
            return
        if malformed:
            raise Divergence("parser-oracle", f"upb accepts the bytes, the gates say malformed "
                                              f"({where})")  # fmt: skip
        if not case.is_batch:
            answered = case.method_name == "check" and status is None
            if answered and not pb.CheckCoverageResponse.FromString(value[1]).decision:
                raise Divergence("answer", f"OK without a decision ({where})")
            return
        if accepted > case.max_batch_items:
            if not (status == rules.batch_too_large_status(case.max_batch_items) or caller_refused):
                raise Divergence("parser-oracle", f"{accepted} items accepted ({where})")
        elif status is not None:
            raise Divergence("parser-oracle", f"a batch of {accepted} refused ({where})")
        elif len(pb.CheckCoverageBatchResponse.FromString(value[1]).items) != accepted:
            raise Divergence("answer", f"not {accepted} answers ({where})")

    def _metering(
        self, case: Case, before: bytes, step: Step, accepted: int | None, where: str
    ) -> None:
        """Issue 9: garbage (undecodable, or a batch over the limit) spends the caller's rate and
        is bad for the harvest guard, unless the caller is refused for its rate or suspended."""
        garbage = accepted is None or (case.is_batch and accepted > case.max_batch_items)
        if not self.garbage_metered or not garbage or step.outcome[0] != "returned":
            return
        old = head_fields(before)
        if old["flags"] & FLAG_SUSPENDED or old["window_len"] >= 64:
            return
        status = refusal(case, step.outcome[1])
        if status is not None and reason(status) in _CALLER_REFUSALS:
            return
        new = head_fields(step.quota, case.slot_index * SLOT_SIZE)
        rate_spent = new["tat_ms"] != old["tat_ms"] or PROFILES[case.profile].shadow & SHADOW_RATE
        counted_bad = new["window_len"] == old["window_len"] + 1 and new["window_bits"] & 1
        if not (rate_spent and counted_bad):
            raise Divergence(
                "garbage-metered",
                f"refused garbage left tat_ms {old['tat_ms']} -> {new['tat_ms']}, window_len "
                f"{old['window_len']} -> {new['window_len']}, window_bits {old['window_bits']:#x} "
                f"-> {new['window_bits']:#x} ({where})",
            )

    # -- known issues ------------------------------------------------------------------------------

    def known_issue(self, case: Case, divergence: Divergence) -> str | None:
        """The KNOWN_ISSUES entry that explains `divergence`, or None for a new finding."""
        if not case.slot_mode or not _SLOT_FIELD_ISSUES:
            return None
        fields = slot_fields(case)
        matching = [
            issue
            for issue, (name, corrupted, _) in _SLOT_FIELD_ISSUES.items()
            if corrupted(fields[name])
        ]
        # The issue whose field alone, made sound, makes the case pass; else all of them at once.
        # (These reruns are not counted as cases.)
        counted = self.cases, self.calls
        try:
            return self._slot_issue(case, matching)
        finally:
            self.cases, self.calls = counted

    def _slot_issue(self, case: Case, matching: list[str]) -> str | None:
        for issues in [[issue] for issue in matching] + ([matching] if len(matching) > 1 else []):
            sound = {_SLOT_FIELD_ISSUES[i][0]: _SLOT_FIELD_ISSUES[i][2] for i in issues}
            try:
                self.check(with_slot_fields(case, **sound))
            except Divergence:
                continue
            return "+".join(issues)
        return None


def compare(c: Step, py: Step, where: str) -> None:
    """The C gate's step against the reference's: the first difference raises."""
    if c.outcome != py.outcome:
        raise Divergence("result", f"C {c.outcome!r} != reference {py.outcome!r} ({where})")
    if c.store_reads != py.store_reads:
        raise Divergence("store-reads", f"C {c.store_reads} != {py.store_reads} ({where})")
    try:
        spans = masked_spans(c.spans), masked_spans(py.spans)
    except ValueError as exc:
        raise Divergence("spans", f"unreadable spans: {exc} ({where})") from exc
    if spans[0] != spans[1]:
        raise Divergence("spans", f"C {c.spans.hex()} != reference {py.spans.hex()} ({where})")
    for name in ("lookup_counts", "anomaly_counts", "suspensions", "spans_dropped"):
        if getattr(c, name) != getattr(py, name):
            raise Divergence(
                name.replace("_", "-"),
                f"C {getattr(c, name)} != reference {getattr(py, name)} ({where})",
            )
    if c.quota != py.quota:
        first = next(i for i, (a, b) in enumerate(zip(c.quota, py.quota, strict=True)) if a != b)
        slot, offset = divmod(first, SLOT_SIZE)
        raise Divergence(
            "quota-file",
            f"slot {slot} differs from byte {offset}: C "
            f"{c.quota[slot * SLOT_SIZE : slot * SLOT_SIZE + SLOT_HEAD].hex()} != reference "
            f"{py.quota[slot * SLOT_SIZE : slot * SLOT_SIZE + SLOT_HEAD].hex()} ({where})",
        )
    if c.baseline != py.baseline:
        first = next(
            i for i, (a, b) in enumerate(zip(c.baseline, py.baseline, strict=True)) if a != b
        )
        slot, offset = divmod(first, RECORD_SIZE)
        raise Divergence("baseline-file", f"slot {slot} differs from byte {offset} ({where})")
