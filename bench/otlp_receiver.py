"""A real OTLP/gRPC receiver (opentelemetry-proto's TraceService and MetricsService) that records
the raw export requests: the tests' and the benchmarks' stand-in for a collector, Jaeger or Tempo.

`python -m bench.otlp_receiver [--port N] [--keep] [--counts-file PATH]` prints `otlp receiver
serving on 127.0.0.1:PORT` and counts (or, with --keep, also keeps) what it receives until SIGTERM;
`bench.OtlpReceiver/Counts` answers the counts so far as JSON (`counts(target)`), and --counts-file
gets the final ones once the server has stopped, so a receiver stopped mid-run loses no count.

Spans are counted without decoding them (a bench receiver must keep up with a shipper sending
several hundred thousand a second): the framing is walked, and lookup spans (`covergate.lookup`, a
unary call's span) are told from batch and stream call spans by their encoded name.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from fastpath import complete_spans
from fastpath import trace as tr

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"
_TRACE_OK = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
_METRICS_OK = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
CONTROL_SERVICE = "bench.OtlpReceiver"
COUNTS_METHOD = f"/{CONTROL_SERVICE}/Counts"


def _name_field(name: str) -> bytes:
    """Span.name as encoded (field 5; every name here is shorter than 128 bytes)."""
    raw = name.encode()
    assert len(raw) < 0x80
    return b"\x2a" + bytes([len(raw)]) + raw


# One span per lookup: a batch item's or stream message's, or a unary call's (which is both).
LOOKUP_NAMES = (
    _name_field(tr.LOOKUP_SPAN_NAME),
    _name_field(tr.RPC_SPAN_NAMES[tr.METHODS.index("CheckCoverage")]),
)


@dataclass
class SpanCounts:
    """What some export requests held: all spans, and those of lookups (the rest are batch and
    stream call spans, and audit gap records)."""

    spans: int = 0
    lookup_spans: int = 0

    def add(self, other: SpanCounts) -> None:
        self.spans += other.spans
        self.lookup_spans += other.lookup_spans


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int) -> Any:
    """(field number, value start, value end) of each length-delimited field in data[start:end];
    other wire types are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 2:
            size, pos = _varint(data, pos)
            yield key >> 3, pos, pos + size
            pos += size
        elif wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected wire type {wire}")


def count_spans(request: bytes) -> SpanCounts:
    """Spans in an encoded ExportTraceServiceRequest, by walking its framing only."""
    out = SpanCounts()
    for number, start, end in _fields(request, 0, len(request)):
        if number != 1:  # resource_spans
            continue
        for number2, start2, end2 in _fields(request, start, end):
            if number2 != 2:  # scope_spans
                continue
            out.add(_count_scope_spans(request, start2, end2))
    return out


def _count_scope_spans(data: bytes, start: int, end: int) -> SpanCounts:
    pos = start
    if pos < end and data[pos] == 0x0A:  # the scope first, as every exporter writes it
        size, pos = _varint(data, pos + 1)
        pos += size
    view = memoryview(data)[pos:end]
    try:
        used, spans = complete_spans(view, len(view))
    except ValueError:
        used, spans = 0, 0
    if used != len(view):  # not only spans after the scope (a schema_url...): field by field
        spans = sum(1 for number, _, _ in _fields(data, start, end) if number == 2)
    chunk = data[start:end]
    return SpanCounts(spans, sum(chunk.count(name) for name in LOOKUP_NAMES))


class OtlpReceiver:
    """OTLP/gRPC on 127.0.0.1:<port> (0: a free one). Requests are kept as raw bytes (`keep`), so
    a test can search exactly what left the server; counts are always kept."""

    def __init__(self, port: int = 0, *, keep: bool = True, max_message_bytes: int = 64 << 20):
        self.keep = keep
        self.trace_requests: list[bytes] = []
        self.metric_requests: list[bytes] = []
        self.trace_bytes = 0
        self.trace_calls = 0
        self.span_counts = SpanCounts()
        # When the first and the latest trace export arrived (time.time()), and the spans of the
        # first: the rate a shipper exports at, from the receiver's side.
        self.first_at = 0.0
        self.first_spans = 0
        self.last_at = 0.0
        self.metric_calls = 0
        self._lock = threading.Lock()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.max_receive_message_length", max_message_bytes)],
        )
        handlers = {
            TRACE_SERVICE: {"Export": grpc.unary_unary_rpc_method_handler(self._traces)},
            METRICS_SERVICE: {"Export": grpc.unary_unary_rpc_method_handler(self._metrics)},
        }
        handlers[CONTROL_SERVICE] = {"Counts": grpc.unary_unary_rpc_method_handler(self._counts)}
        for service, methods in handlers.items():
            self._server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, methods),)
            )
        # grpc.health.v1 too, so the bench starts it like any server it waits for.
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _traces(self, request: bytes, context: Any) -> bytes:
        counted = count_spans(request)
        now = time.time()
        with self._lock:
            if not self.first_at:
                self.first_at, self.first_spans = now, counted.spans
            self.last_at = now
            self.span_counts.add(counted)
            self.trace_calls += 1
            self.trace_bytes += len(request)
            if self.keep:
                self.trace_requests.append(request)
        return _TRACE_OK

    def _metrics(self, request: bytes, context: Any) -> bytes:
        with self._lock:
            self.metric_calls += 1
            if self.keep:
                self.metric_requests.append(request)
        return _METRICS_OK

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {
                **asdict(self.span_counts),
                "trace_calls": self.trace_calls,
                "trace_bytes": self.trace_bytes,
                "metric_calls": self.metric_calls,
                "first_at": self.first_at,
                "first_spans": self.first_spans,
                "last_at": self.last_at,
            }

    def _counts(self, request: bytes, context: Any) -> bytes:
        return json.dumps(self.counts()).encode()

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading what arrived ----------------------------------------------------------------------

    def raw_traces(self) -> bytes:
        with self._lock:
            return b"".join(self.trace_requests)

    def trace_exports(self) -> list[trace_service_pb2.ExportTraceServiceRequest]:
        with self._lock:
            raw = list(self.trace_requests)
        return [trace_service_pb2.ExportTraceServiceRequest.FromString(r) for r in raw]

    def spans(self) -> list[trace_pb2.Span]:
        return [
            span
            for export in self.trace_exports()
            for resource_spans in export.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def metric_exports(self) -> list[metrics_service_pb2.ExportMetricsServiceRequest]:
        with self._lock:
            raw = list(self.metric_requests)
        return [metrics_service_pb2.ExportMetricsServiceRequest.FromString(r) for r in raw]


def counts(target: str, timeout: float = 5.0) -> dict[str, Any]:
    """A running receiver's counts so far (`target`: host:port)."""
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(COUNTS_METHOD)(b"", timeout=timeout)
    return json.loads(raw)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep requests (memory grows)")
    parser.add_argument("--counts-file", type=Path, help="write the final counts here (JSON)")
    args = parser.parse_args(argv)
    receiver = OtlpReceiver(args.port, keep=args.keep).start()
    print(f"otlp receiver serving on 127.0.0.1:{receiver.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    receiver.stop()
    if args.counts_file is not None:
        args.counts_file.write_text(json.dumps(receiver.counts()))
    print(
        f"otlp receiver: {receiver.trace_calls} trace exports ({receiver.trace_bytes} bytes), "
        f"{receiver.metric_calls} metric exports; {receiver.span_counts.spans} spans "
        f"({receiver.span_counts.lookup_spans} of lookups)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
