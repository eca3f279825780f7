"""covergate's hot path: one call decides one coverage request, a batch, or a stream message.

The Cython gate (`_gate_c`) is used when it is built; `_gate_py` is the pure-Python reference with
identical behaviour. COVERGATE_NO_EXTENSIONS=1 forces the reference; COVERGATE_REQUIRE_EXTENSIONS=1
makes a missing or broken extension a hard error instead of a silent fallback (CI, benchmarks).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastpath import baselines, rules
from fastpath.baselines import BaselineProfile
from fastpath.rules import Keys, Practitioner

__all__ = [
    "IMPLEMENTATION",
    "Gate",
    "Keys",
    "Practitioner",
    "batch_items",
    "complete_spans",
    "observe_baseline",
    "rights_records",
    "rules",
]


def _batch_items(request: bytes, limit: int) -> int:
    """rules.count_batch_items, -1 for None (the Cython module's batch_items)."""
    counted = rules.count_batch_items(request, limit) if type(request) is bytes else None
    return -1 if counted is None else counted


_NO_EXTENSIONS = os.environ.get("COVERGATE_NO_EXTENSIONS", "") not in ("", "0")
_REQUIRE_EXTENSIONS = os.environ.get("COVERGATE_REQUIRE_EXTENSIONS", "") not in ("", "0")


def _observe_baseline(
    buffer: bytearray, offset: int, profile: BaselineProfile, today: int, now_ms: int,
    domain: int, storage_key: bytes,
) -> tuple[int, tuple[int, ...], bool]:  # fmt: skip
    """fastpath.baselines.observe on a storage key, as the Cython module's observe_baseline."""
    seen = baselines.observe(buffer, offset, profile, today, now_ms, domain,
                             int.from_bytes(storage_key[8:16], "little"))  # fmt: skip
    return seen.fired, tuple(seen.scores), seen.suspend


if _NO_EXTENSIONS and _REQUIRE_EXTENSIONS:
    raise RuntimeError("COVERGATE_NO_EXTENSIONS and COVERGATE_REQUIRE_EXTENSIONS are both set")

# The compiled reader of rights files (service.importer.read_rights_records); None without the
# extension: service.importer's reference then reads every file.
rights_records: Callable[..., tuple[list[tuple[bytes, bytes]], int] | None] | None = None

if TYPE_CHECKING or _NO_EXTENSIONS:
    from fastpath._gate_py import IMPLEMENTATION, Gate
    from fastpath.trace import complete_spans

    batch_items = _batch_items
    observe_baseline = _observe_baseline
else:
    try:
        from fastpath._gate_c import (
            IMPLEMENTATION,
            Gate,
            batch_items,
            complete_spans,
            observe_baseline,
            rights_records,
        )
    except ImportError:
        if _REQUIRE_EXTENSIONS:
            raise
        from fastpath._gate_py import IMPLEMENTATION, Gate
        from fastpath.trace import complete_spans

        batch_items = _batch_items
        observe_baseline = _observe_baseline
        rights_records = None
