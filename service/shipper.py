"""The audit shipper: one process per host that exports the spool's spans over OTLP/gRPC, in order,
deleting only what the receiver acknowledged.

Workers only append to the spool (service.spool), so exporting costs them nothing and a slow or
absent receiver never blocks or drops a lookup's record. The shipper reads each worker's segments
from its cursor, cuts them at span boundaries into ExportTraceServiceRequests (the segment's own
Resource and InstrumentationScope around the spans, one copy), sends them, and moves the cursor on
an acknowledgement. It honours OTLP partial success (rejected spans are counted and logged, never
resent) and RetryInfo, and backs off exponentially otherwise. A segment whose writer is gone (a
worker killed, a previous run) is exported the same way, then removed.

Unlike the OTLP specification, which drops a batch on any non-retryable code, only
INVALID_ARGUMENT (the receiver will never accept those bytes) gives a batch up: an audit record is
not dropped because a collector's authentication is misconfigured for a while.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from fastpath import complete_spans
from fastpath import trace as tr
from service import spool as sp
from service import telemetry

log = logging.getLogger("covergate.shipper")

CHUNK_BYTES = 3 << 20  # below the 4 MiB a collector accepts by default
# A request is sent once this much is waiting, or once the oldest waiting span is
# OTEL_BSP_SCHEDULE_DELAY old: one export per few thousand spans, as the SDK's batch processor.
BATCH_BYTES = 512 << 10
POLL_SECONDS = 0.02
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0  # an audit trail catches up soon after the receiver is back

# glibc's malloc gives buffers of a chunk's size (the read, the request, gRPC's copy) their own
# mmap and unmaps them when freed, so every chunk faulted its pages in again: ~0.3 page faults
# per span, half the shipper's CPU. Serving them from the heap, kept between chunks, removes that.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest; well above CHUNK_BYTES
TRIM_THRESHOLD = 64 << 20


class Sender:
    """Sends one ExportTraceServiceRequest: returns the rejected span count, or raises
    grpc.RpcError."""

    def __init__(self) -> None:
        from service import telemetry

        self.endpoint = telemetry.traces_endpoint()
        self.console = telemetry.console_enabled()
        self._timeout = telemetry.export_timeout()
        self._headers = telemetry.otlp_headers()
        self._channel = telemetry.otlp_channel(self.endpoint) if self.endpoint else None
        self._export = self._channel.unary_unary(telemetry.TRACE_EXPORT) if self._channel else None

    def __call__(self, request: bytes, count: int) -> int:
        if self.console:
            from service.telemetry import print_spans

            print_spans(request)
        if self._export is None:
            return 0
        response = self._export(request, timeout=self._timeout, metadata=self._headers)
        return rejected_spans(response)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


def rejected_spans(response: bytes) -> int:
    """ExportTraceServiceResponse.partial_success.rejected_spans (0 when absent)."""
    if not response:
        return 0
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    message = trace_service_pb2.ExportTraceServiceResponse.FromString(response)
    if message.HasField("partial_success") and message.partial_success.rejected_spans:
        log.warning(
            "the OTLP receiver rejected %d span(s): %s",
            message.partial_success.rejected_spans,
            message.partial_success.error_message[:200],
        )
        return int(message.partial_success.rejected_spans)
    return 0


def retry_delay(error: grpc.RpcError) -> float | None:
    """The receiver's RetryInfo, when it sent one."""
    from google.rpc import error_details_pb2, status_pb2

    metadata: Any = getattr(error, "trailing_metadata", lambda: None)() or ()
    for key, value in metadata:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            with contextlib.suppress(Exception):
                for detail in status_pb2.Status.FromString(value).details:
                    if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                        info = error_details_pb2.RetryInfo()
                        detail.Unpack(info)
                        return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


class Stats:
    """What the shipper did, for its metrics and logs."""

    def __init__(self) -> None:
        self.exported = 0
        self.rejected = 0
        self.retries = 0
        self.torn_bytes = 0
        self.pending_bytes = 0


class WriterSpool:
    """One worker directory: its cursor, the segment being read."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seq, self.offset = sp.read_cursor(directory)
        self._fd = -1
        self._fd_seq = -1
        self._header: tuple[bytes, bytes, int] | None = None
        self.waiting_since = 0.0  # when spans were first seen waiting (0: none seen)

    def _open(self, seq: int) -> bool:
        if self._fd_seq == seq:
            return True
        self._close()
        try:
            self._fd = os.open(self.directory / sp.segment_name(seq), os.O_RDONLY)
        except FileNotFoundError:
            return False
        self._fd_seq = seq
        self._header = sp.read_header(os.pread(self._fd, 1 << 16, 0))
        return True

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._fd_seq, self._header = -1, -1, None

    def next_chunk(
        self, stats: Stats, delay: float = 0.0
    ) -> tuple[bytes, bytes, memoryview, int, int] | None:
        """(resource, scope, spans, count, end offset) of the next complete spans to send, or
        None when there is nothing to send now: nothing waiting, or less than BATCH_BYTES from a
        live worker for less than `delay` seconds. Finished segments are removed on the way."""
        while True:
            present = sp.segments(self.directory)
            if not present:
                return None
            if self.seq not in present:
                later = [s for s in present if s > self.seq]
                if not later:
                    return None
                self.seq, self.offset = later[0], 0
            if not self._open(self.seq):
                continue
            header = self._header
            if header is None:
                log.error("%s is not a spool segment; skipped", self.directory.name)
                self._finish_segment(stats, torn=True)
                continue
            resource, scope, header_size = header
            self.offset = max(self.offset, header_size)
            waiting = os.fstat(self._fd).st_size - self.offset
            if 0 < waiting < BATCH_BYTES and present[-1] == self.seq:
                now = time.monotonic()
                if not self.waiting_since:
                    self.waiting_since = now
                if now - self.waiting_since < delay and sp.writer_alive(self.directory):
                    return None  # a live worker's few spans: wait for more, up to `delay`
            data = os.pread(self._fd, CHUNK_BYTES, self.offset)
            try:
                end, count = complete_spans(data, CHUNK_BYTES)
            except ValueError:
                log.error("%s/%s holds something other than spans after offset %d; skipped",
                          self.directory.name, sp.segment_name(self.seq), self.offset)  # fmt: skip
                self._finish_segment(stats, torn=True)
                continue
            if count == 0 and len(data) >= CHUNK_BYTES:
                # One span larger than a chunk: read it whole.
                size = _first_span_size(data)
                if size:
                    data = os.pread(self._fd, size, self.offset)
                    end, count = complete_spans(data, size)
            if count:
                return resource, scope, memoryview(data)[:end], count, self.offset + end
            if present[-1] == self.seq and sp.writer_alive(self.directory):
                return None  # the worker is still writing this segment
            self._finish_segment(stats, torn=bool(data))

    def _finish_segment(self, stats: Stats, *, torn: bool) -> None:
        path = self.directory / sp.segment_name(self.seq)
        if torn:
            with contextlib.suppress(OSError):
                stats.torn_bytes += max(0, os.stat(path).st_size - self.offset)
            log.warning("%s/%s ends with a torn span (a worker killed mid-write); skipped",
                        self.directory.name, path.name)  # fmt: skip
        self._close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.seq, self.offset = self.seq + 1, 0
        sp.write_cursor(self.directory, self.seq, self.offset)

    def acknowledged(self, end: int) -> None:
        self.offset = end
        self.waiting_since = 0.0
        sp.write_cursor(self.directory, self.seq, end)

    def remove_if_done(self) -> bool:
        """A dead worker's directory with nothing left is removed."""
        if sp.segments(self.directory) or sp.writer_alive(self.directory):
            return False
        self._close()
        shutil.rmtree(self.directory, ignore_errors=True)
        return True


def _first_span_size(data: bytes) -> int:
    size = shift = 0
    for i in range(1, min(len(data), 11)):
        byte = data[i]
        size |= (byte & 0x7F) << shift
        if byte < 0x80:
            return i + 1 + size
        shift += 7
    return 0


class Shipper:
    """Exports a spool root's spans until stopped, then drains for at most `drain_seconds`."""

    def __init__(self, root: Path, send: Callable[[bytes, int], int], delay: float = 0.0) -> None:
        self.root = root
        self.send = send
        self.delay = delay
        self.stats = Stats()
        self._spools: dict[Path, WriterSpool] = {}
        self._backoff = 0.0
        self._next_try = 0.0
        self.stopping = False

    def step(self) -> bool:
        """One pass over the workers' directories; True when something was sent."""
        now = time.monotonic()
        if now < self._next_try:
            return False
        sent = False
        dirs = sp.writer_dirs(self.root)
        for gone in set(self._spools) - set(dirs):
            self._spools.pop(gone)._close()
        for directory in dirs:
            spool = self._spools.get(directory)
            if spool is None:
                spool = self._spools[directory] = WriterSpool(directory)
            chunk = spool.next_chunk(self.stats, 0.0 if self.stopping else self.delay)
            if chunk is None:
                if spool.remove_if_done():
                    self._spools.pop(directory)
                continue
            resource, scope, spans, count, end = chunk
            request = tr.export_trace_request(resource, scope, spans)
            try:
                rejected = self.send(request, count)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    log.error("the OTLP receiver refused %d span(s) as invalid; skipped", count)
                    self.stats.rejected += count
                    spool.acknowledged(end)
                    continue
                self._failed(exc)
                return sent
            self._backoff = 0.0
            self.stats.exported += count - rejected
            self.stats.rejected += rejected
            spool.acknowledged(end)
            sent = True
        return sent

    def _failed(self, exc: grpc.RpcError) -> None:
        self.stats.retries += 1
        delay = retry_delay(exc)
        if delay is None:
            self._backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff * 2))
            delay = self._backoff * random.uniform(0.8, 1.2)
        self._next_try = time.monotonic() + delay
        code = exc.code().name if hasattr(exc, "code") else type(exc).__name__
        if self.stats.retries == 1 or self.stats.retries % 50 == 0:
            log.warning(
                "the OTLP receiver answered %s; spans stay in the spool, retrying in %.1fs "
                "(%d retries so far)", code, delay, self.stats.retries,
            )  # fmt: skip

    def run(self, drain_seconds: float) -> None:
        deadline = None
        while True:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + drain_seconds
            sent = self.step()
            if deadline is not None and (time.monotonic() >= deadline or not sent):
                return
            if not sent:
                time.sleep(min(POLL_SECONDS, self.delay) if self.delay else POLL_SECONDS)

    def pending_bytes(self) -> int:
        self.stats.pending_bytes = sp.spool_pending_bytes(self.root)
        return self.stats.pending_bytes


def keep_chunk_memory() -> bool:
    """Have glibc keep freed chunk-sized buffers for the next chunk instead of unmapping them
    (mallopt); False where the C library has no mallopt (then nothing changes)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def _take_lock(root: Path) -> int:
    """One shipper per spool: wait for the lock (a previous shipper still draining)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / sp.SHIPPER_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def run(root: str, drain_seconds: float = 5.0) -> None:
    """The shipper process: export until SIGTERM/SIGINT, then drain what is left for at most
    `drain_seconds`; what is still unsent stays in the spool for the next start."""
    from service.server import configure_logging

    configure_logging()
    keep_chunk_memory()
    path = Path(root)
    lock = _take_lock(path)
    sender = Sender()
    from service.telemetry import schedule_delay

    shipper = Shipper(path, sender, schedule_delay())

    def stop(signum: int, frame: object) -> None:
        shipper.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    meters = _metrics(shipper)
    log.info("audit shipper exporting %s to %s", path,
             sender.endpoint or ("the console" if sender.console else "nowhere"))  # fmt: skip
    try:
        shipper.run(drain_seconds)
    finally:
        left = shipper.pending_bytes()
        if left:
            log.warning("%d byte(s) of spans stay in the spool for the next start", left)
        if meters is not None:
            telemetry.shutdown_meter_provider(meters, 1.0)
        sender.close()
        os.close(lock)


def _metrics(shipper: Shipper) -> Any:
    """The shipper's own counters over OTLP (exported, rejected, retried, pending)."""
    from service import telemetry

    if not telemetry.traces_endpoint():
        return None
    from opentelemetry.metrics import CallbackOptions, Observation

    provider, meter = telemetry.meter_provider({"covergate.component": "shipper"})

    def counter(name: str, value: Callable[[], int], unit: str, description: str) -> None:
        def observe(_options: CallbackOptions) -> list[Observation]:
            return [Observation(value())]

        meter.create_observable_counter(name, [observe], unit=unit, description=description)

    stats = shipper.stats
    counter("covergate.spool.exported", lambda: stats.exported, "{span}",
            "Spans the OTLP receiver acknowledged")  # fmt: skip
    counter("covergate.spool.rejected", lambda: stats.rejected, "{span}",
            "Spans the OTLP receiver rejected (partial success or INVALID_ARGUMENT)")  # fmt: skip
    counter("covergate.spool.retries", lambda: stats.retries, "{attempt}",
            "Export attempts that failed and will be retried")  # fmt: skip

    def pending(_options: CallbackOptions) -> list[Observation]:
        return [Observation(shipper.pending_bytes())]

    meter.create_observable_gauge(
        "covergate.spool.pending_bytes", [pending], unit="By",
        description="Span bytes in the spool not yet acknowledged",
    )  # fmt: skip
    return provider


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m service.shipper", description=__doc__)
    parser.add_argument("spool", help="the spool root (DIR/spool by default)")
    parser.add_argument("--drain-seconds", type=float, default=5.0)
    args = parser.parse_args()
    run(args.spool, args.drain_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
