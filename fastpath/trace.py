"""OTLP span encoding shared by both gates: every lookup becomes an OTLP trace.v1.Span, encoded
here (reference) or in C (`_gate_c.pyx`, same bytes) straight into a per-gate buffer.

Each span is framed as a `ScopeSpans.spans` entry (tag 0x12, length, Span), so the exporter builds
an ExportTraceServiceRequest by concatenation. The constant pieces (attribute keys with their
values) are encoded once here; the C gate copies them. No attribute ever carries a request value
other than the domain and AMC of a request that passed validation, and a keyed beneficiary
pseudonym.
"""

from __future__ import annotations

from functools import lru_cache

from fastpath import rules

SCOPE_NAME = "covergate.fastpath"

# Span.kind (opentelemetry.proto.trace.v1.Span.SpanKind)
KIND_INTERNAL = 1
KIND_SERVER = 2

SERVICE = "covergate.v1.CoverageService"
METHOD_UNARY, METHOD_BATCH, METHOD_STREAM = 0, 1, 2
METHODS = ("CheckCoverage", "CheckCoverageBatch", "CheckCoverageStream")
RPC_SPAN_NAMES = tuple(f"{SERVICE}/{m}" for m in METHODS)
LOOKUP_SPAN_NAME = "covergate.lookup"

# What a lookup came to: a decision, or the refusal's reason. Indexes are shared with the C gate
# (its metric counters are [profession][outcome]).
OUTCOMES = (
    "COVERED",
    "NOT_COVERED",
    "NO_MATCH",
    "INVALID_ARGUMENT",
    rules.REASON_DOMAIN,
    rules.REASON_AMC,
    rules.REASON_SUSPENDED,
    rules.REASON_RATE,
    rules.REASON_DAILY,
    rules.REASON_DISTINCT,
    rules.REASON_QUOTA_STATE,
    rules.REASON_NOT_LOADED,
    rules.REASON_ROLE,
    rules.REASON_DEADLINE,
    rules.REASON_BACKLOG,
    rules.REASON_CANCELLED,
    rules.REASON_BACKEND,
)
(
    O_COVERED,
    O_NOT_COVERED,
    O_NO_MATCH,
    O_INVALID,
    O_DOMAIN,
    O_AMC,
    O_SUSPENDED,
    O_RATE,
    O_DAILY,
    O_DISTINCT,
    O_QUOTA_STATE,
    O_NOT_LOADED,
    O_ROLE,
    O_DEADLINE,
    O_BACKLOG,
    O_CANCELLED,
    O_BACKEND,
) = range(len(OUTCOMES))
N_OUTCOMES = len(OUTCOMES)
DECISION_OUTCOMES = {
    rules.DECISION_COVERED: O_COVERED,
    rules.DECISION_NOT_COVERED: O_NOT_COVERED,
    rules.DECISION_NO_MATCH: O_NO_MATCH,
}
REASON_OUTCOMES = {OUTCOMES[o]: o for o in range(O_DOMAIN, N_OUTCOMES)}

# Shadow mode: the first rule that would have refused a lookup it let through.
WOULD_DENY = ("", rules.REASON_RATE, rules.REASON_DAILY, rules.REASON_DISTINCT, "HARVEST_GUARD")
WD_NONE, WD_RATE, WD_DAILY, WD_DISTINCT, WD_GUARD = range(len(WOULD_DENY))

# Metric label values: the configured professions, then everything else.
PROFESSIONS = (
    "pharmacist",
    "physician",
    "dentist",
    "optician",
    "audiologist",
    "laboratory",
    "radiology",
    "paramedical",
    "hospital",
    "transport",
    "other",
)
N_PROFESSIONS = len(PROFESSIONS)

# Buffered span bytes beyond which a gate drops spans (and counts them): an exporter that stopped
# taking them must not grow a worker without bound.
MAX_BUFFER = 64 << 20

AUDIT_GAP_SPAN_NAME = "covergate.audit.gap"
EVENT_SPANS_DROPPED = "covergate.spans_dropped"
K_DROPPED_SPANS = "covergate.audit.dropped_spans"
EVENT_GUARD_FIRED = "covergate.guard.fired"
EVENT_SUSPENDED = "covergate.practitioner.suspended"

# -- protobuf wire pieces ------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_bytes(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + varint(len(data)) + data


def export_trace_request(resource: bytes, scope: bytes, spans: bytes | memoryview) -> bytes:
    """ExportTraceServiceRequest{ResourceSpans{resource, ScopeSpans{scope, spans}}} for an encoded
    Resource and InstrumentationScope: `spans` are already framed ScopeSpans.spans entries, so the
    request is a small head and the spans, copied once (the Cython gate's take_export_requests
    writes the same bytes)."""
    scope_head = field_bytes(0x0A, scope)
    scope_spans = len(scope_head) + len(spans)
    inner = field_bytes(0x0A, resource) + b"\x12" + varint(scope_spans)
    head = b"\x0a" + varint(len(inner) + scope_spans) + inner + scope_head
    return b"".join((head, spans))


def complete_spans(data: bytes | memoryview, max_bytes: int) -> tuple[int, int]:
    """(end, count) of the complete framed spans at the start of `data`: as many as fit in
    `max_bytes`, and at least the first one if it is complete. Raises ValueError where the bytes
    are not framed spans. (The shipper's cut; the Cython gate module has a C twin.)"""
    n = len(data)
    pos = count = 0
    while pos < n:
        if data[pos] != 0x12:
            raise ValueError("not a framed span")
        size = shift = 0
        i = pos + 1
        while True:
            if i >= n:
                return pos, count
            byte = data[i]
            size |= (byte & 0x7F) << shift
            i += 1
            if byte < 0x80:
                break
            shift += 7
            if shift > 63:
                raise ValueError("not a framed span")
        end = i + size
        if end > n or (end > max_bytes and count):
            return pos, count
        pos, count = end, count + 1
    return pos, count


def _key_value(key: str, any_value: bytes) -> bytes:
    """One Span.attributes entry (field 9): KeyValue{key, value: AnyValue}."""
    return field_bytes(0x4A, field_bytes(0x0A, key.encode()) + field_bytes(0x12, any_value))


def attr_str(key: str, value: str | bytes) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
    return _key_value(key, field_bytes(0x0A, raw))


def attr_int(key: str, value: int) -> bytes:
    return _key_value(key, b"\x18" + varint(value))


def attr_bool(key: str, value: bool) -> bytes:
    return _key_value(key, b"\x10\x01" if value else b"\x10\x00")


def fixed64(value: int) -> bytes:
    return (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")


def encode_event(name: str, time_ns: int, attributes: bytes = b"") -> bytes:
    """One Span.events entry (field 11)."""
    return field_bytes(
        0x5A, b"\x09" + fixed64(time_ns) + field_bytes(0x12, name.encode()) + attributes
    )


def encode_span(
    trace_id: bytes,
    span_id: bytes,
    parent_span_id: bytes,
    name: str,
    kind: int,
    start_ns: int,
    end_ns: int,
    attributes: bytes,
    events: bytes = b"",
) -> bytes:
    """A Span, framed as a ScopeSpans.spans entry. `attributes` and `events` are already encoded
    (Span fields 9 and 11), in the order the C gate writes them."""
    span = b"".join(
        (
            b"\x0a\x10",
            trace_id,
            b"\x12\x08",
            span_id,
            b"\x22\x08" + parent_span_id if parent_span_id else b"",
            field_bytes(0x2A, name.encode()),
            b"\x30" + varint(kind),
            b"\x39" + fixed64(start_ns),
            b"\x41" + fixed64(end_ns),
            attributes,
            events,
        )
    )
    return field_bytes(0x12, span)


def rpc_span(
    trace_id: bytes,
    span_id: bytes,
    parent_span_id: bytes,
    method: int,
    code: int,
    who: bytes,
    count: int,
    start_ns: int,
    end_ns: int,
) -> bytes:
    """The SERVER span of a batch (`count` items) or a stream (`count` messages), parent of the
    lookup spans of its items or messages."""
    key = K_BATCH_ITEMS if method == METHOD_BATCH else K_STREAM_MESSAGES
    attributes = b"".join(
        (RPC_ATTRS[method], attr_int(K_STATUS_CODE, code), who, attr_int(key, count))
    )
    return encode_span(
        trace_id,
        span_id,
        parent_span_id,
        RPC_SPAN_NAMES[method],
        KIND_SERVER,
        start_ns,
        end_ns,
        attributes,
    )


def refusal_span(
    trace_id: bytes,
    span_id: bytes,
    parent_span_id: bytes,
    method: int,
    code: int,
    who: bytes,
    outcome: int,
    start_ns: int,
    end_ns: int,
    *,
    child: bool = False,
) -> bytes:
    """An attempt refused before a gate decided it (a suspended or wrong-role credential, data
    not loaded, an expired deadline, a full audit spool): a unary or batch call's SERVER span, or
    (`child`) a stream message's covergate.lookup span under the stream's span."""
    if child:
        name, kind, head = LOOKUP_SPAN_NAME, KIND_INTERNAL, b""
    else:
        name, kind = RPC_SPAN_NAMES[method], KIND_SERVER
        head = RPC_ATTRS[method] + attr_int(K_STATUS_CODE, code)
    return encode_span(
        trace_id,
        span_id,
        parent_span_id,
        name,
        kind,
        start_ns,
        end_ns,
        head + who + OUTCOME_ATTRS[outcome],
    )


def audit_gap_span(
    trace_id: bytes, span_id: bytes, start_ns: int, end_ns: int, dropped: int
) -> bytes:
    """With `when_full = "drop"`: the record that spans were not kept from `start_ns` to
    `end_ns`, written as soon as the spool has room again (an event says how many so far)."""
    event = encode_event(EVENT_SPANS_DROPPED, end_ns, attr_int(K_DROPPED_SPANS, dropped))
    return encode_span(
        trace_id,
        span_id,
        b"",
        AUDIT_GAP_SPAN_NAME,
        KIND_INTERNAL,
        start_ns,
        end_ns,
        attr_int(K_DROPPED_SPANS, dropped),
        event,
    )


# -- the constant attributes, encoded once -------------------------------------------------------

K_PRACTITIONER = "covergate.practitioner.id"
K_PROFESSION = "covergate.practitioner.profession"
K_DOMAIN = "covergate.domain"
K_AMC = "covergate.amc"
K_DECISION = "covergate.decision"
K_REFUSAL = "covergate.refusal"
K_BENEFICIARY = "covergate.beneficiary"
K_DAILY_REMAINING = "covergate.quota.daily_remaining"
K_DISTINCT_TODAY = "covergate.distinct_today"
K_GUARD_FIRED = "covergate.guard.fired"
K_WOULD_DENY = "covergate.quota.would_deny"
K_BATCH_ITEMS = "covergate.batch.items"
K_STREAM_MESSAGES = "covergate.stream.messages"
K_STATUS_CODE = "rpc.grpc.status_code"

# Encoded keys the C gate writes dynamic values after (KeyValue.key field, with its tag).
AMC_KEY = field_bytes(0x0A, K_AMC.encode())
BENEFICIARY_KEY = field_bytes(0x0A, K_BENEFICIARY.encode())
DAILY_REMAINING_KEY = field_bytes(0x0A, K_DAILY_REMAINING.encode())
DISTINCT_TODAY_KEY = field_bytes(0x0A, K_DISTINCT_TODAY.encode())
STATUS_CODE_KEY = field_bytes(0x0A, K_STATUS_CODE.encode())
BATCH_ITEMS_KEY = field_bytes(0x0A, K_BATCH_ITEMS.encode())

DOMAIN_ATTRS = tuple(
    attr_str(K_DOMAIN, rules.DOMAIN_NAMES[d]) if d in rules.DOMAIN_NAMES else b""
    for d in range(rules.MAX_DOMAIN + 1)
)
OUTCOME_ATTRS = tuple(
    attr_str(K_DECISION if o <= O_NO_MATCH else K_REFUSAL, OUTCOMES[o]) for o in range(N_OUTCOMES)
)
WOULD_DENY_ATTRS = (b"", *(attr_str(K_WOULD_DENY, r) for r in WOULD_DENY[1:]))
GUARD_ATTRS = (attr_bool(K_GUARD_FIRED, False), attr_bool(K_GUARD_FIRED, True))
# With [cluster]: on every lookup answered while the host cannot reach Redis (it spends the
# credit it holds), so the backend shows which answers were given degraded.
DEGRADED_ATTR = attr_bool("covergate.cluster.degraded", True)
RPC_ATTRS = tuple(
    attr_str("rpc.system", "grpc") + attr_str("rpc.service", SERVICE) + attr_str("rpc.method", m)
    for m in METHODS
)
NAMES = tuple(n.encode() for n in (*RPC_SPAN_NAMES, LOOKUP_SPAN_NAME))


def _event_attr(span_attr: bytes) -> bytes:
    """A span attribute (Span field 9) as an event's (Event field 3): same KeyValue."""
    return b"\x1a" + span_attr[1:]


GUARD_EVENTS_TAIL = (
    field_bytes(0x12, EVENT_GUARD_FIRED.encode())
    + _event_attr(attr_bool("covergate.practitioner.suspended", True)),
    field_bytes(0x12, EVENT_SUSPENDED.encode())
    + _event_attr(attr_str("covergate.suspended_by", "harvest guard")),
)


def guard_events(time_ns: int) -> bytes:
    """The events of the lookup on which the harvest guard fired and suspended the practitioner."""
    return b"".join(
        field_bytes(0x5A, b"\x09" + fixed64(time_ns) + tail) for tail in GUARD_EVENTS_TAIL
    )


EVENT_ANOMALY = "covergate.anomaly"


# The signals of fastpath.baselines, in their bit order.
ANOMALY_SIGNALS = ("new_share", "new_today", "off_hours", "volume", "new_excess")
_ANOMALY_HEADS = tuple(
    field_bytes(0x12, EVENT_ANOMALY.encode())
    + _event_attr(attr_str("covergate.anomaly.signal", signal))
    for signal in ANOMALY_SIGNALS
)


def anomaly_events(
    time_ns: int, fired: int, scores: tuple[int, ...] | list[int], suspended: bool
) -> bytes:
    """The events of the lookup that raised baseline signals (`fired`, bit i for
    ANOMALY_SIGNALS[i]) with their scores; `suspended`: the policy suspended the practitioner."""
    events = []
    for i, head in enumerate(_ANOMALY_HEADS):
        if fired >> i & 1:
            body = head + _event_attr(attr_int("covergate.anomaly.score", scores[i]))
            if suspended:
                body += _event_attr(attr_bool("covergate.practitioner.suspended", True))
            events.append(field_bytes(0x5A, b"\x09" + fixed64(time_ns) + body))
    return b"".join(events)


K_GENERATION = "covergate.dataset.generation"


@lru_cache(maxsize=64)
def generation_attr(generation: int) -> bytes:
    """The rights generation a span was answered from (0: the host's own store, no snapshot),
    written after the practitioner's attributes in every span."""
    return attr_int(K_GENERATION, generation)


@lru_cache(maxsize=4096)
def practitioner_attributes(practitioner_id: str, profession: str) -> tuple[bytes, int]:
    """The practitioner's two attributes, encoded, and its profession's metric index."""
    try:
        index = PROFESSIONS.index(profession)
    except ValueError:
        index = N_PROFESSIONS - 1
    return attr_str(K_PRACTITIONER, practitioner_id) + attr_str(K_PROFESSION, profession), index


@lru_cache(maxsize=1024)
def refusal_outcome(code: int, status: bytes) -> int:
    """The outcome index of a refusal, from its google.rpc.Status (the reference's way)."""
    if code == rules.INVALID_ARGUMENT:
        return O_INVALID
    from google.rpc import error_details_pb2, status_pb2

    for detail in status_pb2.Status.FromString(status).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return REASON_OUTCOMES[info.reason]
    raise ValueError("a refusal without a reason")


def now_ns(now: object) -> int:
    """The call's `now` (unix seconds) in nanoseconds, saturated; 0 when it is not a number."""
    if type(now) is float:
        if now != now:
            return 0
        value = now * 1e9
        if value >= 9.2e18:
            return 0x7FFFFFFFFFFFFFFF
        if value <= 0:
            return 0
        return int(value)
    if type(now) is int:
        return min(max(now, 0), 9_223_372_036) * 1_000_000_000
    return 0


# -- trace ids -----------------------------------------------------------------------------------

MASK64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(state: int) -> tuple[int, int]:
    """(new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def check_context(trace: object) -> tuple[bytes, bytes]:
    """A caller's (trace id, parent span id), checked."""
    if (
        type(trace) is tuple
        and len(trace) == 2
        and type(trace[0]) is bytes
        and len(trace[0]) == 16
        and type(trace[1]) is bytes
        and len(trace[1]) in (0, 8)
    ):
        return trace
    raise ValueError("trace must be (16-byte trace id, 8-byte or empty parent span id)")
