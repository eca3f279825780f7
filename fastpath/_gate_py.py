"""Pure-Python reference of the covergate gate: one call decides one request, a batch or a stream
message, from serialized request bytes to serialized response (or google.rpc.Status) bytes.

It defines the behaviour; `_gate_c.pyx` must match it byte for byte (tests/test_fastpath_*.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from google.protobuf.message import DecodeError

from covergate.v1 import covergate_pb2 as pb
from fastpath import baselines, rules
from fastpath import trace as tr
from fastpath.baselines import BaselineFile
from fastpath.quota import (
    CREDIT_RING,
    FLAG_SUSPENDED,
    MAX_DISTINCT_LIMIT,
    SHADOW_DAILY,
    SHADOW_DISTINCT,
    SHADOW_GUARD,
    SHADOW_RATE,
    CreditFile,
    CreditState,
    QuotaFile,
    QuotaProfile,
    SlotState,
    fingerprint,
)
from fastpath.rules import (
    DECISION_COVERED,
    DECISION_NO_MATCH,
    DECISION_NOT_COVERED,
    INVALID_ARGUMENT,
    OK,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    Keys,
    Practitioner,
)

IMPLEMENTATION = "python"

# The decisions as the generated stubs type them (protobuf enums are ints at run time).
_COVERED = cast("pb.Decision", DECISION_COVERED)
_NOT_COVERED = cast("pb.Decision", DECISION_NOT_COVERED)
_NO_MATCH = cast("pb.Decision", DECISION_NO_MATCH)


class Gate:
    """Decides coverage requests against one LMDB rights database.

    `today` (YYYYMMDD as an int, Europe/Paris) and `now` (unix seconds) come from the caller so
    that one clock, controlled by tests, drives every decision.
    """

    def __init__(
        self,
        env: Any,
        rights_db: Any,
        keys: Keys,
        *,
        max_batch_items: int = 500,
        attestation_ttl: int = 7 * 86400,
        quota: QuotaFile | None = None,
        trace: bool = False,
        trace_seed: int | None = None,
        credit: CreditFile | None = None,
        generation: int = 0,
        baseline: BaselineFile | None = None,
    ) -> None:
        rules.require_upb()
        # The rights generation this gate reads (service.snapshots), on every span.
        self.generation = generation
        self._generation_attr = tr.generation_attr(generation)
        if (credit is not None or baseline is not None) and quota is None:
            raise ValueError(
                "cluster credit and baselines need the quota file they are locked with"
            )
        self._env = env
        # Per-practitioner baselines (fastpath.baselines), kept under the slot's mutex too.
        self._baseline = baseline
        self._anomaly_counts = [0] * (tr.N_PROFESSIONS * baselines.N_SIGNALS)
        self._quota = quota
        # With [cluster]: this host's credit per slot, spent under the slot's mutex.
        self._credit = credit
        self._cs: CreditState | None = None  # the locked slot's credit, during a call
        self._mode = rules.CREDIT_SPEND
        self._saved_rate = (0, 0)
        # The last call's lookups set aside for want of credit (their indexes), and how many of
        # its outcomes were bad for the guard (the server reports those to the global guard).
        self.short: list[int] = []
        self.last_bad = 0
        # Set by the server while its host cannot reach the cluster's Redis: lookup spans say so.
        self.cluster_degraded = False
        # Closed (replaced): every call refuses. A closed gate never means "no quotas".
        self._closed = False
        self._rights_db = rights_db
        self._keys = keys
        self._attestation_key = keys.attestation_key
        self.max_batch_items = rules.batch_limit(max_batch_items)
        self.attestation_ttl = attestation_ttl
        # Store reads performed, for tests proving which refusals never touch the store.
        self.store_reads = 0
        # Practitioner ids the harvest guard suspended since the caller last emptied this list.
        self.suspensions: list[str] = []
        # Tracing (fastpath.trace): one OTLP span per lookup into _spans; off, no work at all.
        self.trace = bool(trace)
        if trace_seed is None:
            trace_seed = int.from_bytes(os.urandom(8), "little")
        self._trace_state = trace_seed & tr.MASK64
        self._spans = bytearray()
        self._span_count = 0
        self.spans_dropped = 0
        self._counts = [0] * (tr.N_PROFESSIONS * tr.N_OUTCOMES)

    def close(self) -> None:
        """Stop using the quota file (the C gate holds a view of its mapping). From now on every
        call is refused QUOTA_STATE_UNAVAILABLE: a caller still holding a replaced gate must never
        be answered unmetered."""
        self._quota = None
        self._credit = None
        self._baseline = None
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def _state_missing(self, practitioner: Practitioner) -> bool:
        """Quotas are on (or the gate is closed) but this caller's state cannot be reached."""
        if self._closed:
            return True
        if self._quota is None:
            return False
        return (
            practitioner.slot < 0
            or practitioner.quota is None
            or practitioner.slot >= self._quota.slots
            or (self._credit is not None and practitioner.slot >= self._credit.slots)
        )

    @contextmanager
    def _slot(self, practitioner: Practitioner, today: int) -> Iterator[SlotState | None]:
        """The practitioner's quota state, locked across processes for the whole call."""
        if self._quota is None or practitioner.slot < 0 or practitioner.quota is None:
            yield None
            return
        quota, slot, credit = self._quota, practitioner.slot, self._credit
        quota.lock(slot)
        try:
            state = quota.read(slot)
            quota.roll_day(slot, state, today)
            if credit is not None:
                self._cs = credit.read(slot)
                credit.roll_day(self._cs, today)
            yield state
            quota.write(slot, state)
            if credit is not None:
                assert self._cs is not None
                credit.write(slot, self._cs)
        finally:
            self._cs = None
            quota.unlock(slot)

    # -- entry points ------------------------------------------------------------------------------
    #
    # With tracing on (self.trace), each also records its spans (fastpath.trace) in self._spans;
    # the decisions and the bytes returned are the same either way.

    def check(
        self,
        practitioner: Practitioner,
        request: bytes,
        today: int,
        now: float,
        *,
        trace: tuple[bytes, bytes] | None = None,
        credit_mode: int = rules.CREDIT_SPEND,
    ) -> tuple[int, bytes]:
        """A unary call: (OK, CheckCoverageResponse) or (code, google.rpc.Status); with cluster
        credit, (SHORT, b"") when the lookup was set aside for want of it."""
        _req, code, payload = self._single(
            tr.METHOD_UNARY, practitioner, request, today, now, trace, credit_mode
        )
        if code == rules.SHORT:
            return code, b""
        if code == OK:
            assert isinstance(payload, pb.CheckCoverageResponse)
            return OK, payload.SerializeToString()
        assert isinstance(payload, bytes)
        return code, payload

    def check_item(
        self,
        practitioner: Practitioner,
        request: bytes,
        today: int,
        now: float,
        *,
        trace: tuple[bytes, bytes] | None = None,
        credit_mode: int = rules.CREDIT_SPEND,
    ) -> bytes:
        """A stream message: always a CheckCoverageResponse, refusals carried in `error`; with
        cluster credit, b"" when the lookup was set aside for want of it."""
        req, code, payload = self._single(
            tr.METHOD_STREAM, practitioner, request, today, now, trace, credit_mode
        )
        if code == rules.SHORT:
            return b""
        if req is None:
            assert isinstance(payload, bytes)
            return self._error_response("", payload).SerializeToString()
        return self._as_item(req, code, payload).SerializeToString()

    def _single(
        self,
        method: int,
        practitioner: Practitioner,
        request: bytes,
        today: int,
        now: float,
        context: tuple[bytes, bytes] | None,
        credit_mode: int = rules.CREDIT_SPEND,
    ) -> tuple[pb.CheckCoverageRequest | None, int, pb.CheckCoverageResponse | bytes]:
        """One request, for check and check_item: (the parsed request, or None when it does not
        parse; the code; the response or the google.rpc.Status). A request that does not parse
        is still an attempt: it spends the caller's rate and counts as bad for the guard.
        Traced, its lookup span is a unary call's SERVER span, or a stream message's."""
        self.short, self.last_bad, self._mode = [], 0, credit_mode
        span = self._begin(method, practitioner, now, context)
        if self._state_missing(practitioner):
            code, status = rules.UNAVAILABLE, rules.QUOTA_STATE_UNAVAILABLE
            if span is not None:
                self._lookup_span(span, code, status, None, practitioner, None, span.start)
            return None, code, status
        req = self._parse(request)
        whole = None if req is not None else rules.malformed_message_status("CheckCoverageRequest")
        lookup = _Lookup() if span is not None else None
        with (
            self._env.begin(db=self._rights_db, buffers=False) as txn,
            self._slot(practitioner, today) as state,
        ):
            code, payload = self._decide(
                txn, practitioner, req, today, now, state, lookup, whole=whole
            )
            if code == rules.SHORT:
                self.short = [0]
            elif span is not None:
                self._lookup_span(span, code, payload, lookup, practitioner, state, span.start)
        return req, code, payload

    def check_batch(
        self,
        practitioner: Practitioner,
        request: bytes,
        today: int,
        now: float,
        *,
        trace: tuple[bytes, bytes] | None = None,
        credit_mode: int = rules.CREDIT_SPEND,
    ) -> tuple[int, bytes]:
        """A batch: (OK, CheckCoverageBatchResponse) or (code, google.rpc.Status) for the whole.
        With cluster credit, an item set aside for want of it is an empty item, its index in
        self.short (a batch refused whole is set aside whole: code SHORT).
        A batch refused whole (malformed, oversize) is one attempt, metered like a lookup.
        Traced, every lookup's span is a child of the RPC's SERVER span, and a batch refused
        whole records one lookup span (the refused attempt)."""
        self.short, self.last_bad, self._mode = [], 0, credit_mode
        span = self._begin(tr.METHOD_BATCH, practitioner, now, trace)
        if self._state_missing(practitioner):
            code, status = rules.UNAVAILABLE, rules.QUOTA_STATE_UNAVAILABLE
            if span is not None:
                self._lookup_span(span, code, status, None, practitioner, None, span.start)
                self._rpc_span(span, code, 0)
            return code, status
        batch, whole, count = self._whole_batch(request)
        out = pb.CheckCoverageBatchResponse()
        code, payload = OK, b""
        with (
            self._env.begin(db=self._rights_db, buffers=False) as txn,
            self._slot(practitioner, today) as state,
        ):
            if batch is None:
                lookup = _Lookup() if span is not None else None
                code, payload = self._decide(
                    txn, practitioner, None, today, now, state, lookup, whole=whole
                )
                if code == rules.SHORT:
                    self.short = [0]
                elif span is not None:
                    self._lookup_span(span, code, payload, lookup, practitioner, state, span.start)
            else:
                for index, req in enumerate(batch.items):
                    lookup = None
                    if span is not None:
                        item_start = span.start + time.perf_counter_ns() - span.t0
                        lookup = _Lookup()
                    item_code, item = self._decide(
                        txn, practitioner, req, today, now, state, lookup
                    )
                    if item_code == rules.SHORT:
                        self.short.append(index)
                        out.items.append(pb.CheckCoverageResponse())
                        continue
                    if span is not None:
                        self._lookup_span(
                            span, item_code, item, lookup, practitioner, state, item_start
                        )
                    out.items.append(self._as_item(req, item_code, item))
        if code == rules.SHORT:
            return code, b""
        if span is not None:
            self._rpc_span(span, code, count)
        if batch is None:
            assert isinstance(payload, bytes)
            return code, payload
        return OK, out.SerializeToString()

    def _parse(self, request: bytes) -> pb.CheckCoverageRequest | None:
        try:
            return pb.CheckCoverageRequest.FromString(request)
        except DecodeError:
            return None

    def _whole_batch(
        self, request: bytes
    ) -> tuple[pb.CheckCoverageBatchRequest | None, bytes | None, int]:
        """(the parsed batch, or None; the status refusing it whole, or None; its item count as
        far as it was counted)."""
        if type(request) is bytes:
            counted = rules.count_batch_items(request, self.max_batch_items)
            if counted is not None and counted > self.max_batch_items:
                return None, rules.batch_too_large_status(self.max_batch_items), counted
        try:
            batch = pb.CheckCoverageBatchRequest.FromString(request)
        except DecodeError:
            return None, rules.malformed_message_status("CheckCoverageBatchRequest"), 0
        count = len(batch.items)
        if count > self.max_batch_items:
            return None, rules.batch_too_large_status(self.max_batch_items), count
        return batch, None, count

    def _as_item(
        self, req: pb.CheckCoverageRequest, code: int, payload: pb.CheckCoverageResponse | bytes
    ) -> pb.CheckCoverageResponse:
        if code == OK:
            assert isinstance(payload, pb.CheckCoverageResponse)
            return payload
        assert isinstance(payload, bytes)
        request_id = req.request_id if rules.valid_request_id(req.request_id) else ""
        return self._error_response(request_id, payload)

    # -- tracing ----------------------------------------------------------------------------------

    def take_spans(self) -> bytes:
        """The spans recorded since the last call (framed ScopeSpans.spans entries), emptied."""
        spans = bytes(self._spans)
        self._spans.clear()
        self._span_count = 0
        return spans

    def take_span_chunks(self, max_bytes: int) -> list[tuple[bytes, int]]:
        """take_spans() cut at span boundaries into [(chunk, spans in it)], each chunk at most
        `max_bytes` (or one span, if a span is larger): one export request each."""
        data = self.take_spans()
        chunks: list[tuple[bytes, int]] = []
        pos = start = count = 0
        while pos < len(data):
            if data[pos] != 0x12:
                raise AssertionError("the span buffer is not framed spans")
            size, shift, i = 0, 0, pos + 1
            while True:
                byte = data[i]
                size |= (byte & 0x7F) << shift
                i += 1
                if byte < 0x80:
                    break
                shift += 7
            next_pos = i + size
            if next_pos - start > max_bytes and count:
                chunks.append((data[start:pos], count))
                start, count = pos, 0
            count += 1
            pos = next_pos
        if count:
            chunks.append((data[start:], count))
        return chunks

    def take_export_requests(
        self, resource: bytes, scope: bytes, max_bytes: int
    ) -> list[tuple[bytes, int]]:
        """take_span_chunks(max_bytes), each chunk wrapped into the OTLP ExportTraceServiceRequest
        for this encoded Resource and InstrumentationScope: [(request, spans in it)]."""
        return [
            (tr.export_trace_request(resource, scope, chunk), count)
            for chunk, count in self.take_span_chunks(max_bytes)
        ]

    @property
    def span_bytes(self) -> int:
        """Bytes of spans waiting for take_spans()."""
        return len(self._spans)

    def lookup_counts(self) -> tuple[int, ...]:
        """Cumulative lookups per [profession][outcome] (fastpath.trace indexes), flattened."""
        return tuple(self._counts)

    def anomaly_counts(self) -> tuple[int, ...]:
        """Cumulative baseline signals raised per [profession][signal] (fastpath.trace's
        PROFESSIONS, ANOMALY_SIGNALS), flattened; counted whether tracing is on or not."""
        return tuple(self._anomaly_counts)

    def _next_id(self) -> int:
        self._trace_state, value = tr.splitmix64(self._trace_state)
        return value

    def new_trace_id(self) -> bytes:
        return self._next_id().to_bytes(8, "little") + self._next_id().to_bytes(8, "little")

    def new_span_id(self) -> bytes:
        return (self._next_id() or 1).to_bytes(8, "little")

    def add_span(self, span: bytes) -> None:
        """Append a span the server encoded (fastpath.trace.encode_span), e.g. a stream's."""
        if len(self._spans) + len(span) > tr.MAX_BUFFER:
            self.spans_dropped += 1
            return
        self._spans += span
        self._span_count += 1

    def write_spans(self, fd: int) -> tuple[int, int]:
        """Write the recorded spans to the file `fd` (the worker's audit spool) and empty the
        buffer: (bytes written, spans). On an error nothing is kept and OSError is raised; the
        caller undoes a partial write."""
        data, count = memoryview(bytes(self._spans)), self._span_count
        self._spans.clear()
        self._span_count = 0
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        return done, count

    def _begin(
        self,
        method: int,
        practitioner: Practitioner,
        now: float,
        context: tuple[bytes, bytes] | None,
    ) -> _Span | None:
        """The traced call starting now (its trace is the caller's `context`, or a new one), or
        None when tracing is off."""
        if not self.trace:
            return None
        t0 = time.perf_counter_ns()
        if context is None:
            trace_id, parent = self.new_trace_id(), b""
        else:
            trace_id, parent = tr.check_context(context)
        start = tr.now_ns(now)
        who, profession = tr.practitioner_attributes(
            practitioner.practitioner_id, practitioner.profession
        )
        who += self._generation_attr
        span = _Span(method, trace_id, self.new_span_id(), parent, who, profession, start, t0)
        span.degraded = self.cluster_degraded
        return span

    def _rpc_span(self, span: _Span, code: int, items: int) -> None:
        """A batch's SERVER span, parent of its lookup spans."""
        end = span.start + time.perf_counter_ns() - span.t0
        self.add_span(
            tr.rpc_span(
                span.trace_id,
                span.span_id,
                span.parent,
                span.method,
                code,
                span.who,
                items,
                span.start,
                end,
            )
        )

    def _lookup_span(
        self,
        span: _Span,
        code: int,
        payload: pb.CheckCoverageResponse | bytes,
        lookup: _Lookup | None,
        practitioner: Practitioner,
        state: SlotState | None,
        start: int,
    ) -> None:
        """One lookup's span, from `start`: what it came to (`code`, `payload`), what it learnt
        on its way (`lookup`; None when refused before any step) and the quota state it left.
        A unary call's is the SERVER span itself; a batch's lookups are INTERNAL children of its
        RPC span, each with an id of its own; a stream message's is INTERNAL."""
        if code == OK:
            assert isinstance(payload, pb.CheckCoverageResponse)
            outcome = tr.DECISION_OUTCOMES[payload.decision]
        else:
            assert isinstance(payload, bytes)
            outcome = tr.refusal_outcome(code, payload)
        self._counts[span.profession * tr.N_OUTCOMES + outcome] += 1
        if lookup is None:
            lookup = _Lookup()
        # Attributes in the order the C gate writes them. Only a request that passed validation
        # (lookup.identity set) gives its domain, AMC and beneficiary pseudonym.
        parts: list[bytes] = []
        if span.method == tr.METHOD_UNARY:
            parts += (tr.RPC_ATTRS[span.method], tr.attr_int(tr.K_STATUS_CODE, code))
        parts.append(span.who)
        if lookup.identity is not None:
            parts += (tr.DOMAIN_ATTRS[lookup.domain], tr.attr_str(tr.K_AMC, lookup.amc))
        parts.append(tr.OUTCOME_ATTRS[outcome])
        if lookup.identity is not None:
            parts.append(tr.attr_str(tr.K_BENEFICIARY, self._keys.pseudonym(lookup.identity).hex()))
        if state is not None:
            profile = practitioner.quota
            assert profile is not None
            parts += (
                tr.attr_int(tr.K_DAILY_REMAINING, max(0, profile.daily_limit - state.daily_count)),
                tr.attr_int(tr.K_DISTINCT_TODAY, state.distinct_count),
            )
        parts.append(tr.GUARD_ATTRS[lookup.guard_fired])
        if lookup.would_deny:
            parts.append(tr.WOULD_DENY_ATTRS[lookup.would_deny])
        if span.degraded:
            parts.append(tr.DEGRADED_ATTR)
        end = span.start + time.perf_counter_ns() - span.t0
        if span.method == tr.METHOD_BATCH:
            parent, span_id = span.span_id, self.new_span_id()
            name, kind = tr.LOOKUP_SPAN_NAME, tr.KIND_INTERNAL
        elif span.method == tr.METHOD_UNARY:
            parent, span_id = span.parent, span.span_id
            name, kind = tr.RPC_SPAN_NAMES[tr.METHOD_UNARY], tr.KIND_SERVER
        else:
            parent, span_id = span.parent, span.span_id
            name, kind = tr.LOOKUP_SPAN_NAME, tr.KIND_INTERNAL
        self.add_span(
            tr.encode_span(
                span.trace_id,
                span_id,
                parent,
                name,
                kind,
                start,
                end,
                b"".join(parts),
                (tr.guard_events(end) if lookup.guard_fired else b"")
                + (
                    tr.anomaly_events(end, lookup.anomalies, lookup.scores, lookup.base_suspend)
                    if lookup.anomalies
                    else b""
                ),
            )
        )

    # -- one decision -----------------------------------------------------------------------------

    @staticmethod
    def _error_response(request_id: str, status: bytes) -> pb.CheckCoverageResponse:
        resp = pb.CheckCoverageResponse(request_id=request_id)
        resp.error.ParseFromString(status)
        return resp

    def _decide(
        self,
        txn: Any,
        practitioner: Practitioner,
        req: pb.CheckCoverageRequest | None,
        today: int,
        now: float,
        state: SlotState | None,
        lookup: _Lookup | None = None,
        *,
        whole: bytes | None = None,
    ) -> tuple[int, pb.CheckCoverageResponse | bytes]:
        """One attempt's decision. `whole`: the status refusing a message that could not be read
        (`req` None), which is metered like an invalid lookup."""
        profile = practitioner.quota
        now_ms = int(now * 1000) if state is not None else 0
        # 0. A suspended practitioner gets nothing, and its refusals count nowhere.
        if state is not None and state.flags & FLAG_SUSPENDED:
            return PERMISSION_DENIED, rules.PRACTITIONER_SUSPENDED

        # 0'. With cluster credit: a rate token and daily credit this host holds, or the lookup
        # is set aside (or refused) before anything is spent.
        cs = self._cs
        rate_ok = False
        if cs is not None:
            assert state is not None and profile is not None
            rate_ok = cs.rate_tokens > 0 and now_ms < cs.rate_expiry_ms
            daily_ok = cs.daily > 0 and now_ms < cs.lease_expiry_ms
            short = 0
            if not rate_ok and not profile.shadow & SHADOW_RATE:
                short = tr.O_RATE
            elif not daily_ok and not profile.shadow & SHADOW_DAILY:
                short = tr.O_DAILY
            if short and self._mode != rules.CREDIT_OPEN:
                return self._without_credit(short, today, now)
            self._saved_rate = (state.tat_ms, cs.rate_tokens)

        # 1. Rate (GCRA) counts every attempt, valid or not, so floods of garbage are throttled.
        if state is not None:
            assert profile is not None
            tat = max(state.tat_ms, now_ms)
            if tat - now_ms > profile.tolerance_ms:
                if not profile.shadow & SHADOW_RATE:
                    wait = tat - profile.tolerance_ms - now_ms
                    return RESOURCE_EXHAUSTED, rules.quota_status(
                        rules.REASON_RATE, rules.rate_retry_seconds(wait)
                    )
                if lookup is not None:
                    lookup.would_deny = tr.WD_RATE
            else:
                state.tat_ms = tat + profile.interval_ms
            if cs is not None and rate_ok:
                cs.rate_tokens -= 1

        if whole is not None:
            code, payload = INVALID_ARGUMENT, whole
        else:
            assert req is not None
            code, payload = self._evaluate(
                txn, practitioner, req, today, now, state, profile, lookup
            )

        # 7. The harvest guard watches the share of NO_MATCH and invalid answers.
        if state is not None and code in (OK, INVALID_ARGUMENT):
            assert profile is not None
            bad = code == INVALID_ARGUMENT or (
                isinstance(payload, pb.CheckCoverageResponse)
                and payload.decision == DECISION_NO_MATCH
            )
            self._guard(practitioner, state, profile, bad, now_ms, lookup)
            if cs is not None:
                # For the global guard: reported with the host's next call to Redis.
                cs.outcomes_bits = ((cs.outcomes_bits << 1) | int(bad)) & tr.MASK64
                cs.outcomes_len = min(cs.outcomes_len + 1, 64)
                self.last_bad += int(bad)
        return code, payload

    def _without_credit(
        self, outcome: int, today: int, now: float
    ) -> tuple[int, pb.CheckCoverageResponse | bytes]:
        """A lookup this host holds no credit for, as self._mode says: set aside, refused as
        the limit refuses, or refused for want of the shared quota backend."""
        if self._mode == rules.CREDIT_SPEND:
            return rules.SHORT, b""
        if self._mode == rules.CREDIT_BACKEND:
            return rules.UNAVAILABLE, rules.QUOTA_BACKEND_UNAVAILABLE
        if outcome == tr.O_RATE:
            return RESOURCE_EXHAUSTED, rules.quota_status(rules.REASON_RATE, 1)
        reason = rules.REASON_DAILY if outcome == tr.O_DAILY else rules.REASON_DISTINCT
        return RESOURCE_EXHAUSTED, rules.quota_status(reason, rules.day_retry_seconds(today, now))

    def _guard(
        self,
        practitioner: Practitioner,
        state: SlotState,
        profile: QuotaProfile,
        bad: bool,
        now_ms: int,
        lookup: _Lookup | None = None,
    ) -> None:
        state.window_bits = ((state.window_bits << 1) | int(bad)) & 0xFFFFFFFFFFFFFFFF
        state.window_len = min(state.window_len + 1, 64)  # also mends a corrupted length
        n = min(state.window_len, profile.guard_window)
        if n < profile.guard_min_lookups:
            return
        bad_count = (state.window_bits & ((1 << n) - 1)).bit_count()
        if bad_count * 100 >= profile.guard_bad_percent * n:
            if not profile.shadow & SHADOW_GUARD:
                state.flags |= FLAG_SUSPENDED
                state.suspended_at_ms = now_ms
                state.guard_fired = min(state.guard_fired + 1, 0xFFFFFFFF)  # a u32, saturated
                self.suspensions.append(practitioner.practitioner_id)
                if lookup is not None:
                    lookup.guard_fired = True
            elif lookup is not None and not lookup.would_deny:
                lookup.would_deny = tr.WD_GUARD

    def _observe(
        self,
        practitioner: Practitioner,
        state: SlotState,
        today: int,
        now: float,
        domain: int,
        storage_key: bytes,
        lookup: _Lookup | None,
    ) -> None:
        """4'. A counted lookup against the practitioner's own past (fastpath.baselines): the
        signals it raises are counted and traced; a policy they meet suspends, as the guard does."""
        base, profile = self._baseline, practitioner.baseline
        if base is None or profile is None or practitioner.slot >= base.slots:
            return
        now_ms = int(now * 1000)
        h = int.from_bytes(storage_key[8:16], "little")
        seen = baselines.observe(
            base.map, base.offset(practitioner.slot), profile, today, now_ms, domain, h
        )
        if not seen.fired:
            return
        index = tr.practitioner_attributes(practitioner.practitioner_id, practitioner.profession)[1]
        for i in range(baselines.N_SIGNALS):
            if seen.fired >> i & 1:
                self._anomaly_counts[index * baselines.N_SIGNALS + i] += 1
        if seen.suspend:
            state.flags |= FLAG_SUSPENDED
            state.suspended_at_ms = now_ms
            self.suspensions.append(practitioner.practitioner_id)
        if lookup is not None:
            lookup.anomalies, lookup.scores, lookup.base_suspend = (
                seen.fired,
                seen.scores,
                seen.suspend,
            )

    def _evaluate(
        self,
        txn: Any,
        practitioner: Practitioner,
        req: pb.CheckCoverageRequest,
        today: int,
        now: float,
        state: SlotState | None,
        profile: QuotaProfile | None,
        lookup: _Lookup | None = None,
    ) -> tuple[int, pb.CheckCoverageResponse | bytes]:
        # 2. Validate every field; report all bad fields at once, by name only.
        bad = 0
        request_id = req.request_id
        if not rules.valid_request_id(request_id):
            bad |= 1 << rules.F_REQUEST_ID
        nir = rules.normalise_nir(req.nir)
        nir_ok = rules.valid_nir(nir)
        if not nir_ok:
            bad |= 1 << rules.F_NIR
        nir_key = req.nir_key
        if not rules.valid_nir_key_format(nir_key) or (
            nir_ok and int(nir_key) != rules.nir_key_for(nir)
        ):
            bad |= 1 << rules.F_NIR_KEY
        birth_date = req.birth_date
        if not rules.valid_birth_date(birth_date):
            bad |= 1 << rules.F_BIRTH_DATE
        birth_rank = req.birth_rank
        if not 1 <= birth_rank <= 9:
            bad |= 1 << rules.F_BIRTH_RANK
        amc_number = req.amc_number
        if not rules.valid_amc_number(amc_number):
            bad |= 1 << rules.F_AMC_NUMBER
        member_number = req.member_number
        if not rules.valid_member_number(member_number):
            bad |= 1 << rules.F_MEMBER_NUMBER
        domain = req.domain
        if not 1 <= domain <= rules.MAX_DOMAIN:
            bad |= 1 << rules.F_DOMAIN
        care_date = today
        if req.care_date:
            if rules.valid_calendar_date(req.care_date):
                care_date = int(req.care_date)
            else:
                bad |= 1 << rules.F_CARE_DATE
        if bad:
            return INVALID_ARGUMENT, rules.invalid_fields_status(bad)
        if lookup is not None:
            # Validated: the domain and AMC may be recorded, and the beneficiary's pseudonym.
            lookup.domain = domain
            lookup.amc = amc_number
            lookup.identity = rules.identity_bytes(nir, birth_date, birth_rank)

        # 3. Scope, before anything is counted or read: the profession's domains, the agreements.
        if not practitioner.domains & (1 << domain):
            return PERMISSION_DENIED, rules.DOMAIN_OUT_OF_SCOPE
        if practitioner.amc_numbers is not None and amc_number not in practitioner.amc_numbers:
            return PERMISSION_DENIED, rules.AMC_OUT_OF_SCOPE

        identity = rules.identity_bytes(nir, birth_date, birth_rank)

        # The storage key (no store read yet): it also fingerprints the beneficiary for the
        # distinct count, which saves a second keyed hash per lookup.
        storage_key = self._keys.storage_key(identity)

        # 4. Daily lookups and distinct beneficiaries: check both, then count both.
        if state is not None:
            assert profile is not None and self._quota is not None
            if state.daily_count >= profile.daily_limit:
                if not profile.shadow & SHADOW_DAILY:
                    return RESOURCE_EXHAUSTED, rules.quota_status(
                        rules.REASON_DAILY, rules.day_retry_seconds(today, now)
                    )
                if lookup is not None and not lookup.would_deny:
                    lookup.would_deny = tr.WD_DAILY
            fp = fingerprint(storage_key)
            full = state.distinct_count >= profile.distinct_limit
            cs = self._cs
            lease_ok = False
            if cs is not None:
                now_ms = int(now * 1000)
                lease_ok = now_ms < cs.lease_expiry_ms
                # A beneficiary new to this host needs a distinct slot of the cluster's.
                if (
                    not (cs.distinct > 0 and lease_ok)
                    and not profile.shadow & SHADOW_DISTINCT
                    and self._mode != rules.CREDIT_OPEN
                    and not self._quota.seen_or_add(practitioner.slot, fp, may_add=False)[0]
                ):
                    if self._mode == rules.CREDIT_SPEND:
                        state.tat_ms, cs.rate_tokens = self._saved_rate
                    return self._without_credit(tr.O_DISTINCT, today, now)
            seen, added = self._quota.seen_or_add(
                practitioner.slot,
                fp,
                may_add=(not full or bool(profile.shadow & SHADOW_DISTINCT))
                and state.distinct_count < MAX_DISTINCT_LIMIT,
            )
            if not seen and full:
                if not profile.shadow & SHADOW_DISTINCT:
                    return RESOURCE_EXHAUSTED, rules.quota_status(
                        rules.REASON_DISTINCT, rules.day_retry_seconds(today, now)
                    )
                if lookup is not None and not lookup.would_deny:
                    lookup.would_deny = tr.WD_DISTINCT
            state.daily_count = min(state.daily_count + 1, 0xFFFFFFFF)
            if added:
                state.distinct_count += 1
            if cs is not None:
                if cs.daily > 0 and lease_ok:
                    cs.daily -= 1
                cs.used = min(cs.used + 1, 0xFFFFFFFF)
                if added:
                    if cs.distinct > 0 and lease_ok:
                        cs.distinct -= 1
                    if cs.ring_len < CREDIT_RING:
                        assert self._credit is not None
                        self._credit.push(practitioner.slot, cs, fp)
            self._observe(practitioner, state, today, now, domain, storage_key, lookup)

        # 5. Read the store: one LMDB get.
        self.store_reads += 1
        value = txn.get(storage_key)

        # 6. Every factor must match; any miss is the same NO_MATCH.
        matched: list[rules.RightRow] = []
        if value is not None:
            member_hash = (
                self._keys.member_hash(storage_key, member_number) if member_number else None
            )
            matched = [
                row
                for row in rules.decode_record(value)
                if row.amc_number == amc_number
                and (member_hash is None or row.member_hash == member_hash)
            ]
        if not matched:
            return OK, pb.CheckCoverageResponse(request_id=request_id, decision=_NO_MATCH)

        # Rights open for the domain on the care date; the one running longest wins.
        best: rules.RightRow | None = None
        for row in matched:
            if (
                row.domain == domain
                and row.start <= care_date <= row.end
                and (best is None or row.end > best.end)
            ):
                best = row
        if best is None:
            return OK, pb.CheckCoverageResponse(request_id=request_id, decision=_NOT_COVERED)

        attestation = rules.encode_attestation(
            self._attestation_key,
            expires=int(now) + self.attestation_ttl,
            domain=domain,
            care_date=care_date,
            amc_number=amc_number,
            practitioner_id=practitioner.practitioner_id,
            beneficiary_tag=self._keys.beneficiary_tag(identity),
        )
        return OK, pb.CheckCoverageResponse(
            request_id=request_id,
            decision=_COVERED,
            rate_percent=best.rate_percent,
            convention_type=best.convention_type,
            rights_end_date=f"{best.end:08d}",
            attestation=attestation,
        )


class _Span:
    """One traced call: its method, trace and span ids, the caller's attributes and its clock."""

    __slots__ = (
        "degraded", "method", "parent", "profession", "span_id", "start", "t0", "trace_id", "who",
    )  # fmt: skip

    def __init__(
        self,
        method: int,
        trace_id: bytes,
        span_id: bytes,
        parent: bytes,
        who: bytes,
        profession: int,
        start: int,
        t0: int,
    ) -> None:
        self.method = method
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.who = who
        self.profession = profession
        self.start = start
        self.t0 = t0
        self.degraded = False


class _Lookup:
    """What a traced lookup learnt on its way, for its span (never a request value it refused)."""

    __slots__ = (
        "amc", "anomalies", "base_suspend", "domain", "guard_fired", "identity", "scores",
        "would_deny",
    )  # fmt: skip

    def __init__(self) -> None:
        self.identity: bytes | None = None
        self.domain = 0
        self.amc = ""
        self.guard_fired = False
        self.would_deny = tr.WD_NONE
        # Baseline signals this lookup raised (bits), their scores, and whether they suspended.
        self.anomalies = 0
        self.scores: list[int] = []
        self.base_suspend = False
