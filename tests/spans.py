"""Reading the OTLP spans covergate records: decode, mask clock readings, attributes as a dict.

Shared by the span parity tests (both gates) and the telemetry tests (a real OTLP receiver).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.trace.v1 import trace_pb2


def decode_spans(spans: bytes) -> list[trace_pb2.Span]:
    """A gate's take_spans() bytes (ScopeSpans.spans entries) as Span messages."""
    return list(trace_pb2.ScopeSpans.FromString(spans).spans)


def masked_spans(spans: bytes) -> list[bytes]:
    """Each span's bytes with its clock readings zeroed (ids are seeded, so they compare)."""
    out = []
    for span in decode_spans(spans):
        span.start_time_unix_nano = span.end_time_unix_nano = 0
        for event in span.events:
            event.time_unix_nano = 0
        out.append(span.SerializeToString())
    return out


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(span: trace_pb2.Span) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in span.attributes}
