"""Several hosts, one baseline per practitioner ([cluster] with [baselines]): each host's sync
process publishes what its lookups taught it and merges what the other hosts published.

A host's baseline record (fastpath.baselines) sees only the lookups that host answers. Bloom
filters of the same size and generation merge exactly by bitwise OR, and a segment's generation
fixes its place (generation % FILTER_GENERATIONS), so the other hosts' bits of a generation this
record holds are ORed into it: a beneficiary seen on host A is a repeat on host B. Day counters
travel as each host's own totals for its record's Paris day, never as increments, like credit
totals (service.credit): the record's counters become its own plus the sum of the other hosts'
totals for the same day, so the gates' signals, and the fold into the smoothed baselines at the
day's end, count everything the practitioner did. A merge applied twice changes nothing.

What the other hosts added is kept per slot in DIR/quota/baseline-merged (beside the record,
under the same slot mutex; the gates never touch it), so a host can tell its own totals from the
merged ones after a restart. Redis holds, per practitioner, the hash `cg:{id}:b`: one field per
host (its publication) and `seq`, raised by every publication, so a host reads the hash again
only when another host published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpath import baselines
from fastpath.baselines import (
    FILTER_BYTES,
    FILTER_GENERATIONS,
    HEADER_SIZE,
    RECORD_HEAD,
    RECORD_SIZE,
    BaselineFile,
    BaselineState,
)
from fastpath.quota import QuotaFile, SlotFile

log = logging.getLogger("covergate.baselines")

MERGED_FILE = "baseline-merged"
KEY_TTL_SECONDS = 3 * 86400
_U32 = 0xFFFFFFFF

# A publication: version, the record's day, the host's own totals that day (lookups, new,
# off-hours lookups), the day's raised signals and care domains, the generation of each filter
# segment, then the segments (zlib: a practice's filters are mostly zeros).
PUBLICATION_VERSION = 1
_PUBLICATION = struct.Struct("<10I")
_PUBLICATION_FILTERS = FILTER_GENERATIONS * FILTER_BYTES

# A slot's entry in DIR/quota/baseline-merged: the record's day when the merge last ran, and the
# other hosts' totals for that day already included in the record's counters.
_MERGED = struct.Struct("<4I")
MERGED_MAGIC = b"CGBMRG01"


def baseline_key(practitioner_id: str) -> str:
    return f"cg:{{{practitioner_id}}}:b"


@dataclass(frozen=True)
class Counts:
    """A day's lookups, new beneficiaries and off-hours lookups (one host's, or several)."""

    lookups: int = 0
    new: int = 0
    off_hours: int = 0


@dataclass(frozen=True)
class Merged:
    """What the other hosts added to a record: their totals for `day` (0: nothing yet)."""

    day: int = 0
    others: Counts = Counts()


class MergedFile(SlotFile):
    """DIR/quota/baseline-merged: per slot, the other hosts' totals included in the record."""

    MAGIC = MERGED_MAGIC
    ENTRY = _MERGED.size
    WHAT = "merged baseline"

    def read(self, slot: int) -> Merged:
        day, lookups, new, off_hours = _MERGED.unpack_from(self.map, self.offset(slot))
        return Merged(day, Counts(lookups, new, off_hours))

    def write(self, slot: int, merged: Merged) -> None:
        c = merged.others
        _MERGED.pack_into(self.map, self.offset(slot), merged.day, c.lookups, c.new, c.off_hours)


def own_counts(s: BaselineState, merged: Merged) -> Counts:
    """The record's counters without what the other hosts added (theirs are of its day only)."""
    if merged.day != s.day:
        return Counts(s.lookups, s.new, s.off_hours)
    o = merged.others
    return Counts(max(s.lookups - o.lookups, 0), max(s.new - o.new, 0),
                  max(s.off_hours - o.off_hours, 0))  # fmt: skip


@dataclass(frozen=True)
class Publication:
    """One host's baseline of a practitioner, as published: its own totals for `day`, the day's
    raised signals and domains, and its filter segments with their generations."""

    day: int
    own: Counts
    fired: int
    domains: int
    generation: tuple[int, ...]
    filters: bytes

    def to_bytes(self) -> bytes:
        head = _PUBLICATION.pack(PUBLICATION_VERSION, self.day, self.own.lookups, self.own.new,
                                 self.own.off_hours, self.fired, self.domains,
                                 *self.generation)  # fmt: skip
        return head + zlib.compress(self.filters, 1)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Publication | None:
        """None for anything that is not a publication of this version (never an exception: a
        host must not stop merging over another's bytes)."""
        if len(raw) < _PUBLICATION.size:
            return None
        v = _PUBLICATION.unpack_from(raw)
        if v[0] != PUBLICATION_VERSION:
            return None
        try:
            filters = zlib.decompressobj().decompress(raw[_PUBLICATION.size :],
                                                      _PUBLICATION_FILTERS)  # fmt: skip
        except zlib.error:
            return None
        if len(filters) != _PUBLICATION_FILTERS:
            return None
        return cls(v[1], Counts(v[2], v[3], v[4]), v[5], v[6], tuple(v[7:10]), filters)

    def fingerprint(self) -> tuple[int, ...]:
        """What changes when this host's own lookups change the record (bits merged from the
        other hosts are theirs to publish)."""
        o = self.own
        return (self.day, o.lookups, o.new, o.off_hours, self.fired, self.domains,
                *self.generation)  # fmt: skip


def publication(buffer: Any, offset: int, merged: Merged) -> Publication:
    """The record at `offset` as this host publishes it (read under the slot's mutex)."""
    s = BaselineState.unpack(buffer, offset)
    start = offset + RECORD_HEAD
    return Publication(s.day, own_counts(s, merged), s.fired, s.domains, tuple(s.generation),
                       bytes(buffer[start : start + _PUBLICATION_FILTERS]))  # fmt: skip


def merge(buffer: Any, offset: int, merged: Merged, others: list[Publication]) -> Merged:
    """The other hosts' publications into the record at `offset` (under the slot's mutex); returns
    what the record now includes of theirs. Filters: each segment ORed with the others' segment
    of the same generation (another generation's bits are dropped). Counters: the record's own
    plus the sum of the others' totals for the record's day (another day's are not added), never
    below what was merged before that day (a host whose publication expired still counted).
    Idempotent: merging the same publications again changes no byte."""
    s = BaselineState.unpack(buffer, offset)
    if s.day == 0:
        return merged  # nothing ever recorded here: the first lookup starts the record
    base = offset + RECORD_HEAD
    for g in range(FILTER_GENERATIONS):
        mine = s.generation[g]
        parts = [p.filters[g * FILTER_BYTES : (g + 1) * FILTER_BYTES]
                 for p in others if mine and p.generation[g] == mine]  # fmt: skip
        if not parts:
            continue
        start = base + g * FILTER_BYTES
        bits = int.from_bytes(buffer[start : start + FILTER_BYTES], "little")
        for part in parts:
            bits |= int.from_bytes(part, "little")
        buffer[start : start + FILTER_BYTES] = bits.to_bytes(FILTER_BYTES, "little")
    own = own_counts(s, merged)
    today = [p for p in others if p.day == s.day]
    before = merged.others if merged.day == s.day else Counts()
    theirs = Counts(
        max(sum(p.own.lookups for p in today), before.lookups),
        max(sum(p.own.new for p in today), before.new),
        max(sum(p.own.off_hours for p in today), before.off_hours),
    )
    s.lookups = min(own.lookups + theirs.lookups, _U32)
    s.new = min(own.new + theirs.new, _U32)
    s.off_hours = min(own.off_hours + theirs.off_hours, _U32)
    for p in today:
        s.fired |= p.fired
        s.domains |= p.domains
    s.pack_into(buffer, offset)
    return Merged(s.day, theirs)


# -- the sync process's loop -------------------------------------------------------------------


class BaselineSync:
    """Per host, in the cluster sync process: every `interval`, the baselines of the slots this
    host used today or yesterday are published (those its own lookups changed since) and merged
    with what the other hosts published (when they did), in one or two pipelined round trips."""

    def __init__(self, data_dir: Path, backend: Any, practitioners: Callable[[], dict[int, str]],
                 interval: float) -> None:  # fmt: skip
        self.data_dir = Path(data_dir)
        self.backend = backend
        self._practitioners = practitioners  # slot: practitioner id, from this host's store
        self._ids: dict[int, str] = {}
        self.interval = interval
        self._published: dict[int, tuple[int, ...]] = {}  # slot: fingerprint in Redis
        self._seen_seq: dict[int, int] = {}  # slot: the seq of the publications last merged
        self._files: tuple[QuotaFile, BaselineFile, MergedFile] | None = None
        self.rounds = 0

    def _open(self) -> tuple[QuotaFile, BaselineFile, MergedFile] | None:
        from service.quotas import BASELINE_FILE, QUOTA_SUBDIR, quota_path

        path = self.data_dir / QUOTA_SUBDIR / BASELINE_FILE
        try:
            on_disk = (os.path.getsize(path) - HEADER_SIZE) // RECORD_SIZE
        except OSError:
            return None  # the server has not opened it yet (or keeps no baselines)
        if self._files is not None:
            if self._files[1].slots >= on_disk:
                return self._files
            self.close()  # grown for new practitioners: map it again
        base = BaselineFile(path, 0)
        quota = QuotaFile(quota_path(self.data_dir), base.slots)
        merged = MergedFile(self.data_dir / QUOTA_SUBDIR / MERGED_FILE, base.slots)
        self._files = (quota, base, merged)
        return self._files

    def close(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.close()
            self._files = None

    def _active(self, base: BaselineFile, today: int) -> list[int]:
        """Slots whose record holds today's or yesterday's lookups."""
        since = baselines.day_number(today) - 1
        day = struct.Struct("<I")
        return [slot for slot in range(base.slots)
                if (d := day.unpack_from(base.map, base.offset(slot))[0])
                and baselines.day_number(d) >= since]  # fmt: skip

    def _named(self, slots: list[int]) -> dict[int, str]:
        """The practitioner of each slot (the store read again when one is new to this loop)."""
        if any(slot not in self._ids for slot in slots):
            self._ids = self._practitioners()
            self._ids.update({slot: "" for slot in slots if slot not in self._ids})
        return {slot: self._ids[slot] for slot in slots if self._ids[slot]}

    @contextlib.contextmanager
    def _locked(self, quota: QuotaFile, slot: int) -> Any:
        quota.lock(slot)
        try:
            yield
        finally:
            quota.unlock(slot)

    async def run_once(self, today: int) -> int:
        """One round: returns how many records took other hosts' publications in."""
        files = self._open()
        if files is None:
            return 0
        quota, base, merged_file = files
        slots = self._named(self._active(base, today))
        if not slots:
            return 0
        publish: dict[int, Publication] = {}
        for slot in slots:
            with self._locked(quota, slot):
                p = publication(base.map, base.offset(slot), merged_file.read(slot))
            if self._published.get(slot) != p.fingerprint():
                publish[slot] = p
        host = self.backend.host
        order = list(slots)

        async def first() -> Any:
            pipe = self.backend.client.pipeline(transaction=False)
            for slot, p in publish.items():
                key = baseline_key(slots[slot])
                pipe.hset(key, host, p.to_bytes())
                pipe.hincrby(key, "seq", 1)
                pipe.expire(key, KEY_TTL_SECONDS)
            for slot in order:
                pipe.hget(baseline_key(slots[slot]), "seq")
            return await pipe.execute()

        replies = await self.backend._call(first)
        own_seq = {slot: int(replies[3 * i + 1]) for i, slot in enumerate(publish)}
        for slot, p in publish.items():
            self._published[slot] = p.fingerprint()
        current = replies[3 * len(publish) :]
        read = []
        for slot, seq in zip(order, current, strict=True):
            seq = int(seq or 0)
            seen = self._seen_seq.get(slot)
            if seen is not None and (seq == seen or (seq == own_seq.get(slot) == seen + 1)):
                self._seen_seq[slot] = seq  # nothing new, or only this host's own publication
                continue
            read.append(slot)
        self.rounds += 1
        if not read:
            return 0

        async def second() -> Any:
            pipe = self.backend.client.pipeline(transaction=False)
            for slot in read:
                pipe.hgetall(baseline_key(slots[slot]))
            return await pipe.execute()

        hashes = await self.backend._call(second)
        changed = 0
        for slot, fields in zip(read, hashes, strict=True):
            others: list[Publication] = []
            mine = False
            seq = 0
            for name, value in fields.items():
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name == "seq":
                    seq = int(value)
                elif name == host:
                    mine = True
                elif (theirs := Publication.from_bytes(bytes(value))) is not None:
                    others.append(theirs)
            if not mine:
                self._published.pop(slot, None)  # Redis lost it (or it expired): publish again
            self._seen_seq[slot] = seq
            if not others:
                continue
            with self._locked(quota, slot):
                before = merged_file.read(slot)
                after = merge(base.map, base.offset(slot), before, others)
                if after != before:
                    merged_file.write(slot, after)
            changed += 1
        return changed

    async def run(self, stop: asyncio.Event, today: Callable[[], int]) -> None:
        """Rounds every interval until `stop`; Redis failing only skips rounds (each host goes on
        judging from its own record)."""
        from service.cluster import BackendUnavailable

        while not stop.is_set():
            try:
                await self.run_once(today())
            except BackendUnavailable:
                pass
            except Exception:  # a merge must never take the sync process down
                log.exception("baseline merge failed; retrying at the next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        self.close()
