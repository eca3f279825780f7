"""The audit shipper's process settings (its export path is tested over real servers and receivers
in test_audit_spool.py and test_telemetry.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service import shipper

# Allocate and free chunk-sized buffers as the shipper does for every chunk (the bytes read, the
# request, gRPC's copy of it), and print the minor page faults the second pass costs.
_CHURN = """
import resource, sys
from service import shipper
if sys.argv[1] == "kept":
    assert shipper.keep_chunk_memory()
def chunks():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        read, request, copy = (bytearray(shipper.CHUNK_BYTES) for _ in range(3))  # zero-filled
        del read, request, copy
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
chunks()
print(chunks())
"""


def _faults(side: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, side], check=True, capture_output=True, text=True
    ).stdout
    return int(out)


def test_chunk_buffers_are_kept_between_chunks_instead_of_faulted_in_again() -> None:
    if not shipper.keep_chunk_memory():
        pytest.skip("this C library has no mallopt")
    pages_per_chunk = shipper.CHUNK_BYTES // 4096
    default, kept = _faults("default"), _faults("kept")
    # glibc gives back the freed buffers (trims its heap, or unmaps them), so each new chunk
    # faults all its pages in again...
    assert default >= 40 * pages_per_chunk
    # ...unless the shipper has told it to keep them: then the pages are reused as they are.
    assert kept < pages_per_chunk
