"""The audit spool: every lookup's span on disk before its answer leaves the worker.

Each worker appends the spans of every call to its own directory under the spool root (one write(2)
per call, into the page cache: no fsync, so a killed worker loses nothing and the cost is a system
call), and the host's shipper process (service.shipper) exports them in order, deleting only what
the OTLP receiver acknowledged. A receiver that lags or is down for a while costs disk, not records;
when the spool reaches its size limit, new lookups are refused (`AUDIT_BACKLOG`) unless the operator
chose `when_full = "drop"`.

Layout (the anchors: the OpenTelemetry Collector's file_storage sending queue, Vector's and Fluent
Bit's disk buffers)::

    ROOT/w-<pid>-<hex start ns>/      one per worker process; `lock` is flock'ed while it lives
        000000000000.seg            segments: a header, then framed spans (ScopeSpans.spans
        000000000001.seg            entries: 0x12, varint length, Span), appended whole
        cursor                      "<segment> <offset>": what the receiver acknowledged
    ROOT/.shipper.lock              one shipper at a time

A segment's header is MAGIC, then the worker's encoded OTLP Resource and InstrumentationScope, each
as a u32 little-endian length and its bytes: a segment is self-describing, so what a dead worker
left is exported as that worker's, by whichever shipper comes next.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("covergate.spool")

MAGIC = b"CGSPOOL1"
SEGMENT_SUFFIX = ".seg"
CURSOR = "cursor"
LOCK = "lock"
SHIPPER_LOCK = ".shipper.lock"
_U32 = struct.Struct("<I")
RESCAN_SECONDS = 0.1  # a full spool looks again at most this often for what was shipped


class SpoolFull(Exception):
    """The spool is at its size limit (or the disk refused a write): the call is not answered."""


def segment_name(seq: int) -> str:
    return f"{seq:012d}{SEGMENT_SUFFIX}"


def segment_header(resource: bytes, scope: bytes) -> bytes:
    return MAGIC + _U32.pack(len(resource)) + resource + _U32.pack(len(scope)) + scope


def read_header(data: bytes) -> tuple[bytes, bytes, int] | None:
    """(resource, scope, header size) from a segment's first bytes; None when not a segment."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        return None
    pos = len(MAGIC)
    (size,) = _U32.unpack_from(data, pos)
    pos += 4
    resource = data[pos : pos + size]
    pos += size
    if len(resource) != size or len(data) < pos + 4:
        return None
    (size,) = _U32.unpack_from(data, pos)
    pos += 4
    scope = data[pos : pos + size]
    if len(scope) != size:
        return None
    return resource, scope, pos + size


def read_cursor(directory: Path) -> tuple[int, int]:
    """(segment, offset) acknowledged so far; (0, 0) when nothing was."""
    try:
        seq, offset = (directory / CURSOR).read_text().split()
        return int(seq), int(offset)
    except (OSError, ValueError):
        return 0, 0


def write_cursor(directory: Path, seq: int, offset: int) -> None:
    """Replace the cursor whole (write, then rename): a reader never sees half of one."""
    tmp = directory / f"{CURSOR}.tmp"
    tmp.write_text(f"{seq} {offset}\n")
    os.replace(tmp, directory / CURSOR)


def segments(directory: Path) -> list[int]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            name = entry.name
            if name.endswith(SEGMENT_SUFFIX) and name[: -len(SEGMENT_SUFFIX)].isdigit():
                out.append(int(name[: -len(SEGMENT_SUFFIX)]))
    return sorted(out)


def writer_dirs(root: Path) -> list[Path]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(Path(e.path) for e in os.scandir(root) if e.is_dir() and e.name[:2] == "w-")
    return []


def writer_alive(directory: Path) -> bool:
    """Whether the worker that owns `directory` still holds its lock."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def header_size(path: Path) -> int:
    """The size of a segment's header (0 when it has none yet)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            parsed = read_header(head)
            if parsed is None and head.startswith(MAGIC):
                parsed = read_header(head + f.read(1 << 20))
    except FileNotFoundError:
        return 0
    return parsed[2] if parsed is not None else 0


def pending_bytes(directory: Path) -> int:
    """Span bytes in `directory` not yet acknowledged."""
    acked_seq, acked_offset = read_cursor(directory)
    total = 0
    for seq in segments(directory):
        if seq < acked_seq:
            continue
        path = directory / segment_name(seq)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            continue
        start = max(header_size(path), acked_offset if seq == acked_seq else 0)
        total += max(0, size - start)
    return total


def spool_pending_bytes(root: Path) -> int:
    return sum(pending_bytes(d) for d in writer_dirs(root))


@dataclass(frozen=True)
class SpoolSettings:
    root: Path
    max_bytes: int
    when_full: str  # "refuse" or "drop"
    segment_bytes: int


class SpoolWriter:
    """One worker's side of the spool. Not thread-safe: used on the worker's event loop."""

    def __init__(self, settings: SpoolSettings, resource: bytes, scope: bytes) -> None:
        self.settings = settings
        self._header = segment_header(resource, scope)
        # Small spools get small segments, so that what was shipped is given back soon.
        self._segment_bytes = max(4096, min(settings.segment_bytes, settings.max_bytes // 8))
        settings.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(settings.root, 0o700)
        self.directory = settings.root / f"w-{os.getpid()}-{time.time_ns():x}"
        self.directory.mkdir(mode=0o700)
        self._lock_fd = os.open(self.directory / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._seq = -1
        self._fd = -1
        self._size = 0
        self._estimate = 0  # pending bytes in the whole spool, as of the last scan + own writes
        self._scanned_at = 0.0
        self.spans_written = 0
        self.bytes_written = 0
        self._rescan(time.monotonic())
        self._open_next()

    # -- writing ----------------------------------------------------------------------------------

    def _open_next(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._seq += 1
        final = self.directory / segment_name(self._seq)
        tmp = final.with_suffix(".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_APPEND | os.O_TRUNC, 0o600)
        os.write(fd, self._header)
        os.rename(tmp, final)  # the shipper never sees a segment without its whole header
        self._fd = fd
        self._size = len(self._header)

    def write_gate(self, gate: Any) -> None:
        """The spans a gate recorded since the last call, onto the spool (one write)."""
        if not gate.span_bytes:
            return
        before = self._size
        try:
            written, count = gate.write_spans(self._fd)
        except OSError as exc:
            self._undo(before)
            raise SpoolFull(f"the audit spool cannot be written: {exc.strerror}") from exc
        self._account(written, count)

    def write(self, spans: bytes, count: int) -> None:
        """Framed spans encoded outside a gate (refusals before any gate, with no data loaded)."""
        before = self._size
        view = memoryview(spans)
        done = 0
        try:
            while done < len(view):
                done += os.write(self._fd, view[done:])
        except OSError as exc:
            self._undo(before)
            raise SpoolFull(f"the audit spool cannot be written: {exc.strerror}") from exc
        self._account(done, count)

    def _undo(self, size: int) -> None:
        """A write that failed half-way must not leave half a span for the shipper."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, size)

    def _account(self, written: int, count: int) -> None:
        self._size += written
        self._estimate += written
        self.bytes_written += written
        self.spans_written += count
        if self._size >= self._segment_bytes:
            self._open_next()

    # -- room -------------------------------------------------------------------------------------

    def _rescan(self, now: float) -> None:
        self._estimate = spool_pending_bytes(self.settings.root)
        self._scanned_at = now

    def has_room(self) -> bool:
        """Whether the spool is below its size limit: a few arithmetic operations, and a scan of
        the spool (what the shipper acknowledged) at most every RESCAN_SECONDS once near it."""
        if self._estimate < self.settings.max_bytes:
            return True
        now = time.monotonic()
        if now - self._scanned_at >= RESCAN_SECONDS:
            self._rescan(now)
        return self._estimate < self.settings.max_bytes

    @property
    def pending_bytes(self) -> int:
        return self._estimate

    def close(self) -> None:
        """Stop writing; the shipper exports what is left and removes the directory."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


__all__ = [
    "SpoolFull",
    "SpoolSettings",
    "SpoolWriter",
    "read_cursor",
    "read_header",
    "segments",
    "spool_pending_bytes",
    "writer_alive",
    "writer_dirs",
]
