"""OpenTelemetry for one worker: the gate's spans exported over OTLP/gRPC, lookup and suspension
counters and an RPC latency histogram, configured by the standard OTEL_* variables.

Why not the SDK's tracer: an SDK span costs 30-40 us here, more than a whole batch item. The gates
encode each lookup's OTLP span themselves (fastpath.trace); this module takes their buffer on the
worker's loop (the gate is not thread-safe) every OTEL_BSP_SCHEDULE_DELAY ms, or sooner when it
fills, already wrapped into ExportTraceServiceRequests (the gate writes the envelope around its
spans in one copy), and a background thread sends them with a raw gRPC call. A receiver that is
down costs dropped spans, counted and warned about, never a blocked request. Likewise the SDK's
per-record metric calls cost 10-15 us: lookup counts live in the gate (C counters, read by an SDK
ObservableCounter callback), and latencies go to a local fixed-bucket histogram exported as OTLP by
the same thread.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any
from urllib.parse import unquote, urlparse

import grpc

from fastpath import trace as tr

log = logging.getLogger("covergate.telemetry")

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
CHUNK_BYTES = 3 << 20  # below the 4 MiB a collector accepts by default
MAX_QUEUED_BYTES = 64 << 20
LATENCY_BOUNDS_MS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)
CONSOLE_FLAG = "COVERGATE_TRACE_CONSOLE"
METRIC_TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
METRIC_EXPORT_TIMEOUT_SECONDS = 2.0
SDK_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"


class _ExportFailures(logging.Filter):
    """Holds back the SDK exporter's warnings and errors (while the last metrics go out at
    shutdown), counting them, so that one line of ours says what happened."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            self.count += 1
            return False
        return True


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, ""))
    except ValueError:
        return default


def traces_endpoint() -> str:
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or ""
    ).strip()


def enabled() -> bool:
    """Tracing is on when an OTLP endpoint is configured or the development console flag is set
    (and OTEL_SDK_DISABLED is not)."""
    if _env_flag("OTEL_SDK_DISABLED"):
        return False
    return bool(traces_endpoint()) or _env_flag(CONSOLE_FLAG)


# -- W3C trace context ---------------------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")


def parse_traceparent(value: str) -> tuple[bytes, bytes] | None:
    """`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` -> (trace id, parent span id);
    None for anything else (an unusable header starts a new trace, as the spec says)."""
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version, trace_id, parent, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if version == "ff" or (version == "00" and len(value) != 55):
        return None
    if not _HEX.issuperset(version + trace_id + parent + flags):
        return None
    if trace_id == "0" * 32 or parent == "0" * 16:
        return None
    return bytes.fromhex(trace_id), bytes.fromhex(parent)


def trace_context(metadata_items: Iterable[tuple[str, Any]]) -> tuple[bytes, bytes] | None:
    for key, value in metadata_items:
        if key == "traceparent":
            return parse_traceparent(value) if isinstance(value, str) else None
    return None


# -- OTLP envelopes, by hand ---------------------------------------------------------------------


def _any_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + tr.varint(value)
    if isinstance(value, float):
        import struct

        return b"\x21" + struct.pack("<d", value)
    return tr.field_bytes(0x0A, str(value).encode())


def encode_key_values(tag: int, attributes: Mapping[str, Any]) -> bytes:
    return b"".join(
        tr.field_bytes(tag, tr.field_bytes(0x0A, k.encode()) + tr.field_bytes(0x12, _any_value(v)))
        for k, v in attributes.items()
    )


def encode_resource(attributes: Mapping[str, Any]) -> bytes:
    """opentelemetry.proto.resource.v1.Resource."""
    return encode_key_values(0x0A, attributes)


def encode_scope(name: str, version: str) -> bytes:
    """opentelemetry.proto.common.v1.InstrumentationScope."""
    return tr.field_bytes(0x0A, name.encode()) + tr.field_bytes(0x12, version.encode())


export_trace_request = tr.export_trace_request  # the gates' take_export_requests build these


# -- latency, without the SDK's per-record cost ------------------------------------------------


@dataclass
class LatencyHistogram:
    """Cumulative explicit-bucket histogram of RPC durations per method (ms)."""

    bounds: Sequence[float] = LATENCY_BOUNDS_MS
    start_ns: int = field(default_factory=time.time_ns)
    counts: dict[str, list[int]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)

    def record(self, method: str, seconds: float) -> None:
        ms = seconds * 1000.0
        buckets = self.counts.get(method)
        if buckets is None:
            buckets = self.counts[method] = [0] * (len(self.bounds) + 1)
            self.sums[method] = 0.0
        buckets[bisect.bisect_left(self.bounds, ms)] += 1
        self.sums[method] += ms

    def encode_metric(self) -> bytes:
        """opentelemetry.proto.metrics.v1.Metric `rpc.server.duration` (cumulative histogram)."""
        import struct

        now = time.time_ns()
        points = b""
        for method, buckets in sorted(self.counts.items()):
            point = b"".join(
                (
                    encode_key_values(
                        0x4A,
                        {"rpc.system": "grpc", "rpc.service": tr.SERVICE, "rpc.method": method},
                    ),
                    b"\x11" + struct.pack("<Q", self.start_ns),
                    b"\x19" + struct.pack("<Q", now),
                    b"\x21" + struct.pack("<Q", sum(buckets)),
                    b"\x29" + struct.pack("<d", self.sums[method]),
                    tr.field_bytes(0x32, struct.pack(f"<{len(buckets)}Q", *buckets)),
                    tr.field_bytes(0x3A, struct.pack(f"<{len(self.bounds)}d", *self.bounds)),
                )
            )
            points += tr.field_bytes(0x0A, point)
        # Histogram{data_points = 1, aggregation_temporality = 2 (cumulative)}
        histogram = points + b"\x10\x02"
        return b"".join(
            (
                tr.field_bytes(0x0A, b"rpc.server.duration"),
                tr.field_bytes(0x12, b"Duration of covergate's coverage RPCs"),
                tr.field_bytes(0x1A, b"ms"),
                tr.field_bytes(0x4A, histogram),  # Metric.histogram = 9
            )
        )


def export_metrics_request(resource: bytes, scope: bytes, metric: bytes) -> bytes:
    scope_metrics = tr.field_bytes(0x0A, scope) + tr.field_bytes(0x12, metric)
    resource_metrics = tr.field_bytes(0x0A, resource) + tr.field_bytes(0x12, scope_metrics)
    return tr.field_bytes(0x0A, resource_metrics)


# -- the exporter ----------------------------------------------------------------------------------


def _headers() -> tuple[tuple[str, str], ...]:
    raw = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or os.environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    out = []
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out.append((unquote(key.strip()).lower(), unquote(value.strip())))
    return tuple(out)


def _channel(endpoint: str) -> grpc.Channel:
    """OTLP/gRPC channel: http:// or OTEL_EXPORTER_OTLP_INSECURE=true is plaintext; otherwise TLS,
    with OTEL_EXPORTER_OTLP_CERTIFICATE as the trusted roots when given."""
    parsed = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
    target = parsed.netloc or parsed.path
    insecure_env = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE") or os.environ.get(
        "OTEL_EXPORTER_OTLP_INSECURE", ""
    )
    insecure = parsed.scheme == "http" or insecure_env.strip().lower() == "true"
    options = [("grpc.max_send_message_length", 2 * CHUNK_BYTES)]
    if insecure:
        return grpc.insecure_channel(target, options=options)
    cert = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE") or os.environ.get(
        "OTEL_EXPORTER_OTLP_CERTIFICATE"
    )
    roots = open(cert, "rb").read() if cert else None  # noqa: SIM115
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)


class SpanExporter(threading.Thread):
    """Sends export requests (and the latency metric) from a bounded queue; drops when it can't."""

    def __init__(self, resource: bytes, scope: bytes, endpoint: str, console: bool) -> None:
        super().__init__(name="covergate-otlp", daemon=True)
        self._resource = resource
        self._scope = scope
        self._console = console
        self._queue: queue.Queue[tuple[str, bytes, int] | None] = queue.Queue()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._timeout = _env_int("OTEL_EXPORTER_OTLP_TIMEOUT", 10000) / 1000
        self._headers = _headers()
        self.exported_spans = 0
        self.dropped_spans = 0
        self._last_warning = 0.0
        self._channel = _channel(endpoint) if endpoint else None
        if self._channel is not None:
            self._export_traces = self._channel.unary_unary(TRACE_EXPORT)
            self._export_metrics = self._channel.unary_unary(METRICS_EXPORT)

    def submit_spans(self, request: bytes, count: int) -> None:
        """An ExportTraceServiceRequest holding `count` spans."""
        with self._lock:
            if self._queued_bytes + len(request) > MAX_QUEUED_BYTES:
                self._dropped(count, "the export queue is full")
                return
            self._queued_bytes += len(request)
        self._queue.put(("spans", request, count))

    def submit_metric(self, metric: bytes) -> None:
        if self._channel is not None:
            self._queue.put(("metric", metric, 0))

    def close(self, timeout: float) -> None:
        self._queue.put(None)
        self.join(timeout)
        if self._channel is not None:
            self._channel.close()

    def _dropped(self, count: int, why: str) -> None:
        self.dropped_spans += count
        now = time.monotonic()
        if now - self._last_warning >= 10:
            self._last_warning = now
            log.warning("dropped %d span(s) so far: %s", self.dropped_spans, why)

    def run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, data, count = item
            if kind == "spans":
                with self._lock:
                    self._queued_bytes -= len(data)
                if self._console:
                    self._print(data)
                if self._channel is None:
                    continue
                try:
                    self._export_traces(data, timeout=self._timeout, metadata=self._headers)
                    self.exported_spans += count
                except grpc.RpcError as exc:
                    self._dropped(count, f"the OTLP receiver answered {exc.code().name}")
            else:
                request = export_metrics_request(self._resource, self._scope, data)
                try:
                    self._export_metrics(request, timeout=self._timeout, metadata=self._headers)
                except grpc.RpcError as exc:
                    log.warning("latency metrics not exported: %s", exc.code().name)

    @staticmethod
    def _print(request: bytes) -> None:
        from google.protobuf.json_format import MessageToDict
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        message = trace_service_pb2.ExportTraceServiceRequest.FromString(request)
        spans = [
            span
            for resource_spans in message.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        for span in spans:
            d = MessageToDict(span)
            for key in ("traceId", "spanId", "parentSpanId"):
                if key in d:
                    d[key] = getattr(span, _SNAKE[key]).hex()
            print(json.dumps(d, separators=(",", ":")), file=sys.stderr)


_SNAKE = {"traceId": "trace_id", "spanId": "span_id", "parentSpanId": "parent_span_id"}


# -- one worker's telemetry ------------------------------------------------------------------------


def _version() -> str:
    try:
        return metadata.version("covergate")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Telemetry:
    """Set up in a worker process (after fork/spawn), started on its event loop."""

    def __init__(self, worker: int) -> None:
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource

        version = _version()
        host = socket.gethostname()
        defaults: dict[str, str | int] = {
            "service.name": "covergate",
            "service.version": version,
            "host.name": host,
            "service.instance.id": f"{host}/{os.getpid()}",
            "covergate.worker": worker,
        }
        # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME override the defaults.
        self.resource = Resource.create(defaults).merge(OTELResourceDetector().detect())
        self.resource_bytes = encode_resource(dict(self.resource.attributes))
        self.scope_bytes = encode_scope(tr.SCOPE_NAME, version)
        self.endpoint = traces_endpoint()
        self.delay = max(_env_int("OTEL_BSP_SCHEDULE_DELAY", 1000), 1) / 1000
        self.metric_interval = max(_env_int("OTEL_METRIC_EXPORT_INTERVAL", 60000), 1) / 1000
        self.exporter = SpanExporter(
            self.resource_bytes, self.scope_bytes, self.endpoint, _env_flag(CONSOLE_FLAG)
        )
        self.latency = LatencyHistogram()
        self.suspensions = 0
        self._gates: list[Any] = []
        self._retired_counts = [0] * (tr.N_PROFESSIONS * tr.N_OUTCOMES)
        self._meter_provider: Any = None
        self._task: asyncio.Task[None] | None = None

    # -- wiring ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start exporting (call on the worker's event loop)."""
        self.exporter.start()
        self._start_metrics()
        self._task = asyncio.get_running_loop().create_task(self._flush_loop())

    def _start_metrics(self) -> None:
        if not self.endpoint:
            return
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.metrics import Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        exporter_kwargs: dict[str, Any] = {}
        if urlparse(self.endpoint).scheme == "http":
            exporter_kwargs["insecure"] = True
        if not any(os.environ.get(v) for v in METRIC_TIMEOUT_VARIABLES):
            # The SDK retries a failed export with backoff (1 s, 2 s, 4 s) until its timeout: with
            # the receiver down, that held every SIGTERM for ~7 s. The counters are cumulative, so
            # an export given up costs nothing that the next one does not carry.
            exporter_kwargs["timeout"] = METRIC_EXPORT_TIMEOUT_SECONDS
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(**exporter_kwargs))
        self._meter_provider = MeterProvider(resource=self.resource, metric_readers=[reader])
        meter = self._meter_provider.get_meter(tr.SCOPE_NAME, _version())

        def lookups(_options: Any) -> Iterable[Observation]:
            counts = self.lookup_counts()
            for p, profession in enumerate(tr.PROFESSIONS):
                for o, outcome in enumerate(tr.OUTCOMES):
                    n = counts[p * tr.N_OUTCOMES + o]
                    if n:
                        kind = "covergate.decision" if o <= tr.O_NO_MATCH else "covergate.refusal"
                        yield Observation(
                            n, {"covergate.practitioner.profession": profession, kind: outcome}
                        )

        def suspensions(_options: Any) -> Iterable[Observation]:
            yield Observation(self.suspensions)

        meter.create_observable_counter(
            "covergate.lookups", [lookups], unit="{lookup}",
            description="Lookups by profession, and decision or refusal reason",
        )  # fmt: skip
        meter.create_observable_counter(
            "covergate.suspensions", [suspensions], unit="{suspension}",
            description="Practitioners suspended by the harvest guard",
        )  # fmt: skip

    def watch(self, gate: Any) -> None:
        """A gate whose spans and counts this worker exports."""
        self._gates.append(gate)

    def retire(self, gate: Any) -> None:
        """A gate being replaced: keep its counts, send its last spans."""
        if gate in self._gates:
            self._take(gate)
            counts = gate.lookup_counts()
            self._retired_counts = [
                a + b for a, b in zip(self._retired_counts, counts, strict=True)
            ]
            self._gates.remove(gate)

    def refused(self, profession: int, outcome: int) -> None:
        """A lookup refused before any gate saw it (a suspended practitioner's attempt)."""
        self._retired_counts[profession * tr.N_OUTCOMES + outcome] += 1

    def lookup_counts(self) -> list[int]:
        counts = list(self._retired_counts)
        for gate in list(self._gates):
            counts = [a + b for a, b in zip(counts, gate.lookup_counts(), strict=True)]
        return counts

    def record_rpc(self, method: str, seconds: float) -> None:
        self.latency.record(method, seconds)

    def suspended(self, count: int) -> None:
        self.suspensions += count

    # -- the loop side ---------------------------------------------------------------------------

    def _take(self, gate: Any) -> None:
        for request, count in gate.take_export_requests(
            self.resource_bytes, self.scope_bytes, CHUNK_BYTES
        ):
            self.exporter.submit_spans(request, count)

    def flush(self) -> None:
        for gate in self._gates:
            self._take(gate)

    async def _flush_loop(self) -> None:
        """Every OTEL_BSP_SCHEDULE_DELAY, or as soon as a chunk's worth is waiting."""
        last = time.monotonic()
        last_metric = last
        tick = min(self.delay, 0.05)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last >= self.delay or any(g.span_bytes >= CHUNK_BYTES for g in self._gates):
                last = now
                self.flush()
            if now - last_metric >= self.metric_interval:
                last_metric = now
                self._send_latency()

    def _send_latency(self) -> None:
        if self.latency.counts:
            self.exporter.submit_metric(self.latency.encode_metric())

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Graceful stop: the last spans, the last metrics, then the exporters."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush()
        self._send_latency()
        await asyncio.get_running_loop().run_in_executor(None, self.exporter.close, timeout)
        if self._meter_provider is not None:
            provider = self._meter_provider
            failures = _ExportFailures()
            sdk_log = logging.getLogger(SDK_EXPORTER_LOGGER)
            sdk_log.addFilter(failures)
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: provider.shutdown(timeout_millis=timeout * 1000)
                )
            finally:
                sdk_log.removeFilter(failures)
            if failures.count:
                log.warning(
                    "the last metrics were not exported: the OTLP receiver at %s did not answer",
                    self.endpoint,
                )
        if self.exporter.dropped_spans:
            log.warning(
                "%d span(s) were dropped in this worker's life", self.exporter.dropped_spans
            )


def setup(worker: int) -> Telemetry | None:
    """This worker's telemetry, or None when tracing is not configured."""
    if not enabled():
        return None
    return Telemetry(worker)


__all__ = ["Telemetry", "enabled", "parse_traceparent", "setup", "trace_context"]
