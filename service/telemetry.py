"""OpenTelemetry for one worker: every lookup's span into the audit spool before its answer leaves,
lookup and suspension counters and an RPC latency histogram, configured by the standard OTEL_*
variables.

Why not the SDK's tracer: an SDK span costs 30-40 us here, more than a whole batch item. The gates
encode each lookup's OTLP span themselves (fastpath.trace), and after every call the worker writes
the gate's buffer to its spool directory with one write(2) (service.spool); the host's shipper
process (service.shipper) exports the spool. A receiver that is slow or down costs disk, never a
record and never a worker's time. Likewise the SDK's per-record metric calls cost 10-15 us: lookup
counts live in the gate (C counters, read by an SDK ObservableCounter callback), and latencies go to
a local fixed-bucket histogram exported as OTLP by a small background thread.
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
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import grpc

from fastpath import trace as tr
from service.spool import SpoolFull, SpoolSettings, SpoolWriter

log = logging.getLogger("covergate.telemetry")

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
CHUNK_BYTES = 3 << 20  # below the 4 MiB a collector accepts by default
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


def console_enabled() -> bool:
    return _env_flag(CONSOLE_FLAG) and not _env_flag("OTEL_SDK_DISABLED")


def schedule_delay() -> float:
    """OTEL_BSP_SCHEDULE_DELAY in seconds (default 1 s, so that harvesting shows within one)."""
    return max(_env_int("OTEL_BSP_SCHEDULE_DELAY", 1000), 1) / 1000


def export_timeout() -> float:
    return _env_int("OTEL_EXPORTER_OTLP_TIMEOUT", 10000) / 1000


def otlp_headers() -> tuple[tuple[str, str], ...]:
    raw = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or os.environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    out = []
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out.append((unquote(key.strip()).lower(), unquote(value.strip())))
    return tuple(out)


def otlp_channel(endpoint: str) -> grpc.Channel:
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


class MetricSender(threading.Thread):
    """Sends the latency metric (raw OTLP) off the event loop; one pending at most."""

    def __init__(self, resource: bytes, scope: bytes, endpoint: str) -> None:
        super().__init__(name="covergate-otlp-metrics", daemon=True)
        self._resource = resource
        self._scope = scope
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=2)
        self._timeout = export_timeout()
        self._headers = otlp_headers()
        self._channel = otlp_channel(endpoint) if endpoint else None
        if self._channel is not None:
            self._export_metrics = self._channel.unary_unary(METRICS_EXPORT)

    def submit_metric(self, metric: bytes) -> None:
        if self._channel is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(metric)

    def close(self, timeout: float) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self.join(timeout)
        if self._channel is not None:
            self._channel.close()

    def run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            request = export_metrics_request(self._resource, self._scope, data)
            try:
                self._export_metrics(request, timeout=self._timeout, metadata=self._headers)
            except grpc.RpcError as exc:
                log.warning("latency metrics not exported: %s", exc.code().name)


def print_spans(request: bytes) -> None:
    """The development console exporter: one JSON line per span on stderr."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    message = trace_service_pb2.ExportTraceServiceRequest.FromString(request)
    for resource_spans in message.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                d = MessageToDict(span)
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in d:
                        d[key] = getattr(span, _SNAKE[key]).hex()
                print(json.dumps(d, separators=(",", ":")), file=sys.stderr, flush=True)


def shutdown_meter_provider(provider: Any, timeout: float) -> None:
    """Export the last metrics and stop; with the receiver down, one warning of ours instead of
    the SDK's retry warnings and its ERROR line."""
    failures = _ExportFailures()
    # The filter stays: an export still retrying when the timeout ends logs "Shutdown in
    # progress, aborting retry" from its own thread after shutdown() returned (a process ends
    # after this, so nothing else of the exporter's is left to say).
    logging.getLogger(SDK_EXPORTER_LOGGER).addFilter(failures)
    with contextlib.suppress(Exception):
        provider.shutdown(timeout_millis=timeout * 1000)
    if failures.count:
        log.warning(
            "the last metrics were not exported: the OTLP receiver at %s did not answer",
            traces_endpoint(),
        )


def meter_provider(extra: Mapping[str, Any]) -> tuple[Any, Any]:
    """An SDK MeterProvider exporting over OTLP/gRPC (OTEL_* settings), and its meter."""
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    kwargs: dict[str, Any] = {}
    if urlparse(traces_endpoint()).scheme == "http":
        kwargs["insecure"] = True
    if not any(os.environ.get(v) for v in METRIC_TIMEOUT_VARIABLES):
        # The SDK retries a failed export with backoff (1 s, 2 s, 4 s) until its timeout: with
        # the receiver down, that held every SIGTERM for ~7 s. The counters are cumulative, so
        # an export given up costs nothing that the next one does not carry.
        kwargs["timeout"] = METRIC_EXPORT_TIMEOUT_SECONDS
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(**kwargs))
    resource = Resource.create(
        {"service.name": "covergate", "service.version": _version(), **extra}
    ).merge(OTELResourceDetector().detect())
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    return provider, provider.get_meter(tr.SCOPE_NAME, _version())


_SNAKE = {"traceId": "trace_id", "spanId": "span_id", "parentSpanId": "parent_span_id"}


# -- one worker's telemetry ------------------------------------------------------------------------


def _version() -> str:
    try:
        return metadata.version("covergate")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Telemetry:
    """Set up in a worker process (after fork/spawn), started on its event loop."""

    def __init__(self, worker: int, spool: SpoolSettings) -> None:
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
        self.metric_interval = max(_env_int("OTEL_METRIC_EXPORT_INTERVAL", 60000), 1) / 1000
        self.spool = SpoolWriter(spool, self.resource_bytes, self.scope_bytes)
        self.when_full = spool.when_full
        self.metrics = MetricSender(self.resource_bytes, self.scope_bytes, self.endpoint)
        self.latency = LatencyHistogram()
        self.suspensions = 0
        # Refused AUDIT_BACKLOG ("refuse"), or spans not kept ("drop"), since start.
        self.refused_for_backlog = 0
        self.dropped_spans = 0
        self._dropping_since = 0
        self._devnull = os.open(os.devnull, os.O_WRONLY)
        self._gates: list[Any] = []
        self._retired_counts = [0] * (tr.N_PROFESSIONS * tr.N_OUTCOMES)
        self._retired_anomalies = [0] * (tr.N_PROFESSIONS * len(tr.ANOMALY_SIGNALS))
        self._meter_provider: Any = None
        self._meter: Any = None
        self._task: asyncio.Task[None] | None = None

    # -- wiring ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the metrics (call on the worker's event loop)."""
        self.metrics.start()
        self._start_metrics()
        self._task = asyncio.get_running_loop().create_task(self._metric_loop())

    def _start_metrics(self) -> None:
        if not self.endpoint:
            return
        from opentelemetry.metrics import CallbackOptions, Observation

        self._meter_provider, meter = meter_provider(dict(self.resource.attributes))
        self._meter = meter

        def lookups(_options: CallbackOptions) -> Iterable[Observation]:
            counts = self.lookup_counts()
            for p, profession in enumerate(tr.PROFESSIONS):
                for o, outcome in enumerate(tr.OUTCOMES):
                    n = counts[p * tr.N_OUTCOMES + o]
                    if n:
                        kind = "covergate.decision" if o <= tr.O_NO_MATCH else "covergate.refusal"
                        yield Observation(
                            n, {"covergate.practitioner.profession": profession, kind: outcome}
                        )

        def anomalies(_options: CallbackOptions) -> Iterable[Observation]:
            counts = self.anomaly_counts()
            n_signals = len(tr.ANOMALY_SIGNALS)
            for p, profession in enumerate(tr.PROFESSIONS):
                for i, signal in enumerate(tr.ANOMALY_SIGNALS):
                    if counts[p * n_signals + i]:
                        yield Observation(
                            counts[p * n_signals + i],
                            {"covergate.practitioner.profession": profession,
                             "covergate.anomaly.signal": signal},
                        )  # fmt: skip

        def single(value: Any) -> Any:
            return lambda _options: [Observation(value())]

        meter.create_observable_counter(
            "covergate.anomalies",
            [anomalies],
            unit="{signal}",
            description="Baseline signals raised (once a practitioner-day each), by profession "
            "and signal",
        )
        meter.create_observable_counter(
            "covergate.lookups", [lookups], unit="{lookup}",
            description="Lookups by profession, and decision or refusal reason",
        )  # fmt: skip
        meter.create_observable_counter(
            "covergate.suspensions", [single(lambda: self.suspensions)], unit="{suspension}",
            description="Practitioners suspended by the harvest guard",
        )  # fmt: skip
        meter.create_observable_counter(
            "covergate.spool.spans_written", [single(lambda: self.spool.spans_written)],
            unit="{span}", description="Spans written to the audit spool",
        )  # fmt: skip
        meter.create_observable_gauge(
            "covergate.spool.pending_bytes", [single(lambda: self.spool.pending_bytes)],
            unit="By", description="Span bytes in the audit spool not yet acknowledged",
        )  # fmt: skip
        meter.create_observable_counter(
            "covergate.spool.refused", [single(lambda: self.refused_for_backlog)],
            unit="{call}", description="Calls refused AUDIT_BACKLOG: the audit spool was full",
        )  # fmt: skip
        meter.create_observable_counter(
            "covergate.spool.dropped", [single(lambda: self.dropped_spans)], unit="{span}",
            description='Spans not kept because the audit spool was full (when_full = "drop")',
        )  # fmt: skip

    def watch_cluster(self, agent: Any) -> None:
        """With [cluster]: whether the host runs degraded, and Redis calls against lookups."""
        if self._meter is None:
            return
        from opentelemetry.metrics import Observation

        def single(value: Any) -> Any:
            return lambda _options: [Observation(value())]

        self._meter.create_observable_gauge(
            "covergate.cluster.degraded", [single(lambda: int(agent.degraded))],
            description="1 while this host cannot reach the cluster's Redis",
        )  # fmt: skip
        self._meter.create_observable_counter(
            "covergate.cluster.redis_calls", [single(lambda: agent.backend.calls)],
            unit="{call}", description="Round trips to the cluster's Redis",
        )  # fmt: skip
        self._meter.create_observable_counter(
            "covergate.cluster.lookups_reported", [single(lambda: agent.lookups_reported)],
            unit="{lookup}", description="Lookups this worker reported to Redis",
        )  # fmt: skip

    def watch_snapshots(self, data_dir: Path) -> None:
        """The host's rights generations: the one served, and the copies refused by a check,
        by check (read from DIR/snapshots/, written by whoever fetched)."""
        if self._meter is None:
            return
        from opentelemetry.metrics import CallbackOptions, Observation

        from service import snapshots

        def refused(_options: CallbackOptions) -> Iterable[Observation]:
            counts = snapshots.refusals(data_dir).get("counts") or {}
            for check, n in sorted(counts.items()):
                yield Observation(int(n), {"covergate.snapshot.check": str(check)})

        def generation(_options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(snapshots.active(data_dir))

        self._meter.create_observable_counter(
            "covergate.snapshot.refused", [refused], unit="{copy}",
            description="Fetched rights generations refused by a check (size, hash, signature...)",
        )  # fmt: skip
        self._meter.create_observable_gauge(
            "covergate.snapshot.generation", [generation],
            description="The rights generation this host serves (0: its own store)",
        )  # fmt: skip

    def watch(self, gate: Any) -> None:
        """A gate whose spans and counts this worker records."""
        self._gates.append(gate)

    def retire(self, gate: Any) -> None:
        """A gate being replaced: record what it holds, keep its counts."""
        if gate in self._gates:
            self.record(gate)
            counts = gate.lookup_counts()
            self._retired_counts = [
                a + b for a, b in zip(self._retired_counts, counts, strict=True)
            ]
            self._retired_anomalies = [
                a + b for a, b in zip(self._retired_anomalies, gate.anomaly_counts(), strict=True)
            ]
            self._gates.remove(gate)

    def refused(self, profession: int, outcome: int) -> None:
        """A lookup refused before any gate saw it (a suspended practitioner's attempt...)."""
        self._retired_counts[profession * tr.N_OUTCOMES + outcome] += 1

    def lookup_counts(self) -> list[int]:
        counts = list(self._retired_counts)
        for gate in list(self._gates):
            counts = [a + b for a, b in zip(counts, gate.lookup_counts(), strict=True)]
        return counts

    def anomaly_counts(self) -> list[int]:
        """Baseline signals raised per [profession][signal], this worker's gates summed."""
        counts = list(self._retired_anomalies)
        for gate in list(self._gates):
            counts = [a + b for a, b in zip(counts, gate.anomaly_counts(), strict=True)]
        return counts

    def record_rpc(self, method: str, seconds: float) -> None:
        self.latency.record(method, seconds)

    def suspended(self, count: int) -> None:
        self.suspensions += count

    # -- the audit spool -------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether a new call may be decided: False when the spool is full and `when_full` is
        "refuse" (the caller then refuses AUDIT_BACKLOG)."""
        if self.when_full == "drop" or self.spool.has_room():
            return True
        self.refused_for_backlog += 1
        return False

    def record(self, gate: Any) -> None:
        """The spans `gate` recorded for the call about to be answered, into the spool. Raises
        SpoolFull when they cannot be kept (then the call must not be answered)."""
        if self.when_full == "drop" and not self._keep():
            _, count = gate.write_spans(self._devnull)
            self.dropped_spans += count
            return
        self.spool.write_gate(gate)

    def add_span(self, span: bytes) -> None:
        """One framed span encoded outside a gate (a refusal before any gate, a stream's span)."""
        if self.when_full == "drop" and not self._keep():
            self.dropped_spans += 1
            return
        self.spool.write(span, 1)

    def _keep(self) -> bool:
        """when_full = "drop": whether there is room; once there is again, the gap is recorded
        (a span with the number of spans that were not kept)."""
        if not self.spool.has_room():
            if not self._dropping_since:
                self._dropping_since = time.time_ns()
                log.error("the audit spool is full: spans are being DROPPED (when_full = drop)")
            return False
        if self._dropping_since:
            gap = tr.audit_gap_span(
                os.urandom(16), os.urandom(8), self._dropping_since, time.time_ns(),
                self.dropped_spans,
            )  # fmt: skip
            self._dropping_since = 0
            self.spool.write(gap, 1)
            log.warning("the audit spool has room again; %d span(s) dropped so far",
                        self.dropped_spans)  # fmt: skip
        return True

    # -- metrics ---------------------------------------------------------------------------------

    async def _metric_loop(self) -> None:
        while True:
            await asyncio.sleep(self.metric_interval)
            self._send_latency()

    def _send_latency(self) -> None:
        if self.latency.counts:
            self.metrics.submit_metric(self.latency.encode_metric())

    async def shutdown(self, timeout: float = 2.0) -> None:
        """Graceful stop: the last metrics; spans are already in the spool."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for gate in self._gates:
            with contextlib.suppress(SpoolFull):
                self.record(gate)
        self._send_latency()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.metrics.close, timeout)
        if self._meter_provider is not None:
            provider = self._meter_provider
            await loop.run_in_executor(None, shutdown_meter_provider, provider, timeout)
        self.spool.close()
        os.close(self._devnull)
        if self.dropped_spans:
            log.warning("%d span(s) were dropped in this worker's life", self.dropped_spans)


def spool_settings(data_dir: Path, config: Any) -> SpoolSettings:
    settings = config.telemetry
    root = Path(settings.spool_dir) if settings.spool_dir else Path(data_dir) / "spool"
    return SpoolSettings(
        root=root,
        max_bytes=settings.spool_max_bytes,
        when_full=settings.when_full,
        segment_bytes=settings.spool_segment_bytes,
    )


def setup(worker: int, data_dir: Path, config: Any) -> Telemetry | None:
    """This worker's telemetry, or None when tracing is not configured."""
    if not enabled():
        return None
    settings = spool_settings(data_dir, config)
    if settings.when_full == "drop" and worker == 0:
        log.warning(
            "[telemetry] when_full = drop: when the audit spool (%s, %d bytes) is full, lookups "
            "are answered WITHOUT their record (spans DROPPED, counted); the default refuses them",
            settings.root, settings.max_bytes,
        )  # fmt: skip
    return Telemetry(worker, settings)


__all__ = [
    "SpoolFull",
    "Telemetry",
    "enabled",
    "parse_traceparent",
    "setup",
    "spool_settings",
    "trace_context",
]
