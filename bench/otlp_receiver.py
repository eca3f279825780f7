"""A real OTLP/gRPC receiver (opentelemetry-proto's TraceService and MetricsService) that records
the raw export requests: the tests' and the benchmarks' stand-in for a collector, Jaeger or Tempo.

`python -m bench.otlp_receiver [--port N] [--keep]` prints `otlp receiver serving on 127.0.0.1:PORT`
and counts (or, with --keep, also keeps) what it receives until SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"
_TRACE_OK = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
_METRICS_OK = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()


class OtlpReceiver:
    """OTLP/gRPC on 127.0.0.1:<port> (0: a free one). Requests are kept as raw bytes (`keep`), so
    a test can search exactly what left the server; counts are always kept."""

    def __init__(self, port: int = 0, *, keep: bool = True, max_message_bytes: int = 64 << 20):
        self.keep = keep
        self.trace_requests: list[bytes] = []
        self.metric_requests: list[bytes] = []
        self.trace_bytes = 0
        self.trace_calls = 0
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
        for service, methods in handlers.items():
            self._server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, methods),)
            )
        # grpc.health.v1 too, so the bench starts it like any server it waits for.
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _traces(self, request: bytes, context: Any) -> bytes:
        with self._lock:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep requests (memory grows)")
    args = parser.parse_args(argv)
    receiver = OtlpReceiver(args.port, keep=args.keep).start()
    print(f"otlp receiver serving on 127.0.0.1:{receiver.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    receiver.stop()
    print(
        f"otlp receiver: {receiver.trace_calls} trace exports ({receiver.trace_bytes} bytes), "
        f"{receiver.metric_calls} metric exports",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
